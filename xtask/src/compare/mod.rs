//! `cargo xtask bench compare [--quick]`: Ferry against kube-proxy's modes, side by side, on one
//! topology and one workload, in one run.
//!
//! Modes, each set up and torn down completely before the next: no proxy (client to pod IPs),
//! Ferry per packet (tc programs), Ferry per connect (socket LB: the client runs in the cgroup
//! the socket programs serve), kube-proxy's iptables layout through iptables-nft and through iptables-legacy,
//! its nftables layout, and IPVS where the kernel has it (detected; otherwise reported as
//! unavailable, never faked). For every Service count N the mode is programmed from scratch
//! (timed), then measured: new connections/s, round trips/s with p50/p99, CPU seconds per 10,000
//! connections (from /proc/stat), kernel memory, and at one N the time for one endpoint change to
//! reach the datapath (a prober waits for the new endpoint to answer through the ClusterIP).

mod modes;
mod report;

use std::time::Duration;

use anyhow::{bail, Result};
use ferry_testbed::{pod_ip, Topology, ECHO_PORT};
use indicatif::{ProgressBar, ProgressStyle};

use crate::measure::{median, run_reps, vip, Load, Reps, Rng, RunInfo};

use modes::ENDPOINTS;
use modes::{
    endpoint_change, ferry_maps_mib, kernel_mem_kib, node_exec, program, svc_list, teardown,
    write_tmp, Mode, Programmed, TooSlow, CHANGES, CLIENT, NEW_ENDPOINT, PROGRAM_LIMIT,
};
use report::{markdown, report_series, Measure, Paired, Report};

pub(super) struct Plan {
    pub(super) program_sizes: Vec<usize>,
    pub(super) dataplane_sizes: Vec<usize>,
    pub(super) change_at: usize,
    pub(super) secs: f64,
    pub(super) reps: usize,
    /// Repetitions of the paired socket LB measurement, whose per-pair ratios decide its
    /// targets: single pairs of round trips/s ranged 0.76x to 1.33x on this VM, so more than
    /// the rows' `reps`.
    pub(super) paired_reps: usize,
    pub(super) concurrency: usize,
}

fn dataplane(t: &Topology, plan: &Plan, targets: &[String]) -> Result<(Load, Load, Vec<f64>, f64)> {
    Ok(summary(run_reps(
        t,
        CLIENT,
        targets,
        (plan.secs, plan.reps, plan.concurrency),
        |_| {},
    )?))
}

/// A mode measured with each repetition next to one of no proxy (before it, then after it, in
/// turn), the mode torn down completely for the direct one and programmed again after it: the
/// pairing `bench datapath` uses, so drift over the run (thermal, page cache, other tenants) and
/// the order of rows fall out of the ratio. Returns the mode's repetitions and the direct ones.
fn paired_dataplane(
    t: &mut Topology,
    plan: &Plan,
    targets: &[String],
    ct_rules: &std::path::Path,
    (mode, svcs, p): (Mode, &[crate::kube_rules::Svc], &mut Programmed),
) -> Result<(Reps, Reps)> {
    let one = (plan.secs, 1, plan.concurrency);
    let (mut sock, mut direct) = (Reps::default(), Reps::default());
    for rep in 0..plan.paired_reps {
        let mut measure_direct = |t: &mut Topology, p: &mut Programmed| -> Result<()> {
            teardown(t, mode, p)?;
            direct.append(direct_reps(t, one, ct_rules)?);
            program(t, mode, svcs, p)?;
            Ok(())
        };
        if rep % 2 == 1 {
            measure_direct(t, p)?;
        }
        sock.append(run_reps(t, CLIENT, targets, one, |_| {})?);
        if rep % 2 == 0 {
            measure_direct(t, p)?;
        }
    }
    Ok((sock, direct))
}

/// The no-proxy data plane: the clients straight to the pod addresses, with nf_conntrack
/// tracking them as it would under kube-proxy; `plan.reps` repetitions.
fn direct_reps(
    t: &Topology,
    load: (f64, usize, usize),
    ct_rules: &std::path::Path,
) -> Result<Reps> {
    node_exec(t, "nft", &["-f", ct_rules.to_str().unwrap()])?;
    let targets: Vec<String> = (0..ENDPOINTS)
        .map(|i| format!("{}:{ECHO_PORT}", pod_ip(i)))
        .collect();
    let measured = run_reps(t, CLIENT, &targets, load, |_| {});
    node_exec(t, "nft", &["delete", "table", "ip", "bench-ct"])?;
    measured
}

/// CRR median, RR median, the CRR rates, CPU seconds per 10,000 connections.
fn summary(reps: Reps) -> (Load, Load, Vec<f64>, f64) {
    let conns: u64 = reps.crr.iter().map(|l| l.transactions).sum();
    let runs = reps.crr.iter().map(|l| l.rate).collect();
    let cpu = reps.crr_cpu_s / (conns.max(1) as f64 / 10_000.0);
    (median(reps.crr), median(reps.rr), runs, cpu)
}

