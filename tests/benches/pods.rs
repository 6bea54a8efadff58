//! `cargo xtask bench pods`: pod startup latency on a single node with containerd. N pods of
//! Ferry's echo image (readinessProbe tcpSocket, period 1 s) are created through the API at
//! once; a watch in this process stamps when each pod is first Running with an IP, and when it
//! is first Ready. The clock starts just before each pod's create request.
//!
//! Baseline in the same run, on the same containerd: the same N sandboxes + containers started
//! straight through CRI (RunPodSandbox, CreateContainer, StartContainer, all N at once), until
//! the container runs and, for "ready", until its server answers on TCP from the node. What
//! the control path (API server, scheduler, kubelet, status writes) adds is the difference.
//!
//! Arguments: `--quick` (10 pods instead of 30), `--out DIR`.

#[path = "../tests/common/containerd.rs"]
#[allow(dead_code)]
mod containerd;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use containerd::{Kubelet, RuntimeDirs};
use ferry_testbed::bench::{conditions, percentile, BenchArgs};
use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::echo::tcp_ask;
use ferry_testbed::{in_netns, Topology};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::ResourceExt;
use kubelet::cri::Cri;
use serde_json::json;

const TARGET_P99_S: f64 = 2.0;
const POD_CIDR: &str = "10.244.80.0/24";

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

#[derive(Default, Clone, Copy)]
struct Stamps {
    created: Option<Instant>,
    running: Option<Instant>,
    ready: Option<Instant>,
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"bench": "pods"}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "echo", "image": "ferry.local/echo:1", "imagePullPolicy": "IfNotPresent",
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]},
    }))
    .unwrap()
}

