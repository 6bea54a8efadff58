//! A `ferry-controlplane` for tests: its own state directory, a free loopback port, killed
//! and removed on drop. kubectl runs against it with its own cache directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::bin_path;

pub struct ControlPlane {
    child: Option<Child>,
    /// The network namespace it runs in (None: the test's own).
    netns: Option<String>,
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
    args: Vec<String>,
    /// The address it listens on (loopback unless started with `start_reachable`).
    bind_ip: String,
}

/// A free loopback port below the kernel's ephemeral range (32768 and up): a server that is
/// restarted on the same port must not find it taken by a client's outgoing connection (or a
/// client retrying against it connected to itself).
fn free_port() -> Result<u16> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..200 {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20000 + ((std::process::id().wrapping_mul(7919) + n * 131) % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found in 20000-31999")
}

/// The started process is killed when the test that started it goes, even on a panic.
fn die_with_test(cmd: &mut Command) {
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A fresh directory under the system's temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "ferry-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

impl ControlPlane {
    /// Starts a control plane with `extra` flags (e.g. `--etcd-servers`, `--token-auth-file`).
    pub fn start(extra: &[&str]) -> Result<Self> {
        Self::start_in(None, extra)
    }

    /// Starts a control plane inside network namespace `netns` (its loopback), so daemons
    /// started in that namespace reach it; kubectl runs there too.
    pub fn start_in(netns: Option<&str>, extra: &[&str]) -> Result<Self> {
        Self::start_with(netns, "127.0.0.1", extra)
    }

    /// Starts a control plane inside `netns` listening on all its addresses and advertising
    /// `advertise` (the `kubernetes` Service's endpoint), so pods reach it as in-cluster
    /// clients do; kubeconfigs still name loopback.
    pub fn start_reachable(
        netns: &str,
        advertise: std::net::Ipv4Addr,
        extra: &[&str],
    ) -> Result<Self> {
        let advertise = advertise.to_string();
        let mut args = vec!["--advertise-address", &advertise];
        args.extend(extra);
        Self::start_with(Some(netns), "0.0.0.0", &args)
    }

    fn start_with(netns: Option<&str>, bind_ip: &str, extra: &[&str]) -> Result<Self> {
        let dir = temp_dir("cp");
        std::fs::create_dir_all(&dir)?;
        let mut cp = ControlPlane {
            child: None,
            netns: netns.map(String::from),
            dir,
            port: free_port()?,
            url: String::new(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            bind_ip: bind_ip.to_string(),
        };
        cp.spawn()?;
        Ok(cp)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = bin_path("ferry-controlplane")?;
        let bind = format!("{}:{}", self.bind_ip, self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("controlplane.log"))?;
        let mut cmd = self.command(&bin.to_string_lossy());
        cmd.arg("--data-dir")
            .arg(&self.dir)
            .args(["--bind-address", &bind])
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(log);
        die_with_test(&mut cmd);
        let mut child = cmd.spawn().context("starting ferry-controlplane")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        self.child = Some(child);
        let line = rx.recv_timeout(Duration::from_secs(30)).with_context(|| {
            format!(
                "ferry-controlplane did not start; see {}",
                self.log_path().display()
            )
        })?;
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("https://"))
            .with_context(|| format!("unexpected first line: {line}"))?
            .trim_end_matches(';')
            .to_string();
        self.port = url.rsplit(':').next().unwrap_or_default().parse()?;
        self.url = url;
        Ok(())
    }

    /// Another process of the control plane's binary (e.g. `controller-manager`), in the same
    /// network namespace, killed when the returned guard drops.
    pub fn spawn_component(&self, args: &[&str]) -> Result<Component> {
        let bin = bin_path("ferry-controlplane")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", args[0])))?;
        let mut cmd = self.command(&bin.to_string_lossy());
        cmd.args(args).stdout(log.try_clone()?).stderr(log);
        die_with_test(&mut cmd);
        Ok(Component(
            cmd.spawn().context("starting a control plane component")?,
        ))
    }

    /// The controller manager (with `cm_flags`) and the scheduler, each with its own
    /// kubeconfig, as `spawn_component` starts them.
    pub fn spawn_controllers(&self, cm_flags: &[&str]) -> Result<[Component; 2]> {
        let cm = self.kubeconfig("controller-manager");
        let mut args = vec!["controller-manager", "--kubeconfig", cm.to_str().unwrap()];
        args.extend(cm_flags);
        let sched = self.kubeconfig("scheduler");
        Ok([
            self.spawn_component(&args)?,
            self.spawn_component(&["scheduler", "--kubeconfig", sched.to_str().unwrap()])?,
        ])
    }

    /// The server's resident memory, from /proc.
    pub fn rss_mib(&self) -> f64 {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("controlplane.log")
    }

    pub fn kubeconfig(&self, who: &str) -> PathBuf {
        self.dir.join(format!("{who}.kubeconfig"))
    }

    /// Kills the server with SIGKILL (no chance to flush anything).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and state.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// kubectl as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig("admin"), args, None)
    }

    /// `program`, run in the control plane's network namespace.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        self.kubectl_env(kubeconfig, &[], args, stdin)
    }

    /// kubectl with `env` set (e.g. `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`).
    pub fn kubectl_env(
        &self,
        kubeconfig: &Path,
        env: &[(&str, &str)],
        args: &[&str],
        stdin: Option<&str>,
    ) -> Output {
        let mut cmd = self.command("kubectl");
        cmd.envs(env.iter().copied())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kube-cache"))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl is installed");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().expect("kubectl ran")
    }

    /// kubectl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args);
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A process started by `spawn_component`, killed on drop.
pub struct Component(Child);

impl Drop for Component {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("control plane log kept at {}", self.log_path().display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The Python with the `kubernetes` client that `cargo xtask setup` installs.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("FERRY_PYTHON") {
        return p.into();
    }
    PathBuf::from(PYTHON_VENV).join("bin/python")
}

/// Where `cargo xtask setup` makes the virtual environment for the Python client tests.
pub const PYTHON_VENV: &str = "/var/lib/ferry/python";
