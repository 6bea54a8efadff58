//! The pod's network plumbing over rtnetlink: a veth pair whose pod end is moved into the
//! container's namespace and renamed, addresses and routes on both ends.
//!
//! Layout (as the reference `ptp` plugin, and Calico/Cilium, do it): the pod's interface has
//! its address as a /32, a link route to the gateway and a default route through it; the
//! host end holds the gateway address (/32, the same on every pod's host end) and the host
//! has a /32 route to the pod over it. Nothing is bridged: every packet to or from a pod goes
//! through the host end, where Ferry's tc program sees it.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{
    new_connection, Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::spec::{CniError, Code, Interface, Result};

fn io(what: impl Into<String>, e: impl std::fmt::Display) -> CniError {
    CniError::new(
        Code::Io,
        "network setup failed",
        format!("{}: {e}", what.into()),
    )
}

/// The host end's name: `fy` and a hash of the container and interface (stable, so DEL
/// finds it without state).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("fy{:011x}", h & 0xfff_ffff_ffff)
}

/// A netlink handle in this process's namespace, or in the namespace at `netns`.
pub async fn handle(netns: Option<&str>) -> Result<Handle> {
    let Some(path) = netns else {
        let (conn, handle, _) = new_connection().map_err(|e| io("netlink", e))?;
        tokio::spawn(conn);
        return Ok(handle);
    };
    // The socket belongs to the namespace the thread is in when it is created: enter the
    // target, open it, come back.
    let target = File::open(path).map_err(|e| {
        CniError::new(
            Code::UnknownContainer,
            "the container's network namespace is gone",
            format!("{path}: {e}"),
        )
    })?;
    let home =
        File::open("/proc/thread-self/ns/net").map_err(|e| io("/proc/thread-self/ns/net", e))?;
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io(
            format!("entering {path}"),
            std::io::Error::last_os_error(),
        ));
    }
    let made = new_connection();
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io(
            "returning to the host namespace",
            std::io::Error::last_os_error(),
        ));
    }
    let (conn, handle, _) = made.map_err(|e| io("netlink", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

pub async fn find(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(io(format!("looking up {name}"), e)),
    }
}

fn mac_of(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => Some(
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// The IPv4 addresses on link `index`.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<Ipv4Addr>> {
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| io("listing addresses", e))?;
    Ok(msgs
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Address(std::net::IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
        .collect())
}

pub struct Setup<'a> {
    pub netns: &'a str,
    pub ifname: &'a str,
    pub host_name: &'a str,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// Creates the pair and configures both ends; returns (host end, pod end).
pub async fn add(s: &Setup<'_>) -> Result<(Interface, Interface)> {
    let host = handle(None).await?;
    let pod = handle(Some(s.netns)).await?;
    if find(&pod, s.ifname).await?.is_some() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "interface already exists",
            format!(
                "{} already exists in {}; DEL the attachment first",
                s.ifname, s.netns
            ),
        ));
    }
    // A host end left by an ADD that died half-way would block the name.
    if let Some(old) = find(&host, s.host_name).await? {
        let _ = host.link().del(old.header.index).execute().await;
    }
    // The pod end is created in the pod's namespace, already named: moving a device
    // between namespaces afterwards costs an RCU grace period (~25 ms here).
    let ns_file = File::open(s.netns).map_err(|e| io(s.netns, e))?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(s.ifname.to_string())
        .mtu(s.mtu)
        .setns_by_fd(ns_file.as_raw_fd())
        .build();
    let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(s.host_name.to_string())
        .mtu(s.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.link().add(pair).execute().await.map_err(|e| {
        io(
            format!(
                "creating veth {} / {} in {}",
                s.host_name, s.ifname, s.netns
            ),
            e,
        )
    })?;
    let result = async {
        // The pod end: up, addressed, routed through the gateway.
        let link = find(&pod, s.ifname).await?.ok_or_else(|| {
            io(
                format!("{} in {}", s.ifname, s.netns),
                "missing after creation",
            )
        })?;
        let idx = link.header.index;
        pod.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(|e| io(format!("setting {} up", s.ifname), e))?;
        pod.address()
            .add(idx, s.address.into(), 32)
            .execute()
            .await
            .map_err(|e| io(format!("adding {}/32 to {}", s.address, s.ifname), e))?;
        pod.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(s.gateway, 32)
                    .output_interface(idx)
                    .scope(RouteScope::Link)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| io(format!("route to the gateway {}", s.gateway), e))?;
        pod.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(s.gateway)
                    .output_interface(idx)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| io(format!("default route via {}", s.gateway), e))?;
        // The host end: gateway address, up, a route to the pod.
        let h_link = find(&host, s.host_name)
            .await?
            .ok_or_else(|| io(s.host_name, "missing after creation"))?;
        let hidx = h_link.header.index;
        host.link()
            .set(LinkUnspec::new_with_index(hidx).up().build())
            .execute()
            .await
            .map_err(|e| io(format!("setting {} up", s.host_name), e))?;
        host.address()
            .add(hidx, s.gateway.into(), 32)
            .execute()
            .await
            .map_err(|e| io(format!("adding {}/32 to {}", s.gateway, s.host_name), e))?;
        host.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(s.address, 32)
                    .output_interface(hidx)
                    .scope(RouteScope::Link)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| io(format!("host route to {}", s.address), e))?;
        // Pods reach each other and the world through the host: it must forward.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| io("enabling net.ipv4.ip_forward", e))?;
        let pod_link = link;
        Ok((
            Interface {
                name: s.host_name.to_string(),
                mac: mac_of(&h_link),
                sandbox: None,
            },
            Interface {
                name: s.ifname.to_string(),
                mac: mac_of(&pod_link),
                sandbox: Some(s.netns.to_string()),
            },
        ))
    }
    .await;
    if result.is_err() {
        // Leave nothing half-made: deleting either end deletes both.
        if let Ok(Some(l)) = find(&host, s.host_name).await {
            let _ = host.link().del(l.header.index).execute().await;
        }
        if let Ok(Some(l)) = find(&pod, s.ifname).await {
            let _ = pod.link().del(l.header.index).execute().await;
        }
    }
    result
}

