//! `cargo xtask bench <which>`: runs one benchmark. The datapath's is in `bench_datapath.rs`,
//! Ferry against kube-proxy in `compare.rs`, the CNI plugin's in `bench_cni.rs`; the others live
//! with their crate (`cargo bench`) and write their results beside these. What they share
//! (load generation, medians, run information, results files) is in `measure.rs`.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum Which {
    /// Datapath rates and programming time (see the module docs).
    Datapath(Opts),
    /// Ferry against kube-proxy's iptables, nftables and IPVS layouts, side by side.
    Compare(crate::compare::CompareOpts),
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
    /// Cluster DNS with 10,000 Services against unbound serving the same static zone:
    /// queries/s and latency with dnsperf, and Service create to name resolvable.
    Dns(Opts),
    /// ferry-cni against ptp + host-local: ADD and DEL latency for 100 pods.
    Cni(Opts),
    /// Pod startup on one node with containerd: create to Running and to Ready for 30 pods,
    /// against the same pods started straight through CRI.
    Pods(Opts),
    /// kubectl exec latency and port-forward throughput through the API server and kubelet,
    /// against kubectl's own round trip, CRI ExecSync and the same transfer to the pod IP.
    Streaming(Opts),
}

#[derive(Args, Clone)]
pub struct Opts {
    /// A short run (about a minute) that shows the benchmark works; figures are noisier.
    #[arg(long)]
    quick: bool,
}

pub fn run(which: Which) -> Result<()> {
    ferry_testbed::clean_up_on_signal();
    match which {
        Which::Datapath(o) => crate::bench_datapath::run(o.quick),
        Which::Compare(o) => crate::compare::run(&o),
        Which::Controlplane(o) => crate_bench("controlplane", "controlplane", o.quick),
        Which::Scheduler(o) => crate_bench("controlplane", "scheduler", o.quick),
        Which::Endpoints(o) => crate_bench("proxy", "endpoint_latency", o.quick),
        Which::Prog(o) => crate_bench("proxy", "prog", o.quick),
        Which::Dns(o) => crate_bench("proxy", "dns", o.quick),
        Which::Cni(o) => crate::bench_cni::run(o.quick),
        Which::Pods(o) => {
            crate::images::build()?;
            crate_bench("tests", "pods", o.quick)
        }
        Which::Streaming(o) => {
            crate::images::build()?;
            crate_bench("tests", "streaming", o.quick)
        }
    }
}

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
