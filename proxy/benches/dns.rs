//! `cargo xtask bench dns`: the node's cluster DNS with 10,000 Services, side by side with a
//! reference authoritative server from Debian (unbound) serving the same records as a static
//! zone, in the same run.
//!
//! The control plane (`ferry-controlplane`, embedded store) and `ferry-proxy --kubeconfig
//! --dns-addr` run as their own processes in a node namespace; unbound runs there too with
//! one `local-data` line per record Ferry answers (A and SRV of every Service) and the rest of
//! `cluster.local` static (NXDOMAIN). `dnsperf` asks both from the node namespace the same
//! mix: 60% A of a Service, 20% SRV of its named port, 20% names that do not exist.
//! - queries/s: dnsperf as fast as the server answers (400 queries outstanding over 16
//!   clients), in turns (reference, Ferry, reference, Ferry, ...), median of the turns;
//! - latency p50/p99: dnsperf at a fixed rate both servers sustain (`-Q`), every query's
//!   latency from its verbose output;
//! - create to resolvable: a Service created through the API, the clock started before the
//!   request, a query every half millisecond to the node's server until the name answers.
//!   Baseline: when the same creation reaches a plain watch in this process (the API's
//!   delivery alone).
//!
//! Arguments: `--quick` (fewer Services, shorter turns), `--out DIR`.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ferry_testbed::bench::{conditions, percentile, BenchArgs};
use ferry_testbed::controlplane::ControlPlane;
use ferry_testbed::netns::Netns;
use ferry_testbed::Topology;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use serde_json::json;

use common::{vip, FirstSeen};

const NODE_DNS: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);
const REFERENCE_PORT: u16 = 5300;
const ZONE: &str = "cluster.local";
const TARGET_CREATE_P99_MS: f64 = 50.0;
/// dnsperf's sockets: enough that SO_REUSEPORT's hash spreads them evenly over either
/// server's per-core sockets (with 4, one thread could get them all in one turn).
const CLIENTS: u32 = 16;

fn fqdn(j: usize) -> String {
    format!("s{j}.default.svc.{ZONE}")
}

/// The Services `s<j>`, each with a named port (for its SRV record); no endpoints needed.
async fn populate(client: &kube::Client, services: usize) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    common::create_all("dns", "Services", services, |j| {
        let api = api.clone();
        async move {
            let svc: Service = serde_json::from_value(json!({
                "metadata": {"name": format!("s{j}")},
                "spec": {"clusterIP": vip(j).to_string(),
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
            }))?;
            api.create(&PostParams::default(), &svc).await?;
            Ok(())
        }
    })
    .await
}

/// unbound's configuration: the same records as a static zone, as many threads as cores, and
/// receive buffers at least as large as Ferry's (unbound forces them past rmem_max as root).
fn unbound_conf(dir: &std::path::Path, services: usize) -> Result<std::path::PathBuf> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut c = format!(
        "server:\n  interface: 127.0.0.1@{REFERENCE_PORT}\n  port: {REFERENCE_PORT}\n  num-threads: {threads}\n  so-reuseport: yes\n  so-rcvbuf: 4m\n  so-sndbuf: 4m\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  access-control: 0.0.0.0/0 allow\n  module-config: \"iterator\"\n  local-zone: \"{ZONE}.\" static\n",
        dir.display()
    );
    for j in 0..services {
        let n = fqdn(j);
        let _ = writeln!(c, "  local-data: \"{n}. 5 IN A {}\"", vip(j));
        let _ = writeln!(
            c,
            "  local-data: \"_http._tcp.{n}. 5 IN SRV 0 100 80 {n}.\""
        );
    }
    c.push_str("remote-control:\n  control-enable: no\n");
    let path = dir.join("unbound.conf");
    std::fs::write(&path, c)?;
    Ok(path)
}

/// dnsperf's query file: 60% A, 20% SRV, 20% names that do not exist.
fn queries(dir: &std::path::Path, services: usize) -> Result<std::path::PathBuf> {
    let mut q = String::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = (x % services as u64) as usize;
        match i % 5 {
            0..=2 => {
                let _ = writeln!(q, "{} A", fqdn(j));
            }
            3 => {
                let _ = writeln!(q, "_http._tcp.{} SRV", fqdn(j));
            }
            _ => {
                let _ = writeln!(q, "n{j}.default.svc.{ZONE} A");
            }
        }
    }
    let path = dir.join("queries.txt");
    std::fs::write(&path, q)?;
    Ok(path)
}

fn query_bytes(name: &str, id: u16) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("a valid name"),
            RecordType::A,
        ));
    m.to_vec().expect("a query encodes")
}

/// One query to `server` from this (node-namespace) thread; the response code and whether
/// the answer section is not empty.
fn ask(sock: &UdpSocket, server: SocketAddr, name: &str, id: u16) -> Option<(ResponseCode, bool)> {
    sock.send_to(&query_bytes(name, id), server).ok()?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        let m = Message::from_vec(&buf[..n]).ok()?;
        if m.id() == id {
            return Some((m.response_code(), !m.answers().is_empty()));
        }
    }
}

