//! Cluster DNS on this node: the `dns` crate's server, fed from the daemon's own watch of
//! Services and EndpointSlices, answering on a node-local address. The address sits on a
//! dummy link of the host (`ferry-dns`, as NodeLocal DNSCache does it; `lo` on a kernel
//! without dummy links), and the cluster DNS Service's port-53 frontends lead there
//! (`model::LocalDns`), so a pod's query never leaves its node and, through the socket
//! programs, needs no conntrack entry at all.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context as _, Result};
use dns::{ForwardConfig, Forwarder, Records, Server, ServerConfig, Zone};
use futures::TryStreamExt as _;
use ipnetwork::{IpNetwork, Ipv4Network};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{new_connection, LinkDummy, LinkUnspec};
use tracing::{info, warn};

use crate::model::LocalDns;
use crate::source::Change;

/// The dummy link holding the node-local DNS address.
pub const LINK: &str = "ferry-dns";
/// TTL of the cluster's answers (CoreDNS's default).
const TTL: u32 = 5;

#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// The node-local address the server answers on.
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// Upstream resolvers; empty: the node's resolv.conf.
    pub upstreams: Vec<SocketAddr>,
    /// Source ranges always allowed to ask, besides the nodes' addresses and pod ranges the
    /// daemon learns from the API.
    pub allow: Vec<IpNetwork>,
    /// Queries per second per client address (0: unlimited).
    pub client_qps: u32,
    /// The cluster DNS Service (namespace, name) sent to this server.
    pub service: (String, String),
    /// Create the dummy link and its address (off when the address is managed elsewhere, as in
    /// tests that listen on loopback).
    pub manage_link: bool,
}

impl DnsOptions {
    pub fn local_dns(&self) -> LocalDns {
        LocalDns {
            namespace: self.service.0.clone(),
            name: self.service.1.clone(),
            addr: self.addr,
        }
    }
}

/// The running server and the records it answers from.
pub struct NodeDns {
    records: Arc<RwLock<Records>>,
    pub server: Arc<Server>,
    always: Vec<IpNetwork>,
}

pub async fn start(opts: &DnsOptions) -> Result<NodeDns> {
    if opts.manage_link {
        ensure_link(opts.addr)
            .await
            .with_context(|| format!("--dns-addr {}: the link {LINK}", opts.addr))?;
    }
    let zone =
        Zone::new(&opts.domain, TTL).map_err(|e| anyhow::anyhow!("--cluster-domain: {e}"))?;
    let upstreams = if opts.upstreams.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        dns::upstreams_from_resolv_conf(&text, &[IpAddr::V4(opts.addr)])
    } else {
        opts.upstreams.clone()
    };
    let mut always = opts.allow.clone();
    always.push(IpNetwork::V4(Ipv4Network::new(opts.addr, 32)?));
    always.push("127.0.0.0/8".parse()?);
    let records = Arc::new(RwLock::new(Records::default()));
    let server = Arc::new(Server::new(
        zone,
        records.clone(),
        Forwarder::new(ForwardConfig {
            upstreams,
            timeout: Duration::from_secs(2),
            cache_entries: 10_000,
        }),
        ServerConfig {
            listen: vec![SocketAddr::new(IpAddr::V4(opts.addr), opts.port)],
            allow: always.clone(),
            client_qps: opts.client_qps,
            max_tcp_connections: 256,
            tcp_idle: Duration::from_secs(10),
            max_forwards: 512,
        },
    ));
    server
        .clone()
        .start()
        .await
        .context("starting the DNS server")?;
    Ok(NodeDns {
        records,
        server,
        always,
    })
}

impl NodeDns {
    /// Takes changes into the records, before the view consumes them.
    pub fn apply(&self, changes: &[Change]) {
        let mut r = self.records.write().unwrap();
        for c in changes {
            match c {
                Change::Service(key, svc) => r.set_service(key, svc.as_deref()),
                Change::Slice(key, slice) => r.set_slice(key, slice.as_deref()),
                Change::AllServices(list) => {
                    r.replace_services(list.iter().map(|s| (crate::source::key_of(&s.metadata), s)))
                }
                Change::AllSlices(list) => {
                    r.replace_slices(list.iter().map(|s| (crate::source::key_of(&s.metadata), s)))
                }
            }
        }
    }

    /// Who may ask: the configured ranges, and every node's addresses and pod range.
    pub fn allow_nodes(&self, nodes: &[k8s_openapi::api::core::v1::Node]) {
        let mut allow = self.always.clone();
        for n in nodes {
            let status = n.status.as_ref();
            for a in status
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
            {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    allow.push(IpNetwork::from(ip));
                }
            }
            let spec = n.spec.as_ref();
            let cidrs = spec
                .and_then(|s| s.pod_cidrs.clone())
                .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]));
            for c in cidrs.into_iter().flatten() {
                if let Ok(net) = c.parse::<IpNetwork>() {
                    allow.push(net);
                }
            }
        }
        self.server.set_allow(allow);
    }

    pub fn service_count(&self) -> usize {
        self.records.read().unwrap().service_count()
    }
}

/// Puts `addr`/32 on the dummy link, up (created or completed; an address already there is
/// kept). A kernel without the dummy driver gets it on `lo` instead, where it is as local.
async fn ensure_link(addr: Ipv4Addr) -> Result<()> {
    let (conn, handle, _) = new_connection().context("netlink")?;
    tokio::spawn(conn);
    let find = |name: &'static str| {
        let handle = handle.clone();
        async move {
            let mut links = handle.link().get().match_name(name.to_string()).execute();
            match links.try_next().await {
                Ok(l) => Ok(l),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
                Err(e) => Err(anyhow::Error::from(e)),
            }
        }
    };
    let (name, link) = match find(LINK).await? {
        Some(l) => (LINK, l),
        None => match handle
            .link()
            .add(LinkDummy::new(LINK).build())
            .execute()
            .await
        {
            Ok(()) => (
                LINK,
                find(LINK)
                    .await?
                    .context("the dummy link is missing after its creation")?,
            ),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EOPNOTSUPP => {
                warn!("this kernel has no dummy links: the node-local DNS address goes on lo");
                ("lo", find("lo").await?.context("no lo link")?)
            }
            Err(e) => return Err(anyhow::Error::from(e).context("creating the dummy link")),
        },
    };
    let idx = link.header.index;
    handle
        .link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .context("setting the link up")?;
    let have: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(idx)
        .execute()
        .try_collect()
        .await
        .context("listing its addresses")?;
    let present = have
        .iter()
        .flat_map(|m| m.attributes.iter())
        .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == addr));
    if !present {
        handle
            .address()
            .add(idx, addr.into(), 32)
            .execute()
            .await
            .with_context(|| format!("adding {addr}/32 to {name}"))?;
    }
    info!(link = name, %addr, "node-local DNS address ready");
    Ok(())
}
