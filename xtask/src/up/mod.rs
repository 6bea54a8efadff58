//! `cargo xtask up`: a working single-node cluster in the foreground.
//!
//! ```text
//!  host (kubectl, curl) 192.168.77.2 --ferry0|ext0-- node namespace "ferry-node" 192.168.77.1
//!                                                     control plane :6443, controller-manager,
//!                                                     scheduler, ferry-proxy, ferry-kubelet,
//!                                                     containerd; pods on fy* links (10.244.0.0/24)
//! ```
//! The node lives in its own network namespace so the cluster's links, routes and eBPF
//! programs never touch the host's; the host reaches the API server, NodePorts, ClusterIPs and
//! pods over one veth pair, with routes for the Service and pod ranges and the node-local DNS
//! address. Ctrl-C removes every pod, stops every process and removes the namespace, links,
//! routes and pins. The control plane's state stays under /var/lib/ferry/up/controlplane (delete
//! it for a fresh cluster).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ferry_testbed::procs::{kill_matching, unmount_below};
use ferry_testbed::{run, Netns};

mod daemons;
mod smoke;

use daemons::{lock, start_daemon, supervise_one, Daemon, RESTART_BACKOFF};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const NODE: &str = "ferry";
const NETNS: &str = "ferry-node";
const NODE_IP: &str = "192.168.77.1";
const HOST_IP: &str = "192.168.77.2";
const HOST_LINK: &str = "ferry0";
const POD_CIDR: &str = "10.244.0.0/24";
/// The Service and pod ranges, and the node-local DNS address: the node's socket programs act on
/// the host's processes too (they share the cgroup hierarchy), and send the host's queries to
/// the cluster DNS address there.
const HOST_ROUTES: &[&str] = &["10.96.0.0/12", "10.244.0.0/16", "169.254.20.10/32"];
const DATA: &str = "/var/lib/ferry/up";
const RUN: &str = "/run/ferry";
const BPF_DIR: &str = "/sys/fs/bpf/ferry";
/// The node-local address ferry-proxy answers DNS on, and the cluster DNS Service's address
/// (the tenth of the default service range, where the control plane puts kube-dns).
const NODE_DNS: &str = "169.254.20.10";
const CLUSTER_DNS: &str = "10.96.0.10";

/// Everything `up` started; dropping it tears the cluster down in order.
struct Cluster {
    node: Option<Netns>,
    /// In start order; stopped in reverse. Shared with the supervisor thread.
    daemons: Arc<Mutex<Vec<Daemon>>>,
    supervisor: Option<std::thread::JoinHandle<()>>,
    /// Tells the supervisor to stop restarting (the cluster is being torn down).
    stopping: Arc<AtomicBool>,
}

impl Cluster {
    fn spawn(&mut self, name: &'static str, bin: &Path, args: &[&str]) -> Result<()> {
        let node = self.node.as_ref().context("no node namespace")?;
        let log = Path::new(DATA).join("logs").join(format!("{name}.log"));
        // A fresh log per `up`; restarts within it append.
        let _ = std::fs::remove_file(&log);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = start_daemon(node, name, bin, &args)?;
        lock(&self.daemons).push(Daemon {
            name,
            bin: bin.to_path_buf(),
            args,
            child: Some(child),
            started: Instant::now(),
            restarts: 0,
            restart_at: None,
            backoff: RESTART_BACKOFF,
        });
        Ok(())
    }

