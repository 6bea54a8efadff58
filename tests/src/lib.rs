//! Ferry's test bed: a node network namespace, pods as namespaces wired to it with veth pairs,
//! an outside client, echo servers, and a guard that removes all of it on drop, even when a
//! test fails.
//!
//! ```text
//!  ext (192.168.77.2) --eth0|ext0-- node (192.168.77.1, ip_forward) --vethN|eth0-- pod N (10.244.1.N)
//! ```
//! Pods reach everything through 169.254.1.1, which every host-side veth owns (the Calico
//! layout); the node routes each pod's /32 to its veth. ferry-proxy runs in the node namespace.

pub mod bench;
pub mod cni;
pub mod controlplane;
pub mod echo;
pub mod netns;
pub mod packet;
pub mod procs;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context as _, Result};

pub use netns::{in_netns, Netns};

/// The node's address on the outside link, where NodePorts are reached.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const ECHO_PORT: u16 = 8080;

pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1 + (i / 200) as u8, 10 + (i % 200) as u8)
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &str) -> Result<()> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>()).map(|_| ())
}

/// Where the workspace's binaries are: next to the running test or xtask binary.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let var = format!(
        "FERRY_{}_BIN",
        name.trim_start_matches("ferry-").to_uppercase()
    );
    if let Ok(p) = std::env::var(&var) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found near {}; build the workspace first (`cargo xtask test` does) or set {var}", exe.display())
}

pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Host-side interface, in the node namespace.
    pub veth: String,
}

