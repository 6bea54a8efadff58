//! `cargo xtask bench compare [--quick]`: Ferry against kube-proxy's modes, side by side, on one
//! topology and one workload, in one run.
//!
//! Modes, each set up and torn down completely before the next: no proxy (client to pod IPs),
//! Ferry (eBPF), kube-proxy's iptables layout through iptables-nft and through iptables-legacy,
//! its nftables layout, and IPVS where the kernel has it (detected; otherwise reported as
//! unavailable, never faked). For every Service count N the mode is programmed from scratch
//! (timed), then measured: new connections/s, round trips/s with p50/p99, CPU seconds per 10,000
//! connections (from /proc/stat), kernel memory, and at one N the time for one endpoint change to
//! reach the datapath (a prober waits for the new endpoint to answer through the ClusterIP).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use ferry_testbed::{bin_path, pod_ip, Proxy, Topology, ECHO_PORT, NODE_IP};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::kube_rules::{self, Svc};
use crate::measure::{ferry_yaml, median, run_reps, vip, Load, Rng, RunInfo};

/// Pods 0 and 1 serve every Service (M = 2); pod 2 is the endpoint added by the change test.
const ENDPOINTS: usize = 2;
const NEW_ENDPOINT: usize = 2;
const CLIENT: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    NoProxy,
    Ferry,
    IptablesNft,
    IptablesLegacy,
    Nftables,
    Ipvs,
}

impl Mode {
    const ALL: [Mode; 6] = [
        Mode::NoProxy,
        Mode::Ferry,
        Mode::IptablesNft,
        Mode::Nftables,
        Mode::IptablesLegacy,
        Mode::Ipvs,
    ];

