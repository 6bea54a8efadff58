//! The node's registration and heartbeat: the Node object (capacity, allocatable, addresses,
//! podCIDR, node info), its Ready condition, and the Lease in kube-node-lease that the node
//! lifecycle controller watches.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::chrono::Utc;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// How often the Lease is renewed (kubelet's default).
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// How long a Lease is valid without renewal.
pub const LEASE_DURATION_SECONDS: i32 = 40;
/// How often the node status (Ready's heartbeat) is written even when nothing changed.
const STATUS_REPORT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    /// `spec.podCIDR` to set at registration (None: the node IPAM controller assigns it).
    pub pod_cidr: Option<String>,
    /// `containerd://1.6.20`.
    pub runtime_version: String,
    /// Where the kubelet serves logs (`status.daemonEndpoints`).
    pub port: u16,
}

/// This machine's CPU count and memory, as Node capacity.
fn capacity() -> serde_json::Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({"cpu": cpus.to_string(), "memory": format!("{mem_kib}Ki"), "pods": "110",
           "ephemeral-storage": "10Gi"})
}

/// The node's capacity as quantities (what an unset limit means to the downward API).
pub fn capacity_quantities() -> std::collections::BTreeMap<String, Quantity> {
    serde_json::from_value(capacity()).unwrap_or_default()
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn status(info: &NodeInfo) -> serde_json::Value {
    let now = Utc::now();
    let cond = |t: &str, s: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": s, "reason": reason, "message": msg,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({"status": {
        "capacity": capacity(),
        "allocatable": capacity(),
        "addresses": [{"type": "InternalIP", "address": info.ip.to_string()},
                      {"type": "Hostname", "address": info.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": info.port}},
        "nodeInfo": {
            "kubeletVersion": concat!("v1.32.0-ferry.", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "containerRuntimeVersion": info.runtime_version,
            "kernelVersion": kernel_version(),
            "osImage": "Ferry node",
            "operatingSystem": "linux",
            "architecture": arch(),
            "machineID": "", "systemUUID": "", "bootID": "",
        },
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
    }})
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Creates the Node (or adopts an existing one of the same name) and writes its status.
pub async fn register(client: &kube::Client, info: &NodeInfo) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": info.name, "labels": {
            "kubernetes.io/hostname": info.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": arch(),
        }},
    });
    if let Some(cidr) = &info.pod_cidr {
        node["spec"] = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
    }
    let node: Node = serde_json::from_value(node)?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!(node = %info.name, "registered the node"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::info!(node = %info.name, "the node exists; taking it over")
        }
        Err(e) => return Err(e).with_context(|| format!("registering node {}", info.name)),
    }
    report_status(client, info).await
}

async fn report_status(client: &kube::Client, info: &NodeInfo) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(
            &info.name,
            &PatchParams::default(),
            &Patch::Merge(&status(info)),
        )
        .await
        .with_context(|| format!("writing node {}'s status", info.name))?;
    Ok(())
}

async fn renew_lease(leases: &Api<Lease>, name: &str) -> Result<()> {
    let now = MicroTime(Utc::now());
    let renew = json!({"spec": {"holderIdentity": name, "renewTime": now,
                                "leaseDurationSeconds": LEASE_DURATION_SECONDS}});
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&renew))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                         "renewTime": now}}))?;
            leases.create(&PostParams::default(), &lease).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Renews the Lease every 10 s and rewrites the status every minute, until the task ends.
pub async fn heartbeat(client: kube::Client, info: NodeInfo) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let mut since_status = Duration::ZERO;
    loop {
        if let Err(e) = renew_lease(&leases, &info.name).await {
            tracing::warn!(node = %info.name, "renewing the node lease: {e:#}");
        }
        if since_status >= STATUS_REPORT {
            match report_status(&client, &info).await {
                Ok(()) => since_status = Duration::ZERO,
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
        tokio::time::sleep(LEASE_RENEW).await;
        since_status += LEASE_RENEW;
    }
}
