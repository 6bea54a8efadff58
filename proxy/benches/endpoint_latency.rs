//! `cargo xtask bench endpoints`: how long from an EndpointSlice write to the new endpoint
//! being live in the datapath's maps, with 10,000 Services (and their slices) present.
//!
//! The control plane (`ferry-controlplane`, embedded store) and `ferry-proxy --kubeconfig`
//! run as their own processes in a node namespace. Each sample moves one Service's single
//! endpoint to a new address with a merge patch, starting the clock before the request is
//! sent, and polls the pinned service and backend maps (every 50 µs) until the Service's
//! slot 1 names the new address. Samples are spaced so they do not queue.
//!
//! Baseline in the same run: when the same change reaches a plain watch of EndpointSlices
//! in this process (the API server's delivery alone). What the proxy adds is the difference.
//!
//! Arguments: `--quick` (fewer Services and samples), `--out DIR`.

mod common;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use ferry_testbed::bench::{conditions, percentile, BenchArgs};
use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::Topology;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use proxy_common::{Backend, ServiceKey, ServiceValue, PROTO_TCP};
use serde_json::json;

use common::{vip, FirstSeen};

const TARGET_P99_MS: f64 = 10.0;

fn new_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8)
}

struct Maps {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
}

impl Maps {
    fn open(bpf_dir: &std::path::Path) -> Result<Maps> {
        let open = |name: &str| -> Result<Map> {
            let p = bpf_dir.join("maps").join(name);
            Ok(Map::HashMap(
                MapData::from_pin(&p).with_context(|| format!("opening {}", p.display()))?,
            ))
        };
        Ok(Maps {
            services: BpfHashMap::try_from(open("FERRY_SERVICES")?)?,
            backends: BpfHashMap::try_from(open("FERRY_BACKENDS")?)?,
        })
    }

    /// The address slot 1 of the frontend `addr:80/TCP` sends to, if any.
    fn first_backend(&self, addr: Ipv4Addr) -> Option<Ipv4Addr> {
        let key = ServiceKey::new(
            u32::from_ne_bytes(addr.octets()),
            80u16.to_be(),
            PROTO_TCP,
            1,
        );
        let v = self.services.get(&key, 0).ok()?;
        let b = self.backends.get(&v.backend_id, 0).ok()?;
        Some(Ipv4Addr::from(b.addr.to_ne_bytes()))
    }
}

async fn populate(client: &kube::Client, services: usize) -> Result<()> {
    let svc_api: Api<Service> = Api::namespaced(client.clone(), "default");
    let slice_api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    common::create_all("endpoints", "Services and slices", services, |j| {
        let (svc_api, slice_api) = (svc_api.clone(), slice_api.clone());
        async move {
            let svc: Service = serde_json::from_value(json!({
                "metadata": {"name": format!("s{j}")},
                "spec": {"clusterIP": vip(j).to_string(), "ports": [{"port": 80, "targetPort": 8080}]}
            }))?;
            svc_api.create(&PostParams::default(), &svc).await?;
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": format!("s{j}"),
                             "labels": {"kubernetes.io/service-name": format!("s{j}")}},
                "addressType": "IPv4",
                "ports": [{"port": 8080}],
                "endpoints": [{"addresses": ["10.250.0.1"]}]
            }))?;
            slice_api.create(&PostParams::default(), &slice).await?;
            Ok(())
        }
    })
    .await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = BenchArgs::parse();
    let quick = args.quick;
    let (services, samples) = if quick { (2_000, 60) } else { (10_000, 300) };
    ferry_testbed::clean_up_on_signal();
    let mut t = Topology::new(1)?;
    // This thread (the runtime's only one) talks to the API server in the node namespace.
    t.node.enter()?;
    let cp = ControlPlane::start_in(Some(&t.node.name), &[])?;
    let client = common::client(&cp, "admin").await?;
    populate(&client, services).await?;
    eprintln!("[bench endpoints] starting ferry-proxy over {services} Services");
    let started = Instant::now();
    let _proxy = t.start_proxy_api(&cp.kubeconfig("kube-proxy"))?;
    let first_sync = started.elapsed();
    let maps = Maps::open(&t.bpf_dir)?;
    if maps.first_backend(vip(services - 1)) != Some(Ipv4Addr::new(10, 250, 0, 1)) {
        bail!("after the first sync the last Service is not in the maps");
    }

    // The baseline: a plain watch in this process, noting when each new address shows up.
    let seen = FirstSeen::watch(
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        |slice| {
            let e = slice.endpoints.first()?;
            e.addresses.first().cloned()
        },
    )
    .await;

    let slice_api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let (mut live, mut delivered) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let j = (i * 7919) % services;
        let ip = new_ip(i);
        let patch = json!({"endpoints": [{"addresses": [ip.to_string()]}]});
        let t0 = Instant::now();
        slice_api
            .patch(
                &format!("s{j}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        let deadline = t0 + Duration::from_secs(10);
        loop {
            if maps.first_backend(vip(j)) == Some(ip) {
                live.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "sample {i}: {ip} never became live for Service s{j} (see {})",
                    t.proxy_log().display()
                );
            }
            tokio::time::sleep(Duration::from_micros(50)).await;
        }
        // The plain watch has had at least as long; give it a moment more if it lags.
        delivered.extend(seen.after_ms(&ip.to_string(), t0).await);
        if (i + 1) % 50 == 0 {
            eprintln!("[bench endpoints] {} of {samples} samples", i + 1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(seen);
    live.sort_by(f64::total_cmp);
    delivered.sort_by(f64::total_cmp);
    if delivered.is_empty() {
        bail!("the baseline watch saw none of the changes");
    }
    let (lp50, lp99) = (percentile(&live, 0.5), percentile(&live, 0.99));
    let (dp50, dp99) = (percentile(&delivered, 0.5), percentile(&delivered, 0.99));

    let mut md = String::new();
    let _ = writeln!(
        md,
        "EndpointSlice write to live map entry, {}: {services} Services with a slice each, {samples} samples 20 ms apart; control plane and ferry-proxy as processes. First sync of all {services} Services: {:.0} ms.\n",
        conditions(quick),
        first_sync.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        md,
        "| path | p50 | p99 | max | p99 vs target {TARGET_P99_MS} ms |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| write -> entry live in Ferry's maps | {lp50:.2} ms | {lp99:.2} ms | {:.2} ms | {:.2}x |",
        live.last().copied().unwrap_or(0.0),
        lp99 / TARGET_P99_MS
    );
    let _ = writeln!(
        md,
        "| write -> event at a plain watch (baseline: API delivery alone) | {dp50:.2} ms | {dp99:.2} ms | {:.2} ms | {:.2}x |",
        delivered.last().copied().unwrap_or(0.0),
        dp99 / TARGET_P99_MS
    );
    let _ = writeln!(
        md,
        "\nFerry adds {:.2} ms at p50 over the API's own delivery ({:.2}x the baseline).",
        lp50 - dp50,
        lp50 / dp50.max(1e-9)
    );
    args.report(
        "endpoints",
        &md,
        &json!({
            "quick": quick, "services": services, "samples": samples,
            "first_sync_ms": first_sync.as_secs_f64() * 1e3,
            "live_ms": {"p50": lp50, "p99": lp99},
            "watch_ms": {"p50": dp50, "p99": dp99},
            "target_p99_ms": TARGET_P99_MS,
        }),
    )?;
    drop(cp);
    drop(t);
    Ok(())
}
