//! `cargo xtask bench datapath [--quick]`: what Ferry's datapath costs, measured against the
//! direct path in the same run.
//!
//! Rows: a client pod reaching three backend pods (a) directly by pod IP, with no program
//! attached (the limit), before and again after the Ferry rows; (b) through a ClusterIP picked
//! at random among N = 1, 1,000 and 10,000 programmed Services. For each row: new connections/s
//! (TCP_CRR-style) and round trips/s on persistent connections with p50/p99 latency
//! (TCP_RR-style). Ferry forwards translated packets itself (BPF host routing); one more row
//! shows it handing them to the host stack instead (`--bpf-host-routing=false`). Then the time to
//! program 10,000 Services x 10 endpoints from scratch.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use ferry_testbed::{bin_path, pod_ip, Topology, ECHO_PORT};
use serde::Serialize;

use crate::kube_rules::Svc;

#[derive(Subcommand)]
pub enum Which {
    /// Datapath rates and programming time (see the module docs).
    Datapath(Opts),
    /// Ferry against kube-proxy's iptables, nftables and IPVS layouts, side by side.
    Compare(Opts),
    /// The API server on the embedded store against etcd: creates, updates, lists, watches.
    Controlplane(Opts),
    /// The scheduler: pods/s bound for 1,000 pods over 100 nodes, against a binder that
    /// decides nothing.
    Scheduler(Opts),
    /// ferry-proxy fed from the API: EndpointSlice write to live map entry, 10,000 Services.
    Endpoints(Opts),
    /// The datapath program alone: ns per packet for each path (new flow, established,
    /// reply, non-service) against an empty tc program, measured with BPF_PROG_TEST_RUN.
    Prog(Opts),
    /// ferry-cni against ptp + host-local: ADD and DEL latency for 100 pods.
    Cni(Opts),
    /// Pod startup on one node with containerd: create to Running and to Ready for 30 pods,
    /// against the same pods started straight through CRI.
    Pods(Opts),
}

#[derive(Args, Clone)]
pub struct Opts {
    /// A short run (about a minute) that shows the benchmark works; figures are noisier.
    #[arg(long)]
    quick: bool,
}

const BACKENDS: usize = 3;
const CLIENT: usize = BACKENDS;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Load {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    pub transactions: u64,
}

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

/// Where and how a benchmark ran: the head of every report.
#[derive(Debug, Serialize)]
pub struct RunInfo {
    pub machine: String,
    pub kernel: String,
    pub quick: bool,
    pub seconds_per_run: f64,
    pub repetitions: usize,
    pub concurrency: usize,
}

impl RunInfo {
    pub fn new(quick: bool, seconds_per_run: f64, repetitions: usize, concurrency: usize) -> Self {
        Self {
            machine: cpu_model(),
            kernel: uname(),
            quick,
            seconds_per_run,
            repetitions,
            concurrency,
        }
    }

    /// "`cargo xtask bench NAME` on MACHINE (Linux K), C connections, R x S s per figure".
    pub fn describe(&self, name: &str) -> String {
        format!(
            "`cargo xtask bench {name}{}` on {} (Linux {}): {} connections, {} x {:.1} s per figure",
            if self.quick { " --quick" } else { "" },
            self.machine,
            self.kernel,
            self.concurrency,
            self.repetitions,
            self.seconds_per_run
        )
    }
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    run: RunInfo,
    rows: Vec<Row>,
    program_10k_x10_sync_seconds: f64,
    program_10k_x10_startup_seconds: f64,
}

/// A xorshift generator: enough to pick Services at random without another dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(t ^ 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// `n` ClusterIP Services; each has `eps` endpoints. With `real`, every Service points at the
/// test bed's backend pods; otherwise at distinct addresses (a worst case for the backend map).
fn services_yaml(n: usize, eps: usize, real: bool) -> String {
    let svcs: Vec<Svc> = (0..n)
        .map(|i| Svc {
            ns: "bench".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            vip: vip(i),
            port: 80,
            endpoints: (0..eps)
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
                .collect(),
        })
        .collect();
    ferry_yaml(&svcs)
}

/// Services as Kubernetes YAML (a v1 Service and its EndpointSlice each), for ferry-proxy.
pub fn ferry_yaml(svcs: &[Svc]) -> String {
    let mut s = String::with_capacity(svcs.len() * 600);
    for v in svcs {
        let target = v.endpoints.first().map_or(v.port, |e| e.1);
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  clusterIP: {}\n  ports: [{{name: {}, port: {}, targetPort: {target}, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-a\n  namespace: {}\n  labels: {{kubernetes.io/service-name: {}}}\naddressType: IPv4\nports: [{{name: {}, port: {target}, protocol: TCP}}]\nendpoints:\n",
            v.name, v.ns, v.vip, v.port_name, v.port, v.name, v.ns, v.name, v.port_name
        );
        for (ip, _) in &v.endpoints {
            let _ = writeln!(s, "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}");
        }
    }
    s
}

/// Each measurement connects from an address of its own, so no connection tuple of an earlier
/// measurement (in any kernel table) can collide with its connections.
pub fn fresh_source(t: &Topology, client: usize) -> Result<Ipv4Addr> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 200, 0)) + n);
    t.add_pod_address(client, addr)?;
    Ok(addr)
}

