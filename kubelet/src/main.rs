//! `ferry-kubelet`: the node agent. Registers the node, renews its Lease, and runs the pods
//! bound to it through containerd's CRI (starting containerd with Ferry's configuration when
//! it is not running, and importing Ferry's local images).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use kubelet::containerd::{self, Layout};
use kubelet::node::NodeInfo;
use kubelet::pods::Kubelet;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "ferry-kubelet",
    about = "Ferry's node agent: runs pods through containerd's CRI"
)]
struct Args {
    /// Kubeconfig for the API server.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// This node's name.
    #[arg(long)]
    node_name: String,
    /// This node's address (the Node's InternalIP, hostIP of its pods).
    #[arg(long)]
    node_ip: Ipv4Addr,
    /// The node's pod CIDR (default: the one the node IPAM controller assigns).
    #[arg(long)]
    pod_cidr: Option<String>,
    /// Persistent state: containerd's images and snapshots, IPAM, pod logs and volumes.
    #[arg(long, default_value = "/var/lib/ferry")]
    data_dir: PathBuf,
    /// Runtime state: containerd's sockets.
    #[arg(long, default_value = "/run/ferry")]
    run_dir: PathBuf,
    /// containerd's CRI socket (default: the one of Ferry's own containerd under --run-dir).
    #[arg(long)]
    containerd_socket: Option<PathBuf>,
    /// Start containerd with Ferry's configuration when nothing answers on the socket.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    start_containerd: bool,
    /// Image archives (`cargo xtask images`) to import into containerd at start.
    #[arg(long)]
    images: Option<PathBuf>,
    /// The ferry-cni binary containerd runs (default: next to this binary).
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
    /// Where the reference CNI plugins (portmap) are.
    #[arg(long, default_value = "/usr/lib/cni")]
    cni_reference_dir: PathBuf,
    /// ferry-proxy's pin directory: ferry-cni waits for the datapath on new pods' links.
    #[arg(long, default_value = "/sys/fs/bpf/ferry")]
    bpf_dir: PathBuf,
    /// On SIGTERM or Ctrl-C, stop and remove every pod sandbox on the node before exiting
    /// (a development cluster's teardown; a production kubelet leaves its pods running).
    #[arg(long)]
    remove_pods_on_exit: bool,
    /// The cluster DNS server(s) ClusterFirst pods resolve with (the kube-dns Service's address,
    /// 10.96.0.10 in a default cluster). Repeatable; none: pods get the node's resolv.conf.
    #[arg(long)]
    cluster_dns: Vec<std::net::IpAddr>,
    /// The cluster's DNS domain, first in ClusterFirst pods' search list.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The node's resolver configuration: Default pods' resolv.conf and the search domains
    /// ClusterFirst pods inherit.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// The port announced in the Node's daemonEndpoints.
    #[arg(long, default_value_t = 10250)]
    port: u16,
    /// The serving certificate of the kubelet's port (default: a self-signed one made under
    /// <data-dir>/pki).
    #[arg(long, requires = "tls_private_key_file")]
    tls_cert_file: Option<PathBuf>,
    #[arg(long, requires = "tls_cert_file")]
    tls_private_key_file: Option<PathBuf>,
    /// The CA whose client certificates the kubelet's port accepts (default: the kubeconfig's
    /// cluster CA).
    #[arg(long)]
    client_ca_file: Option<PathBuf>,
}

/// The API client and the cluster CA certificates (DER) the kubeconfig trusts.
async fn client(kubeconfig: &std::path::Path) -> Result<(kube::Client, Vec<Vec<u8>>)> {
    let config = ferry_common::kubeconfig::config(kubeconfig, "ferry-kubelet").await?;
    let cas = config.root_cert.clone().unwrap_or_default();
    Ok((
        kube::Client::try_from(config).context("building the API client")?,
        cas,
    ))
}

