//! `cargo xtask bench scheduler`: how fast pods get a node.
//!
//! The API server runs in-process on the embedded store (HTTPS, client certificates) with 100
//! Ready nodes (32 cores, 64 GiB each). Each run creates 1,000 pods (64 creates in flight)
//! in a fresh namespace while a binder runs, and times from the first create to the watch
//! showing the last pod bound. Two binders, in the same run:
//! - Ferry's scheduler (filters, scores, assumes, binds 32 at a time, writes a Scheduled event
//!   per pod);
//! - a baseline that decides nothing: it binds each pending pod it sees to the next node
//!   round-robin, 32 at a time. That is the API's ceiling for this workload, so the ratio is
//!   what the scheduler's decisions cost.
//!
//! Arguments: `--quick` (one run of each instead of three), `--out DIR`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use controlplane::api::{Api as ApiServer, Config};
use controlplane::store::embedded::EmbeddedStore;
use controlplane::{pki, scheduler, server};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Binding, Namespace, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::json;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NODES: usize = 100;
const PODS: usize = 1_000;
const TARGET: f64 = 1_000.0;

async fn client(dir: &std::path::Path, name: &str) -> Result<Client> {
    ferry_common::kubeconfig::client(&dir.join(format!("{name}.kubeconfig")), "ferry-bench").await
}

async fn make_nodes(c: &Client) -> Result<()> {
    let api: Api<Node> = Api::all(c.clone());
    for i in 0..NODES {
        let name = format!("node-{i:03}");
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}
        }))?;
        api.create(&PostParams::default(), &node).await?;
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {
                "capacity": {"cpu": "32", "memory": "64Gi", "pods": "110"},
                "allocatable": {"cpu": "32", "memory": "64Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await?;
    }
    Ok(())
}

/// The baseline binder: every unbound pod goes to the next node, no questions asked.
async fn round_robin(c: Client, ns: String) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(c.clone(), &ns);
    let next = std::sync::atomic::AtomicUsize::new(0);
    watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .try_filter(|p| {
            std::future::ready(p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none())
        })
        .map_err(anyhow::Error::from)
        .try_for_each_concurrent(32, |p| {
            let api = api.clone();
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move {
                let b = Binding {
                    metadata: ObjectMeta {
                        name: Some(p.name_any()),
                        ..Default::default()
                    },
                    target: ObjectReference {
                        kind: Some("Node".into()),
                        name: Some(format!("node-{:03}", i % NODES)),
                        ..Default::default()
                    },
                };
                match api
                    .create_subresource::<serde_json::Value>(
                        "binding",
                        &p.name_any(),
                        &PostParams::default(),
                        serde_json::to_vec(&b)?,
                    )
                    .await
                {
                    Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        })
        .await
}

struct Run {
    pods_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    spread: (usize, usize),
}

/// Creates the pods in `ns` and waits for all to be bound; the binder must already run.
async fn one_run(c: &Client, ns: &str) -> Result<Run> {
    let api: Api<Pod> = Api::namespaced(c.clone(), ns);
    let created: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let bound = {
        let api = api.clone();
        let created = created.clone();
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(PODS);
            let mut per_node: HashMap<String, usize> = HashMap::new();
            let mut stream = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            let mut done = std::collections::HashSet::new();
            while let Some(p) = stream.try_next().await? {
                if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                    if done.insert(p.name_any()) {
                        let t0 = created.lock().unwrap().get(&p.name_any()).copied();
                        if let Some(t0) = t0 {
                            lat.push(t0.elapsed().as_secs_f64() * 1e3);
                        }
                        *per_node.entry(n).or_default() += 1;
                        if done.len() == PODS {
                            return Ok::<_, anyhow::Error>((Instant::now(), lat, per_node));
                        }
                    }
                }
            }
            bail!("the pod watch ended")
        })
    };
    let start = Instant::now();
    futures::stream::iter(0..PODS)
        .map(|i| {
            let api = api.clone();
            let created = created.clone();
            async move {
                let name = format!("p-{i:04}");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"containers": [{"name": "c", "image": "ferry/echo:1",
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}
                }))?;
                created.lock().unwrap().insert(name, Instant::now());
                api.create(&PostParams::default(), &pod).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let (end, mut lat, per_node) = tokio::time::timeout(Duration::from_secs(120), bound)
        .await
        .context("pods were not all bound within 120 s")???;
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Ok(Run {
        pods_per_s: PODS as f64 / (end - start).as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        spread: (
            per_node.values().copied().min().unwrap_or(0),
            per_node.values().copied().max().unwrap_or(0),
        ),
    })
}