    fn label(self) -> &'static str {
        match self {
            Mode::NoProxy => "no proxy (pod IPs)",
            Mode::Ferry => "Ferry (eBPF)",
            Mode::IptablesNft => "kube-proxy iptables (nft)",
            Mode::IptablesLegacy => "kube-proxy iptables (legacy)",
            Mode::Nftables => "kube-proxy nftables",
            Mode::Ipvs => "kube-proxy IPVS",
        }
    }

    fn iptables(self) -> Option<&'static str> {
        match self {
            Mode::IptablesNft => Some("iptables-nft"),
            Mode::IptablesLegacy => Some("iptables-legacy"),
            _ => None,
        }
    }

    /// Why the mode cannot run here, if it cannot.
    fn unavailable(self) -> Option<String> {
        match self {
            Mode::Ipvs if !std::path::Path::new("/proc/net/ip_vs").exists() => Some(
                "unavailable on this kernel (no CONFIG_IP_VS: /proc/net/ip_vs is absent)".into(),
            ),
            Mode::Ipvs => Some("IPVS is present but this benchmark does not program it yet".into()),
            m => m.iptables().and_then(|bin| {
                let ok = Command::new(bin)
                    .arg("--version")
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                (!ok).then(|| format!("{bin} is not installed (cargo xtask setup)"))
            }),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct Measure {
    mode: Mode,
    services: usize,
    /// Full programming from scratch, seconds (None for no proxy).
    program_s: Option<f64>,
    /// Programming was stopped after this many seconds (too slow to finish in the run).
    program_stopped_after_s: Option<f64>,
    crr: Option<Load>,
    rr: Option<Load>,
    crr_runs: Vec<f64>,
    /// CPU seconds (all cores, from /proc/stat) per 10,000 connections of the CRR runs.
    cpu_s_per_10k: Option<f64>,
    /// Kernel memory added by programming (Slab + VmallocUsed + Percpu), MiB.
    kernel_mem_mib: Option<f64>,
    /// Time from the change being applied until the new endpoint answered, ms.
    endpoint_change_ms: Option<f64>,
    /// Applying the change was stopped after this many seconds.
    endpoint_change_stopped_after_s: Option<f64>,
}

impl Measure {
    fn too_slow(mode: Mode, services: usize) -> Self {
        Measure {
            mode,
            services,
            program_s: None,
            program_stopped_after_s: Some(PROGRAM_LIMIT.as_secs_f64()),
            crr: None,
            rr: None,
            crr_runs: vec![],
            cpu_s_per_10k: None,
            kernel_mem_mib: None,
            endpoint_change_ms: None,
            endpoint_change_stopped_after_s: None,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    run: RunInfo,
    conntrack_note: String,
    memory_note: String,
    unavailable: Vec<(Mode, String)>,
    results: Vec<Measure>,
}

struct Plan {
    program_sizes: Vec<usize>,
    dataplane_sizes: Vec<usize>,
    change_at: usize,
    secs: f64,
    reps: usize,
    concurrency: usize,
}

fn svc_list(n: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            ns: "bench".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            vip: vip(i),
            port: 80,
            endpoints: (0..ENDPOINTS).map(|j| (pod_ip(j), ECHO_PORT)).collect(),
        })
        .collect()
}

/// Kernel memory that rules and maps live in, KiB.
fn kernel_mem_kib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .filter(|l| {
            l.starts_with("Slab:") || l.starts_with("VmallocUsed:") || l.starts_with("Percpu:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Memory charged by Ferry's maps, MiB.
fn ferry_maps_mib() -> Result<f64> {
    let out = Command::new("bpftool")
        .args(["map", "show", "-j"])
        .output()
        .context("bpftool map show")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool map show -j")?;
    let bytes: u64 = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"].as_str().is_some_and(|n| n.starts_with("FERRY_")))
        .filter_map(|m| m["bytes_memlock"].as_u64())
        .sum();
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// Runs a command in the node namespace with a file as its input.
fn node_exec(t: &Topology, program: &str, args: &[&str]) -> Result<()> {
    t.node.exec(program, args).map(|_| ())
}

fn write_tmp(t: &Topology, name: &str, text: &str) -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("{}-{name}", t.prefix));
    std::fs::write(&p, text)?;
    Ok(p)
}

/// One mode programmed on the node.
struct Programmed {
    proxy: Option<Proxy>,
}

fn teardown(t: &mut Topology, mode: Mode, p: &mut Programmed) -> Result<()> {
    if let Some(proxy) = p.proxy.take() {
        t.stop(proxy.pid, libc::SIGTERM)?;
        std::fs::remove_dir_all(&t.bpf_dir).ok();
    }
    if let Some(bin) = mode.iptables() {
        for table in ["nat", "filter"] {
            node_exec(t, bin, &["-w", "-t", table, "-F"])?;
            node_exec(t, bin, &["-w", "-t", table, "-X"])?;
        }
    }
    if mode == Mode::Nftables {
        let _ = node_exec(t, "nft", &["delete", "table", "ip", "kube-proxy"]);
    }
    // No connection state may leak from one mode or size into the next.
    let _ = node_exec(t, "conntrack", &["-F"]);
    Ok(())
}

/// How long one full programming may take before the benchmark stops it and reports the limit
/// (a transaction stopped before it commits leaves nothing behind).
const PROGRAM_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
#[error("stopped after {0:?}")]
struct TooSlow(Duration);

/// Runs a rule loader in the node namespace, killing it once it exceeds `PROGRAM_LIMIT`.
fn exec_bounded(t: &Topology, program: &str, args: &[&str]) -> Result<()> {
    let mut child = t.node.spawn(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("{program} {}: {}", args.join(" "), err.trim());
        }
        if start.elapsed() > PROGRAM_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TooSlow(PROGRAM_LIMIT).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Programs `svcs` from scratch, the way the mode does on a full sync; returns the time it took.
fn program(t: &mut Topology, mode: Mode, svcs: &[Svc], p: &mut Programmed) -> Result<Duration> {
    match mode {
        Mode::NoProxy | Mode::Ipvs => Ok(Duration::ZERO),
        Mode::Ferry => {
            // The daemon runs with no Services first; the timed part is from the new input
            // landing to the daemon reporting it in the datapath.
            let proxy = t.start_proxy("")?;
            let (applied, took) = proxy.update_timed(&ferry_yaml(svcs))?;
            if !applied {
                bail!("ferry-proxy rejected the generated Services");
            }
            p.proxy = Some(proxy);
            Ok(took)
        }
        Mode::IptablesNft | Mode::IptablesLegacy => {
            let bin = mode.iptables().unwrap();
            let restore = format!("{bin}-restore");
            let rules = write_tmp(
                t,
                "rules.iptables",
                &kube_rules::iptables_restore(svcs, &|_| true),
            )?;
            let start = Instant::now();
            for (table, chain) in kube_rules::IPTABLES_HOOK_TARGETS {
                let _ = node_exec(t, bin, &["-w", "-t", table, "-N", chain]);
            }
            for (table, chain, rule) in kube_rules::iptables_hooks() {
                let mut args = vec!["-w", "-t", table, "-I", chain];
                args.extend(rule.iter().map(String::as_str));
                node_exec(t, bin, &args).with_context(|| format!("{bin} hook in {chain}"))?;
            }
            let done = exec_bounded(
                t,
                &restore,
                &[
                    "-w",
                    "5",
                    "--noflush",
                    "--counters",
                    rules.to_str().unwrap(),
                ],
            );
            std::fs::remove_file(rules).ok();
            done?;
            Ok(start.elapsed())
        }
        Mode::Nftables => {
            let rules = write_tmp(t, "rules.nft", &kube_rules::nft_full(svcs, NODE_IP))?;
            let start = Instant::now();
            let done = exec_bounded(t, "nft", &["-f", rules.to_str().unwrap()]);
            std::fs::remove_file(rules).ok();
            done?;
            Ok(start.elapsed())
        }
    }
}

/// Adds the new endpoint to Service `k` the way the mode applies one EndpointSlice change, and
/// measures until a prober in the client pod gets an answer from it through the ClusterIP.
fn endpoint_change(
    t: &mut Topology,
    mode: Mode,
    svcs: &[Svc],
    k: usize,
    p: &Programmed,
) -> Result<Duration> {
    let mut changed = svcs.to_vec();
    changed[k].endpoints.push((pod_ip(NEW_ENDPOINT), ECHO_PORT));
    // Prepare the input before the clock starts: generating it is not the datapath's work.
    enum Apply {
        Ferry(String),
        Cmd(String, Vec<String>, PathBuf),
    }
    let apply = match mode {
        Mode::Ferry => Apply::Ferry(ferry_yaml(&changed)),
        Mode::IptablesNft | Mode::IptablesLegacy => {
            let f = write_tmp(
                t,
                "change.iptables",
                &kube_rules::iptables_restore(&changed, &|i| i == k),
            )?;
            let bin = format!("{}-restore", mode.iptables().unwrap());
            Apply::Cmd(
                bin,
                vec![
                    "-w".into(),
                    "5".into(),
                    "--noflush".into(),
                    "--counters".into(),
                    f.to_str().unwrap().into(),
                ],
                f,
            )
        }
        Mode::Nftables => {
            let f = write_tmp(t, "change.nft", &kube_rules::nft_partial(&changed[k]))?;
            Apply::Cmd(
                "nft".into(),
                vec!["-f".into(), f.to_str().unwrap().into()],
                f,
            )
        }
        Mode::NoProxy | Mode::Ipvs => bail!("no endpoint change for {mode:?}"),
    };
    let want = t.pods[NEW_ENDPOINT].name.clone();
    let source = crate::measure::fresh_source(t, CLIENT)?.to_string();
    let target = format!("{}:{}", changed[k].vip, changed[k].port);
    let mut probe = t.pods[CLIENT].ns.spawn(
        Command::new(bin_path("ferry-loadgen")?)
            .args([
                "--mode",
                "probe",
                "--want",
                &want,
                "--target",
                &target,
                "--source",
                &source,
                "--seconds",
                "150",
            ])
            .stdout(Stdio::piped()),
    )?;
    std::thread::sleep(Duration::from_millis(300)); // the prober is connecting by now
    if let (Apply::Ferry(yaml), Some(proxy)) = (&apply, p.proxy.as_ref()) {
        // Written before the clock, like the other modes' rule files.
        proxy.stage(yaml)?;
    }
    let start_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as u64;
    let applied = match &apply {
        Apply::Ferry(_) => p
            .proxy
            .as_ref()
            .context("Ferry is not running")
            .and_then(|proxy| proxy.apply_staged().map(|_| ())),
        Apply::Cmd(bin, args, _) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            exec_bounded(t, bin, &args)
        }
    };
    if let Err(e) = applied {
        let _ = probe.kill();
        let _ = probe.wait();
        return Err(e);
    }
    let out = probe.wait_with_output()?;
    if let Apply::Cmd(_, _, f) = apply {
        std::fs::remove_file(f).ok();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("prober output")?;
    let seen = v["seen_unix_us"].as_u64().unwrap_or(0);
    if seen == 0 {
        bail!("{} never answered through {target} after the change", want);
    }
    Ok(Duration::from_micros(seen.saturating_sub(start_us)))
}

fn dataplane(t: &Topology, plan: &Plan, targets: &[String]) -> Result<(Load, Load, Vec<f64>, f64)> {
    let reps = run_reps(
        t,
        CLIENT,
        targets,
        (plan.secs, plan.reps, plan.concurrency),
        |_| {},
    )?;
    let conns: u64 = reps.crr.iter().map(|l| l.transactions).sum();
    let runs = reps.crr.iter().map(|l| l.rate).collect();
    let cpu = reps.crr_cpu_s / (conns.max(1) as f64 / 10_000.0);
    Ok((median(reps.crr), median(reps.rr), runs, cpu))
}

/// Shows what runs now: on the bar in a terminal, as a log line otherwise (CI).
fn step(bar: &ProgressBar, msg: String) {
    if bar.is_hidden() {
        eprintln!(
            "[compare {}/{}] {msg}",
            bar.position() + 1,
            bar.length().unwrap_or(0)
        );
    }
    bar.set_message(msg);
}

/// `cargo xtask bench compare` options. With `--modes` or `--sizes`, only that part runs (to
/// look closer at one row, e.g. repeated runs of one N) and the report is written as
/// `compare-subset` beside the full one.
#[derive(clap::Args, Clone)]
pub struct CompareOpts {
    /// A short run (about a minute) that shows the benchmark works; figures are noisier.
    #[arg(long)]
    quick: bool,
    /// Only these modes: none, ferry, iptables-nft, nftables, iptables-legacy, ipvs.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Only these numbers of Services (programming and data plane at each).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
}

fn mode_named(name: &str) -> Result<Mode> {
    Ok(match name {
        "none" => Mode::NoProxy,
        "ferry" => Mode::Ferry,
        "iptables-nft" => Mode::IptablesNft,
        "nftables" => Mode::Nftables,
        "iptables-legacy" => Mode::IptablesLegacy,
        "ipvs" => Mode::Ipvs,
        other => bail!("--modes: unknown mode {other:?}; use none, ferry, iptables-nft, nftables, iptables-legacy or ipvs"),
    })
}

pub fn run(opts: &CompareOpts) -> Result<()> {
    let quick = opts.quick;
    let mut plan = if quick {
        Plan {
            program_sizes: vec![100, 1_000],
            dataplane_sizes: vec![1, 1_000],
            change_at: 1_000,
            secs: 1.0,
            reps: 1,
            concurrency: 4,
        }
    } else {
        Plan {
            program_sizes: vec![100, 1_000, 10_000, 30_000],
            dataplane_sizes: vec![1, 1_000, 10_000, 30_000],
            change_at: 10_000,
            secs: 3.0,
            reps: 3,
            concurrency: 4,
        }
    };
    let subset = !opts.modes.is_empty() || !opts.sizes.is_empty();
    if !opts.sizes.is_empty() {
        if opts.sizes.iter().any(|n| *n == 0 || *n > 60_000) {
            bail!("--sizes: each must be between 1 and 60000");
        }
        plan.program_sizes = opts.sizes.clone();
        plan.dataplane_sizes = opts.sizes.clone();
        if !opts.sizes.contains(&plan.change_at) {
            plan.change_at = *opts.sizes.iter().max().unwrap_or(&plan.change_at);
        }
    }
    let mut sizes: Vec<usize> = plan
        .program_sizes
        .iter()
        .chain(&plan.dataplane_sizes)
        .copied()
        .collect();
    sizes.sort_unstable();
    sizes.dedup();

    let modes: Vec<Mode> = if opts.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        opts.modes
            .iter()
            .map(|m| mode_named(m))
            .collect::<Result<_>>()?
    };
    let mut unavailable = Vec::new();
    let runnable: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|m| match m.unavailable() {
            Some(why) => {
                unavailable.push((*m, why));
                false
            }
            None => true,
        })
        .collect();
    let steps = runnable
        .iter()
        .map(|m| {
            if *m == Mode::NoProxy {
                1
            } else {
                sizes.len() as u64
            }
        })
        .sum::<u64>();
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}").unwrap(),
    );

    let mut t = Topology::with_prefix(&format!("fc{}", std::process::id()), CLIENT + 1)?;
    t.conntrack_gc_interval = 60.0;
    t.pods[CLIENT]
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    for p in &t.pods[..CLIENT] {
        p.ns.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
    }
    t.start_echo_servers()?;
    // The node tracks connections for the no-proxy row as it does under kube-proxy, so both pay
    // for nf_conntrack (Ferry keeps its own conntrack in eBPF and needs none).
    let ct_rules = write_tmp(&t, "ct.nft", "table ip bench-ct {\n  chain forwarded {\n    type filter hook forward priority 0;\n    ct state new counter\n  }\n}\n")?;

    let mut rng = Rng::seeded();
    let mut results = Vec::new();
    for &mode in &runnable {
        let mut p = Programmed { proxy: None };
        if mode == Mode::NoProxy {
            step(&bar, format!("{}: data plane", mode.label()));
            node_exec(&t, "nft", &["-f", ct_rules.to_str().unwrap()])?;
            let direct: Vec<String> = (0..ENDPOINTS)
                .map(|i| format!("{}:{ECHO_PORT}", pod_ip(i)))
                .collect();
            let (crr, rr, runs, cpu) = dataplane(&t, &plan, &direct)?;
            node_exec(&t, "nft", &["delete", "table", "ip", "bench-ct"])?;
            results.push(Measure {
                mode,
                services: 0,
                program_s: None,
                program_stopped_after_s: None,
                endpoint_change_stopped_after_s: None,
                crr: Some(crr),
                rr: Some(rr),
                crr_runs: runs,
                cpu_s_per_10k: Some(cpu),
                kernel_mem_mib: None,
                endpoint_change_ms: None,
            });
            bar.inc(1);
            continue;
        }
        for &n in &sizes {
            step(&bar, format!("{}: programming {n} Services", mode.label()));
            teardown(&mut t, mode, &mut p)?;
            let svcs = svc_list(n);
            if n == plan.change_at {
                // Memory freed by the teardown is released in the background: let it settle.
                std::thread::sleep(Duration::from_secs(2));
            }
            let mem0 = kernel_mem_kib();
            let took = match program(&mut t, mode, &svcs, &mut p) {
                Ok(d) => d,
                Err(e) if e.downcast_ref::<TooSlow>().is_some() => {
                    // Larger N would only take longer: report the limit and move on.
                    results.push(Measure::too_slow(mode, n));
                    bar.inc((sizes.len() - sizes.iter().position(|x| *x == n).unwrap_or(0)) as u64);
                    break;
                }
                Err(e) => {
                    return Err(e.context(format!("{}: programming {n} Services", mode.label())))
                }
            };
            let mut mem = (kernel_mem_kib() as f64 - mem0 as f64) / 1024.0;
            if mode == Mode::Ferry {
                // Exact figure for eBPF maps: what they charge (bytes_memlock).
                mem = ferry_maps_mib()?;
            }
            let mut m = Measure {
                mode,
                services: n,
                program_stopped_after_s: None,
                endpoint_change_stopped_after_s: None,
                program_s: plan
                    .program_sizes
                    .contains(&n)
                    .then_some(took.as_secs_f64()),
                crr: None,
                rr: None,
                crr_runs: vec![],
                cpu_s_per_10k: None,
                kernel_mem_mib: (n == plan.change_at).then_some(mem),
                endpoint_change_ms: None,
            };
            if plan.dataplane_sizes.contains(&n) {
                step(
                    &bar,
                    format!("{}: data plane at {n} Services", mode.label()),
                );
                let targets: Vec<String> = (0..plan.concurrency)
                    .map(|_| format!("{}:80", vip(rng.next() as usize % n)))
                    .collect();
                let (crr, rr, runs, cpu) = dataplane(&t, &plan, &targets)?;
                m.crr = Some(crr);
                m.rr = Some(rr);
                m.crr_runs = runs;
                m.cpu_s_per_10k = Some(cpu);
            }
            if n == plan.change_at {
                step(
                    &bar,
                    format!("{}: one endpoint change at {n} Services", mode.label()),
                );
                let k = rng.next() as usize % n;
                match endpoint_change(&mut t, mode, &svcs, k, &p) {
                    Ok(d) => m.endpoint_change_ms = Some(d.as_secs_f64() * 1000.0),
                    Err(e) if e.downcast_ref::<TooSlow>().is_some() => {
                        m.endpoint_change_stopped_after_s = Some(PROGRAM_LIMIT.as_secs_f64())
                    }
                    Err(e) => {
                        return Err(
                            e.context(format!("{}: endpoint change at {n} Services", mode.label()))
                        )
                    }
                }
            }
            results.push(m);
            bar.inc(1);
        }
        teardown(&mut t, mode, &mut p)?;
    }
    bar.finish_with_message("done");
    std::fs::remove_file(ct_rules).ok();
    drop(t);

    let report = Report {
        run: RunInfo::new(quick, plan.secs, plan.reps, plan.concurrency),
        conntrack_note: "nf_conntrack active in the node for the no-proxy and kube-proxy rows; Ferry tracks connections in its own eBPF map".into(),
        memory_note: "kube-proxy modes: growth of Slab + VmallocUsed + Percpu from programming the rules; Ferry: bytes charged by its eBPF maps; the conntrack (512k entries) and affinity (64k) LRU maps are preallocated whatever N is, the service, backend and rev-NAT maps grow with N".into(),
        unavailable,
        results,
    };
    if subset {
        crate::measure::write_results("compare-subset", &report, &markdown(&report))?;
        return Ok(());
    }
    let dir = crate::measure::write_results("compare", &report, &markdown(&report))?;
    crate::charts::compare(&report_series(&report), &dir)?;
    eprintln!("[bench] wrote bench/results/compare-connrate.png and compare-programming.png");
    Ok(())
}

/// (mode label, [(N, conn/s)], [(N, programming s)]) per mode, for the charts.
fn report_series(r: &Report) -> Vec<crate::charts::Series> {
    let mut out: Vec<crate::charts::Series> = Vec::new();
    for m in &r.results {
        if m.mode == Mode::NoProxy {
            continue;
        }
        let i = match out.iter().position(|s| s.label == m.mode.label()) {
            Some(i) => i,
            None => {
                out.push(crate::charts::Series {
                    label: m.mode.label().into(),
                    conn_rate: vec![],
                    program_s: vec![],
                });
                out.len() - 1
            }
        };
        if let Some(c) = &m.crr {
            out[i].conn_rate.push((m.services as f64, c.rate));
        }
        if let Some(p) = m.program_s {
            out[i].program_s.push((m.services as f64, p));
        }
    }
    if let Some(base) = r
        .results
        .iter()
        .find(|m| m.mode == Mode::NoProxy)
        .and_then(|m| m.crr.clone())
    {
        let xs: Vec<f64> = out
            .iter()
            .flat_map(|s| s.conn_rate.iter().map(|p| p.0))
            .collect();
        let (lo, hi) = xs
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), x| (a.min(*x), b.max(*x)));
        if hi > 0.0 {
            out.insert(
                0,
                crate::charts::Series {
                    label: Mode::NoProxy.label().into(),
                    conn_rate: vec![(lo, base.rate), (hi, base.rate)],
                    program_s: vec![],
                },
            );
        }
    }
    out
}

