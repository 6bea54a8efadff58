//! Routes to the other nodes' pods: each node's pod CIDR (`spec.podCIDR`) via that node's
//! InternalIP (direct routing, as flannel's host-gw does: the nodes share a link). Pods on
//! different nodes then reach each other with their own addresses, and a Service translated
//! on one node reaches an endpoint on another; its replies come back the same way.
//!
//! The routes carry their own protocol number, so the daemon finds and removes the ones it
//! made (and only those) when a node goes or changes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use rtnetlink::{new_connection, RouteMessageBuilder};
use tracing::{info, warn};

/// The protocol number on Ferry's routes (`ip route` shows `proto 249`).
pub const FERRY_PROTO: u8 = 249;

/// Pod CIDR -> the node address it is reached through, for every node but `me`.
pub fn desired(nodes: &[Node], me: &str) -> BTreeMap<Ipv4Network, Ipv4Addr> {
    let mut out = BTreeMap::new();
    for n in nodes {
        if n.metadata.name.as_deref() == Some(me) {
            continue;
        }
        let Some(cidr) = n
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_ref())
            .and_then(|c| c.parse::<Ipv4Network>().ok())
        else {
            continue;
        };
        let ip = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        match ip {
            Some(ip) => {
                out.insert(cidr, ip);
            }
            None => warn!(
                node = n.metadata.name.as_deref().unwrap_or_default(),
                "node has a pod CIDR but no IPv4 InternalIP; no route to its pods"
            ),
        }
    }
    out
}

/// Makes the main table hold exactly `want` among Ferry's routes; returns (added, removed).
pub async fn sync(want: &BTreeMap<Ipv4Network, Ipv4Addr>) -> Result<(usize, usize)> {
    let (conn, handle, _) = new_connection().context("netlink")?;
    tokio::spawn(conn);
    let mut have: BTreeMap<Ipv4Network, (Ipv4Addr, rtnetlink::packet_route::route::RouteMessage)> =
        BTreeMap::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = routes.try_next().await.context("listing routes")? {
        if r.header.protocol != RouteProtocol::Other(FERRY_PROTO) {
            continue;
        }
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        let gw = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        if let (Some(dst), Some(gw)) = (dst, gw) {
            if let Ok(net) = Ipv4Network::new(dst, r.header.destination_prefix_length) {
                have.insert(net, (gw, r));
            }
        }
    }
    let mut removed = 0;
    for (net, (gw, msg)) in &have {
        if want.get(net) != Some(gw) {
            handle
                .route()
                .del(msg.clone())
                .execute()
                .await
                .with_context(|| format!("removing the route to {net} via {gw}"))?;
            removed += 1;
        }
    }
    let mut added = 0;
    for (net, gw) in want {
        if have.get(net).map(|h| h.0) == Some(*gw) {
            continue;
        }
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix())
            .gateway(*gw)
            .protocol(RouteProtocol::Other(FERRY_PROTO))
            .build();
        handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding a route to {net} via {gw}"))?;
        added += 1;
    }
    if added + removed > 0 {
        info!(
            added,
            removed,
            routes = want.len(),
            "routes to other nodes' pods"
        );
    }
    Ok((added, removed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": ip.map(|i| vec![json!({"type": "InternalIP", "address": i})]).unwrap_or_default()}
        }))
        .unwrap()
    }

    #[test]
    fn routes_to_every_other_node_with_a_cidr_and_an_address() {
        let nodes = [
            node("a", Some("10.244.0.0/24"), Some("192.168.5.1")),
            node("b", Some("10.244.1.0/24"), Some("192.168.5.2")),
            node("c", None, Some("192.168.5.3")),
            node("d", Some("10.244.3.0/24"), None),
        ];
        let want = desired(&nodes, "a");
        assert_eq!(want.len(), 1);
        assert_eq!(
            want[&"10.244.1.0/24".parse::<Ipv4Network>().unwrap()],
            Ipv4Addr::new(192, 168, 5, 2)
        );
    }
}
