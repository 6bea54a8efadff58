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
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ferry_testbed::procs::{kill_matching, unmount_below};
use ferry_testbed::{run, Netns};

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

/// A daemon `up` started and keeps running: restarted with back-off whenever it exits, as
/// systemd's `Restart=always` does for kube-proxy and the kubelet.
struct Daemon {
    name: &'static str,
    bin: PathBuf,
    args: Vec<String>,
    /// None while it waits to be started again.
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    /// When it is started again, after it exited.
    restart_at: Option<Instant>,
    backoff: Duration,
}

/// The first restart's delay, doubled each time it exits again soon after.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A daemon that ran this long restarts with the first delay again.
const RESTART_RESET: Duration = Duration::from_secs(60);

/// Everything `up` started; dropping it tears the cluster down in order.
struct Cluster {
    node: Option<Netns>,
    /// In start order; stopped in reverse. Shared with the supervisor thread.
    daemons: Arc<Mutex<Vec<Daemon>>>,
    supervisor: Option<std::thread::JoinHandle<()>>,
    /// Tells the supervisor to stop restarting (the cluster is being torn down).
    stopping: Arc<AtomicBool>,
}

fn start_daemon(node: &Netns, name: &str, bin: &Path, args: &[String]) -> Result<Child> {
    let logs = Path::new(DATA).join("logs");
    std::fs::create_dir_all(&logs)?;
    // Appended to: a restarted daemon's log follows the one of the run that exited.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Their own process group: Ctrl-C reaches `up` only, which stops them in order.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    node.spawn(&mut cmd)
        .with_context(|| format!("starting {name} ({})", bin.display()))
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

fn lock(d: &Mutex<Vec<Daemon>>) -> std::sync::MutexGuard<'_, Vec<Daemon>> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

fn supervise_one(node: &Netns, d: &mut Daemon) {
    if let Some(child) = d.child.as_mut() {
        let Ok(Some(status)) = child.try_wait() else {
            return;
        };
        d.child = None;
        if d.started.elapsed() >= RESTART_RESET {
            d.backoff = RESTART_BACKOFF;
        }
        eprintln!(
            "[up] {} exited ({status}); starting it again in {:?} (see {DATA}/logs/{}.log)",
            d.name, d.backoff, d.name
        );
        d.restart_at = Some(Instant::now() + d.backoff);
        d.backoff = (d.backoff * 2).min(RESTART_BACKOFF_MAX);
        return;
    }
    if d.restart_at.is_some_and(|t| Instant::now() >= t) {
        match start_daemon(node, d.name, &d.bin, &d.args) {
            Ok(child) => {
                d.restarts += 1;
                eprintln!(
                    "[up] {} started again (pid {}, restart {})",
                    d.name,
                    child.id(),
                    d.restarts
                );
                d.child = Some(child);
                d.started = Instant::now();
                d.restart_at = None;
            }
            Err(e) => {
                eprintln!("[up] {}: {e:#}; trying again in {:?}", d.name, d.backoff);
                d.restart_at = Some(Instant::now() + d.backoff);
                d.backoff = (d.backoff * 2).min(RESTART_BACKOFF_MAX);
            }
        }
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
        kubectl(
            &admin,
            &[
                "get",
                "node",
                NODE,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ],
        )
        .is_ok_and(|s| s == "True")
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
        return smoke_test(&c, &admin, &root);
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

/// A pod that connects to the API server the way in-cluster clients find it.
const API_CLIENT: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: api-client, namespace: default}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: ferry.local/busybox:1
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'if echo | nc -w 3 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT >/dev/null; then echo api-reachable; fi; if echo | nc -w 3 kubernetes.default.svc 443 >/dev/null; then echo api-by-name; fi']
"#;

/// A pod for the cluster to schedule and run once its daemons were restarted.
const AFTER_RESTARTS: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: after-restarts, namespace: default}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: ferry.local/busybox:1
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'echo ran']
"#;

