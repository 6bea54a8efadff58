use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use proxy::daemon::{self, Config};
use proxy::links::Globs;
use proxy::source::{ApiSource, FileSource};

/// Ferry's node daemon: programs the in-kernel Service load balancer from Kubernetes Services
/// and EndpointSlices.
#[derive(Parser, Debug)]
#[command(name = "ferry-proxy", version)]
struct Args {
    /// Multi-document YAML of v1 Services and discovery.k8s.io/v1 EndpointSlices; reloaded on change.
    #[arg(long, required_unless_present_any = ["cleanup", "kubeconfig"], conflicts_with = "kubeconfig")]
    services: Option<PathBuf>,
    /// Watch Services and EndpointSlices of the API server this kubeconfig names (Ferry's
    /// control plane or any Kubernetes cluster) instead of reading a file.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Glob of interfaces to attach to (host side of pod veths, NodePort-facing links); repeatable.
    /// The default covers veths and ferry-cni's pod interfaces (`fy*`).
    #[arg(long = "interfaces", default_values = ["veth*", "fy*"])]
    interfaces: Vec<String>,
    /// This node's name, for externalTrafficPolicy/internalTrafficPolicy Local.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Address accepting NodePort traffic; repeatable. Default: every IPv4 address of non-pod interfaces.
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// bpffs directory where programs, links and maps are pinned.
    #[arg(long, default_value = "/sys/fs/bpf/ferry")]
    bpf_dir: PathBuf,
    /// Source address given to a pod that reaches itself through a Service (hairpin).
    #[arg(long, default_value = "169.254.42.1")]
    hairpin_ip: Ipv4Addr,
    /// Forward translated packets from the datapath itself (FIB lookup and redirect), skipping
    /// the host's IP stack; `false` hands them to the stack (netfilter and routing see them).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    bpf_host_routing: bool,
    #[arg(long, default_value = "0.0.0.0:10249")]
    metrics_bind_address: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// Conntrack garbage-collection period, in seconds. The datapath ignores expired entries by
    /// itself and the LRU map evicts the oldest when full; collection frees room and updates
    /// `ferry_conntrack_entries`, walking the whole map, so it runs seldom.
    #[arg(long, default_value_t = 60.0)]
    conntrack_gc_interval: f64,
    /// Connect-time load balancing: cgroup socket programs translate a Service address once per
    /// connect (TCP, connected UDP) or datagram (unconnected UDP), for pods and the node's own
    /// processes; the tc programs still serve traffic from outside. Needs cgroup v2 and Linux
    /// >= 5.18; without them the daemon warns and runs with the tc programs only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// The cgroup v2 directory the socket programs serve, with every cgroup below it (default:
    /// the root of the cgroup v2 hierarchy, found in the mount table).
    #[arg(long)]
    socket_lb_cgroup: Option<PathBuf>,
    /// Detach the datapath and remove everything pinned under --bpf-dir, then exit.
    #[arg(long)]
    cleanup: bool,
}

fn main() -> std::process::ExitCode {
    ferry_common::exit::exit_code(run())
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.cleanup {
        return proxy::datapath::cleanup(&args.bpf_dir);
    }
    let node_name = match args.node_name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")?
            .trim()
            .to_string(),
    };
    let cfg = Config {
        interfaces: Globs::new(&args.interfaces)?,
        node_name,
        node_ips: args.node_ips,
        pin_dir: args.bpf_dir,
        hairpin_ip: args.hairpin_ip,
        host_routing: args.bpf_host_routing,
        metrics_addr: args.metrics_bind_address,
        healthz_addr: args.healthz_bind_address,
        ct_gc_interval: Duration::from_secs_f64(args.conntrack_gc_interval.max(0.01)),
        socket_lb: args.socket_lb,
        socket_lb_cgroup: args.socket_lb_cgroup,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match (args.kubeconfig, args.services) {
        (Some(kc), _) => rt.block_on(async move {
            let _ = rustls::crypto::ring::default_provider().install_default();
            daemon::run(cfg, ApiSource::connect(&kc).await?).await
        }),
        (None, Some(file)) => rt.block_on(daemon::run(cfg, FileSource::new(file))),
        (None, None) => unreachable!("clap requires --services or --kubeconfig"),
    }
}