fn client_cas(
    file: Option<&std::path::Path>,
    from_kubeconfig: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>> {
    let Some(f) = file else {
        return Ok(from_kubeconfig);
    };
    let pem =
        std::fs::read(f).with_context(|| format!("reading --client-ca-file {}", f.display()))?;
    rustls_pemfile::certs(&mut pem.as_slice())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("--client-ca-file {}: not PEM certificates", f.display()))
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = Args::parse();
    let mut layout = Layout::under(&a.data_dir, &a.run_dir);
    if let Some(s) = &a.containerd_socket {
        layout.socket = s.clone();
    }

    // The CNI network list containerd reads: ferry-cni with the node's pod CIDR (given, or
    // read from the Node through the kubeconfig), then portmap.
    let plugin = match &a.cni_plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary's directory")?
            .join("ferry-cni"),
    };
    let mut cni = json!({"dataDir": a.data_dir.join("ipam"), "bpfDir": a.bpf_dir});
    match &a.pod_cidr {
        Some(c) => cni["podCIDR"] = json!(c),
        None => {
            cni["kubeconfig"] = json!(std::fs::canonicalize(&a.kubeconfig)?);
            cni["nodeName"] = json!(a.node_name);
        }
    }
    layout
        .install_cni(&plugin, &a.cni_reference_dir, &containerd::conflist(cni))
        .context("installing the CNI configuration")?;

    // containerd: use the running one, or start Ferry's.
    let mut started = None;
    let mut cri = match kubelet::cri::Cri::connect(&layout.socket).await {
        Ok(c) => c,
        Err(e) if a.start_containerd => {
            tracing::info!(
                "no containerd at {} ({e:#}); starting one",
                layout.socket.display()
            );
            let mut cmd = layout.prepare()?;
            let log_path = a.run_dir.join("containerd.log");
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            cmd.stdout(log.try_clone()?).stderr(log);
            started = Some(
                cmd.spawn()
                    .context("starting containerd (`cargo xtask setup` installs it)")?,
            );
            containerd::wait_ready(&layout.socket, Duration::from_secs(30))
                .await
                .with_context(|| format!("containerd's log: {}", log_path.display()))?
        }
        Err(e) => return Err(e),
    };
    let runtime = cri.version().await?;
    tracing::info!(runtime = %runtime, socket = %layout.socket.display(), "container runtime ready");
    if let Some(dir) = &a.images {
        let mut archives: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading the image directory {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        archives.sort();
        for archive in archives {
            layout.import_image(&archive)?;
            tracing::info!(archive = %archive.display(), "imported image");
        }
    }

    let (client, cluster_cas) = client(&a.kubeconfig).await?;
    let info = NodeInfo {
        name: a.node_name.clone(),
        ip: a.node_ip,
        pod_cidr: a.pod_cidr.clone(),
        runtime_version: runtime.replacen(' ', "://", 1),
        port: a.port,
    };
    kubelet::node::register(&client, &info).await?;
    tokio::spawn(kubelet::node::heartbeat(client.clone(), info));
    let listener = tokio::net::TcpListener::bind((a.node_ip, a.port))
        .await
        .with_context(|| format!("listening on {}:{} (--node-ip, --port)", a.node_ip, a.port))?;
    let stats = kubelet::stats::Stats::new(&a.node_name);
    tokio::spawn(kubelet::stats::run(
        stats.clone(),
        cri.clone(),
        kubelet::stats::EVERY,
    ));
    let app = kubelet::server::router(a.data_dir.join("pods"), cri.clone(), stats);
    let (cert, key) = kubelet::serving::serving_pair(
        a.tls_cert_file
            .as_deref()
            .zip(a.tls_private_key_file.as_deref()),
        &a.data_dir.join("pki"),
        &[a.node_name.clone(), a.node_ip.to_string()],
    )?;
    let tls = kubelet::serving::tls_config(
        &cert,
        &key,
        &client_cas(a.client_ca_file.as_deref(), cluster_cas)?,
    )
    .context("the kubelet's TLS configuration")?;
    tokio::spawn(kubelet::serving::serve(listener, app, tls));
    let events = ferry_common::events::Recorder::new(client.clone(), "kubelet");
    let services = kubelet::services::Services::watch(client.clone());
    let host_resolv = match std::fs::read_to_string(&a.resolv_conf) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %a.resolv_conf.display(), "no node resolv.conf: Default pods get no name servers");
            String::new()
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading --resolv-conf {}", a.resolv_conf.display()))
        }
    };
    let dns = kubelet::pods::DnsSettings {
        cluster_dns: a.cluster_dns,
        cluster_domain: a.cluster_domain,
        host: kubelet::pods::ResolvConf::parse(&host_resolv),
    };
    if dns.cluster_dns.is_empty() {
        tracing::warn!("no --cluster-dns: ClusterFirst pods get the node's resolv.conf");
    }
    let k = Arc::new(Kubelet {
        dns,
        events,
        services,
        client,
        cri: cri.clone(),
        node_name: a.node_name,
        node_ip: a.node_ip.to_string(),
        pods_dir: a.data_dir.join("pods"),
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = kubelet::pods::run(k) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    if a.remove_pods_on_exit {
        let sandboxes = cri.sandboxes().await.unwrap_or_default();
        tracing::info!(count = sandboxes.len(), "removing every pod sandbox");
        for s in sandboxes {
            let _ = cri.stop_sandbox(&s.id).await;
            if let Err(e) = cri.remove_sandbox(&s.id).await {
                tracing::warn!("{e:#}");
            }
        }
    }
    if let Some(mut c) = started {
        // The containerd this kubelet started stops with it (its containers' shims stay,
        // as with any containerd restart, and are adopted by the next one).
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
    tracing::info!("ferry-kubelet stopped");
    result
}
