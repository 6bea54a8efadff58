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
//! A full run does three rounds, alternating which path goes first (baseline then API, API then
//! baseline, baseline then API), with a pause between phases for the kernel to finish tearing
//! down the previous phase's network namespaces; each figure is the median of the rounds', with
//! their range. A quick run does one round.
//!
//! Arguments: `--quick` (one round of 10 pods instead of three of 30), `--out DIR`.

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

/// Pause between phases: RemovePodSandbox returns before the kernel has finished tearing the
/// network namespaces down, and that work would otherwise land on the next phase.
const SETTLE: Duration = Duration::from_secs(3);

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// One path's figure over the rounds: the median round's value and the range.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(per_round: &[f64]) -> Spread {
    let v = sorted(per_round.to_vec());
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
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
async fn through_the_api(
    client: kube::Client,
    round: usize,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
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
        let name = format!("bench-{round}-{i}");
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
    round: usize,
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
            let name = format!("raw-{round}-{i}");
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
    t.node.enter()?;
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
    let client = ferry_common::kubeconfig::client(&cp.kubeconfig("admin"), "ferry-e2e").await?;
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
    let rounds = if quick { 1 } else { 3 };
    // Per path, per round: the sorted latencies.
    let mut runs: [Vec<Vec<f64>>; 4] = Default::default();
    for round in 0..rounds {
        for api_phase in [round % 2 == 1, round % 2 == 0] {
            tokio::time::sleep(SETTLE).await;
            if api_phase {
                eprintln!(
                    "[bench pods] round {}/{rounds}: {n} pods through the API",
                    round + 1
                );
                let (running, ready) = through_the_api(client.clone(), round, n).await?;
                runs[0].push(sorted(running));
                runs[1].push(sorted(ready));
            } else {
                eprintln!(
                    "[bench pods] round {}/{rounds}: {n} pods straight through CRI (baseline)",
                    round + 1
                );
                let (running, ready) =
                    through_cri(cri.clone(), t.node.clone(), round, n, dirs.data.clone()).await?;
                runs[2].push(sorted(running));
                runs[3].push(sorted(ready));
            }
        }
    }

    let names = [
        "create -> Running with IP (API, scheduler, kubelet)",
        "create -> Ready (readiness probe passed)",
        "baseline: CRI start -> container running with IP",
        "baseline: CRI start -> server answering",
    ];
    let at = |path: usize, q: f64| -> Spread {
        spread(
            &runs[path]
                .iter()
                .map(|v| percentile(v, q))
                .collect::<Vec<_>>(),
        )
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Pod startup, {}: {rounds} round(s) of {n} pods of ferry.local/echo:1 created at once on one node (containerd 1.6, runc, ferry-cni); readinessProbe tcpSocket every 1 s. Rounds alternate which path goes first; figures are the median round's, with the range over rounds.\n",
        conditions(quick),
    );
    let _ = writeln!(
        md,
        "| path | p50 | p99 | p99 range | p99 vs target {TARGET_P99_S} s |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (path, name) in names.iter().enumerate() {
        let (p50, p99) = (at(path, 0.5), at(path, 0.99));
        let _ = writeln!(
            md,
            "| {name} | {:.2} s | {:.2} s | {:.2}-{:.2} s | {:.2}x |",
            p50.median,
            p99.median,
            p99.min,
            p99.max,
            p99.median / TARGET_P99_S
        );
    }
    // Per round, the API path against the baseline measured next to it.
    let ratios = |a: usize, b: usize, q: f64| -> Spread {
        spread(
            &runs[a]
                .iter()
                .zip(&runs[b])
                .map(|(x, y)| percentile(x, q) / percentile(y, q).max(1e-9))
                .collect::<Vec<_>>(),
        )
    };
    let (run50, ready50, run99) = (ratios(0, 2, 0.5), ratios(1, 3, 0.5), ratios(0, 2, 0.99));
    let _ = writeln!(
        md,
        "\nThrough the API against the runtime alone in the same round: Running {:.2}x at p50 ({:.2}-{:.2}x) and {:.2}x at p99 ({:.2}-{:.2}x); Ready {:.2}x at p50.",
        run50.median, run50.min, run50.max, run99.median, run99.min, run99.max, ready50.median
    );
    let pct = |path: usize| {
        let (p50, p99) = (at(path, 0.5), at(path, 0.99));
        json!({"p50": p50.median, "p99": p99.median, "p99_min": p99.min, "p99_max": p99.max})
    };
    args.report(
        "pods",
        &md,
        &json!({
            "quick": quick, "pods": n, "rounds": rounds,
            "api_running_s": pct(0), "api_ready_s": pct(1),
            "cri_running_s": pct(2), "cri_ready_s": pct(3),
            "api_vs_cri_running_p50": run50.median, "api_vs_cri_running_p99": run99.median,
            "target_p99_s": TARGET_P99_S,
        }),
    )?;
    Ok(())
}
