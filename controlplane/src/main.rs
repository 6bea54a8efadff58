//! `ferry-controlplane`: the Kubernetes-compatible API server (embedded store by default,
//! etcd with `--etcd-servers`), and `snapshot save|restore` for the embedded store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use controlplane::api::{self, auth, Api, Config};
use controlplane::store::{embedded, etcd::EtcdStore, Store};
use controlplane::{pki, server};
use ipnetwork::Ipv4Network;
use tracing::{info, warn};

/// glibc's allocator showed in profiles of watch fan-out and creates; mimalloc is faster
/// for the many small, short-lived buffers of JSON and TLS.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ferry-controlplane",
    version,
    about = "Ferry's Kubernetes-compatible API server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// The controller manager: Endpoints and EndpointSlices, ReplicaSets and
    /// ReplicationControllers, Deployments, DaemonSets, Jobs, CronJobs, StatefulSets, garbage
    /// collection, node lifecycle.
    ControllerManager {
        /// Kubeconfig of the API server (the control plane writes controller-manager.kubeconfig).
        #[arg(long)]
        kubeconfig: PathBuf,
        #[command(flatten)]
        election: ElectionArgs,
        /// A node silent (no Lease renewal, no status) this long is marked Unknown and tainted.
        #[arg(long, default_value = "40s", value_parser = parse_duration)]
        node_monitor_grace_period: Duration,
        /// How often nodes' heartbeats are checked.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        node_monitor_period: Duration,
        /// Give each node a pod CIDR (spec.podCIDR) from this range.
        #[arg(long)]
        cluster_cidr: Option<Ipv4Network>,
        /// The prefix length of each node's pod CIDR.
        #[arg(long, default_value_t = 24)]
        node_cidr_mask_size: u8,
    },
    /// The scheduler: binds pending pods to nodes.
    Scheduler {
        /// Kubeconfig of the API server (the control plane writes scheduler.kubeconfig).
        #[arg(long)]
        kubeconfig: PathBuf,
        #[command(flatten)]
        election: ElectionArgs,
    },
    /// Backup and restore of the embedded store.
    Snapshot {
        #[command(subcommand)]
        op: SnapshotOp,
    },
}