/// Removes the pair (whichever end still exists); nothing there is fine.
pub async fn del(netns: Option<&str>, ifname: &str, host_name: &str) -> Result<()> {
    let host = handle(None).await?;
    if let Some(l) = find(&host, host_name).await? {
        match host.link().del(l.header.index).execute().await {
            Ok(()) => return Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(io(format!("deleting {host_name}"), e)),
        }
    }
    if let Some(ns) = netns.filter(|p| std::path::Path::new(p).exists()) {
        if let Ok(pod) = handle(Some(ns)).await {
            if let Some(l) = find(&pod, ifname).await? {
                let _ = pod.link().del(l.header.index).execute().await;
            }
        }
    }
    Ok(())
}

/// What CHECK verifies: the pod end exists with the address, the host end exists with a
/// route to it.
pub async fn check(netns: &str, ifname: &str, host_name: &str, address: Ipv4Network) -> Result<()> {
    let missing = |d: String| {
        CniError::new(
            Code::UnknownContainer,
            "attachment is not as ADD left it",
            d,
        )
    };
    let pod = handle(Some(netns)).await?;
    let Some(link) = find(&pod, ifname).await? else {
        return Err(missing(format!("{ifname} does not exist in {netns}")));
    };
    if !addresses(&pod, link.header.index)
        .await?
        .contains(&address.ip())
    {
        return Err(missing(format!(
            "{ifname} in {netns} does not have {}",
            address.ip()
        )));
    }
    let host = handle(None).await?;
    if find(&host, host_name).await?.is_none() {
        return Err(missing(format!("the host end {host_name} does not exist")));
    }
    Ok(())
}
