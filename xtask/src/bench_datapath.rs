//! `cargo xtask bench datapath [--quick]`: what Ferry's datapath costs, measured against the
//! direct path in the same run.
//!
//! Rows: a client pod reaching three backend pods (a) directly by pod IP, with no program
//! attached (the limit), before and again after the Ferry rows; (b) through a ClusterIP picked
//! at random among N = 1, 1,000 and 10,000 programmed Services. For each row: new connections/s
//! (TCP_CRR-style) and round trips/s on persistent connections with p50/p99 latency
//! (TCP_RR-style). Ferry forwards translated packets itself (BPF host routing); one more row
//! shows it handing them to the host stack instead (`--bpf-host-routing=false`); (c) at the
//! largest N through the socket programs (connect-time translation), and to the pods directly
//! with those programs attached (what they cost apart from the translation). Then how fast a
//! connect to a Service without endpoints is refused (the datapath's ICMP port unreachable),
//! next to a connect to a closed port of a pod (the kernel's RST) in the same run, and the time
//! to program 10,000 Services x 10 endpoints from scratch.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry_testbed::{pod_ip, Topology, ECHO_PORT};
use serde::Serialize;

use crate::measure::{
    bench_svc, ferry_yaml, loadgen, median, run_reps, vip, write_results, Load, Reps, Rng, RunInfo,
};

use crate::kube_rules::Svc;

const BACKENDS: usize = 3;

const CLIENT: usize = BACKENDS;

#[derive(Clone, Debug, Serialize)]
struct Row {
    name: String,
    services: usize,
    crr: Load,
    rr: Load,
    /// Every repetition's rates, for the spread.
    crr_runs: Vec<f64>,
    rr_runs: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    run: RunInfo,
    rows: Vec<Row>,
    program_10k_x10_sync_seconds: f64,
    program_10k_x10_startup_seconds: f64,
    /// Connects refused by Ferry for a Service without endpoints (tc: ICMP port unreachable).
    refused_no_endpoints: Load,
    /// The same with connect-time load balancing (the socket program fails the connect).
    refused_no_endpoints_socket_lb: Load,
    /// Connects refused by a pod's kernel (closed port): the baseline.
    refused_closed_port: Load,
}

/// A Service without endpoints (outside the addresses of `services_yaml`).
const EMPTY: usize = 50_000;

/// `n` ClusterIP Services; each has `eps` endpoints. With `real`, every Service points at the
/// test bed's backend pods; otherwise at distinct addresses (a worst case for the backend map).
fn services_yaml(n: usize, eps: usize, real: bool) -> String {
    let svcs: Vec<Svc> = (0..n)
        .map(|i| {
            let endpoints = (0..eps)
                .map(|j| {
                    let addr = if real {
                        pod_ip(j % BACKENDS)
                    } else {
                        Ipv4Addr::from(
                            u32::from(Ipv4Addr::new(10, 248, 0, 0)) + (i * eps + j) as u32,
                        )
                    };
                    (addr, ECHO_PORT)
                })
                .collect();
            bench_svc(i, endpoints)
        })
        .collect();
    ferry_yaml(&svcs)
}

struct Plan {
    secs: f64,
    reps: usize,
    concurrency: usize,
}

fn measure(
    t: &Topology,
    plan: &Plan,
    name: &str,
    services: usize,
    targets: &[String],
    step: &mut usize,
    steps: usize,
) -> Result<Row> {
    let Reps { crr, rr, .. } = run_reps(
        t,
        CLIENT,
        targets,
        (plan.secs, plan.reps, plan.concurrency),
        |rep| {
            *step += 1;
            eprintln!(
                "[bench {step}/{steps}] {name}: run {}/{} ({:.0} s each for CRR and RR)",
                rep + 1,
                plan.reps,
                plan.secs
            );
        },
    )?;
    Ok(Row {
        name: name.into(),
        services,
        crr_runs: crr.iter().map(|l| l.rate).collect(),
        rr_runs: rr.iter().map(|l| l.rate).collect(),
        crr: median(crr),
        rr: median(rr),
    })
}

/// The direct rows measured each next to a socket LB repetition.
const PAIRED: &str = "direct to pod IPs, paired with socket LB";

