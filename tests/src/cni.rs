//! Driving a CNI plugin as a container runtime does (environment, configuration on stdin,
//! JSON on stdout, exit code), inside a node namespace: `ferry-cni`, or the reference
//! `ptp` plugin with `host-local` IPAM from Debian's containernetworking-plugins.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use crate::netns::Netns;

/// Where Debian's reference plugins live.
pub const REFERENCE_DIR: &str = "/usr/lib/cni";

#[derive(Clone, Debug)]
pub struct Plugin {
    pub name: &'static str,
    binary: PathBuf,
    ferry: bool,
}

/// One invocation's outcome.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub ok: bool,
    /// stdout as JSON (Null when empty).
    pub out: Value,
    pub took: Duration,
}

impl Outcome {
    /// The error code, when the plugin failed.
    pub fn code(&self) -> Option<u64> {
        self.out["code"].as_u64()
    }
}

impl Plugin {
    pub fn ferry() -> Result<Plugin> {
        Ok(Plugin {
            name: "ferry-cni",
            binary: crate::bin_path("ferry-cni")?,
            ferry: true,
        })
    }

    /// `ptp` + `host-local`; fails with what to install when they are missing.
    pub fn reference() -> Result<Plugin> {
        let binary = Path::new(REFERENCE_DIR).join("ptp");
        anyhow::ensure!(
            binary.exists() && Path::new(REFERENCE_DIR).join("host-local").exists(),
            "{REFERENCE_DIR}/ptp and host-local are missing: `cargo xtask setup` installs containernetworking-plugins"
        );
        Ok(Plugin {
            name: "ptp + host-local",
            binary,
            ferry: false,
        })
    }

    /// Another reference plugin by name (e.g. `portmap` for chaining).
    pub fn named(name: &'static str) -> Result<Plugin> {
        let binary = Path::new(REFERENCE_DIR).join(name);
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: `cargo xtask setup` installs containernetworking-plugins",
            binary.display()
        );
        Ok(Plugin {
            name,
            binary,
            ferry: false,
        })
    }

    /// A network configuration for `cidr`, allocations kept under `data_dir`.
    pub fn conf(&self, version: &str, cidr: &str, data_dir: &Path) -> Value {
        if self.ferry {
            json!({"cniVersion": version, "name": "ferry", "type": "ferry-cni",
                   "podCIDR": cidr, "mtu": 1400, "dataDir": data_dir,
                   "bpfDir": data_dir.join("no-datapath")})
        } else {
            json!({"cniVersion": version, "name": "ferry", "type": "ptp", "mtu": 1400,
                   "ipam": {"type": "host-local", "subnet": cidr, "dataDir": data_dir,
                            "routes": [{"dst": "0.0.0.0/0"}]}})
        }
    }

    /// Runs the plugin in `node` with `env` (CNI_PATH is set) and `stdin`.
    pub fn run(&self, node: &Netns, env: &[(&str, &str)], stdin: &str) -> Result<Outcome> {
        let mut cmd = Command::new(&self.binary);
        cmd.env_clear()
            .env("CNI_PATH", REFERENCE_DIR)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = node.spawn(&mut cmd)?;
        // A plugin that fails before reading its configuration (a missing CNI_COMMAND, say)
        // closes stdin early; like a runtime, take its exit code and output instead.
        match child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin.as_bytes())
        {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.context("writing the configuration to the plugin's stdin")?,
        }
        let out = child.wait_with_output()?;
        let took = start.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        let json = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .with_context(|| format!("{}: stdout is not JSON: {text}", self.name))?
        };
        Ok(Outcome {
            ok: out.status.success(),
            out: json,
            took,
        })
    }

    /// A per-container command (ADD, DEL, CHECK) for interface eth0.
    pub fn call(
        &self,
        node: &Netns,
        command: &str,
        container: &str,
        pod: Option<&Netns>,
        conf: &Value,
    ) -> Result<Outcome> {
        let netns = pod.map(|p| p.path()).unwrap_or_default();
        let mut env = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
            ),
        ];
        if pod.is_some() {
            env.push(("CNI_NETNS", &netns));
        }
        self.run(node, &env, &conf.to_string())
    }
}

/// The pod address of an ADD result.
pub fn result_address(result: &Value) -> Option<std::net::Ipv4Addr> {
    result["ips"][0]["address"]
        .as_str()?
        .split('/')
        .next()?
        .parse()
        .ok()
}