/// The no-proxy row.
fn direct(t: &Topology, plan: &Plan, ct_rules: &std::path::Path, after: bool) -> Result<Measure> {
    let (crr, rr, runs, cpu) = summary(direct_reps(
        t,
        (plan.secs, plan.reps, plan.concurrency),
        ct_rules,
    )?);
    Ok(Measure {
        after,
        crr: Some(crr),
        rr: Some(rr),
        crr_runs: runs,
        cpu_s_per_10k: Some(cpu),
        ..Measure::empty(Mode::NoProxy, 0)
    })
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
    /// Only these modes: none, ferry, ferry-socket, iptables-nft, nftables, iptables-legacy, ipvs.
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
        "ferry-socket" => Mode::FerrySocket,
        "iptables-nft" => Mode::IptablesNft,
        "nftables" => Mode::Nftables,
        "iptables-legacy" => Mode::IptablesLegacy,
        "ipvs" => Mode::Ipvs,
        other => bail!("--modes: unknown mode {other:?}; use none, ferry, ferry-socket, iptables-nft, nftables, iptables-legacy or ipvs"),
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
            paired_reps: 1,
            concurrency: 4,
        }
    } else {
        Plan {
            program_sizes: vec![100, 1_000, 10_000, 30_000],
            dataplane_sizes: vec![1, 1_000, 10_000, 30_000],
            change_at: 10_000,
            secs: 3.0,
            reps: 3,
            paired_reps: 5,
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
    // The no-proxy row is measured first and again last (bench-notes: order effects), and the
    // ratios are against the mean of the two.
    let direct_again = runnable.contains(&Mode::NoProxy) && runnable.len() > 1;
    let steps = runnable
        .iter()
        .map(|m| {
            if *m == Mode::NoProxy {
                1 + u64::from(direct_again)
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
            results.push(direct(&t, &plan, &ct_rules, false)?);
            bar.inc(1);
            continue;
        }
        for &n in &sizes {
            step(&bar, format!("{}: programming {n} Services", mode.label()));
            teardown(&mut t, mode, &mut p)?;
            let mut svcs = svc_list(n);
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
            if mode.is_ferry() {
                // Exact figure for eBPF maps: what they charge (bytes_memlock).
                mem = ferry_maps_mib()?;
            }
            let mut m = Measure {
                program_s: plan
                    .program_sizes
                    .contains(&n)
                    .then_some(took.as_secs_f64()),
                kernel_mem_mib: (n == plan.change_at).then_some(mem),
                ..Measure::empty(mode, n)
            };
            if plan.dataplane_sizes.contains(&n) {
                step(
                    &bar,
                    format!("{}: data plane at {n} Services", mode.label()),
                );
                let targets: Vec<String> = (0..plan.concurrency)
                    .map(|_| format!("{}:80", vip(rng.next() as usize % n)))
                    .collect();
                let (crr, rr, runs, cpu) = if mode == Mode::FerrySocket && n == plan.change_at {
                    let (sock, direct) = paired_dataplane(
                        &mut t,
                        &plan,
                        &targets,
                        &ct_rules,
                        (mode, &svcs, &mut p),
                    )?;
                    m.paired = Some(Paired::new(&sock, &direct));
                    summary(sock)
                } else {
                    dataplane(&t, &plan, &targets)?
                };
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
                let mut samples = Vec::new();
                while samples.len() < CHANGES.min(n) {
                    let k = rng.next() as usize % n;
                    if svcs[k]
                        .endpoints
                        .contains(&(pod_ip(NEW_ENDPOINT), ECHO_PORT))
                    {
                        continue; // changed already
                    }
                    match endpoint_change(&mut t, mode, &mut svcs, k, &p) {
                        Ok(d) => samples.push(d.as_secs_f64() * 1000.0),
                        Err(e) if e.downcast_ref::<TooSlow>().is_some() => {
                            m.endpoint_change_stopped_after_s = Some(PROGRAM_LIMIT.as_secs_f64());
                            break;
                        }
                        Err(e) => {
                            return Err(e.context(format!(
                                "{}: endpoint change at {n} Services",
                                mode.label()
                            )))
                        }
                    }
                }
                let mut sorted = samples.clone();
                sorted.sort_by(f64::total_cmp);
                m.endpoint_change_ms = sorted.get(sorted.len() / 2).copied();
                m.endpoint_change_samples_ms = samples;
            }
            results.push(m);
            bar.inc(1);
        }
        teardown(&mut t, mode, &mut p)?;
    }
    if direct_again {
        step(
            &bar,
            format!("{}: data plane, again", Mode::NoProxy.label()),
        );
        results.push(direct(&t, &plan, &ct_rules, true)?);
        bar.inc(1);
    }
    bar.finish_with_message("done");
    std::fs::remove_file(ct_rules).ok();
    drop(t);

    let report = Report {
        run: RunInfo::new(quick, plan.secs, plan.reps, plan.concurrency),
        conntrack_note: "nf_conntrack active in the node for the no-proxy and kube-proxy rows; Ferry (tc) tracks connections in its own eBPF map; Ferry socket LB translates at connect and tracks nothing".into(),
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
