//! containerd for the tests: a directory layout of its own per test, and a guard that leaves
//! nothing behind however the test ends: every sandbox is stopped and removed through CRI,
//! then containerd (whoever started it), the CNI plugins it was running, its shims and its
//! mounts go, then the directories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::procs::{kill_matching, unmount_below};
use ferry_testbed::{bin_path, Netns, Topology, NODE_IP};
use kubelet::containerd::{self, Layout};
use kubelet::cri::{v1 as cri, Cri};
use serde_json::{json, Value};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Where `cargo xtask images` put the image archives.
pub fn images_dir() -> PathBuf {
    std::env::var_os("FERRY_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"))
}

/// A containerd layout under fresh directories, cleaned on drop.
pub struct RuntimeDirs {
    pub layout: Layout,
    pub data: PathBuf,
    pub run: PathBuf,
    cleaned: bool,
}

impl RuntimeDirs {
    pub fn new() -> RuntimeDirs {
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let data = std::env::temp_dir().join(format!("ferry-ctd-{id}"));
        let run = PathBuf::from(format!("/run/ferry-ctd-{id}"));
        RuntimeDirs {
            layout: Layout::under(&data, &run),
            data,
            run,
            cleaned: false,
        }
    }

    /// IPAM allocations ferry-cni holds (its data directory is `<data>/ipam`).
    pub fn allocations(&self) -> usize {
        std::fs::read_dir(self.data.join("ipam/ferry"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .parse::<std::net::Ipv4Addr>()
                            .is_ok()
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    pub fn cleanup(&mut self) {
        if std::mem::replace(&mut self.cleaned, true) {
            return;
        }
        // On a thread of its own: the caller may be inside a runtime (a benchmark's main).
        let socket = self.layout.socket.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async {
                let remove_all = async {
                    let Ok(mut cri) = Cri::connect(&socket).await else {
                        return;
                    };
                    for s in cri.sandboxes().await.unwrap_or_default() {
                        let _ = cri.stop_sandbox(&s.id).await;
                        let _ = cri.remove_sandbox(&s.id).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(30), remove_all).await;
            });
        })
        .join();
        let config = self.layout.config_path().display().to_string();
        kill_matching(|c| c.starts_with("containerd") && c.contains(&config), true);
        // CNI plugins containerd had running (a sandbox being created when it went) would
        // otherwise recreate their state under `data` after it is removed.
        let plugins = self.layout.cni_bin_dir.display().to_string();
        kill_matching(|c| c.starts_with(&plugins), true);
        let socket = self.layout.socket.display().to_string();
        kill_matching(
            |c| c.contains("containerd-shim") && c.contains(&socket),
            false,
        );
        unmount_below(&[&self.data, &self.run]);
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

impl Drop for RuntimeDirs {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// containerd started by the test in `node`, with ferry-cni (plus `ferry_cni`'s fields) as
/// its network and Ferry's pause and echo images imported.
pub struct Runtime {
    pub tokio: tokio::runtime::Runtime,
    pub cri: Cri,
    child: Child,
    pub dirs: RuntimeDirs,
}

impl Runtime {
    pub fn start(node: &Netns, ferry_cni: Value) -> Result<Runtime> {
        let dirs = RuntimeDirs::new();
        let mut cni = ferry_cni;
        cni["dataDir"] = json!(dirs.data.join("ipam"));
        dirs.layout.install_cni(
            &bin_path("ferry-cni")?,
            Path::new("/usr/lib/cni"),
            &containerd::conflist(cni),
        )?;
        let mut cmd = dirs.layout.prepare()?;
        let log = std::fs::File::create(dirs.run.join("containerd.log"))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let tokio = tokio::runtime::Runtime::new()?;
        let child = node.spawn(&mut cmd)?;
        // `dirs` cleans up (containerd included) if anything below fails.
        let cri = tokio.block_on(containerd::wait_ready(
            &dirs.layout.socket,
            Duration::from_secs(20),
        ))?;
        for image in ["pause.tar", "echo.tar"] {
            dirs.layout
                .import_image(&images_dir().join(image))
                .context("importing Ferry's images (`cargo xtask images` builds them)")?;
        }
        Ok(Runtime {
            tokio,
            cri,
            child,
            dirs,
        })
    }

    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.tokio.block_on(f)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.dirs.cleanup();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ferry-kubelet, killed on drop; its log is printed when the test failed.
pub struct Kubelet {
    child: Child,
    log: std::path::PathBuf,
}

impl Kubelet {
    /// ferry-kubelet for node-a in `t`'s node namespace (it starts containerd in `dirs` and
    /// imports Ferry's images), with the node's kubeconfig from `cp`.
    pub fn start(t: &Topology, cp: &ControlPlane, dirs: &RuntimeDirs, pod_cidr: &str) -> Kubelet {
        Self::start_with(t, cp, dirs, pod_cidr, &[])
    }

    /// Like `start`, with more flags.
    pub fn start_with(
        t: &Topology,
        cp: &ControlPlane,
        dirs: &RuntimeDirs,
        pod_cidr: &str,
        extra: &[&str],
    ) -> Kubelet {
        std::fs::create_dir_all(&dirs.run).unwrap();
        let log = dirs.run.join("kubelet.log");
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin_path("ferry-kubelet").unwrap());
        cmd.arg("--kubeconfig")
            .arg(cp.kubeconfig("node-node-a"))
            .args(["--node-name", "node-a", "--node-ip", &NODE_IP.to_string()])
            .args(["--pod-cidr", pod_cidr])
            .arg("--data-dir")
            .arg(&dirs.data)
            .arg("--run-dir")
            .arg(&dirs.run)
            .arg("--images")
            .arg(images_dir())
            .arg("--cni-plugin")
            .arg(bin_path("ferry-cni").unwrap())
            .arg("--bpf-dir")
            .arg(&t.bpf_dir)
            .args(extra)
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        let child = t.node.spawn(&mut cmd).expect("ferry-kubelet");
        Kubelet { child, log }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- ferry-kubelet log (last lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A pod sandbox for pod `name` in `namespace`, its logs under `data`/logs.
pub fn sandbox_config(name: &str, namespace: &str, data: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{namespace}-{name}"),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: data
            .join("logs")
            .join(namespace)
            .join(name)
            .display()
            .to_string(),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

/// Ferry's echo image as a container (it answers on 8080 with the pod's host name).
pub fn echo_container() -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "echo".into(),
            attempt: 0,
        }),
        image: Some(kubelet::cri::image_spec("ferry.local/echo:1")),
        log_path: "echo/0.log".into(),
        ..Default::default()
    }
}