#[derive(Subcommand)]
enum SnapshotOp {
    /// Writes a consistent copy of the store in --data-dir to FILE (the server may run).
    Save {
        file: PathBuf,
        #[arg(long, default_value = "/var/lib/ferry/controlplane")]
        data_dir: PathBuf,
    },
    /// Makes --data-dir hold exactly the state in FILE (the server must be stopped).
    Restore {
        file: PathBuf,
        #[arg(long, default_value = "/var/lib/ferry/controlplane")]
        data_dir: PathBuf,
        /// Replace a store that already holds data.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct ElectionArgs {
    /// Run only while holding the Lease kube-system/<component>, so that several copies can
    /// run and one acts (`--leader-elect=false` to act at once).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// How long a leader's lease lasts without renewal before another copy takes over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,
}

impl ElectionArgs {
    /// Runs `work` as the leader of `lease` (or at once without election).
    async fn run(
        &self,
        client: kube::Client,
        lease: &str,
        work: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        if !self.leader_elect {
            return work.await;
        }
        if self.leader_elect_lease_duration < Duration::from_secs(1) {
            bail!("--leader-elect-lease-duration: give at least 1s");
        }
        let cfg = ferry_common::leader::Config::new(lease)
            .with_lease_duration(self.leader_elect_lease_duration);
        ferry_common::leader::run_as_leader(client, cfg, work).await
    }
}

#[derive(Args)]
struct ServeArgs {
    /// State directory: the embedded store (store/), certificates (pki/), kubeconfigs.
    #[arg(long, default_value = "/var/lib/ferry/controlplane")]
    data_dir: PathBuf,
    /// Address and port of the HTTPS API.
    #[arg(long, default_value = "127.0.0.1:6443")]
    bind_address: SocketAddr,
    /// The address other members of the cluster reach this server at: the endpoint of the
    /// `kubernetes` Service and discovery's server address (default: the bind address's; a
    /// loopback address gives the Service no endpoint, as pods could not reach it).
    #[arg(long)]
    advertise_address: Option<std::net::Ipv4Addr>,
    /// Use etcd v3 at these URLs (comma-separated) instead of the embedded store.
    #[arg(long, value_delimiter = ',')]
    etcd_servers: Vec<String>,
    /// Static bearer tokens: lines of `token,user,uid[,"group1,group2"]`.
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
    /// Cluster IPs of Services are allocated from this range.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: Ipv4Network,
    /// Node ports of NodePort Services are allocated from this range.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Extra names and addresses in the serving certificate (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tls_san: Vec<String>,
    /// Write a kubeconfig (client certificate, group system:nodes) for each of these nodes.
    #[arg(long, value_delimiter = ',')]
    node_kubeconfigs: Vec<String>,
    /// Store history older than this is compacted (watches from before it get 410 Gone).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    compaction_interval: Duration,
    /// Reads in flight at once; more are answered 429 (watches are not counted).
    #[arg(long, default_value_t = 400)]
    max_requests_inflight: usize,
    /// Writes in flight at once; more are answered 429.
    #[arg(long, default_value_t = 200)]
    max_mutating_requests_inflight: usize,
    /// A request (other than a watch or a followed log) that takes longer gets 504.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Events one watcher may have waiting; a watcher that falls further behind is closed.
    #[arg(long, default_value_t = 1000)]
    watch_buffer_size: usize,
    /// Bytes of object data one watcher may have waiting before it is closed.
    #[arg(long, default_value_t = 64 << 20)]
    watch_buffer_bytes: usize,
    /// Open connections from one client address; more are closed at once.
    #[arg(long, default_value_t = 2000)]
    max_connections_per_client: usize,
    /// Open connections in all (kept below the file descriptor limit).
    #[arg(long, default_value_t = 10000)]
    max_connections: usize,
    /// A connection with nothing in flight for this long is closed.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    idle_connection_timeout: Duration,
    /// A new connection must finish its TLS handshake, and then send its first request,
    /// each within this.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Kubernetes' EncryptionConfiguration (aescbc, secretbox, identity): how Secrets (or the
    /// resources it names) are encrypted in the store.
    #[arg(long)]
    encryption_provider_config: Option<PathBuf>,
    /// Authorizers in order: Node (each node's kubelet reaches only its own node's objects)
    /// and RBAC.
    #[arg(long, default_value = "Node,RBAC", value_delimiter = ',')]
    authorization_mode: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("\"{s}\" is not a duration: write e.g. 30s, 5m or 1h"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => {
            return Err(format!(
                "\"{s}\": unknown unit \"{unit}\" (use ms, s, m or h)"
            ))
        }
    })
}