fn markdown(r: &Report) -> String {
    let base = r.results.iter().find(|m| m.mode == Mode::NoProxy);
    let (bc, br) = base
        .map(|b| {
            (
                b.crr.as_ref().map_or(0.0, |l| l.rate),
                b.rr.as_ref().map_or(0.0, |l| l.rate),
            )
        })
        .unwrap_or((0.0, 0.0));
    let ratio = |v: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}x", v / b)
        } else {
            "-".into()
        }
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} (median). {}.\n",
        r.run.describe("compare"),
        r.conntrack_note
    );
    let _ = writeln!(
        s,
        "Data plane (a ClusterIP picked at random among N; ratios against no proxy):\n"
    );
    let _ = writeln!(s, "| mode | N | conn/s | vs no proxy | round trips/s | vs no proxy | RR p50 µs | RR p99 µs | CPU s / 10k conns |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in r.results.iter().filter(|m| m.crr.is_some()) {
        let (c, rr) = (m.crr.as_ref().unwrap(), m.rr.as_ref().unwrap());
        let n = if m.mode == Mode::NoProxy {
            "-".to_string()
        } else {
            m.services.to_string()
        };
        let _ = writeln!(
            s,
            "| {} | {n} | {:.0} | {} | {:.0} | {} | {:.0} | {:.0} | {:.2} |",
            m.mode.label(),
            c.rate,
            ratio(c.rate, bc),
            rr.rate,
            ratio(rr.rate, br),
            rr.p50_us,
            rr.p99_us,
            m.cpu_s_per_10k.unwrap_or(0.0)
        );
    }
    for m in r
        .results
        .iter()
        .filter(|m| m.program_stopped_after_s.is_some())
    {
        let _ = writeln!(
            s,
            "| {} | {} | not measured: programming did not finish in {:.0} s | | | | | | |",
            m.mode.label(),
            m.services,
            m.program_stopped_after_s.unwrap_or(0.0)
        );
    }
    for (m, why) in &r.unavailable {
        let _ = writeln!(s, "| {} | - | {why} | | | | | | |", m.label());
    }
    let _ = writeln!(s, "\nControl plane (full programming from scratch, seconds; kernel memory and one endpoint change at N = {}):\n", r.results.iter().find_map(|m| m.endpoint_change_ms.map(|_| m.services)).unwrap_or(0));
    let prog_sizes: Vec<usize> = {
        let mut v: Vec<usize> = r
            .results
            .iter()
            .filter(|m| m.program_s.is_some() || m.program_stopped_after_s.is_some())
            .map(|m| m.services)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let _ = write!(s, "| mode |");
    for n in &prog_sizes {
        let _ = write!(s, " N={n} |");
    }
    let _ = writeln!(s, " endpoint change ms | kernel memory MiB |");
    let _ = writeln!(s, "|---|{}---:|---:|", "---:|".repeat(prog_sizes.len()));
    let mut modes: Vec<Mode> = r
        .results
        .iter()
        .map(|m| m.mode)
        .filter(|m| *m != Mode::NoProxy)
        .collect();
    modes.dedup();
    for mode in &modes {
        let _ = write!(s, "| {} |", mode.label());
        for n in &prog_sizes {
            let m = r
                .results
                .iter()
                .find(|m| m.mode == *mode && m.services == *n);
            let cell = match (
                m.and_then(|m| m.program_s),
                m.and_then(|m| m.program_stopped_after_s),
            ) {
                (Some(v), _) => format!("{v:.3}"),
                (None, Some(limit)) => format!("> {limit:.0} (stopped)"),
                _ => "-".into(),
            };
            let _ = write!(s, " {cell} |");
        }
        let change = r.results.iter().find(|m| m.mode == *mode).and_then(|_| {
            r.results
                .iter()
                .filter(|m| m.mode == *mode)
                .find_map(|m| m.endpoint_change_ms)
        });
        let mem = r
            .results
            .iter()
            .filter(|m| m.mode == *mode)
            .find_map(|m| m.kernel_mem_mib);
        let stopped = r
            .results
            .iter()
            .filter(|m| m.mode == *mode)
            .find_map(|m| m.endpoint_change_stopped_after_s);
        let _ = writeln!(
            s,
            " {} | {} |",
            change.map_or(
                stopped.map_or("-".into(), |l| format!("> {:.0} s (stopped)", l)),
                |v| format!("{v:.1}")
            ),
            mem.map_or("-".into(), |v| format!("{v:.1}"))
        );
    }
    let _ = writeln!(s, "\nMemory: {}.", r.memory_note);
    s.push_str(&targets(r));
    s
}