async fn new_namespace(c: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

fn median(mut v: Vec<Run>) -> Run {
    v.sort_by(|a, b| a.pods_per_s.total_cmp(&b.pods_per_s));
    v.swap_remove(v.len() / 2)
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = ferry_testbed::bench::BenchArgs::parse();
    let quick = args.quick;
    let reps = if quick { 1 } else { 3 };
    let dir = std::env::temp_dir().join(format!("ferry-sched-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = EmbeddedStore::open(&dir.join("store"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let url = format!("https://127.0.0.1:{}", addr.port());
    let pki = pki::ensure(&dir, &url, &["127.0.0.1".into()], &[])?;
    let cfg = Config {
        service_cidr: "10.96.0.0/12".parse()?,
        node_ports: (30000, 32767),
        tokens: HashMap::new(),
        advertise: std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, addr.port()),
        limits: Default::default(),
        node_authorizer: true,
        signer: None,
        kubelet_tls: None,
    };
    let api = ApiServer::new(store, cfg).await?;
    let server =
        tokio::spawn(async move { server::serve(api, listener, &pki, Default::default()).await });
    let admin = client(&dir, "admin").await?;
    eprintln!("[bench scheduler] creating {NODES} nodes");
    make_nodes(&admin).await?;

    let mut ferry = Vec::new();
    let mut baseline = Vec::new();
    for rep in 0..reps {
        // Ferry's scheduler, as its own client with its own identity.
        let ns = format!("sched-{rep}");
        new_namespace(&admin, &ns).await?;
        let sched = tokio::spawn(scheduler::run(client(&dir, "scheduler").await?));
        tokio::time::sleep(Duration::from_millis(500)).await; // let it list
        let r = one_run(&admin, &ns).await?;
        sched.abort();
        eprintln!(
            "[bench scheduler] run {}/{reps} scheduler: {:.0} pods/s (p50 {:.1} ms, p99 {:.1} ms), {}..{} pods per node",
            rep + 1,
            r.pods_per_s,
            r.p50_ms,
            r.p99_ms,
            r.spread.0,
            r.spread.1
        );
        ferry.push(r);
        // The baseline, on the same server with the same number of bound pods before it.
        let ns = format!("rr-{rep}");
        new_namespace(&admin, &ns).await?;
        let rr = tokio::spawn(round_robin(client(&dir, "scheduler").await?, ns.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = one_run(&admin, &ns).await?;
        rr.abort();
        eprintln!(
            "[bench scheduler] run {}/{reps} round-robin: {:.0} pods/s (p50 {:.1} ms, p99 {:.1} ms)",
            rep + 1,
            r.pods_per_s,
            r.p50_ms,
            r.p99_ms
        );
        baseline.push(r);
    }
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
    let (f, b) = (median(ferry), median(baseline));

    let mut md = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        md,
        "Scheduler, {} run ({} of {reps}) on {} cores, kernel {}: {PODS} pods (100m CPU, 128Mi each) over {NODES} nodes; API server, scheduler and client in one process.\n",
        if quick { "quick" } else { "full" },
        if reps > 1 { "median" } else { "one" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );
    let _ = writeln!(md, "| binder | pods/s | create-to-bound p50 | p99 | pods per node | vs round-robin | vs target 1,000/s |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for (name, r) in [
        ("Ferry scheduler", &f),
        ("round-robin (decides nothing)", &b),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.1} ms | {:.1} ms | {}..{} | {:.2}x | {:.2}x |",
            r.pods_per_s,
            r.p50_ms,
            r.p99_ms,
            r.spread.0,
            r.spread.1,
            r.pods_per_s / b.pods_per_s,
            r.pods_per_s / TARGET
        );
    }
    args.report(
        "scheduler",
        &md,
        &json!({
            "quick": quick, "nodes": NODES, "pods": PODS,
            "scheduler": {"pods_per_s": f.pods_per_s, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms,
                          "min_per_node": f.spread.0, "max_per_node": f.spread.1},
            "round_robin": {"pods_per_s": b.pods_per_s, "p50_ms": b.p50_ms, "p99_ms": b.p99_ms},
            "target_pods_per_s": TARGET,
        }),
    )?;
    Ok(())
}
