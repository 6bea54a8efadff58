//! containerd on a Ferry node: its configuration under Ferry's own directories (cgroupfs,
//! overlayfs, CNI naming `ferry-cni`, `restrict_oom_score_adj`), the CNI network list it
//! reads, starting it when it does not answer, and importing locally built images.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::cri::Cri;

/// The namespace CRI keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Where one containerd instance keeps everything.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Persistent: content store, snapshots (`root` in containerd's terms).
    pub root: PathBuf,
    /// Runtime state: sockets, task state (`state`).
    pub state: PathBuf,
    pub socket: PathBuf,
    /// The CNI plugins containerd may run (links to `ferry-cni` and the reference plugins).
    pub cni_bin_dir: PathBuf,
    /// The CNI network list containerd uses (the first file in name order).
    pub cni_conf_dir: PathBuf,
    /// The pause image every pod sandbox runs.
    pub sandbox_image: String,
    /// containerd's registry host configuration (`config_path`): a directory per registry
    /// (`<host>[:<port>]/hosts.toml`: its CA, mirrors, `skip_verify`), read at each pull.
    pub registry_hosts_dir: PathBuf,
}

/// The pause image `cargo xtask images` builds.
pub const PAUSE_IMAGE: &str = "ferry.local/pause:1";

impl Layout {
    /// The layout below a persistent directory (`/var/lib/ferry`) and a runtime directory
    /// (`/run/ferry`).
    pub fn under(data_dir: &Path, run_dir: &Path) -> Layout {
        let state = run_dir.join("containerd");
        Layout {
            root: data_dir.join("containerd"),
            socket: state.join("containerd.sock"),
            state,
            cni_bin_dir: data_dir.join("cni/bin"),
            cni_conf_dir: data_dir.join("cni/net.d"),
            sandbox_image: PAUSE_IMAGE.into(),
            registry_hosts_dir: data_dir.join("containerd/certs.d"),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.state.join("config.toml")
    }

    /// containerd's configuration (version 2, as containerd 1.6 reads it).
    pub fn config_toml(&self) -> String {
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        format!(
            r#"# Written by Ferry; containerd started by Ferry reads it.
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{socket}"

[{cri}]
  sandbox_image = "{pause}"
  # Containers may not ask for an oom_score_adj below containerd's own (needed where
  # containerd itself runs with a raised score, as on this project's machines).
  restrict_oom_score_adj = true
  enable_unprivileged_ports = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [{cri}.registry]
    config_path = "{hosts}"
"#,
            root = self.root.display(),
            state = self.state.display(),
            socket = self.socket.display(),
            pause = self.sandbox_image,
            cni_bin = self.cni_bin_dir.display(),
            cni_conf = self.cni_conf_dir.display(),
            hosts = self.registry_hosts_dir.display(),
        )
    }

    /// Writes the configuration and returns the command that starts containerd with it (the
    /// caller chooses where its output goes and, in tests, its network namespace).
    pub fn prepare(&self) -> Result<Command> {
        for dir in [
            &self.root,
            &self.state,
            &self.cni_bin_dir,
            &self.cni_conf_dir,
            &self.registry_hosts_dir,
        ] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let config = self.config_path();
        std::fs::write(&config, self.config_toml())
            .with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config).stdin(Stdio::null());
        Ok(cmd)
    }

    /// Links the CNI plugins containerd may run into `cni_bin_dir`: `ferry-cni` and the
    /// reference plugins from `reference_dir` (Debian's /usr/lib/cni), and writes `conflist`
    /// as the network list.
    pub fn install_cni(
        &self,
        ferry_cni: &Path,
        reference_dir: &Path,
        conflist: &Value,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.cni_bin_dir)?;
        std::fs::create_dir_all(&self.cni_conf_dir)?;
        let mut links = vec![("ferry-cni".to_string(), ferry_cni.to_path_buf())];
        if let Ok(dir) = std::fs::read_dir(reference_dir) {
            for e in dir.flatten() {
                links.push((e.file_name().to_string_lossy().into_owned(), e.path()));
            }
        }
        for (name, target) in links {
            let link = self.cni_bin_dir.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
        }
        let path = self.cni_conf_dir.join("10-ferry.conflist");
        std::fs::write(&path, serde_json::to_vec_pretty(conflist)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Imports an OCI image archive (`cargo xtask images` makes them) into CRI's namespace.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", CRI_NAMESPACE, "images", "import"])
            .arg(archive)
            .output()
            .context("running ctr (Debian's containerd package; `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!(
                "importing {} into containerd at {}: {}",
                archive.display(),
                self.socket.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Ferry's CNI network list: `ferry-cni` first, then `portmap` for hostPorts (containerd
/// passes `portMappings` as runtimeConfig to the plugins that declare the capability).
/// `ferry` holds ferry-cni's own fields (podCIDR or kubeconfig + nodeName, dataDir, bpfDir).
pub fn conflist(ferry: Value) -> Value {
    let mut first = json!({"type": "ferry-cni"});
    if let (Some(obj), Some(extra)) = (first.as_object_mut(), ferry.as_object()) {
        obj.extend(extra.clone());
    }
    json!({
        "cniVersion": "1.0.0",
        "name": "ferry",
        "plugins": [
            first,
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
        ],
    })
}

/// Waits until the runtime at `socket` answers CRI calls (containerd loads its plugins first).
pub async fn wait_ready(socket: &Path, timeout: Duration) -> Result<Cri> {
    let start = Instant::now();
    loop {
        match Cri::connect(socket).await {
            Ok(cri) => return Ok(cri),
            Err(e) if start.elapsed() > timeout => {
                return Err(e)
                    .with_context(|| format!("containerd did not answer within {timeout:?}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_layout() {
        let l = Layout::under(Path::new("/var/lib/ferry"), Path::new("/run/ferry"));
        let c = l.config_toml();
        assert!(c.contains(r#"address = "/run/ferry/containerd/containerd.sock""#));
        assert!(c.contains(r#"root = "/var/lib/ferry/containerd""#));
        assert!(c.contains(r#"bin_dir = "/var/lib/ferry/cni/bin""#));
        assert!(c.contains("restrict_oom_score_adj = true"));
        assert!(c.contains("SystemdCgroup = false"));
        assert!(c.contains(PAUSE_IMAGE));
    }

    #[test]
    fn conflist_puts_ferry_first_and_portmap_after() {
        let c = conflist(json!({"podCIDR": "10.244.0.0/24"}));
        assert_eq!(c["plugins"][0]["type"], "ferry-cni");
        assert_eq!(c["plugins"][0]["podCIDR"], "10.244.0.0/24");
        assert_eq!(c["plugins"][1]["type"], "portmap");
        assert_eq!(c["plugins"][1]["capabilities"]["portMappings"], true);
    }
}