/// A test cluster; everything it created goes away on drop.
pub struct Topology {
    pub prefix: String,
    pub node: Netns,
    pub ext: Netns,
    pub pods: Vec<Pod>,
    children: Vec<Child>,
    pub bpf_dir: PathBuf,
    /// `--conntrack-gc-interval` of the proxies this topology starts (seconds).
    pub conntrack_gc_interval: f64,
    /// Pods whose echo server is started (the first n).
    echo_servers: usize,
    /// `--bpf-host-routing` of the proxies this topology starts.
    pub host_routing: bool,
    /// More `--interfaces` globs for the proxies this topology starts (e.g. `fy*` for pods
    /// wired by ferry-cni).
    pub extra_interfaces: Vec<String>,
    /// `--node-name` of the proxies this topology starts.
    pub node_name: String,
    /// The cgroup the socket programs of this topology's proxies serve (`enable_socket_lb`);
    /// `None`: they run with `--socket-lb=false`, so the tc programs carry every flow and no
    /// test's socket programs see another test's processes.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// More flags for the proxies this topology starts (e.g. `--dns-addr`).
    pub proxy_args: Vec<String>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// What every live topology created, so a signal can still remove it (`clean_up_on_signal`).
struct Live {
    prefix: String,
    pids: Vec<u32>,
    bpf_dir: PathBuf,
    cgroup: Option<PathBuf>,
}

static LIVE: std::sync::Mutex<Vec<Live>> = std::sync::Mutex::new(Vec::new());
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// For long-running tools (benchmarks): on SIGINT or SIGTERM, kill what the live topologies
/// started, delete their namespaces and pinned objects, and exit, instead of leaking them.
pub fn clean_up_on_signal() {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::thread::spawn(|| loop {
        if SIGNALLED.load(Ordering::SeqCst) {
            let live = LIVE
                .lock()
                .map(|l| {
                    l.iter()
                        .map(|x| {
                            (
                                x.prefix.clone(),
                                x.pids.clone(),
                                x.bpf_dir.clone(),
                                x.cgroup.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            for (prefix, pids, bpf_dir, cgroup) in live {
                eprintln!("interrupted: removing test bed {prefix}");
                for pid in pids {
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                let names = run("ip", &["netns", "list"]).unwrap_or_default();
                for name in names.lines().filter_map(|l| l.split_whitespace().next()) {
                    if name.starts_with(&format!("{prefix}-")) {
                        let _ = run("ip", &["netns", "del", name]);
                    }
                }
                let _ = std::fs::remove_dir_all(bpf_dir);
                if let Some(cg) = cgroup {
                    remove_cgroup(&cg);
                }
            }
            std::process::exit(130);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    });
}

impl Topology {
    /// A node, an outside client and `pods` pods.
    pub fn new(pods: usize) -> Result<Self> {
        let prefix = format!(
            "fy{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        Self::with_prefix(&prefix, pods)
    }

    /// Like `new`, with namespaces named `<prefix>-node`, `<prefix>-ext`, `<prefix>-p<i>`.
    pub fn with_prefix(prefix: &str, pods: usize) -> Result<Self> {
        if let Ok(mut live) = LIVE.lock() {
            live.push(Live {
                prefix: prefix.to_string(),
                pids: Vec::new(),
                bpf_dir: PathBuf::from(format!("/sys/fs/bpf/ferry-test-{prefix}")),
                cgroup: None,
            });
        }
        let node = Netns::create(&format!("{prefix}-node"))?;
        let ext = Netns::create(&format!("{prefix}-ext"));
        let mut t = Topology {
            bpf_dir: PathBuf::from(format!("/sys/fs/bpf/ferry-test-{prefix}")),
            prefix: prefix.to_string(),
            node,
            ext: Netns::placeholder(),
            pods: Vec::new(),
            children: Vec::new(),
            conntrack_gc_interval: 1.0,
            echo_servers: 0,
            host_routing: true,
            extra_interfaces: Vec::new(),
            node_name: "node-a".into(),
            socket_lb_cgroup: None,
            proxy_args: Vec::new(),
        };
        t.ext = ext?;
        let n = t.node.name.clone();
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            t.node.sysctl(k, v)?;
        }
        let e = t.ext.name.clone();
        ip(&format!(
            "link add ext0 netns {n} type veth peer name eth0 netns {e}"
        ))?;
        ip(&format!("-n {n} addr add {NODE_IP}/24 dev ext0"))?;
        ip(&format!("-n {n} link set ext0 up"))?;
        ip(&format!("-n {e} addr add {EXT_IP}/24 dev eth0"))?;
        ip(&format!("-n {e} link set eth0 up"))?;
        ip(&format!("-n {e} route add default via {NODE_IP}"))?;
        for i in 0..pods {
            t.add_pod(&format!("pod{i}"))?;
        }
        Ok(t)
    }

    /// Adds a pod: namespace, veth pair, addresses, routes.
    pub fn add_pod(&mut self, name: &str) -> Result<&Pod> {
        let i = self.pods.len();
        let ns = Netns::create(&format!("{}-p{i}", self.prefix))?;
        let (n, p) = (self.node.name.clone(), ns.name.clone());
        let addr = pod_ip(i);
        let veth = format!("veth{i}");
        ip(&format!(
            "link add {veth} netns {n} type veth peer name eth0 netns {p}"
        ))?;
        ip(&format!("-n {n} addr add {POD_GATEWAY}/32 dev {veth}"))?;
        ip(&format!("-n {n} link set {veth} up"))?;
        ip(&format!("-n {n} route add {addr}/32 dev {veth} scope link"))?;
        ip(&format!("-n {p} addr add {addr}/32 dev eth0"))?;
        ip(&format!("-n {p} link set eth0 up"))?;
        ip(&format!(
            "-n {p} route add {POD_GATEWAY} dev eth0 scope link"
        ))?;
        ip(&format!(
            "-n {p} route add default via {POD_GATEWAY} dev eth0"
        ))?;
        self.pods.push(Pod {
            name: name.into(),
            ns,
            ip: addr,
            veth,
        });
        Ok(self.pods.last().unwrap())
    }

    /// Gives pod `i` one more address (routed to it by the node), e.g. a fresh client address.
    pub fn add_pod_address(&self, i: usize, addr: Ipv4Addr) -> Result<()> {
        let p = &self.pods[i];
        ip(&format!("-n {} addr add {addr}/32 dev eth0", p.ns.name))?;
        ip(&format!(
            "-n {} route add {addr}/32 dev {} scope link",
            self.node.name, p.veth
        ))
    }

    /// Starts a process inside a namespace; it is killed when the topology is dropped.
    pub fn spawn(&mut self, ns: &Netns, cmd: &mut Command) -> Result<u32> {
        let child = ns.spawn(cmd)?;
        let pid = child.id();
        if let Ok(mut live) = LIVE.lock() {
            if let Some(l) = live.iter_mut().find(|l| l.prefix == self.prefix) {
                l.pids.push(pid);
            }
        }
        self.children.push(child);
        Ok(pid)
    }

    /// Starts `ferry-echo` in every pod: TCP and UDP on `ECHO_PORT`, answering with its name.
    /// Pods added later get theirs on the next call.
    pub fn start_echo_servers(&mut self) -> Result<()> {
        let bin = bin_path("ferry-echo")?;
        let first = self.echo_servers;
        self.echo_servers = self.pods.len();
        for i in first..self.pods.len() {
            let ns = self.pods[i].ns.clone();
            let name = self.pods[i].name.clone();
            let mut cmd = Command::new(&bin);
            cmd.args(["--name", &name, "--port", &ECHO_PORT.to_string()])
                .stdout(Stdio::null());
            self.spawn(&ns, &mut cmd)?;
        }
        for p in &self.pods[first..] {
            let addr = (p.ip, ECHO_PORT);
            echo::wait_listening(&p.ns, addr.into())?;
        }
        Ok(())
    }

    /// Turns connect-time load balancing on for the proxies this topology starts, scoped to a
    /// cgroup of its own: only processes started with `in_cgroup` are served by the socket
    /// programs (the rest of the machine, other tests included, is not).
    pub fn enable_socket_lb(&mut self) -> Result<PathBuf> {
        let root = cgroup2_root()?;
        let cg = root.join(format!("ferry-test-{}", self.prefix));
        std::fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
        if let Ok(mut live) = LIVE.lock() {
            if let Some(l) = live.iter_mut().find(|l| l.prefix == self.prefix) {
                l.cgroup = Some(cg.clone());
            }
        }
        self.socket_lb_cgroup = Some(cg.clone());
        Ok(cg)
    }

    /// Turns connect-time load balancing off again for the proxies started from now on (the
    /// running ones must be stopped first: their processes leave the cgroup, which goes).
    pub fn disable_socket_lb(&mut self) {
        if let Some(cg) = self.socket_lb_cgroup.take() {
            remove_cgroup(&cg);
        }
        if let Ok(mut live) = LIVE.lock() {
            if let Some(l) = live.iter_mut().find(|l| l.prefix == self.prefix) {
                l.cgroup = None;
            }
        }
    }

    /// Puts a client command where connect-time load balancing serves it when it is on (the
    /// socket-LB cgroup), and leaves it alone otherwise.
    pub fn client_cgroup(&self, cmd: &mut Command) -> Result<()> {
        match self.socket_lb_cgroup {
            Some(_) => self.in_cgroup(cmd),
            None => Ok(()),
        }
    }

    /// Makes `cmd` start inside this topology's socket-LB cgroup (see `enable_socket_lb`).
    pub fn in_cgroup(&self, cmd: &mut Command) -> Result<()> {
        let cg = self
            .socket_lb_cgroup
            .as_ref()
            .context("enable_socket_lb() first")?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cg.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", cg.display()))?;
        unsafe {
            // Only a write(2) after fork: "0" moves the writing process.
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Sends a signal to a process this topology started, and reaps it.
    pub fn stop(&mut self, pid: u32, signal: i32) -> Result<()> {
        let Some(pos) = self.children.iter().position(|c| c.id() == pid) else {
            bail!("no child {pid}");
        };
        let mut c = self.children.remove(pos);
        unsafe { libc::kill(pid as i32, signal) };
        c.wait()?;
        Ok(())
    }
}

/// The root of the cgroup v2 hierarchy: /sys/fs/cgroup/unified on a hybrid layout (this
/// machine's), /sys/fs/cgroup on a unified one.
pub fn cgroup2_root() -> Result<PathBuf> {
    for dir in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let dir = PathBuf::from(dir);
        if dir.join("cgroup.controllers").exists() {
            return Ok(dir);
        }
    }
    bail!("no cgroup v2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup")
}

/// Removes a test's cgroup once its processes are gone (they may take a moment to leave).
fn remove_cgroup(cg: &std::path::Path) {
    for _ in 0..100 {
        if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("warning: cgroup {} could not be removed", cg.display());
}

impl Topology {
    pub fn proxy_log(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}-proxy.log", self.prefix))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let log = self.proxy_log();
        if std::thread::panicking() {
            if let Ok(text) = std::fs::read_to_string(&log) {
                eprintln!(
                    "--- ferry-proxy log ({}) ---\n{text}--- end of log ---",
                    log.display()
                );
            }
        }
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("{}-services.yaml", self.prefix)),
        );
        for c in &mut self.children {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
        // Deleting the namespaces removes their veths; unpinning links detaches the programs.
        for p in &self.pods {
            p.ns.delete();
        }
        self.ext.delete();
        self.node.delete();
        let _ = std::fs::remove_dir_all(&self.bpf_dir);
        if let Some(cg) = &self.socket_lb_cgroup {
            remove_cgroup(cg);
        }
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|l| l.prefix != self.prefix);
        }
    }
}

/// A `ferry-proxy` running in the node namespace of a topology.
pub struct Proxy {
    pub pid: u32,
    pub services_file: PathBuf,
    node: Netns,
}

impl Topology {
    /// Writes `yaml` and starts `ferry-proxy` on every pod veth and the outside link, then waits
    /// until it is healthy (first sync done).
    pub fn start_proxy(&mut self, yaml: &str) -> Result<Proxy> {
        let file = std::env::temp_dir().join(format!("{}-services.yaml", self.prefix));
        std::fs::write(&file, yaml)?;
        self.start_proxy_from(&["--services", file.to_str().unwrap()], file.clone())
    }

    /// Starts `ferry-proxy` fed from the API server of `kubeconfig` (reachable from the node
    /// namespace) and waits for its first sync.
    pub fn start_proxy_api(&mut self, kubeconfig: &std::path::Path) -> Result<Proxy> {
        self.start_proxy_from(
            &["--kubeconfig", kubeconfig.to_str().unwrap()],
            PathBuf::new(),
        )
    }

    fn start_proxy_from(&mut self, source: &[&str], file: PathBuf) -> Result<Proxy> {
        let mut cmd = Command::new(bin_path("ferry-proxy")?);
        cmd.args(source)
            .args(["--interfaces", "veth*", "--interfaces", "ext0"])
            .args(
                self.extra_interfaces
                    .iter()
                    .flat_map(|g| ["--interfaces", g.as_str()]),
            )
            .args([
                "--node-name",
                &self.node_name,
                "--node-ip",
                &NODE_IP.to_string(),
            ])
            .args(match &self.socket_lb_cgroup {
                Some(cg) => vec!["--socket-lb-cgroup".to_string(), cg.display().to_string()],
                None => vec!["--socket-lb=false".to_string()],
            })
            .args([
                "--bpf-dir",
                self.bpf_dir.to_str().unwrap(),
                "--conntrack-gc-interval",
                &self.conntrack_gc_interval.to_string(),
                "--bpf-host-routing",
                &self.host_routing.to_string(),
            ])
            .args(&self.proxy_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "info,netlink_packet_route=error".into()),
            );
        // The daemon's log goes to a file, shown when the test fails (see `Drop`).
        let log = self.proxy_log();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdout(f.try_clone()?).stderr(f);
        let node = self.node.clone();
        let pid = self.spawn(&node, &mut cmd)?;
        let p = Proxy {
            pid,
            services_file: file,
            node,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.sync_counts().map(|c| c.0).unwrap_or(0) < 1 {
            if Instant::now() > deadline {
                bail!("ferry-proxy did not finish its first sync within 20 s (see its log above)");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }
}

use std::time::{Duration, Instant};

impl Proxy {
    /// The daemon's /metrics, fetched from inside the node namespace.
    pub fn metrics(&self) -> Result<String> {
        in_netns(&self.node, || -> Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(
                &"127.0.0.1:10249".parse().unwrap(),
                Duration::from_secs(1),
            )?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })?
    }

    /// Sum of every sample of a metric (all label sets).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics()?;
        Ok(text
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// `(syncs, sync errors)` from the daemon's /healthz (cheap: no datapath reads).
    pub fn sync_counts(&self) -> Result<(u64, u64)> {
        let body = in_netns(&self.node, || -> Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(
                &"127.0.0.1:10256".parse().unwrap(),
                Duration::from_secs(1),
            )?;
            s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
        let json = body.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(json).with_context(|| format!("healthz answered {body:?}"))?;
        Ok((
            v["syncs"].as_u64().unwrap_or(0),
            v["syncErrors"].as_u64().unwrap_or(0),
        ))
    }

    /// Replaces the services file and waits until the daemon has handled it (applied or
    /// rejected). Returns true when it was applied.
    pub fn update(&self, yaml: &str) -> Result<bool> {
        self.update_timed(yaml).map(|(applied, _)| applied)
    }

    /// `update`, also returning the time from the file's replacement to the daemon's answer.
    pub fn update_timed(&self, yaml: &str) -> Result<(bool, Duration)> {
        self.stage(yaml)?;
        self.apply_staged()
    }

    /// Writes `yaml` beside the services file, for `apply_staged` to put in place (so a
    /// measurement can leave the writing of a large file out, as kube-proxy's rule files are
    /// written before their clock starts).
    pub fn stage(&self, yaml: &str) -> Result<()> {
        std::fs::write(self.services_file.with_extension("tmp"), yaml)?;
        Ok(())
    }

    /// Replaces the services file with the staged one and waits for the daemon's answer, as
    /// `update_timed`.
    pub fn apply_staged(&self) -> Result<(bool, Duration)> {
        let before = self.sync_counts()?;
        let start = Instant::now();
        self.put_staged()?;
        self.answer(before, start)
    }

    /// Puts the staged file in place and returns at once; `answer` then waits for the daemon
    /// (a measurement that decides its end by other means, such as a prober, keeps the
    /// `/healthz` polling out of its window).
    pub fn put_staged(&self) -> Result<()> {
        let tmp = self.services_file.with_extension("tmp");
        std::fs::rename(&tmp, &self.services_file)?;
        Ok(())
    }

    /// Waits until the daemon has taken the input put in place at `start` (counts as they were
    /// before it): `true` when it synced, `false` when it refused it.
    pub fn answer(&self, before: (u64, u64), start: Instant) -> Result<(bool, Duration)> {
        let deadline = start + Duration::from_secs(60);
        loop {
            let now = self.sync_counts()?;
            if now.0 > before.0 {
                return Ok((true, start.elapsed()));
            }
            if now.1 > before.1 {
                return Ok((false, start.elapsed()));
            }
            if Instant::now() > deadline {
                bail!("ferry-proxy did not pick up the new services file within 60 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Builds Service and EndpointSlice YAML for tests and demos.
pub mod yaml {
    use std::net::Ipv4Addr;

    pub struct Endpoint {
        pub ip: Ipv4Addr,
        pub node: &'static str,
        pub ready: bool,
        pub terminating: bool,
    }

    impl Endpoint {
        pub fn ready(ip: Ipv4Addr) -> Self {
            Self {
                ip,
                node: "node-a",
                ready: true,
                terminating: false,
            }
        }
    }

    /// A Service with one TCP port `http` (and optionally one UDP port `dns`) targeting 8080,
    /// plus its EndpointSlice. `extra_spec` lines are inserted under `spec:` (2-space indent).
    pub fn service(
        name: &str,
        vip: Ipv4Addr,
        tcp_port: u16,
        udp_port: Option<u16>,
        node_port: Option<u16>,
        extra_spec: &str,
        eps: &[Endpoint],
    ) -> String {
        let mut ports = format!(
            "  - name: http\n    port: {tcp_port}\n    targetPort: 8080\n    protocol: TCP\n"
        );
        if let Some(np) = node_port {
            ports.push_str(&format!("    nodePort: {np}\n"));
        }
        if let Some(u) = udp_port {
            ports.push_str(&format!(
                "  - name: dns\n    port: {u}\n    targetPort: 8080\n    protocol: UDP\n"
            ));
        }
        let ty = if node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let mut s = format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {ty}\n  clusterIP: {vip}\n{extra_spec}  ports:\n{ports}"
        );
        s.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abc\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - name: http\n    port: 8080\n    protocol: TCP\n"
        ));
        if udp_port.is_some() {
            s.push_str("  - name: dns\n    port: 8080\n    protocol: UDP\n");
        }
        s.push_str(if eps.is_empty() {
            "endpoints: []\n"
        } else {
            "endpoints:\n"
        });
        for e in eps {
            s.push_str(&format!(
                "  - addresses: [\"{}\"]\n    nodeName: {}\n    conditions: {{ready: {}, serving: true, terminating: {}}}\n",
                e.ip, e.node, e.ready, e.terminating
            ));
        }
        s
    }
}