fn parse_ports(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .context("--service-node-port-range: write it as LOW-HIGH, e.g. 30000-32767")?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .context("--service-node-port-range: LOW is not a port")?,
        b.trim()
            .parse()
            .context("--service-node-port-range: HIGH is not a port")?,
    );
    if a == 0 || a > b {
        bail!(
            "--service-node-port-range: {a}-{b} is empty; LOW must be 1 or more and at most HIGH"
        );
    }
    Ok((a, b))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferry_common::exit::exit_code(run().await)
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Snapshot {
            op: SnapshotOp::Save { file, data_dir },
        }) => {
            let rev = embedded::snapshot_save(&data_dir.join("store"), &file)?;
            println!("snapshot of revision {rev} saved to {}", file.display());
            Ok(())
        }
        Some(Cmd::Snapshot {
            op:
                SnapshotOp::Restore {
                    file,
                    data_dir,
                    force,
                },
        }) => {
            let rev = embedded::snapshot_restore(&file, &data_dir.join("store"), force)?;
            println!("store in {} restored to revision {rev}", data_dir.display());
            Ok(())
        }
        Some(Cmd::ControllerManager {
            kubeconfig,
            election,
            node_monitor_grace_period,
            node_monitor_period,
            cluster_cidr,
            node_cidr_mask_size,
        }) => {
            if let Some(c) = cluster_cidr {
                if node_cidr_mask_size < c.prefix() || node_cidr_mask_size > 30 {
                    bail!(
                        "--node-cidr-mask-size {node_cidr_mask_size}: must be between the cluster CIDR's prefix ({}) and 30",
                        c.prefix()
                    );
                }
            }
            use controlplane::controllers::{
                cronjob, daemonset, deployment, disruption, endpoints, gc, job, nodeipam,
                nodelifecycle, replicaset, serviceaccounts, statefulset,
            };
            let client =
                ferry_common::kubeconfig::client(&kubeconfig, "ferry-controller-manager").await?;
            let ca = serviceaccounts::kubeconfig_ca(&kubeconfig)?;
            let nodes = nodelifecycle::Options {
                grace_period: node_monitor_grace_period,
                monitor_period: node_monitor_period,
            };
            let work = async {
                tokio::select! {
                    r = endpoints::run(client.clone()) => r,
                    r = replicaset::run::<k8s_openapi::api::apps::v1::ReplicaSet>(client.clone()) => r,
                    r = replicaset::run::<k8s_openapi::api::core::v1::ReplicationController>(client.clone()) => r,
                    r = gc::run(client.clone()) => r,
                    r = deployment::run(client.clone()) => r,
                    r = nodelifecycle::run(client.clone(), nodes) => r,
                    r = daemonset::run(client.clone()) => r,
                    r = job::run(client.clone()) => r,
                    r = cronjob::run(client.clone()) => r,
                    r = statefulset::run(client.clone()) => r,
                    r = disruption::run(client.clone()) => r,
                    r = serviceaccounts::run(client.clone(), ca.clone()) => r,
                    r = async {
                        match cluster_cidr {
                            Some(cluster_cidr) => nodeipam::run(client.clone(), nodeipam::Options {
                                cluster_cidr,
                                mask: node_cidr_mask_size,
                            }).await,
                            None => std::future::pending().await,
                        }
                    } => r,
                }
            };
            tokio::select! {
                r = election.run(client.clone(), "kube-controller-manager", work) => r,
                _ = terminated() => Ok(()),
            }
        }
        Some(Cmd::Scheduler {
            kubeconfig,
            election,
        }) => {
            let client = ferry_common::kubeconfig::client(&kubeconfig, "ferry-scheduler").await?;
            let work = controlplane::scheduler::run(client.clone());
            tokio::select! {
                r = election.run(client.clone(), "kube-scheduler", work) => r,
                _ = terminated() => Ok(()),
            }
        }
        None => serve(cli.serve).await,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; stopping"),
        _ = term.recv() => info!("terminated; stopping"),
    }
}

