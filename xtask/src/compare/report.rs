//! The comparison as tables, the targets checked, and the charts' series.

use std::fmt::Write as _;

use serde::Serialize;

use super::modes::{Mode, CHANGES, PROGRAM_LIMIT};
use crate::measure::{Load, Reps, RunInfo};

#[derive(Clone, Debug, Serialize)]
pub(super) struct Measure {
    pub(super) mode: Mode,
    pub(super) services: usize,
    /// The no-proxy row measured again after every other mode.
    pub(super) after: bool,
    /// Full programming from scratch, seconds (None for no proxy).
    pub(super) program_s: Option<f64>,
    /// Programming was stopped after this many seconds (too slow to finish in the run).
    pub(super) program_stopped_after_s: Option<f64>,
    pub(super) crr: Option<Load>,
    pub(super) rr: Option<Load>,
    pub(super) crr_runs: Vec<f64>,
    /// CPU seconds (all cores, from /proc/stat) per 10,000 connections of the CRR runs.
    pub(super) cpu_s_per_10k: Option<f64>,
    /// Kernel memory added by programming (Slab + VmallocUsed + Percpu), MiB.
    pub(super) kernel_mem_mib: Option<f64>,
    /// Time from the change being applied until the new endpoint answered, ms: the median of
    /// `endpoint_change_samples_ms`.
    pub(super) endpoint_change_ms: Option<f64>,
    /// Each of the endpoint changes measured, in order, ms.
    pub(super) endpoint_change_samples_ms: Vec<f64>,
    /// Applying the change was stopped after this many seconds.
    pub(super) endpoint_change_stopped_after_s: Option<f64>,
    /// The repetitions measured next to no-proxy ones (socket LB at the change size).
    pub(super) paired: Option<Paired>,
}

/// A mode's repetitions each against the no-proxy repetition measured next to it.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Paired {
    /// Per repetition, the mode's conn/s over the direct path's.
    pub(super) crr_ratios: Vec<f64>,
    /// Per repetition, the mode's round trips/s over the direct path's.
    pub(super) rr_ratios: Vec<f64>,
    /// CPU seconds per 10,000 connections of all the mode's CRR repetitions over the direct
    /// path's.
    pub(super) cpu_ratio: f64,
    pub(super) direct_crr_runs: Vec<f64>,
    pub(super) direct_rr_runs: Vec<f64>,
}

impl Paired {
    pub(super) fn new(mode: &Reps, direct: &Reps) -> Self {
        let ratios = |a: &[Load], b: &[Load]| -> Vec<f64> {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.rate / y.rate.max(1e-9))
                .collect()
        };
        let cpu = |r: &Reps| {
            let conns: u64 = r.crr.iter().map(|l| l.transactions).sum();
            r.crr_cpu_s / (conns.max(1) as f64 / 10_000.0)
        };
        Paired {
            crr_ratios: ratios(&mode.crr, &direct.crr),
            rr_ratios: ratios(&mode.rr, &direct.rr),
            cpu_ratio: cpu(mode) / cpu(direct).max(1e-9),
            direct_crr_runs: direct.crr.iter().map(|l| l.rate).collect(),
            direct_rr_runs: direct.rr.iter().map(|l| l.rate).collect(),
        }
    }

    /// The median of the per-repetition conn/s ratios.
    pub(super) fn crr(&self) -> f64 {
        median_of(&self.crr_ratios)
    }

    /// The median of the per-repetition round-trip ratios.
    pub(super) fn rr(&self) -> f64 {
        median_of(&self.rr_ratios)
    }
}

fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn list(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Measure {
    /// A row of `mode` at `services` with nothing measured yet.
    pub(super) fn empty(mode: Mode, services: usize) -> Self {
        Measure {
            mode,
            services,
            after: false,
            program_s: None,
            program_stopped_after_s: None,
            crr: None,
            rr: None,
            crr_runs: vec![],
            cpu_s_per_10k: None,
            kernel_mem_mib: None,
            endpoint_change_ms: None,
            endpoint_change_samples_ms: vec![],
            endpoint_change_stopped_after_s: None,
            paired: None,
        }
    }

    pub(super) fn too_slow(mode: Mode, services: usize) -> Self {
        Measure {
            program_stopped_after_s: Some(PROGRAM_LIMIT.as_secs_f64()),
            ..Self::empty(mode, services)
        }
    }

    fn label(&self) -> String {
        if self.after {
            format!("{}, after", self.mode.label())
        } else {
            self.mode.label().to_string()
        }
    }
}

/// What every ratio is against: the mean of the no-proxy rows (measured first, and again last
/// when other modes ran between).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Baseline {
    pub(super) crr: f64,
    pub(super) rr: f64,
    pub(super) cpu_s_per_10k: f64,
    pub(super) rows: usize,
}

