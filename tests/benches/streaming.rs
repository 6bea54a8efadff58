//! `cargo xtask bench streaming`: what the streaming path (kubectl -> API server -> kubelet ->
//! containerd's streaming server) costs, on one node with containerd.
//!
//! - `kubectl exec <pod> -- true`, one after another: wall time of the whole command, p50 and
//!   p99. Two baselines in the same run: `kubectl get --raw /healthz` (kubectl's own start, TLS
//!   and round trip: what any kubectl command pays) and CRI ExecSync of `true` in the same
//!   container straight to containerd (the runtime's exec without any stream). What the stream
//!   adds is the distance between them.
//! - `kubectl port-forward` throughput: iperf3 (TCP, one stream) from the node to a server in
//!   the pod's network namespace through the forwarded local port, against the same transfer
//!   straight to the pod IP, alternating which goes first each round.
//!
//! Arguments: `--quick` (10 execs, 1 round of 2 s transfers instead of 50 and 3 of 5 s),
//! `--out DIR`.

#[path = "../tests/common/containerd.rs"]
#[allow(dead_code)]
mod containerd;

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use containerd::{Kubelet, RuntimeDirs};
use ferry_testbed::bench::{conditions, percentile, BenchArgs};
use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::{Netns, Topology, NODE_IP};
use kubelet::cri::Cri;
use serde_json::json;

const POD_CIDR: &str = "10.244.81.0/24";
const IPERF_PORT: u16 = 5201;
const LOCAL_PORT: u16 = 15201;

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Runs kubectl as the admin in the node's namespace; fails on a non-zero exit.
fn kubectl(t: &Topology, cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let cfg = cp.kubeconfig("admin");
    let mut all = vec!["--kubeconfig", cfg.to_str().unwrap()];
    all.extend(args);
    t.node.exec("kubectl", &all)
}

/// Milliseconds of each of `n` runs of `f`.
fn timed(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f()?;
        out.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(sorted(out))
}

/// Gbit/s of one iperf3 TCP transfer of `secs` from the node to `host:port`, from the
/// sender's one-second intervals: through port-forward iperf3's closing exchange of results on
/// its control connection often fails ("unable to receive results"), so both paths are
/// measured the same way, by what the sender wrote.
fn iperf(node: &Netns, host: &str, port: u16, secs: u32) -> Result<f64> {
    // Bounded: a transfer that stalls is killed, never waited on.
    let limit = (secs + 20).to_string();
    let out = node.exec(
        "timeout",
        &[
            &limit,
            "iperf3",
            "--connect-timeout",
            "5000",
            "-c",
            host,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
    )?;
    // A warning line may come before the JSON.
    let json = out.find('{').map_or("", |i| &out[i..]);
    let v: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("iperf3 -J printed {out:?}"))?;
    let (mut bytes, mut seconds) = (0.0, 0.0);
    for i in v["intervals"].as_array().into_iter().flatten() {
        bytes += i["sum"]["bytes"].as_f64().unwrap_or(0.0);
        seconds += i["sum"]["seconds"].as_f64().unwrap_or(0.0);
    }
    if seconds < f64::from(secs) * 0.5 {
        bail!(
            "iperf3 to {host}:{port} ran {seconds:.1} s of {secs}: {}",
            v["error"]
        );
    }
    Ok(bytes * 8.0 / seconds / 1e9)
}