/// The README's two lines, checked: every replica answers over the NodePort and the ClusterIP
/// from the host.
fn smoke_test(c: &Cluster, admin: &Path, root: &Path) -> Result<()> {
    let hello = root.join("examples/hello.yaml");
    kubectl(admin, &["apply", "-f", hello.to_str().unwrap()])?;
    kubectl(
        admin,
        &["rollout", "status", "deploy/hello", "--timeout=120s"],
    )?;
    let pods: std::collections::BTreeSet<String> = kubectl(
        admin,
        &[
            "get",
            "pods",
            "-l",
            "app=hello",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
    )?
    .split_whitespace()
    .map(str::to_string)
    .collect();
    let vip = kubectl(
        admin,
        &["get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}"],
    )?;
    for (what, addr) in [
        ("NodePort", format!("{NODE_IP}:30080")),
        ("ClusterIP", format!("{vip}:80")),
    ] {
        let to: std::net::SocketAddr = addr.parse()?;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..60 {
            if let Ok(a) = ferry_testbed::echo::tcp_ask(to, Duration::from_secs(1)) {
                seen.insert(a.server);
            }
            if seen == pods {
                break;
            }
        }
        if seen != pods {
            bail!("the {what} {addr} was answered by {seen:?}; the replicas are {pods:?}");
        }
        eprintln!(
            "[up] smoke: the {what} {addr} reaches all {} replicas",
            pods.len()
        );
    }
    // A pod finds the API through the `kubernetes` Service and the variables the kubelet gave
    // it (the API server is a backend on the node itself).
    let manifest = Path::new(DATA).join("api-client.yaml");
    std::fs::write(&manifest, API_CLIENT)?;
    kubectl(admin, &["apply", "-f", manifest.to_str().unwrap()])?;
    std::fs::remove_file(&manifest).ok();
    wait_for(
        "the api-client pod to finish",
        Duration::from_secs(60),
        || {
            kubectl(
                admin,
                &["get", "pod", "api-client", "-o", "jsonpath={.status.phase}"],
            )
            .is_ok_and(|p| p == "Succeeded" || p == "Failed")
        },
    )?;
    let said = kubectl(admin, &["logs", "api-client"])?;
    if !said.contains("api-reachable") {
        bail!("a pod could not reach the API through the kubernetes Service: {said}");
    }
    if !said.contains("api-by-name") {
        bail!("a pod could not reach the API as kubernetes.default.svc (cluster DNS): {said}");
    }
    eprintln!(
        "[up] smoke: a pod reaches the API at $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT and as kubernetes.default.svc"
    );
    // Every daemon killed in turn, the Service in use: each is started again, the NodePort
    // keeps answering, the running pods are adopted and the finished one is not run again.
    survive_kills(c, admin, &pods)?;
    kubectl(admin, &["delete", "pod", "api-client", "--wait=false"])?;
    // The printed DNS line, from the host.
    let name = "hello.default.svc.cluster.local";
    let dig = run(
        "dig",
        &[
            &format!("@{CLUSTER_DNS}"),
            "+short",
            "+time=2",
            "+tries=3",
            name,
        ],
    )?;
    if dig.trim() != vip {
        bail!("dig @{CLUSTER_DNS} {name} answered {dig:?}, not the Service's {vip}");
    }
    eprintln!("[up] smoke: {name} resolves to {vip} at the cluster DNS address {CLUSTER_DNS}");
    // The README's other lines work too.
    for args in [
        &["get", "pods", "-o", "wide"][..],
        &["logs", "-l", "app=hello"][..],
        &["describe", "pod", "-l", "app=hello"][..],
    ] {
        kubectl(admin, args).with_context(|| format!("kubectl {}", args.join(" ")))?;
    }
    kubectl(
        admin,
        &[
            "delete",
            "-f",
            hello.to_str().unwrap(),
            "--wait=true",
            "--timeout=60s",
        ],
    )?;
    Ok(())
}

/// What the pods of the smoke test look like to the API: (name, container id, restarts, phase).
fn pod_states(admin: &Path) -> Result<Vec<String>> {
    let out = kubectl(
        admin,
        &[
            "get",
            "pods",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.containerStatuses[0].containerID} {.status.containerStatuses[0].restartCount}{"\n"}{end}"#,
        ],
    )?;
    let mut v: Vec<String> = out.lines().map(str::to_string).collect();
    v.sort();
    Ok(v)
}