pub(super) fn baseline(results: &[Measure]) -> Option<Baseline> {
    let rows: Vec<&Measure> = results
        .iter()
        .filter(|m| m.mode == Mode::NoProxy && m.crr.is_some())
        .collect();
    if rows.is_empty() {
        return None;
    }
    let n = rows.len() as f64;
    let mean = |f: &dyn Fn(&Measure) -> f64| rows.iter().map(|m| f(m)).sum::<f64>() / n;
    Some(Baseline {
        crr: mean(&|m| m.crr.as_ref().map_or(0.0, |l| l.rate)),
        rr: mean(&|m| m.rr.as_ref().map_or(0.0, |l| l.rate)),
        cpu_s_per_10k: mean(&|m| m.cpu_s_per_10k.unwrap_or(0.0)),
        rows: rows.len(),
    })
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    #[serde(flatten)]
    pub(super) run: RunInfo,
    pub(super) conntrack_note: String,
    pub(super) memory_note: String,
    pub(super) unavailable: Vec<(Mode, String)>,
    pub(super) results: Vec<Measure>,
}

/// (mode label, [(N, conn/s)], [(N, programming s)]) per mode, for the charts.
pub(super) fn report_series(r: &Report) -> Vec<crate::charts::Series> {
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
    if let Some(base) = baseline(&r.results) {
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
                    conn_rate: vec![(lo, base.crr), (hi, base.crr)],
                    program_s: vec![],
                },
            );
        }
    }
    out
}

pub(super) fn markdown(r: &Report) -> String {
    let base = baseline(&r.results);
    let (bc, br) = base.map(|b| (b.crr, b.rr)).unwrap_or((0.0, 0.0));
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
    let against = match base {
        Some(b) if b.rows > 1 => "the mean of the no-proxy rows, measured first and last",
        _ => "no proxy",
    };
    let _ = writeln!(
        s,
        "Data plane (a ClusterIP picked at random among N; ratios against {against}):\n"
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
            m.label(),
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
    let _ = writeln!(s, "\nControl plane (full programming from scratch, seconds; kernel memory and one endpoint change at N = {}, the median of {CHANGES} changes):\n", r.results.iter().find_map(|m| m.endpoint_change_ms.map(|_| m.services)).unwrap_or(0));
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
pub(super) fn targets(r: &Report) -> String {
    let find = |mode: Mode, n: usize| r.results.iter().find(|m| m.mode == mode && m.services == n);
    let big = if r.run.quick { 1_000 } else { 10_000 };
    let rate = |mode, n| find(mode, n).and_then(|m| m.crr.as_ref()).map(|l| l.rate);
    let baseline = baseline(&r.results);
    let base = baseline.map(|b| b.crr);
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
    // Connect-time load balancing against the direct path: the figures the socket programs
    // promise (no per-packet work, so within noise of no proxy).
    // Against the no-proxy repetitions measured next to each of its own where the run paired
    // them, otherwise against the no-proxy rows.
    let sock = find(Mode::FerrySocket, big);
    let paired = sock.and_then(|m| m.paired.as_ref());
    let against = if paired.is_some() {
        "vs no proxy, paired repetitions"
    } else {
        "vs no proxy"
    };
    let rr = |m: Option<&Measure>| m.and_then(|m| m.rr.as_ref()).map(|l| l.rate);
    let cpu = |m: Option<&Measure>| m.and_then(|m| m.cpu_s_per_10k);
    let (crr_ratio, rr_ratio, cpu_ratio) = match paired {
        Some(p) => (Some(p.crr()), Some(p.rr()), Some(p.cpu_ratio)),
        None => (
            div(rate(Mode::FerrySocket, big), base),
            div(rr(sock), baseline.map(|b| b.rr)),
            div(cpu(sock), baseline.map(|b| b.cpu_s_per_10k)),
        ),
    };
    line(
        format!("Ferry socket LB conn/s {against}"),
        crr_ratio,
        0.98,
        true,
    );
    line(
        format!("Ferry socket LB round trips/s {against}"),
        rr_ratio,
        0.98,
        true,
    );
    line(
        format!("Ferry socket LB CPU seconds per 10,000 connections {against}"),
        cpu_ratio,
        1.05,
        false,
    );
    let prog = |mode| find(mode, big).and_then(|m| m.program_s);
    line(
        "programming speed-up of Ferry over iptables-nft".into(),
        div(prog(Mode::IptablesNft), prog(Mode::Ferry)),
        10.0,
        true,
    );
    let samples = find(Mode::Ferry, big)
        .map(|m| {
            m.endpoint_change_samples_ms
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    line(
        format!("one endpoint change visible, ms (median of {samples})"),
        find(Mode::Ferry, big).and_then(|m| m.endpoint_change_ms),
        10.0,
        false,
    );
    if let Some(p) = paired {
        let _ = writeln!(
            s,
            "  (repetitions, each socket LB over the direct one next to it, before it then after it in turn: conn/s {}; round trips/s {}; direct conn/s {}, round trips/s {})",
            list(&p.crr_ratios, 2),
            list(&p.rr_ratios, 2),
            list(&p.direct_crr_runs, 0),
            list(&p.direct_rr_runs, 0),
        );
    }
    s
}