async fn serve(a: ServeArgs) -> Result<()> {
    let node_ports = parse_ports(&a.service_node_port_range)?;
    if a.service_cluster_ip_range.prefix() > 28 {
        bail!(
            "--service-cluster-ip-range {} is too small; give at least a /28",
            a.service_cluster_ip_range
        );
    }
    if a.watch_buffer_size == 0 || a.watch_buffer_bytes == 0 {
        bail!("--watch-buffer-size and --watch-buffer-bytes: give at least 1");
    }
    if a.max_requests_inflight == 0 || a.max_mutating_requests_inflight == 0 {
        bail!("--max-requests-inflight and --max-mutating-requests-inflight: give at least 1");
    }
    let mut node_authorizer = false;
    for m in &a.authorization_mode {
        match m.as_str() {
            "Node" => node_authorizer = true,
            "RBAC" => {}
            other => bail!("--authorization-mode: unknown mode \"{other}\"; use Node and/or RBAC"),
        }
    }
    if !a.authorization_mode.iter().any(|m| m == "RBAC") {
        bail!("--authorization-mode: RBAC is required (e.g. Node,RBAC)");
    }
    controlplane::store::watch_buffer::set_limits(controlplane::store::watch_buffer::WatchLimits {
        events: a.watch_buffer_size,
        bytes: a.watch_buffer_bytes,
    });
    controlplane::private_dir(&a.data_dir)?;
    let store: Arc<dyn Store> = if a.etcd_servers.is_empty() {
        embedded::EmbeddedStore::open(&a.data_dir.join("store"))?
    } else {
        info!(servers = ?a.etcd_servers, "using etcd");
        EtcdStore::connect(&a.etcd_servers).await?
    };
    let store: Arc<dyn Store> = match &a.encryption_provider_config {
        Some(p) => {
            use controlplane::store::encryption::{EncryptedStore, EncryptionConfig};
            let cfg = EncryptionConfig::load(p)?;
            info!(path = %p.display(), resources = ?cfg.resources(), "encrypting at rest");
            let prefix_of = |name: &str| -> Result<String> {
                let (plural, group) = name.split_once('.').unwrap_or((name, ""));
                api::resources::RESOURCES
                    .iter()
                    .find(|r| r.plural == plural && r.group == group)
                    .map(|r| r.prefix())
                    .with_context(|| format!(
                        "{}: resource \"{name}\" is not served; write e.g. secrets or deployments.apps",
                        p.display()
                    ))
            };
            Arc::new(EncryptedStore::new(store, cfg, prefix_of)?)
        }
        None => store,
    };
    let tokens = match &a.token_auth_file {
        Some(p) => auth::load_tokens(p)?,
        None => Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(a.bind_address)
        .await
        .with_context(|| format!("listening on {}", a.bind_address))?;
    let addr = listener.local_addr()?;
    let advertise = match (a.advertise_address, addr.ip()) {
        (Some(ip), _) => ip,
        (None, std::net::IpAddr::V4(ip)) if !ip.is_unspecified() => ip,
        (None, std::net::IpAddr::V4(_)) => std::net::Ipv4Addr::LOCALHOST,
        (None, std::net::IpAddr::V6(_)) => {
            bail!("--bind-address {addr}: give --advertise-address, an IPv4 address pods reach the API at")
        }
    };
    let advertise = std::net::SocketAddrV4::new(advertise, addr.port());
    // Kubeconfigs name the address this server listens on.
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let server_url = format!("https://{host}:{}", addr.port());
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        host.clone(),
        advertise.ip().to_string(),
        api::kubernetes_service::service_ip(a.service_cluster_ip_range).to_string(),
    ];
    names.extend(a.tls_san.iter().cloned());
    names.sort();
    names.dedup();
    let pki = pki::ensure(&a.data_dir, &server_url, &names, &a.node_kubeconfigs)?;
    for p in &pki.written {
        info!(path = %p.display(), "kubeconfig written");
    }
    let cfg = Config {
        service_cidr: a.service_cluster_ip_range,
        node_ports,
        tokens,
        advertise,
        limits: api::RequestLimits {
            max_requests_inflight: a.max_requests_inflight,
            max_mutating_requests_inflight: a.max_mutating_requests_inflight,
            request_timeout: a.request_timeout,
        },
        node_authorizer,
        signer: Some(api::serviceaccount::Signer::new(
            &pki.sa_key_pem,
            &pki.sa_public_pem,
        )?),
        kubelet_tls: Some(api::kubelet_tls(
            &pki.kubelet_client_cert_pem,
            &pki.kubelet_client_key_pem,
        )?),
    };
    let conn_limits = server::ConnLimits {
        handshake_timeout: a.handshake_timeout,
        first_request_timeout: a.handshake_timeout,
        idle_timeout: a.idle_connection_timeout,
        max_per_client: a.max_connections_per_client,
        max_total: a.max_connections,
    };
    api::log_start(&cfg);
    let api = Api::new(store.clone(), cfg).await?;
    // Compaction as Kubernetes does it: each interval, forget history older than the
    // revision seen at the previous tick.
    let compact_store = store.clone();
    let every = a.compaction_interval;
    tokio::spawn(async move {
        let mut prev = 0;
        loop {
            tokio::time::sleep(every).await;
            if prev > 0 {
                match compact_store.compact(prev).await {
                    Ok(()) => info!(revision = prev, "store compacted"),
                    Err(e) => warn!(error = %e, "compaction failed"),
                }
            }
            prev = compact_store.current_revision().await.unwrap_or(prev);
        }
    });
    println!(
        "ferry-controlplane serving {server_url}; admin kubeconfig: {}",
        a.data_dir.join("admin.kubeconfig").display()
    );
    tokio::select! {
        r = server::serve(api, listener, &pki, conn_limits) => {
            tracing::error!(result = ?r, "the API server stopped serving");
            r
        }
        _ = terminated() => Ok(()),
    }
}