fn wait_answering(server: SocketAddr, name: &str) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if ask(&sock, server, name, 1).is_some_and(|(c, a)| c == ResponseCode::NoError && a) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{server} did not answer {name} within 30 s")
}

struct Perf {
    qps: f64,
    lost: u64,
    latencies_ms: Vec<f64>,
}

/// dnsperf against `server` in `ns`: `seconds` long, at most `max_qps` (0: as fast as it
/// answers), with every query's latency when `verbose`.
fn dnsperf(
    ns: &Netns,
    server: SocketAddr,
    file: &std::path::Path,
    seconds: u32,
    max_qps: u32,
    verbose: bool,
) -> Result<Perf> {
    let mut cmd = Command::new("dnsperf");
    cmd.args([
        "-s",
        &server.ip().to_string(),
        "-p",
        &server.port().to_string(),
    ])
    .arg("-d")
    .arg(file)
    .args([
        "-l",
        &seconds.to_string(),
        "-c",
        &CLIENTS.to_string(),
        "-q",
        "400",
        "-t",
        "2",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if max_qps > 0 {
        cmd.args(["-Q", &max_qps.to_string()]);
    }
    if verbose {
        cmd.arg("-v");
    }
    let out = ns
        .spawn(&mut cmd)
        .context("dnsperf (`cargo xtask setup` installs it)")?
        .wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "dnsperf against {server} failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |label: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let qps = field("Queries per second:").context("no queries/s in dnsperf's output")?;
    let lost = field("Queries lost:").unwrap_or(0.0) as u64;
    // Verbose lines: "> NOERROR name type 0.000123".
    let mut latencies_ms: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|s| s * 1e3)
        .collect();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Perf {
        qps,
        lost,
        latencies_ms,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = BenchArgs::parse();
    let quick = args.quick;
    let (services, turns, seconds, samples) = if quick {
        (2_000, 1, 3, 30)
    } else {
        (10_000, 3, 10, 200)
    };
    ferry_testbed::clean_up_on_signal();
    let mut t = Topology::new(0)?;
    // This thread (the runtime's only one) works in the node namespace.
    t.node.enter()?;
    let cp = ControlPlane::start_in(Some(&t.node.name), &[])?;
    let client = common::client(&cp, "admin").await?;
    populate(&client, services).await?;
    eprintln!("[bench dns] starting ferry-proxy --dns-addr {NODE_DNS} over {services} Services");
    // No rate limit per client (dnsperf is one client) and nowhere to forward to.
    t.proxy_args = [
        "--dns-addr",
        &NODE_DNS.to_string(),
        "--dns-upstream",
        "127.0.0.1:9",
        "--dns-client-qps",
        "0",
    ]
    .map(String::from)
    .to_vec();
    let _proxy = t.start_proxy_api(&cp.kubeconfig("kube-proxy"))?;
    let ferry: SocketAddr = (NODE_DNS, 53).into();
    wait_answering(ferry, &fqdn(services - 1))?;

    let dir = std::env::temp_dir().join(format!("{}-dns-bench", t.prefix));
    std::fs::create_dir_all(&dir)?;
    let conf = unbound_conf(&dir, services)?;
    let mut cmd = Command::new("unbound");
    cmd.arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let node = t.node.clone();
    t.spawn(&node, &mut cmd)
        .context("unbound (`cargo xtask setup` installs it)")?;
    let reference: SocketAddr = (Ipv4Addr::LOCALHOST, REFERENCE_PORT).into();
    wait_answering(reference, &fqdn(services - 1))?;
    let file = queries(&dir, services)?;

    // Queries per second, in turns.
    let (mut ref_qps, mut ferry_qps) = (Vec::new(), Vec::new());
    for turn in 0..turns {
        for (name, server, into) in [
            ("unbound", reference, &mut ref_qps),
            ("ferry", ferry, &mut ferry_qps),
        ] {
            let p = dnsperf(&t.node, server, &file, seconds, 0, false)?;
            eprintln!(
                "[bench dns] turn {}/{turns} {name}: {:.0} queries/s, {} lost",
                turn + 1,
                p.qps,
                p.lost
            );
            into.push(p.qps);
        }
    }
    let (rq, fq) = (median(ref_qps), median(ferry_qps));

    // Latency at a rate both sustain: half the slower one's.
    let rate = ((rq.min(fq) / 2.0) as u32).max(500);
    let mut lat = HashMap::new();
    for (name, server) in [("unbound", reference), ("ferry", ferry)] {
        let p = dnsperf(&t.node, server, &file, seconds.min(5), rate, true)?;
        if p.latencies_ms.is_empty() {
            bail!("dnsperf -v printed no latencies for {name}");
        }
        eprintln!(
            "[bench dns] {name} at {rate} queries/s: p50 {:.3} ms, p99 {:.3} ms, {} lost",
            percentile(&p.latencies_ms, 0.5),
            percentile(&p.latencies_ms, 0.99),
            p.lost
        );
        lat.insert(name, p);
    }

    // Create to resolvable, against the API's own delivery to a plain watch. A new client:
    // the API server has closed the first one's idle connection during the queries.
    let client = common::client(&cp, "admin").await?;
    let seen = FirstSeen::watch(
        Api::<Service>::namespaced(client.clone(), "default"),
        |svc| svc.metadata.name.clone(),
    )
    .await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let (mut resolvable, mut delivered) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let j = services + i;
        let name = format!("s{j}");
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"clusterIP": vip(j).to_string(), "ports": [{"name": "http", "port": 80}]}
        }))?;
        let t0 = Instant::now();
        // The request runs while this thread asks: the clock includes the API's write.
        let create = {
            let api = api.clone();
            tokio::spawn(async move { api.create(&PostParams::default(), &svc).await })
        };
        let deadline = t0 + Duration::from_secs(10);
        let mut id: u16 = 1;
        loop {
            tokio::task::yield_now().await;
            id = id.wrapping_add(1);
            if ask(&sock, ferry, &fqdn(j), id).is_some_and(|(c, a)| c == ResponseCode::NoError && a)
            {
                resolvable.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "sample {i}: {} never resolved (see {})",
                    fqdn(j),
                    t.proxy_log().display()
                );
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        create.await??;
        delivered.extend(seen.after_ms(&name, t0).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(seen);
    resolvable.sort_by(f64::total_cmp);
    delivered.sort_by(f64::total_cmp);
    if delivered.is_empty() {
        bail!("the baseline watch saw none of the creations");
    }
    let (cp50, cp99) = (percentile(&resolvable, 0.5), percentile(&resolvable, 0.99));
    let (dp50, dp99) = (percentile(&delivered, 0.5), percentile(&delivered, 0.99));
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };

    let (rl, fl) = (&lat["unbound"], &lat["ferry"]);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Cluster DNS, {}: {services} Services (A and SRV each), query mix 60% A / 20% SRV / 20% NXDOMAIN from dnsperf ({CLIENTS} clients, 400 outstanding) in the node namespace; the reference is unbound ({} threads) serving the same records as a static zone. Queries/s: median of {turns} turn(s) of {seconds} s each, servers alternating.\n",
        conditions(quick),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let _ = writeln!(
        md,
        "| server | queries/s | vs unbound | p50 at {rate}/s | p99 at {rate}/s | lost |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| unbound (static zone, baseline) | {rq:.0} | 1.00x | {:.3} ms | {:.3} ms | {} |",
        percentile(&rl.latencies_ms, 0.5),
        percentile(&rl.latencies_ms, 0.99),
        rl.lost
    );
    let _ = writeln!(
        md,
        "| ferry-proxy | {fq:.0} | {:.2}x | {:.3} ms | {:.3} ms | {} |",
        fq / rq.max(1e-9),
        percentile(&fl.latencies_ms, 0.5),
        percentile(&fl.latencies_ms, 0.99),
        fl.lost
    );
    let _ = writeln!(
        md,
        "\nTarget queries/s >= unbound's: {} ({:.2}x).\n",
        verdict(fq >= rq),
        fq / rq.max(1e-9)
    );
    let _ = writeln!(
        md,
        "Service create to name resolvable at the node, {samples} samples:\n\n| path | p50 | p99 | max | p99 vs target {TARGET_CREATE_P99_MS} ms |\n|---|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        md,
        "| create -> answered by ferry-proxy | {cp50:.2} ms | {cp99:.2} ms | {:.2} ms | {} ({:.2}x) |",
        resolvable.last().copied().unwrap_or(0.0),
        verdict(cp99 < TARGET_CREATE_P99_MS),
        cp99 / TARGET_CREATE_P99_MS
    );
    let _ = writeln!(
        md,
        "| create -> event at a plain watch (baseline: API delivery alone) | {dp50:.2} ms | {dp99:.2} ms | {:.2} ms | |",
        delivered.last().copied().unwrap_or(0.0),
    );
    args.report(
        "dns",
        &md,
        &json!({
            "quick": quick, "services": services, "turns": turns, "seconds": seconds,
            "qps": {"unbound": rq, "ferry": fq, "ratio": fq / rq.max(1e-9)},
            "latency_rate_qps": rate,
            "latency_ms": {
                "unbound": {"p50": percentile(&rl.latencies_ms, 0.5), "p99": percentile(&rl.latencies_ms, 0.99)},
                "ferry": {"p50": percentile(&fl.latencies_ms, 0.5), "p99": percentile(&fl.latencies_ms, 0.99)},
            },
            "create_to_resolvable_ms": {"p50": cp50, "p99": cp99},
            "watch_delivery_ms": {"p50": dp50, "p99": dp99},
            "target_create_p99_ms": TARGET_CREATE_P99_MS,
        }),
    )?;
    std::fs::remove_dir_all(&dir).ok();
    drop(cp);
    drop(t);
    Ok(())
}
