//! The commands, as a runtime (containerd's libcni) calls them.

use serde_json::{json, Value};

use crate::ipam::Pool;
use crate::link;
use crate::spec::{
    prev_address, Added, CniError, Code, Command, Env, NetConf, Result, LATEST, SUPPORTED_VERSIONS,
};

/// Runs one command; `Ok(Some(json))` is printed on stdout, `Ok(None)` prints nothing.
pub async fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>> {
    if env.command == Command::Version {
        return Ok(Some(
            json!({"cniVersion": LATEST, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let mut conf = NetConf::parse(stdin)?;
    conf.check_version()?;
    if let Some(cidr) = pod_cidr_from_node(&conf).await? {
        conf.pod_cidr = Some(cidr);
    }
    let net = conf.network()?;
    let v = |min: &str| {
        if net.version.as_str() < min {
            Err(CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "{:?} needs cniVersion {min} or later; the configuration says {}",
                    env.command, net.version
                ),
            ))
        } else {
            Ok(())
        }
    };
    let pool = || Pool::open(&net.data_dir, &net.name, net.cidr, net.gateway);
    let host_name = link::host_ifname(&env.container_id, &env.ifname);
    match env.command {
        Command::Version => unreachable!("answered above"),
        Command::Add => {
            let netns = env.netns.as_deref().expect("checked by Env::read");
            // The lock is held only while choosing the address, so ADDs run in parallel.
            let ip = pool()?.allocate(&env.container_id, &env.ifname)?;
            let setup = link::Setup {
                netns,
                ifname: &env.ifname,
                host_name: &host_name,
                address: ip,
                gateway: net.gateway,
                mtu: net.mtu,
            };
            match link::add(&setup).await {
                Ok((host, pod)) => {
                    datapath_attached(&net.bpf_dir, &host.name).await;
                    let address = ipnetwork::Ipv4Network::new(ip, net.cidr.prefix())
                        .expect("prefix of a valid CIDR");
                    let added = Added {
                        host,
                        pod,
                        address,
                        gateway: net.gateway,
                    };
                    Ok(Some(added.to_json(&net.version)))
                }
                Err(e) => {
                    let _ = pool()?.release(&env.container_id, &env.ifname);
                    Err(e)
                }
            }
        }
        Command::Del => {
            link::del(env.netns.as_deref(), &env.ifname, &host_name).await?;
            pool()?.release(&env.container_id, &env.ifname)?;
            Ok(None)
        }
        Command::Check => {
            v("0.4.0")?;
            let prev = conf.prev_result.as_ref().ok_or_else(|| {
                CniError::new(
                    Code::InvalidConfig,
                    "invalid network configuration",
                    "prevResult: CHECK needs the result of ADD",
                )
            })?;
            let address = prev_address(prev, &env.ifname)?;
            let held = pool()?.find(&env.container_id, &env.ifname)?;
            if held != Some(address.ip()) {
                return Err(CniError::new(
                    Code::UnknownContainer,
                    "attachment is not as ADD left it",
                    format!(
                        "{} is not allocated to container {} ({})",
                        address.ip(),
                        env.container_id,
                        env.ifname
                    ),
                ));
            }
            link::check(
                env.netns.as_deref().expect("checked"),
                &env.ifname,
                &host_name,
                address,
            )
            .await?;
            Ok(None)
        }
        Command::Status => {
            v("1.1.0")?;
            let p = pool()?;
            let used = p.allocations()?.len();
            if used >= p.capacity() {
                return Err(CniError::new(
                    Code::NotAvailable,
                    "no free address",
                    format!("the pod CIDR {} is exhausted ({used} in use)", net.cidr),
                ));
            }
            Ok(None)
        }
        Command::Gc => {
            v("1.1.0")?;
            let valid = conf.valid_attachments.clone().unwrap_or_default();
            pool()?.collect(&valid)?;
            Ok(None)
        }
    }
}

/// Without a podCIDR in the configuration but with a kubeconfig: the Node's spec.podCIDR,
/// read once and then kept next to the allocations (a node's CIDR never changes).
async fn pod_cidr_from_node(conf: &NetConf) -> Result<Option<String>> {
    let in_conf = conf.pod_cidr.is_some()
        || conf
            .ipam
            .as_ref()
            .is_some_and(|i| i.get("subnet").is_some());
    let Some(kubeconfig) = conf.kubeconfig.as_deref().filter(|_| !in_conf) else {
        return Ok(None);
    };
    let data_dir = conf
        .data_dir
        .clone()
        .unwrap_or_else(|| "/var/lib/ferry/ipam".into());
    let cache = std::path::Path::new(&data_dir)
        .join(&conf.name)
        .join("pod_cidr");
    if let Ok(c) = std::fs::read_to_string(&cache) {
        return Ok(Some(c.trim().to_string()));
    }
    let node = match &conf.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .map_err(|e| CniError::new(Code::Io, "reading the host name", e.to_string()))?,
    };
    let bad = |d: String| CniError::new(Code::InvalidConfig, "invalid network configuration", d);
    let later = |d: String| {
        CniError::new(
            Code::TryAgainLater,
            "the node's pod CIDR is not known yet",
            d,
        )
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| bad(format!("kubeconfig: {kubeconfig}: {e}")))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| bad(format!("kubeconfig: {kubeconfig}: {e}")))?;
    let client = kube::Client::try_from(cfg).map_err(|e| bad(format!("kubeconfig: {e}")))?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let n = nodes
        .get(&node)
        .await
        .map_err(|e| later(format!("reading Node {node}: {e}")))?;
    let cidr = n
        .spec
        .and_then(|s| s.pod_cidr)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            later(format!(
                "Node {node} has no spec.podCIDR yet (the controller manager assigns one with --cluster-cidr)"
            ))
        })?;
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(&cache, &cidr);
    Ok(Some(cidr))
}

/// When ferry-proxy runs on this node (its program is pinned), waits until it has attached
/// the datapath to the new host end (it watches for new links), so the pod's first packet
/// already goes through Ferry. Without a running ferry-proxy there is nothing to wait for.
async fn datapath_attached(bpf_dir: &std::path::Path, host_ifname: &str) {
    if !bpf_dir.join("prog_ingress").exists() {
        return;
    }
    let pin = bpf_dir.join("links").join(host_ifname);
    for _ in 0..400 {
        if pin.exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    eprintln!(
        "ferry-cni: ferry-proxy has not attached to {host_ifname} within 2 s (is `fy*` among its --interfaces?); the pod runs without the datapath until it does"
    );
}

/// The version an error is reported in: the configuration's when it could be read.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_string())
}