/// Through the API: (create -> Running with IP, create -> Ready), seconds, per pod.
async fn through_the_api(client: kube::Client, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let api: Api<Pod> = Api::namespaced(client, "default");
    let stamps: Arc<Mutex<HashMap<String, Stamps>>> = Default::default();
    let s2 = stamps.clone();
    let mut events = watcher(api.clone(), watcher::Config::default().labels("bench=pods")).boxed();
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn(async move {
        let mut synced = Some(synced_tx);
        while let Some(ev) = events.next().await {
            let now = Instant::now();
            let p = match ev {
                Ok(watcher::Event::InitDone) => {
                    if let Some(tx) = synced.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => p,
                _ => continue,
            };
            let status = p.status.clone().unwrap_or_default();
            let running = status.phase.as_deref() == Some("Running")
                && status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty());
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let mut s = s2.lock().unwrap();
            let e = s.entry(p.name_any()).or_default();
            if running && e.running.is_none() {
                e.running = Some(now);
            }
            if ready && e.ready.is_none() {
                e.ready = Some(now);
            }
        }
    });
    synced_rx
        .await
        .context("the pod watch ended before its first list")?;
    for i in 0..n {
        let name = format!("bench-{i}");
        stamps
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_default()
            .created = Some(Instant::now());
        api.create(&PostParams::default(), &pod(&name)).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = stamps
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.ready.is_some())
            .count();
        eprint!("\r[bench pods] through the API: {done}/{n} ready");
        if done == n {
            eprintln!();
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {n} pods became Ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watch.abort();
    let out = {
        let s = stamps.lock().unwrap();
        let lat = |f: fn(&Stamps) -> Option<Instant>| -> Vec<f64> {
            s.values()
                .map(|x| (f(x).unwrap() - x.created.unwrap()).as_secs_f64())
                .collect()
        };
        (lat(|x| x.running), lat(|x| x.ready))
    };
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("bench=pods"),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !api
        .list(&ListParams::default().labels("bench=pods"))
        .await?
        .items
        .is_empty()
    {
        if Instant::now() > deadline {
            bail!("the benchmark's pods were not removed within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(out)
}

/// Straight through CRI: (start -> running with IP, start -> answering), seconds, per pod.
async fn through_cri(
    cri: Cri,
    node: ferry_testbed::Netns,
    n: usize,
    dirs_data: PathBuf,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut cri = cri.clone();
        let node = node.clone();
        let data = dirs_data.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let name = format!("raw-{i}");
            let sandbox = containerd::sandbox_config(&name, "bench", &data);
            let id = cri.run_sandbox(sandbox.clone()).await?;
            let container = containerd::echo_container();
            cri.start_container(&id, &sandbox, container).await?;
            let (status, _) = cri.sandbox_status(&id).await?;
            let running = start.elapsed().as_secs_f64();
            let ip: std::net::Ipv4Addr =
                status.network.map(|n| n.ip).unwrap_or_default().parse()?;
            let to: SocketAddr = SocketAddrV4::new(ip, 8080).into();
            loop {
                let ok = in_netns(&node, move || {
                    tcp_ask(to, Duration::from_millis(200)).is_ok()
                })?;
                if ok {
                    break;
                }
                if start.elapsed() > Duration::from_secs(60) {
                    bail!("{name} did not answer within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok((running, start.elapsed().as_secs_f64(), id))
        }));
    }
    let (mut running, mut ready) = (Vec::new(), Vec::new());
    let mut cri = cri;
    for t in tasks {
        let (r, a, id) = t.await??;
        running.push(r);
        ready.push(a);
        cri.stop_sandbox(&id).await?;
        cri.remove_sandbox(&id).await?;
    }
    Ok((running, ready))
}

fn main() -> Result<()> {
    let mut t = Topology::new(0)?;
    t.extra_interfaces = vec!["fy*".into()];
    // The API server listens on the node namespace's loopback: this process joins that
    // namespace before its runtime's threads start (they inherit it).
    let ns = std::fs::File::open(t.node.path())?;
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("entering the node namespace");
    }
    tokio::runtime::Runtime::new()?.block_on(run(t))
}

async fn run(mut t: Topology) -> Result<()> {
    let args = BenchArgs::parse();
    let quick = args.quick;
    let n = if quick { 10 } else { 30 };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dirs = RuntimeDirs::new();
    let cp = ControlPlane::start_in(Some(&t.node.name), &["--node-kubeconfigs", "node-a"])?;
    let _controllers = cp.spawn_controllers(&[])?;
    let _proxy = t.start_proxy_api(&cp.kubeconfig("kube-proxy"))?;
    let _kubelet = Kubelet::start(&t, &cp, &dirs, POD_CIDR);
    let client = controlplane::controllers::endpoints::client(&cp.kubeconfig("admin")).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = nodes.get_opt("node-a").await?.is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dirs.run.join("kubelet.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "node-a did not become Ready; ferry-kubelet's last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cri = Cri::connect(&dirs.layout.socket).await?;
    eprintln!("[bench pods] {n} pods straight through CRI (baseline)");
    let (raw_run, raw_ready) = through_cri(cri, t.node.clone(), n, dirs.data.clone()).await?;
    eprintln!("[bench pods] {n} pods through the API");
    let (api_run, api_ready) = through_the_api(client, n).await?;

    let rows = [
        (
            "create -> Running with IP (API, scheduler, kubelet)",
            sorted(api_run),
        ),
        (
            "create -> Ready (readiness probe passed)",
            sorted(api_ready),
        ),
        (
            "baseline: CRI start -> container running with IP",
            sorted(raw_run),
        ),
        ("baseline: CRI start -> server answering", sorted(raw_ready)),
    ];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Pod startup, {}: {n} pods of ferry.local/echo:1 created at once on one node (containerd 1.6, ferry-cni); readinessProbe tcpSocket every 1 s.\n",
        conditions(quick),
    );
    let _ = writeln!(
        md,
        "| path | p50 | p99 | max | p99 vs target {TARGET_P99_S} s |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (name, v) in &rows {
        let _ = writeln!(
            md,
            "| {name} | {:.2} s | {:.2} s | {:.2} s | {:.2}x |",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(0.0),
            percentile(v, 0.99) / TARGET_P99_S
        );
    }
    let ratio = |a: &[f64], b: &[f64]| percentile(a, 0.5) / percentile(b, 0.5).max(1e-9);
    let _ = writeln!(
        md,
        "\nThrough the API, Running takes {:.2}x and Ready {:.2}x the runtime's own time at p50.",
        ratio(&rows[0].1, &rows[2].1),
        ratio(&rows[1].1, &rows[3].1)
    );
    let pct = |v: &Vec<f64>| json!({"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)});
    args.report(
        "pods",
        &md,
        &json!({
            "quick": quick, "pods": n,
            "api_running_s": pct(&rows[0].1), "api_ready_s": pct(&rows[1].1),
            "cri_running_s": pct(&rows[2].1), "cri_ready_s": pct(&rows[3].1),
            "target_p99_s": TARGET_P99_S,
        }),
    )?;
    Ok(())
}