/// kill -9 of each daemon in turn while a client asks the NodePort every 20 ms: each must be
/// started again by the supervisor and serve (the API answers, the node is Ready), no request
/// may fail for longer than the daemon was away, and the pods must be the same containers
/// afterwards (adopted by the restarted kubelet; the finished pod not run again).
fn survive_kills(
    c: &Cluster,
    admin: &Path,
    replicas: &std::collections::BTreeSet<String>,
) -> Result<()> {
    let before = pod_states(admin)?;
    let to: std::net::SocketAddr = format!("{NODE_IP}:30080").parse()?;
    let done = Arc::new(AtomicBool::new(false));
    // (requests, failed, the longest run of failures)
    let client = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut asked, mut failed, mut worst) = (0u64, 0u64, Duration::ZERO);
            let mut failing_since: Option<Instant> = None;
            // Bounded: stops when told, or after 10 minutes whatever happens.
            let limit = Instant::now() + Duration::from_secs(600);
            while !done.load(Ordering::SeqCst) && Instant::now() < limit {
                asked += 1;
                if ferry_testbed::echo::tcp_ask(to, Duration::from_secs(1)).is_ok() {
                    if let Some(t) = failing_since.take() {
                        worst = worst.max(t.elapsed());
                    }
                } else {
                    failed += 1;
                    failing_since.get_or_insert_with(Instant::now);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(t) = failing_since {
                worst = worst.max(t.elapsed());
            }
            (asked, failed, worst)
        })
    };
    let mut away_longest = Duration::ZERO;
    let mut result = Ok(());
    for name in [
        "ferry-proxy",
        "ferry-kubelet",
        "scheduler",
        "controller-manager",
        "ferry-controlplane",
    ] {
        let Some((pid, restarts)) = c.daemon(name) else {
            result = Err(anyhow::anyhow!("{name} is not running before the kill"));
            break;
        };
        let killed = Instant::now();
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let back = wait_for(
            &format!("{name} to be started again"),
            Duration::from_secs(30),
            || c.daemon(name).is_some_and(|(_, r)| r > restarts),
        )
        .and_then(|()| {
            wait_for(
                &format!("the API and node ferry to be Ready after {name} came back"),
                Duration::from_secs(90),
                || {
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
                },
            )
        });
        if let Err(e) = back {
            result = Err(e);
            break;
        }
        let away = killed.elapsed();
        away_longest = away_longest.max(away);
        eprintln!("[up] smoke: kill -9 {name}: started again, the API answering, after {away:.1?}");
    }
    done.store(true, Ordering::SeqCst);
    let (asked, failed, worst) = client
        .join()
        .map_err(|_| anyhow::anyhow!("the NodePort client panicked"))?;
    result?;
    eprintln!(
        "[up] smoke: the NodePort answered {} of {asked} requests during the kills; longest failure {worst:.1?}",
        asked - failed
    );
    if worst > away_longest {
        bail!(
            "the NodePort failed for {worst:?}, longer than any daemon was away ({away_longest:?})"
        );
    }
    // The restarted cluster schedules and runs a new pod; the restarted kubelet's workers for
    // the pods it found had their first sync before that (it starts them all at once).
    let manifest = Path::new(DATA).join("after-restarts.yaml");
    std::fs::write(&manifest, AFTER_RESTARTS)?;
    kubectl(admin, &["apply", "-f", manifest.to_str().unwrap()])?;
    std::fs::remove_file(&manifest).ok();
    wait_for(
        "a pod created after the restarts to run and finish",
        Duration::from_secs(120),
        || {
            kubectl(
                admin,
                &[
                    "get",
                    "pod",
                    "after-restarts",
                    "-o",
                    "jsonpath={.status.phase}",
                ],
            )
            .is_ok_and(|p| p == "Succeeded")
        },
    )?;
    kubectl(admin, &["delete", "pod", "after-restarts", "--wait=false"])?;
    let mut after = pod_states(admin)?;
    after.retain(|p| !p.starts_with("after-restarts "));
    if after != before {
        bail!("the pods changed across the restarts (a restarted kubelet must adopt running containers and never run a finished pod again):\nbefore: {before:#?}\nafter: {after:#?}");
    }
    eprintln!(
        "[up] smoke: a new pod ran; the {} replicas and the finished api-client pod are the same containers as before the restarts",
        replicas.len()
    );
    Ok(())
}
