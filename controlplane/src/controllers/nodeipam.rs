//! The node IPAM controller: gives each node a pod CIDR from `--cluster-cidr`
//! (`spec.podCIDR` and `spec.podCIDRs`), `--node-cidr-mask-size` wide, as Kubernetes'
//! range allocator does. A node keeps its CIDR for life; ferry-cni reads it to address
//! the node's pods, and ferry-proxy routes to the other nodes' CIDRs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use ferry_common::events::{self, Recorder};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub cluster_cidr: Ipv4Network,
    pub mask: u8,
}

struct Ctx {
    client: Client,
    nodes: Store<Node>,
    opts: Options,
    recorder: Recorder,
    /// CIDRs this controller assigned that the cache may not show yet (node uid → CIDR): the
    /// watch delivers a node's new podCIDR some time after the patch returns, and the next
    /// node's allocation must not hand out the same subnet meanwhile. Keyed by the node's uid:
    /// a node deleted and created again under its name is a new node.
    assigned: Mutex<BTreeMap<String, Ipv4Network>>,
}

/// Every CIDR in use: the cached nodes', plus this controller's assignments the cache has not
/// caught up with (dropped once the cache shows the node's CIDR or no longer has the node).
fn in_use(
    nodes: &[Arc<Node>],
    assigned: &mut BTreeMap<String, Ipv4Network>,
) -> BTreeSet<Ipv4Network> {
    assigned.retain(|uid, _| {
        nodes
            .iter()
            .any(|n| n.uid().as_ref() == Some(uid) && cidr_of(n).is_none())
    });
    nodes
        .iter()
        .filter_map(|n| cidr_of(n))
        .chain(assigned.values().copied())
        .collect()
}

/// The first `mask`-wide subnet of `cluster` that none of `used` overlaps.
pub fn next_free(
    cluster: Ipv4Network,
    mask: u8,
    used: &BTreeSet<Ipv4Network>,
) -> Option<Ipv4Network> {
    if mask < cluster.prefix() || mask > 30 {
        return None;
    }
    let size = 1u64 << (32 - mask);
    let start = u32::from(cluster.network()) as u64;
    let count = 1u64 << (mask - cluster.prefix());
    (0..count)
        .map(|i| Ipv4Network::new(((start + i * size) as u32).into(), mask).expect("valid prefix"))
        .find(|c| !used.iter().any(|u| u.overlaps(*c)))
}