/// One row from repetitions measured apart (each a row of one repetition).
fn merge(reps: Vec<Row>) -> Row {
    let first = &reps[0];
    let (name, services) = (first.name.clone(), first.services);
    let crr_runs = reps.iter().flat_map(|r| r.crr_runs.clone()).collect();
    let rr_runs = reps.iter().flat_map(|r| r.rr_runs.clone()).collect();
    let (crr, rr): (Vec<Load>, Vec<Load>) = reps.into_iter().map(|r| (r.crr, r.rr)).unzip();
    Row {
        name,
        services,
        crr: median(crr),
        rr: median(rr),
        crr_runs,
        rr_runs,
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn markdown(r: &Report) -> String {
    let base = &r.rows[0];
    let base_crr = (r.rows[0].crr.rate + r.rows.last().unwrap().crr.rate) / 2.0;
    let base_rr = (r.rows[0].rr.rate + r.rows.last().unwrap().rr.rate) / 2.0;
    let one = r
        .rows
        .iter()
        .find(|x| x.services == 1 && !x.name.contains("kernel"));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} (median; spread in the JSON).\n",
        r.run.describe("datapath")
    );
    let _ = writeln!(s, "| path | conn/s (CRR) | vs direct | round trips/s (RR) | vs direct | RR p50 µs | RR p99 µs |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2}x | {:.0} | {:.2}x | {:.0} | {:.0} |",
            row.name,
            row.crr.rate,
            row.crr.rate / base_crr,
            row.rr.rate,
            row.rr.rate / base_rr,
            row.rr.p50_us,
            row.rr.p99_us
        );
    }
    let _ = writeln!(
        s,
        "\nDirect baseline = mean of the before and after rows (before: {:.0} CRR, {:.0} RR).",
        base.crr.rate, base.rr.rate
    );
    if let (Some(one), Some(big)) = (one, r.rows.iter().find(|x| x.services == 10_000)) {
        let _ = writeln!(s, "10,000 Services vs 1 Service: {:.3}x conn/s, {:.3}x round trips/s (target: within 3%).", big.crr.rate / one.crr.rate, big.rr.rate / one.rr.rate);
    }
    let (f, k) = (&r.refused_no_endpoints, &r.refused_closed_port);
    let _ = writeln!(
        s,
        "Connect to a Service without endpoints, refused by Ferry: p50 {:.0} µs, p99 {:.0} µs over {} connects (target p99 < 1000 µs: {}); to a closed port of a pod (the kernel's RST), same run: p50 {:.0} µs, p99 {:.0} µs ({:.2}x at p99).",
        f.p50_us,
        f.p99_us,
        f.transactions,
        verdict(f.p99_us < 1000.0),
        k.p50_us,
        k.p99_us,
        f.p99_us / k.p99_us.max(1.0)
    );
    let sl = &r.refused_no_endpoints_socket_lb;
    let _ = writeln!(
        s,
        "With socket LB the connect itself fails (ECONNREFUSED, no packet sent): p50 {:.0} µs, p99 {:.0} µs over {} connects (target p99 < 1000 µs: {}).",
        sl.p50_us,
        sl.p99_us,
        sl.transactions,
        verdict(sl.p99_us < 1000.0),
    );
    let sock = r
        .rows
        .iter()
        .find(|x| x.name.starts_with("Ferry socket LB"));
    let paired = r.rows.iter().find(|x| x.name == PAIRED);
    if let (Some(sock), Some(paired)) = (sock, paired) {
        // Each repetition against the direct one measured next to it; their median.
        let ratios = |a: &[f64], b: &[f64]| -> (f64, String) {
            let mut v: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            let list = v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], list.join(", "))
        };
        let (c, cs) = ratios(&sock.crr_runs, &paired.crr_runs);
        let (t, ts) = ratios(&sock.rr_runs, &paired.rr_runs);
        let _ = writeln!(
            s,
            "Socket LB at N={} vs the direct path measured next to each repetition (before it, then after it, in turn): {c:.2}x conn/s (target >= 0.98x: {}; repetitions {cs}), {t:.2}x round trips/s (target >= 0.98x: {}; repetitions {ts}); vs the before and after rows: {:.2}x, {:.2}x.",
            sock.services,
            verdict(c >= 0.98),
            verdict(t >= 0.98),
            sock.crr.rate / base_crr,
            sock.rr.rate / base_rr,
        );
    }
    let _ = writeln!(
        s,
        "Programming 10,000 Services x 10 endpoints from scratch: {:.3} s in the sync (validation + map writes; target < 1 s), {:.2} s from process start to healthy (includes parsing {} MB of YAML and loading the program).",
        r.program_10k_x10_sync_seconds,
        r.program_10k_x10_startup_seconds,
        services_yaml(10_000, 10, false).len() / 1_000_000
    );
    s
}

