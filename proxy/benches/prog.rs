//! `cargo xtask bench prog`: nanoseconds per packet inside the datapath program, path by path,
//! measured by the kernel itself (BPF_PROG_TEST_RUN), next to the same measure of an empty tc
//! program (the floor: what entering any tc program costs here).
//!
//! Each path runs 100,000 times (20,000 with `--quick`), one packet per run: the kernel's own
//! `repeat` would rerun the program on the buffer it has just translated, which takes another
//! path from the second run on. Paths: a new flow (a fresh tuple every run: backend pick,
//! two conntrack inserts, DNAT), an established flow (conntrack hit, refresh, DNAT), a reply
//! (reply entry, rev-NAT), and non-service traffic (every lookup misses). 1,000 Services with
//! 4 backends each are installed, so lookups do not run in an empty map.
//!
//! Arguments: `--quick`, `--out DIR`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{ensure, Result};
use ferry_testbed::bench::{conditions, percentile, BenchArgs};
use ferry_testbed::packet::{self, Tcp};
use proxy::testrun::{Floor, Frontend, TestBed};
use proxy_common::PROTO_TCP;
use serde_json::json;

const SERVICES: usize = 1_000;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const BACKEND: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 9, 9), 8080);

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn client(i: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(10, 244, 100 + (i / 50_000) as u8, 5),
        10_000 + (i % 50_000) as u16,
    )
}

struct Path {
    name: &'static str,
    ns: Vec<f64>,
}

/// Runs `one` (given the run's number) `runs` times; its nanoseconds, and progress on stderr.
fn sample(
    name: &'static str,
    runs: usize,
    mut one: impl FnMut(usize) -> Result<u64>,
) -> Result<Path> {
    let mut ns = Vec::with_capacity(runs);
    for i in 0..runs {
        ns.push(one(i)? as f64);
    }
    eprintln!("[bench prog] {name}: done");
    Ok(Path { name, ns })
}

fn summary(ns: &mut [f64]) -> (f64, f64, f64) {
    ns.sort_by(f64::total_cmp);
    let mean = ns.iter().sum::<f64>() / ns.len() as f64;
    (mean, percentile(ns, 0.5), percentile(ns, 0.99))
}

fn main() -> Result<()> {
    let args = BenchArgs::parse();
    let runs = if args.quick { 20_000 } else { 100_000 };
    let mut bed = TestBed::new(Ipv4Addr::new(169, 254, 42, 1))?;
    for i in 0..SERVICES {
        let fe = Frontend {
            addr: vip(i),
            port: 80,
            proto: PROTO_TCP,
            affinity: None,
        };
        let backends: Vec<_> = (0..4)
            .map(|b| {
                if i == 0 {
                    BACKEND
                } else {
                    (
                        Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250) as u8),
                        8080 + b,
                    )
                }
            })
            .collect();
        bed.add_service(&fe, &backends)?;
    }
    let floor = Floor::new()?;
    let mut paths = Vec::new();

    // The floor, on the same kind of packet.
    let syn = packet::tcp(client(0), (VIP, 80), Tcp::Syn, &[]);
    paths.push(sample("empty tc program (floor)", runs, |_| {
        floor.run(&syn)
    })?);

    // New flows: one fresh tuple per run.
    paths.push(sample("new flow (pick, track, DNAT)", runs, |i| {
        let out = bed.run(&packet::tcp(client(i), (VIP, 80), Tcp::Syn, &[]))?;
        ensure!(out.verdict == 0, "new flow {i}: verdict {}", out.verdict);
        Ok(out.ns)
    })?);

    // Established: the first client's flow again and again.
    let c = client(0);
    let ack = packet::tcp(c, (VIP, 80), Tcp::Ack, b"GET / HTTP/1.1\r\n\r\n");
    let first = packet::read(&bed.run(&ack)?.packet)?;
    ensure!(first.dst.0 == BACKEND.0, "established flow not translated");
    paths.push(sample(
        "established flow (conntrack hit, DNAT)",
        runs,
        |_| Ok(bed.run(&ack)?.ns),
    )?);

    // Replies of that flow.
    let reply = packet::tcp(first.dst, c, Tcp::Ack, b"HTTP/1.1 200 OK\r\n\r\n");
    let seen = packet::read(&bed.run(&reply)?.packet)?;
    ensure!(seen.src == (VIP, 80), "reply not translated: {seen:?}");
    paths.push(sample("reply (rev-NAT)", runs, |_| {
        Ok(bed.run(&reply)?.ns)
    })?);

    // Traffic for no Service.
    let other = packet::tcp(c, (Ipv4Addr::new(10, 244, 50, 50), 80), Tcp::Ack, &[]);
    paths.push(sample("non-service (all lookups miss)", runs, |_| {
        let out = bed.run(&other)?;
        ensure!(out.packet == other, "non-service packet changed");
        Ok(out.ns)
    })?);

    let mut rows = Vec::new();
    for p in &mut paths {
        let (mean, p50, p99) = summary(&mut p.ns);
        rows.push((p.name, mean, p50, p99));
    }
    let floor_mean = rows[0].1;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Datapath program, ns per packet as the kernel measures it (BPF_PROG_TEST_RUN), {}: {runs} runs per path, one packet per run, {SERVICES} Services of 4 backends installed.\n",
        conditions(args.quick)
    );
    let _ = writeln!(
        md,
        "| path | mean | p50 | p99 | mean vs floor | above floor |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    for (name, mean, p50, p99) in &rows {
        let _ = writeln!(
            md,
            "| {name} | {mean:.0} ns | {p50:.0} ns | {p99:.0} ns | {:.2}x | {:.0} ns |",
            mean / floor_mean,
            mean - floor_mean
        );
        json_rows.push(json!({"path": name, "mean_ns": mean, "p50_ns": p50, "p99_ns": p99}));
    }
    args.report(
        "prog",
        &md,
        &json!({"quick": args.quick, "runs": runs, "services": SERVICES, "rows": json_rows}),
    )
}