/// Runs `ferry-loadgen` in pod `client` from a fresh source address.
fn loadgen(
    t: &Topology,
    client: usize,
    mode: &str,
    targets: &[String],
    secs: f64,
    concurrency: usize,
) -> Result<Load> {
    let bin = bin_path("ferry-loadgen")?;
    let source = fresh_source(t, client)?.to_string();
    let mut args = vec![
        "--mode".to_string(),
        mode.into(),
        "--seconds".into(),
        secs.to_string(),
        "--concurrency".into(),
        concurrency.to_string(),
        "--source".into(),
        source,
    ];
    for tg in targets {
        args.push("--target".into());
        args.push(tg.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = t.pods[client].ns.exec(bin.to_str().unwrap(), &args)?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("loadgen printed {out:?}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let load = Load {
        rate: f("rate"),
        p50_us: f("p50_us"),
        p99_us: f("p99_us"),
        errors: v["errors"].as_u64().unwrap_or(0),
        transactions: v["transactions"].as_u64().unwrap_or(0),
    };
    if load.rate == 0.0 {
        bail!(
            "no {mode} transaction completed towards {targets:?} ({} errors)",
            load.errors
        );
    }
    Ok(load)
}

pub fn median(mut v: Vec<Load>) -> Load {
    v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    v[v.len() / 2].clone()
}

struct Plan {
    secs: f64,
    reps: usize,
    concurrency: usize,
}

/// The CRR and RR runs of one measurement, with the machine's busy CPU time during the CRR runs.
pub struct Reps {
    pub crr: Vec<Load>,
    pub rr: Vec<Load>,
    pub crr_cpu_s: f64,
}

/// `reps` times a CRR run then an RR run from pod `client`; `before` is told each repetition.
pub fn run_reps(
    t: &Topology,
    client: usize,
    targets: &[String],
    (secs, reps, concurrency): (f64, usize, usize),
    mut before: impl FnMut(usize),
) -> Result<Reps> {
    let mut out = Reps {
        crr: Vec::new(),
        rr: Vec::new(),
        crr_cpu_s: 0.0,
    };
    for rep in 0..reps {
        before(rep);
        let c0 = cpu_busy_s();
        out.crr
            .push(loadgen(t, client, "crr", targets, secs, concurrency)?);
        out.crr_cpu_s += cpu_busy_s() - c0;
        out.rr
            .push(loadgen(t, client, "rr", targets, secs, concurrency)?);
    }
    Ok(out)
}

/// Busy CPU time of the whole machine, in seconds (from /proc/stat).
fn cpu_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle) as f64 / 100.0 // USER_HZ
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

fn uname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    let cores = info.lines().filter(|l| l.starts_with("processor")).count();
    format!("{cores} x {model}")
}

pub fn run(which: Which) -> Result<()> {
    ferry_testbed::clean_up_on_signal();
    let opts = match which {
        Which::Datapath(o) => o,
        Which::Compare(o) => return crate::compare::run(o.quick),
        Which::Controlplane(o) => return crate_bench("controlplane", "controlplane", o.quick),
        Which::Scheduler(o) => return crate_bench("controlplane", "scheduler", o.quick),
        Which::Endpoints(o) => return crate_bench("proxy", "endpoint_latency", o.quick),
        Which::Prog(o) => return crate_bench("proxy", "prog", o.quick),
        Which::Cni(o) => return crate::bench_cni::run(o.quick),
        Which::Pods(o) => {
            crate::images::build()?;
            return crate_bench("tests", "pods", o.quick);
        }
    };
    let plan = if opts.quick {
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
    let steps = (sizes.len() + 3) * plan.reps;
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
    // Back to the direct path with nothing attached, for order effects.
    if let Some(p) = proxy.take() {
        t.stop(p.pid, libc::SIGTERM)?;
    }
    std::fs::remove_dir_all(&t.bpf_dir).ok();
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
        run: RunInfo::new(opts.quick, plan.secs, plan.reps, plan.concurrency),
        rows,
        program_10k_x10_sync_seconds: sync,
        program_10k_x10_startup_seconds: startup,
    };
    write_results("datapath", &report, &markdown(&report))?;
    Ok(())
}

/// Prints the Markdown report and writes it with the JSON one under `bench/results/`; returns
/// the directory.
/// Benchmarks that live with their crate (the control plane's drive the API server
/// in-process; the proxy's reads its pinned maps); this runs one and keeps its results
/// beside the others.
fn crate_bench(krate: &str, bench: &str, quick: bool) -> Result<()> {
    let out = crate::workspace_root().join("bench/results");
    let out = out.to_string_lossy();
    let mut args = vec!["bench", "-p", krate, "--bench", bench, "--", "--out", &out];
    if quick {
        args.push("--quick");
    }
    crate::sh("cargo", &args)
}

pub fn write_results(name: &str, report: &impl Serialize, md: &str) -> Result<std::path::PathBuf> {
    println!("\n{md}");
    let dir = crate::workspace_root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join(format!("{name}.md")), md)?;
    eprintln!("[bench] wrote bench/results/{name}.json and {name}.md");
    Ok(dir)
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
    let _ = writeln!(
        s,
        "Programming 10,000 Services x 10 endpoints from scratch: {:.3} s in the sync (validation + map writes; target < 1 s), {:.2} s from process start to healthy (includes parsing {} MB of YAML and loading the program).",
        r.program_10k_x10_sync_seconds,
        r.program_10k_x10_startup_seconds,
        services_yaml(10_000, 10, false).len() / 1_000_000
    );
    s
}