pub fn run(quick: bool) -> Result<()> {
    let plan = if quick {
        Plan {
            secs: 1.5,
            reps: 1,
            concurrency: 4,
        }
    } else {
        Plan {
            secs: 5.0,
            reps: 3,
            concurrency: 4,
        }
    };
    let sizes = [1usize, 1_000, 10_000];
    let steps = (sizes.len() + 6) * plan.reps;
    let mut step = 0;

    let mut t = Topology::with_prefix(&format!("fb{}", std::process::id()), BACKENDS + 1)?;
    // Servers close first in connection-rate runs; with no TIME_WAIT kept on the servers, the
    // client's ports can be reused at once and runs do not slow each other down (see the shared
    // bench notes). The whole port range keeps reuse rare anyway.
    t.pods[CLIENT]
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    for p in &t.pods[..BACKENDS] {
        p.ns.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
    }
    t.conntrack_gc_interval = 60.0; // ferry-proxy's default
    t.start_echo_servers()?;
    let direct: Vec<String> = (0..BACKENDS)
        .map(|i| format!("{}:{ECHO_PORT}", pod_ip(i)))
        .collect();
    let mut rows = vec![measure(
        &t,
        &plan,
        "direct to pod IPs (before)",
        0,
        &direct,
        &mut step,
        steps,
    )?];

    // Ferry handing translated packets to the host stack (netfilter, routing), for reference.
    eprintln!("[bench] Ferry with --bpf-host-routing=false, 1 Service");
    t.host_routing = false;
    let p = t.start_proxy(&services_yaml(1, BACKENDS, true))?;
    rows.push(measure(
        &t,
        &plan,
        "Ferry ClusterIP, N=1, kernel routing",
        1,
        &[format!("{}:80", vip(0))],
        &mut step,
        steps,
    )?);
    t.stop(p.pid, libc::SIGTERM)?;
    std::fs::remove_dir_all(&t.bpf_dir).ok();
    t.host_routing = true;

    let mut rng = Rng::seeded();
    let mut proxy = None;
    for &n in &sizes {
        eprintln!("[bench] programming {n} Services");
        let yaml = services_yaml(n, BACKENDS, true);
        match &proxy {
            None => {
                proxy = Some(t.start_proxy(&yaml)?);
                // Fill the conntrack table to its steady state first (at these rates closed
                // connections occupy it for their 10 s close timeout), so the first row does not
                // enjoy an empty table that the later rows do not have.
                eprintln!(
                    "[bench] warming Ferry's conntrack table up ({:.0} s, not measured)",
                    plan.secs * 2.0
                );
                loadgen(
                    &t,
                    CLIENT,
                    "crr",
                    &[format!("{}:80", vip(0))],
                    plan.secs * 2.0,
                    plan.concurrency,
                )?;
            }
            Some(p) => {
                if !p.update(&yaml)? {
                    bail!("ferry-proxy rejected the generated Services");
                }
            }
        }
        let targets: Vec<String> = (0..plan.concurrency)
            .map(|_| format!("{}:80", vip(rng.next() as usize % n)))
            .collect();
        rows.push(measure(
            &t,
            &plan,
            &format!("Ferry ClusterIP, N={n} Services"),
            n,
            &targets,
            &mut step,
            steps,
        )?);
    }
    // Refusals, one connect at a time: Ferry's for a Service without endpoints, and a closed
    // port's on a backend pod (the kernel's RST, not a Service: the program lets it pass).
    eprintln!("[bench] refused connects");
    let empty = services_yaml(1, BACKENDS, true) + &ferry_yaml(&[bench_svc(EMPTY, vec![])]);
    let p = proxy.as_ref().expect("started above");
    if !p.update(&empty)? {
        bail!("ferry-proxy rejected a Service without endpoints");
    }
    let refused = |t: &Topology, target: String| -> Result<Load> {
        let l = loadgen(
            t,
            CLIENT,
            "refused",
            std::slice::from_ref(&target),
            plan.secs,
            1,
        )?;
        if l.errors > 0 || l.transactions == 0 {
            bail!(
                "{target}: {} connects refused, {} not",
                l.transactions,
                l.errors
            );
        }
        Ok(l)
    };
    let refused_no_endpoints = refused(&t, format!("{}:80", vip(EMPTY)))?;
    let refused_closed_port = refused(&t, format!("{}:9", pod_ip(0)))?;
    if let Some(p) = proxy.take() {
        t.stop(p.pid, libc::SIGTERM)?;
    }
    std::fs::remove_dir_all(&t.bpf_dir).ok();

    // Connect-time load balancing at the largest N: the client runs in the cgroup the socket
    // programs serve, so they translate each connect and the packets need no translation.
    // Each repetition is paired with one of the direct path, nothing attached (the daemon
    // stopped, its pins gone, a pause for the kernel to free its maps) and the client in the
    // same cgroup, before it and after it in turn (D S, S D, D S, ...), so this VM's drift over
    // a run hits both alike (the bench notes: alternate, do not batch). With the
    // programs attached, the same client also reaches the pods directly: what the attached
    // programs cost per packet, apart from the translation at connect.
    let n = *sizes.last().unwrap();
    eprintln!("[bench] Ferry socket LB, {n} Services, alternating with the direct path");
    t.enable_socket_lb()?;
    let yaml = services_yaml(n, BACKENDS, true) + &ferry_yaml(&[bench_svc(EMPTY, vec![])]);
    let targets: Vec<String> = (0..plan.concurrency)
        .map(|_| format!("{}:80", vip(rng.next() as usize % n)))
        .collect();
    let once = Plan { reps: 1, ..plan };
    let (mut paired, mut sock, mut attached) = (Vec::new(), Vec::new(), Vec::new());
    let mut refused_no_endpoints_socket_lb = None;
    let direct_alone = |t: &Topology, step: &mut usize| -> Result<Row> {
        std::thread::sleep(Duration::from_secs(2));
        measure(t, &once, PAIRED, 0, &direct, step, steps)
    };
    for rep in 0..plan.reps {
        let direct_first = rep % 2 == 0;
        if direct_first {
            paired.push(direct_alone(&t, &mut step)?);
        }
        let p = t.start_proxy(&yaml)?;
        sock.push(measure(
            &t,
            &once,
            &format!("Ferry socket LB, N={n} Services"),
            n,
            &targets,
            &mut step,
            steps,
        )?);
        attached.push(measure(
            &t,
            &once,
            "direct to pod IPs, socket LB attached",
            0,
            &direct,
            &mut step,
            steps,
        )?);
        if rep + 1 == plan.reps {
            refused_no_endpoints_socket_lb = Some(refused(&t, format!("{}:80", vip(EMPTY)))?);
        }
        t.stop(p.pid, libc::SIGTERM)?;
        std::fs::remove_dir_all(&t.bpf_dir).ok();
        if !direct_first {
            paired.push(direct_alone(&t, &mut step)?);
        }
    }
    t.disable_socket_lb();
    rows.extend([paired, sock, attached].map(merge));
    let refused_no_endpoints_socket_lb =
        refused_no_endpoints_socket_lb.expect("at least one repetition");

    // Back to the direct path with nothing attached, for order effects.
    rows.push(measure(
        &t,
        &plan,
        "direct to pod IPs (after)",
        0,
        &direct,
        &mut step,
        steps,
    )?);

    eprintln!("[bench] programming 10,000 Services x 10 endpoints from scratch");
    let yaml = services_yaml(10_000, 10, false);
    let start = Instant::now();
    let p = t.start_proxy(&yaml)?;
    let startup = start.elapsed().as_secs_f64();
    let sync = p.metric("ferry_sync_duration_seconds_sum")?;
    let frontends = p.metric("ferry_frontends")?;
    if frontends != 10_000.0 {
        bail!("expected 10000 frontends programmed, metrics say {frontends}");
    }
    t.stop(p.pid, libc::SIGTERM)?;
    drop(t);

    let report = Report {
        run: RunInfo::new(quick, plan.secs, plan.reps, plan.concurrency),
        rows,
        program_10k_x10_sync_seconds: sync,
        program_10k_x10_startup_seconds: startup,
        refused_no_endpoints,
        refused_no_endpoints_socket_lb,
        refused_closed_port,
    };
    write_results("datapath", &report, &markdown(&report))?;
    Ok(())
}