fn wait_ready(t: &Topology, cp: &ControlPlane, pod: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let phase = kubectl(
            t,
            cp,
            &["get", "pod", pod, "-o", "jsonpath={.status.phase}"],
        )
        .unwrap_or_default();
        if phase == "Running" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pod {pod} is not Running after 90 s (phase {phase:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn main() -> Result<()> {
    // Interrupted, it still removes its namespaces and pinned objects.
    ferry_testbed::clean_up_on_signal();
    let args = BenchArgs::parse();
    let quick = args.quick;
    let (execs, rounds, secs) = if quick { (10, 1, 2) } else { (50, 3, 5) };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut t = Topology::new(0)?;
    t.extra_interfaces = vec!["fy*".into()];
    let dirs = RuntimeDirs::new();
    let cp =
        ControlPlane::start_reachable(&t.node.name, NODE_IP, &["--node-kubeconfigs", "node-a"])?;
    let _controllers = cp.spawn_controllers(&[])?;
    let _proxy = t.start_proxy_api(&cp.kubeconfig("kube-proxy"))?;
    let _kubelet = Kubelet::start(&t, &cp, &dirs, POD_CIDR);
    let manifest = "apiVersion: v1
kind: Pod
metadata: {name: shell, namespace: default}
spec:
  nodeName: node-a
  terminationGracePeriodSeconds: 1
  containers:
  - {name: c, image: ferry.local/busybox:1, imagePullPolicy: IfNotPresent, command: [sleep, '3600']}
";
    let file = dirs.data.join("shell.yaml");
    std::fs::create_dir_all(&dirs.data)?;
    std::fs::write(&file, manifest)?;
    let mut applied = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while applied.is_none() {
        // The node registers and the default ServiceAccount appears a moment after start.
        match kubectl(&t, &cp, &["apply", "-f", file.to_str().unwrap()]) {
            Ok(o) => applied = Some(o),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
    wait_ready(&t, &cp, "shell")?;

    // The container and the pod's network namespace, from containerd.
    let rt = tokio::runtime::Runtime::new()?;
    let (mut cri, container, pod_netns, pod_ip) = rt.block_on(async {
        let mut cri = Cri::connect(&dirs.layout.socket).await?;
        let sb = cri
            .sandboxes()
            .await?
            .into_iter()
            .find(|s| s.metadata.as_ref().is_some_and(|m| m.name == "shell"))
            .context("no sandbox for pod shell")?;
        let (status, netns) = cri.sandbox_status(&sb.id).await?;
        let ip = status
            .network
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .context("the sandbox has no IP")?;
        let c = cri
            .containers(&sb.id)
            .await?
            .into_iter()
            .next()
            .context("no container in pod shell")?;
        let netns = netns.context("the sandbox has no network namespace")?;
        anyhow::Ok((
            cri,
            c.id,
            Netns {
                name: netns.rsplit('/').next().unwrap_or_default().to_string(),
            },
            ip,
        ))
    })?;

    eprintln!("[bench streaming] {execs} x kubectl exec, kubectl get --raw, CRI ExecSync");
    let exec = timed(execs, || {
        kubectl(&t, &cp, &["exec", "shell", "--", "true"]).map(|_| ())
    })?;
    let raw = timed(execs, || {
        kubectl(&t, &cp, &["get", "--raw", "/healthz"]).map(|_| ())
    })?;
    let sync = timed(execs, || {
        let (code, out) = rt.block_on(cri.exec_sync(&container, vec!["true".into()], 10))?;
        if code != 0 {
            bail!("ExecSync true exited {code}: {out}");
        }
        Ok(())
    })?;

    // iperf3's server in the pod's namespace (the node's binary; the network path is the
    // pod's), one per transfer (`-1`: a transfer that ends badly cannot leave it busy for the
    // next), port-forward from the node.
    let one_server = || {
        pod_netns.spawn(
            Command::new("iperf3")
                .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    // kubectl port-forward ends when a forwarded connection fails (as iperf3's control
    // connection often does at the end), so each transfer gets its own, started and listening
    // before the transfer.
    let cfg = cp.kubeconfig("admin");
    let port_forward = || -> Result<std::process::Child> {
        let mut pf = t.node.spawn(
            Command::new("kubectl")
                .args(["--kubeconfig", cfg.to_str().unwrap()])
                .args([
                    "port-forward",
                    "pod/shell",
                    &format!("{LOCAL_PORT}:{IPERF_PORT}"),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )?;
        let out = pf.stdout.take().context("port-forward's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut lines = std::io::BufReader::new(out).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.contains("Forwarding from") => Ok(pf),
            other => {
                let _ = pf.kill();
                let _ = pf.wait();
                bail!("kubectl port-forward did not start: {other:?}")
            }
        }
    };
    let mut forwarded = Vec::new();
    let mut direct = Vec::new();
    for round in 0..rounds {
        eprintln!("[bench streaming] round {}/{rounds}: iperf3 {secs} s through port-forward and straight", round + 1);
        for pf_first in [round % 2 == 0, round % 2 == 1] {
            let mut server = one_server()?;
            let r = if pf_first {
                port_forward().and_then(|mut pf| {
                    let r = iperf(&t.node, "127.0.0.1", LOCAL_PORT, secs);
                    let _ = pf.kill();
                    let _ = pf.wait();
                    r.map(|g| forwarded.push(g))
                })
            } else {
                std::thread::sleep(Duration::from_millis(300));
                iperf(&t.node, &pod_ip, IPERF_PORT, secs).map(|g| direct.push(g))
            };
            let _ = server.kill();
            let _ = server.wait();
            r?;
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let (forwarded, direct) = (sorted(forwarded), sorted(direct));
    let med = |v: &[f64]| percentile(v, 0.5);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "Streaming, {}: kubectl 1.32 (WebSocket) -> ferry-controlplane (SPDY/3.1 from here on) -> ferry-kubelet (TLS) -> containerd 1.6's streaming server, one node.\n",
        conditions(quick)
    );
    let _ = writeln!(md, "| {execs} runs, one after another | p50 ms | p99 ms |");
    let _ = writeln!(md, "|---|---:|---:|");
    for (name, v) in [
        ("`kubectl exec shell -- true`", &exec),
        ("baseline: `kubectl get --raw /healthz`", &raw),
        ("baseline: CRI ExecSync `true` (no stream)", &sync),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.1} | {:.1} |",
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    }
    let _ = writeln!(
        md,
        "\nexec over kubectl's own round trip: {:.2}x at p50 (the stream's setup, the exec and its status: {:.1} ms); over CRI ExecSync: {:.2}x.\n",
        percentile(&exec, 0.5) / percentile(&raw, 0.5),
        percentile(&exec, 0.5) - percentile(&raw, 0.5),
        percentile(&exec, 0.5) / percentile(&sync, 0.5),
    );
    let _ = writeln!(
        md,
        "| iperf3 TCP, {secs} s, {rounds} round(s) | Gbit/s (median; the sender's intervals) | runs |"
    );
    let _ = writeln!(md, "|---|---:|---|");
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        md,
        "| `kubectl port-forward` | {:.2} | {} |",
        med(&forwarded),
        list(&forwarded)
    );
    let _ = writeln!(
        md,
        "| baseline: straight to the pod IP | {:.2} | {} |",
        med(&direct),
        list(&direct)
    );
    let _ = writeln!(
        md,
        "\nport-forward over straight: {:.3}x (every byte crosses kubectl, the API server, the kubelet and containerd's streaming server, each a user-space copy).",
        med(&forwarded) / med(&direct)
    );
    let json = json!({
        "quick": quick,
        "exec_ms": exec, "raw_ms": raw, "exec_sync_ms": sync,
        "port_forward_gbps": forwarded, "direct_gbps": direct,
    });
    args.report("streaming", &md, &json)
}