/// The targets, each checked against this run's figures and said plainly.
fn targets(r: &Report) -> String {
    let find = |mode: Mode, n: usize| r.results.iter().find(|m| m.mode == mode && m.services == n);
    let big = if r.run.quick { 1_000 } else { 10_000 };
    let rate = |mode, n| find(mode, n).and_then(|m| m.crr.as_ref()).map(|l| l.rate);
    let base = r
        .results
        .iter()
        .find(|m| m.mode == Mode::NoProxy)
        .and_then(|m| m.crr.as_ref())
        .map(|l| l.rate);
    let mut s = format!("\nTargets at N={big}:\n");
    let mut line = |what: String, got: Option<f64>, want: f64, higher_better: bool| {
        let verdict = match got {
            Some(g) if (higher_better && g >= want) || (!higher_better && g <= want) => "met",
            Some(_) => "NOT met",
            None => "not measured",
        };
        let _ = writeln!(
            s,
            "- {what}: {} (target {}{want}) — {verdict}",
            got.map_or("-".into(), |g| format!("{g:.2}")),
            if higher_better { ">= " } else { "<= " }
        );
    };
    let ferry = rate(Mode::Ferry, big);
    let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    line(
        "Ferry conn/s vs iptables-nft".into(),
        div(ferry, rate(Mode::IptablesNft, big)),
        1.5,
        true,
    );
    line(
        "Ferry conn/s vs nftables".into(),
        div(ferry, rate(Mode::Nftables, big)),
        1.0,
        true,
    );
    line(
        "Ferry conn/s vs no proxy".into(),
        div(ferry, base),
        0.95,
        true,
    );
    let flat: Vec<f64> = r
        .results
        .iter()
        .filter(|m| m.mode == Mode::Ferry)
        .filter_map(|m| m.crr.as_ref().map(|l| l.rate))
        .collect();
    let spread = (!flat.is_empty()).then(|| {
        let (lo, hi) = flat
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), x| (a.min(*x), b.max(*x)));
        (hi - lo) / hi * 100.0
    });
    line(
        "Ferry conn/s spread over all N, %".into(),
        spread,
        5.0,
        false,
    );
    let prog = |mode| find(mode, big).and_then(|m| m.program_s);
    line(
        "programming speed-up of Ferry over iptables-nft".into(),
        div(prog(Mode::IptablesNft), prog(Mode::Ferry)),
        10.0,
        true,
    );
    line(
        "one endpoint change visible, ms".into(),
        find(Mode::Ferry, big).and_then(|m| m.endpoint_change_ms),
        10.0,
        false,
    );
    s
}
