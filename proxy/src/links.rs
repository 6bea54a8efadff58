//! Which interfaces the datapath is attached to: those whose name matches the configured
//! globs, now and whenever a new one appears (rtnetlink link notifications).

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{new_connection, new_multicast_connection, MulticastGroup};
use tokio::sync::mpsc;
use tracing::{debug, warn};

#[derive(Clone, Debug)]
pub struct Globs(Vec<glob::Pattern>);

impl Globs {
    pub fn new(patterns: &[String]) -> Result<Self> {
        patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p).with_context(|| format!("--interfaces: invalid glob {p:?}"))
            })
            .collect::<Result<_>>()
            .map(Self)
    }
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }
}

/// A network interface of the daemon's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// One end of a veth pair (a pod interface, or a link to another namespace).
    pub veth: bool,
}

#[derive(Debug)]
pub enum LinkEvent {
    /// A link exists (at start) or appeared.
    Present(Link),
    /// A link was deleted.
    Gone(String),
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn link_of(msg: &LinkMessage) -> Option<Link> {
    let veth = msg.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    });
    Some(Link {
        name: link_name(msg)?,
        index: msg.header.index,
        veth,
    })
}

/// Sends every current link, then every change, until the receiver is dropped.
pub async fn watch(tx: mpsc::UnboundedSender<LinkEvent>) -> Result<()> {
    // Subscribe before dumping so no link is missed in between.
    let (conn, _handle, mut messages) =
        new_multicast_connection(&[MulticastGroup::Link]).context("netlink link subscription")?;
    tokio::spawn(conn);
    for link in list_links().await? {
        if tx.send(LinkEvent::Present(link)).is_err() {
            return Ok(());
        }
    }
    while let Some((msg, _)) = messages.next().await {
        let event = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                link_of(&l).map(LinkEvent::Present)
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                link_name(&l).map(LinkEvent::Gone)
            }
            _ => None,
        };
        if let Some(ev) = event {
            debug!(?ev, "link event");
            if tx.send(ev).is_err() {
                return Ok(());
            }
        }
    }
    warn!("netlink link subscription ended");
    Ok(())
}

pub async fn list_links() -> Result<Vec<Link>> {
    let (conn, handle, _) = new_connection().context("netlink connection")?;
    let task = tokio::spawn(conn);
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing links")?;
    task.abort();
    Ok(links.iter().filter_map(link_of).collect())
}

/// IPv4 addresses of this network namespace that accept NodePort traffic: every address but
/// loopback, link-local ones (the node-local DNS address lives there) and those on pod
/// interfaces (`exclude`).
pub async fn node_addresses(exclude: &Globs) -> Result<Vec<Ipv4Addr>> {
    let (conn, handle, _) = new_connection().context("netlink connection")?;
    let task = tokio::spawn(conn);
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    let excluded: Vec<u32> = links
        .iter()
        .filter(|l| link_name(l).is_some_and(|n| n == "lo" || exclude.matches(&n)))
        .map(|l| l.header.index)
        .collect();
    let addrs: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing addresses")?;
    task.abort();
    let mut out = Vec::new();
    for a in addrs {
        if excluded.contains(&a.header.index) {
            continue;
        }
        for attr in &a.attributes {
            if let AddressAttribute::Local(std::net::IpAddr::V4(ip)) = attr {
                if !ip.is_loopback() && !ip.is_link_local() && !out.contains(ip) {
                    out.push(*ip);
                }
            }
        }
    }
    Ok(out)
}
