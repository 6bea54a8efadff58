use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use proxy::daemon::{self, Config};
use proxy::dns::DnsOptions;
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
    /// Serve cluster DNS on this node, on this node-local address (put on a dummy link
    /// `ferry-dns`, or on `lo` when the kernel has no dummy links); the cluster DNS Service's
    /// port 53 leads here. Off when not given.
    #[arg(long)]
    dns_addr: Option<Ipv4Addr>,
    /// The port of the DNS server (53 unless a test needs another).
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// The cluster domain the DNS server is authoritative for.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Upstream resolver for names outside the cluster (ip or ip:port); repeatable. Default:
    /// the nameservers of the node's /etc/resolv.conf.
    #[arg(long = "dns-upstream")]
    dns_upstreams: Vec<String>,
    /// Source range allowed to query the DNS server besides loopback and, from the API, every
    /// node's addresses and pod range; repeatable. Default: the private ranges (RFC 1918).
    #[arg(long = "dns-allow", default_values = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"])]
    dns_allow: Vec<ipnetwork::IpNetwork>,
    /// DNS queries per second one client address may send (bursts of twice that); 0: no limit.
    #[arg(long, default_value_t = 2000)]
    dns_client_qps: u32,
    /// The cluster DNS Service (namespace/name) whose port 53 leads to this node's server.
    #[arg(long, default_value = "kube-system/kube-dns")]
    dns_service: String,
    /// Detach the datapath and remove everything pinned under --bpf-dir, then exit.
    #[arg(long)]
    cleanup: bool,
}

/// `ip` or `ip:port` (port 53 when not given).
fn parse_upstream(s: &str) -> Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: std::net::IpAddr = s.parse().map_err(|_| {
        anyhow::anyhow!(
            "--dns-upstream {s:?}: give an address, optionally with a port (10.0.0.2:53)"
        )
    })?;
    Ok(SocketAddr::new(ip, 53))
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
        dns: match args.dns_addr {
            None => None,
            Some(addr) => Some(DnsOptions {
                addr,
                port: args.dns_port,
                domain: args.cluster_domain,
                upstreams: args
                    .dns_upstreams
                    .iter()
                    .map(|u| parse_upstream(u))
                    .collect::<Result<_>>()?,
                allow: args.dns_allow,
                client_qps: args.dns_client_qps,
                service: match args.dns_service.split_once('/') {
                    Some((ns, n)) if !ns.is_empty() && !n.is_empty() => (ns.into(), n.into()),
                    _ => anyhow::bail!(
                        "--dns-service {:?}: give it as namespace/name, e.g. kube-system/kube-dns",
                        args.dns_service
                    ),
                },
                manage_link: true,
            }),
        },
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