fn cidr_of(n: &Node) -> Option<Ipv4Network> {
    n.spec.as_ref()?.pod_cidr.as_ref()?.parse().ok()
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    if cidr_of(&node).is_some() || node.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    ctx.nodes.wait_until_ready().await.ok();
    let used = {
        let mut assigned = ctx.assigned.lock().expect("nodeipam lock");
        if node.uid().is_some_and(|uid| assigned.contains_key(&uid)) {
            // Assigned already; this copy of the node predates the patch.
            return Ok(Action::await_change());
        }
        in_use(&ctx.nodes.state(), &mut assigned)
    };
    let Some(cidr) = next_free(ctx.opts.cluster_cidr, ctx.opts.mask, &used) else {
        let msg = format!(
            "no /{} left in the cluster CIDR {} for node {}",
            ctx.opts.mask,
            ctx.opts.cluster_cidr,
            node.name_any()
        );
        warn!("{msg}");
        ctx.recorder
            .warning(events::reference(&*node), "CIDRNotAvailable", msg);
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    // The resourceVersion makes two allocations racing for the node fail one of them.
    let patch = json!({
        "metadata": {"resourceVersion": node.resource_version()},
        "spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}
    });
    Api::<Node>::all(ctx.client.clone())
        .patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    if let Some(uid) = node.uid() {
        ctx.assigned
            .lock()
            .expect("nodeipam lock")
            .insert(uid, cidr);
    }
    info!(node = %node.name_any(), %cidr, "pod CIDR assigned");
    ctx.recorder.normal(
        events::reference(&*node),
        "CIDRAssignmentSucceeded",
        format!("Node {} is assigned pod CIDR {cidr}", node.name_any()),
    );
    Ok(Action::await_change())
}

fn error_policy(node: Arc<Node>, e: &kube::Error, _: Arc<Ctx>) -> Action {
    warn!(node = %node.name_any(), error = %e, "pod CIDR assignment failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client, opts: Options) -> anyhow::Result<()> {
    let controller = Controller::new(Api::<Node>::all(client.clone()), watcher::Config::default());
    let nodes = controller.store();
    info!(cluster_cidr = %opts.cluster_cidr, mask = opts.mask, "node IPAM controller started");
    super::drain(
        "nodeipam",
        controller
            // One at a time: each allocation must see the previous one.
            .with_config(kube::runtime::controller::Config::default().concurrency(1))
            .run(
                reconcile,
                error_policy,
                Arc::new(Ctx {
                    recorder: Recorder::new(client.clone(), "node-ipam-controller"),
                    client,
                    nodes,
                    opts,
                    assigned: Mutex::default(),
                }),
            ),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>) -> Arc<Node> {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.uid = Some(format!("uid-{name}"));
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: cidr.map(String::from),
            ..Default::default()
        });
        Arc::new(n)
    }

    #[test]
    fn assignments_count_until_the_cache_shows_them() {
        let a: Ipv4Network = "10.244.0.0/24".parse().unwrap();
        let b: Ipv4Network = "10.244.1.0/24".parse().unwrap();
        let mut assigned = BTreeMap::from([("uid-n1".to_string(), a)]);
        // The cache has not seen n1's patch yet: n2 must not get n1's subnet.
        let stale = [node("n1", None), node("n2", None)];
        assert_eq!(in_use(&stale, &mut assigned), BTreeSet::from([a]));
        assert_eq!(
            next_free(
                "10.244.0.0/16".parse().unwrap(),
                24,
                &in_use(&stale, &mut assigned)
            ),
            Some(b)
        );
        // Once the cache shows it, the cache is the record.
        let fresh = [node("n1", Some("10.244.0.0/24")), node("n2", None)];
        assert_eq!(in_use(&fresh, &mut assigned), BTreeSet::from([a]));
        assert!(assigned.is_empty());
        // A deleted node's pending assignment is released.
        let mut assigned = BTreeMap::from([("uid-gone".to_string(), b)]);
        assert!(in_use(&fresh, &mut assigned).len() == 1 && assigned.is_empty());
        // So is a node's that was deleted and created again under its name (a new uid).
        let mut assigned = BTreeMap::from([("uid-n2-before".to_string(), b)]);
        assert_eq!(in_use(&fresh, &mut assigned), BTreeSet::from([a]));
        assert!(assigned.is_empty());
    }

    #[test]
    fn allocates_the_first_free_subnet() {
        let cluster: Ipv4Network = "10.244.0.0/16".parse().unwrap();
        let mut used = BTreeSet::new();
        let a = next_free(cluster, 24, &used).unwrap();
        assert_eq!(a.to_string(), "10.244.0.0/24");
        used.insert(a);
        used.insert("10.244.2.0/24".parse().unwrap());
        assert_eq!(
            next_free(cluster, 24, &used).unwrap().to_string(),
            "10.244.1.0/24"
        );
        used.insert("10.244.1.0/24".parse().unwrap());
        assert_eq!(
            next_free(cluster, 24, &used).unwrap().to_string(),
            "10.244.3.0/24"
        );
        let tiny: Ipv4Network = "10.0.0.0/25".parse().unwrap();
        let full: BTreeSet<Ipv4Network> = [
            "10.0.0.0/26".parse().unwrap(),
            "10.0.0.64/26".parse().unwrap(),
        ]
        .into();
        assert_eq!(next_free(tiny, 26, &full), None);
        assert_eq!(
            next_free(tiny, 24, &BTreeSet::new()),
            None,
            "mask wider than the cluster"
        );
    }
}