    /// From here on, a daemon that exits is started again (with back-off), never the cluster
    /// torn down.
    fn supervise(&mut self) -> Result<()> {
        let node = self.node.clone().context("no node namespace")?;
        let (daemons, stopping) = (self.daemons.clone(), self.stopping.clone());
        self.supervisor = Some(std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                for d in lock(&daemons).iter_mut() {
                    supervise_one(&node, d);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
        Ok(())
    }

    /// The pid of daemon `name` and how often it was restarted (None while it is down).
    fn daemon(&self, name: &str) -> Option<(u32, u32)> {
        lock(&self.daemons)
            .iter()
            .find(|d| d.name == name)
            .and_then(|d| Some((d.child.as_ref()?.id(), d.restarts)))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        eprintln!("[up] stopping: pods, then the node's daemons, then the control plane");
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        let mut daemons = std::mem::take(&mut *lock(&self.daemons));
        while let Some(d) = daemons.pop() {
            let Some(mut child) = d.child else { continue };
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            // The kubelet removes every pod sandbox before it exits.
            let patience = if d.name == "ferry-kubelet" { 60 } else { 10 };
            let deadline = Instant::now() + Duration::from_secs(patience);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let config = Path::new(RUN).join("containerd/config.toml");
        let config = config.display().to_string();
        kill_matching(
            |c| c.starts_with("containerd ") && c.contains(&config),
            true,
        );
        kill_matching(|c| c.contains("containerd-shim") && c.contains(RUN), false);
        unmount_below(&[Path::new(DATA), Path::new(RUN)]);
        for dst in HOST_ROUTES {
            let _ = run("ip", &["route", "del", dst, "via", NODE_IP]);
        }
        if let Some(n) = self.node.take() {
            n.delete();
        }
        let _ = std::fs::remove_dir_all(BPF_DIR);
        let _ = std::fs::remove_dir_all(RUN);
        for d in ["containerd", "ipam", "pods", "cni"] {
            let _ = std::fs::remove_dir_all(Path::new(DATA).join(d));
        }
        eprintln!("[up] stopped; logs are in {DATA}/logs");
    }
}

fn bin(name: &str) -> PathBuf {
    crate::target_dir("release").join(name)
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let mut all = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    all.extend(args);
    run("kubectl", &all)
}

/// Whether the API answers and shows node `NODE` Ready.
fn node_ready(admin: &Path) -> bool {
    kubectl(
        admin,
        &[
            "get",
            "node",
            NODE,
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
        ],
    )
    .is_ok_and(|s| s == "True")
}

/// Waits until `ok` holds (or Ctrl-C, or `timeout`).
fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !ok() {
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted while waiting for {what}");
        }
        if start.elapsed() > timeout {
            bail!("{what} did not happen within {timeout:?}; see the logs in {DATA}/logs");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn network(c: &mut Cluster) -> Result<()> {
    // Leftovers of an `up` that was killed.
    let _ = run("ip", &["link", "del", HOST_LINK]);
    for dst in HOST_ROUTES {
        let _ = run("ip", &["route", "del", dst]);
    }
    let node = Netns::create(NETNS)?;
    c.node = Some(node.clone());
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        node.sysctl(k, v)?;
    }
    let ip = |args: &str| run("ip", &args.split_whitespace().collect::<Vec<_>>()).map(|_| ());
    ip(&format!(
        "link add {HOST_LINK} type veth peer name ext0 netns {NETNS}"
    ))?;
    ip(&format!("addr add {HOST_IP}/24 dev {HOST_LINK}"))?;
    ip(&format!("link set {HOST_LINK} up"))?;
    ip(&format!("-n {NETNS} addr add {NODE_IP}/24 dev ext0"))?;
    ip(&format!("-n {NETNS} link set ext0 up"))?;
    ip(&format!("-n {NETNS} route add default via {HOST_IP}"))?;
    for dst in HOST_ROUTES {
        ip(&format!("route add {dst} via {NODE_IP} dev {HOST_LINK}"))?;
    }
    Ok(())
}

/// Starts the cluster; with `smoke`, applies the example, checks the Service answers from
/// every replica over its NodePort and ClusterIP, and stops.
pub fn run_cluster(exit_after: Option<u64>, smoke: bool) -> Result<()> {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut c = Cluster {
        node: None,
        daemons: Arc::default(),
        supervisor: None,
        stopping: Arc::default(),
    };
    eprintln!("[up] network: namespace {NETNS} ({NODE_IP}), host link {HOST_LINK} ({HOST_IP})");
    network(&mut c)?;
    let cp_dir = Path::new(DATA).join("controlplane");
    let cfg = |who: &str| cp_dir.join(format!("{who}.kubeconfig"));
    eprintln!("[up] control plane on https://{NODE_IP}:6443");
    c.spawn(
        "ferry-controlplane",
        &bin("ferry-controlplane"),
        &[
            "--data-dir",
            cp_dir.to_str().unwrap(),
            "--bind-address",
            &format!("{NODE_IP}:6443"),
            "--node-kubeconfigs",
            NODE,
        ],
    )?;
    let admin = cfg("admin");
    wait_for("the API server to answer", Duration::from_secs(30), || {
        admin.exists() && kubectl(&admin, &["get", "--raw", "/readyz"]).is_ok()
    })?;
    for name in ["controller-manager", "scheduler"] {
        eprintln!("[up] {name}");
        let kc = cfg(name);
        c.spawn(
            name,
            &bin("ferry-controlplane"),
            &[name, "--kubeconfig", kc.to_str().unwrap()],
        )?;
    }
    eprintln!("[up] ferry-proxy");
    c.spawn(
        "ferry-proxy",
        &bin("ferry-proxy"),
        &[
            "--kubeconfig",
            cfg("kube-proxy").to_str().unwrap(),
            "--node-name",
            NODE,
            "--node-ip",
            NODE_IP,
            "--interfaces",
            "ext0",
            "--interfaces",
            "fy*",
            "--bpf-dir",
            BPF_DIR,
            "--dns-addr",
            NODE_DNS,
        ],
    )?;
    eprintln!("[up] ferry-kubelet (starts containerd, imports Ferry's images)");
    let images = crate::images::dir();
    c.spawn(
        "ferry-kubelet",
        &bin("ferry-kubelet"),
        &[
            "--kubeconfig",
            cfg(&format!("node-{NODE}")).to_str().unwrap(),
            "--node-name",
            NODE,
            "--node-ip",
            NODE_IP,
            "--pod-cidr",
            POD_CIDR,
            "--data-dir",
            DATA,
            "--run-dir",
            RUN,
            "--images",
            images.to_str().unwrap(),
            "--bpf-dir",
            BPF_DIR,
            "--remove-pods-on-exit",
            "--cluster-dns",
            CLUSTER_DNS,
        ],
    )?;
    c.supervise()?;
    wait_for("node ferry to be Ready", Duration::from_secs(90), || {
        node_ready(&admin)
    })?;
    let root = crate::workspace_root();
    println!();
    println!("Ferry is up: a single-node cluster, node {NODE} at {NODE_IP}.");
    println!("  export KUBECONFIG={}", admin.display());
    println!(
        "  kubectl apply -f {}/examples/hello.yaml && kubectl rollout status deploy/hello",
        root.display()
    );
    println!("  curl http://{NODE_IP}:30080/     # the NodePort; each answer names its pod");
    println!("  dig @{CLUSTER_DNS} +short hello.default.svc.cluster.local   # cluster DNS");
    println!("Logs: {DATA}/logs. Ctrl-C stops everything and cleans up.");
    if smoke {
        return smoke::smoke_test(&c, &admin, &root);
    }
    let start = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        if exit_after.is_some_and(|s| start.elapsed() >= Duration::from_secs(s)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
