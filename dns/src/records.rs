//! The cluster's names, kept from Services and EndpointSlices as the node sees them change.
//!
//! Each object is reduced to what the Kubernetes DNS specification needs (cluster IPs, ports,
//! the ExternalName, endpoints with their hostnames and readiness) when it changes, so a query
//! reads compact maps and never a Kubernetes object. The reverse (PTR) index is kept per
//! Service: a change recomputes that Service's contributions only.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service or slice, by namespace and name.
pub type Key = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    /// The SRV label without its underscore.
    pub fn label(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

/// A named port: SRV records exist only for these.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub proto: Proto,
    pub port: u16,
}

impl NamedPort {
    /// A Service's or a slice's port, when it has a name (only named ports have SRV records).
    fn new(name: Option<&str>, protocol: Option<&str>, port: Option<i32>) -> Option<Self> {
        Some(NamedPort {
            name: name.filter(|n| !n.is_empty())?.to_ascii_lowercase(),
            proto: Proto::parse(protocol)?,
            port: u16::try_from(port?).ok()?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A cluster IP (the IPv4 ones of `clusterIPs`).
    ClusterIp(Vec<Ipv4Addr>),
    /// `clusterIP: None`: names resolve to the endpoints.
    Headless,
    /// A CNAME to this name (lowercase, no trailing dot).
    ExternalName(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub kind: Kind,
    /// The Service's named ports (the ClusterIP's SRV records).
    pub ports: Vec<NamedPort>,
    pub publish_not_ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addrs: Vec<Ipv4Addr>,
    /// `hostname` of the endpoint (a StatefulSet pod's name), lowercase.
    pub hostname: Option<String>,
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Slice {
    service: String,
    endpoints: Vec<Endpoint>,
    /// The slice's named ports (the endpoints' SRV records for a headless Service).
    ports: Vec<NamedPort>,
}

/// An endpoint's own name under its Service: its hostname, or its address with dashes.
pub fn endpoint_label(ep: &Endpoint, addr: Ipv4Addr) -> String {
    match &ep.hostname {
        Some(h) => h.clone(),
        None => dashed(addr),
    }
}

/// `10.0.0.1` as `10-0-0-1`, the label pod and endpoint records use.
pub fn dashed(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("{}-{}-{}-{}", o[0], o[1], o[2], o[3])
}

/// The keys of `have` that `all` lacks.
fn missing<V, W>(have: &HashMap<Key, V>, all: &HashMap<Key, W>) -> Vec<Key> {
    have.keys()
        .filter(|k| !all.contains_key(*k))
        .cloned()
        .collect()
}

#[derive(Default)]
pub struct Records {
    services: HashMap<Key, Svc>,
    slices: HashMap<Key, Slice>,
    /// Slice names by the Service (namespace, name) they name.
    slices_of: HashMap<Key, BTreeSet<String>>,
    /// Services per namespace: `<ns>.svc.<zone>` exists while it has one.
    namespaces: HashMap<String, usize>,
    /// PTR targets by address, relative to the zone (`web.default.svc`).
    ptr: HashMap<Ipv4Addr, BTreeSet<String>>,
    /// Each Service's contributions to `ptr`, to take them back when it changes.
    ptr_of: HashMap<Key, Vec<(Ipv4Addr, String)>>,
    /// Bumped on every change: the SOA serial.
    generation: u32,
}

impl Records {
    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// A Service's new state, or `None` when it was deleted.
    pub fn set_service(&mut self, key: &Key, svc: Option<&Service>) {
        let old = match svc.map(reduce_service) {
            Some(s) => self.services.insert(key.clone(), s),
            None => self.services.remove(key),
        };
        let now = self.services.contains_key(key);
        match (old.is_some(), now) {
            (false, true) => *self.namespaces.entry(key.0.clone()).or_default() += 1,
            (true, false) => {
                if let Some(n) = self.namespaces.get_mut(&key.0) {
                    *n -= 1;
                    if *n == 0 {
                        self.namespaces.remove(&key.0);
                    }
                }
            }
            _ => {}
        }
        self.reindex(key);
    }

    /// An EndpointSlice's new state, or `None` when it was deleted.
    pub fn set_slice(&mut self, key: &Key, slice: Option<&EndpointSlice>) {
        let new = slice.and_then(reduce_slice);
        let old = self.slices.remove(key);
        if let Some(old) = &old {
            let svc = (key.0.clone(), old.service.clone());
            if let Some(set) = self.slices_of.get_mut(&svc) {
                set.remove(&key.1);
                if set.is_empty() {
                    self.slices_of.remove(&svc);
                }
            }
        }
        if let Some(new) = new {
            let svc = (key.0.clone(), new.service.clone());
            self.slices_of.entry(svc).or_default().insert(key.1.clone());
            self.slices.insert(key.clone(), new);
        }
        // The Service it named before and the one it names now.
        let mut touched: BTreeSet<Key> = BTreeSet::new();
        if let Some(o) = old {
            touched.insert((key.0.clone(), o.service));
        }
        if let Some(s) = self.slices.get(key) {
            touched.insert((key.0.clone(), s.service.clone()));
        }
        for svc in touched {
            self.reindex(&svc);
        }
    }

    /// Every Service there is: those not in `all` are gone.
    pub fn replace_services<'a>(&mut self, all: impl IntoIterator<Item = (Key, &'a Service)>) {
        let all: HashMap<Key, &Service> = all.into_iter().collect();
        for k in missing(&self.services, &all) {
            self.set_service(&k, None);
        }
        for (k, s) in all {
            self.set_service(&k, Some(s));
        }
    }

    /// Every EndpointSlice there is: those not in `all` are gone.
    pub fn replace_slices<'a>(&mut self, all: impl IntoIterator<Item = (Key, &'a EndpointSlice)>) {
        let all: HashMap<Key, &EndpointSlice> = all.into_iter().collect();
        for k in missing(&self.slices, &all) {
            self.set_slice(&k, None);
        }
        for (k, s) in all {
            self.set_slice(&k, Some(s));
        }
    }

    /// Recomputes one Service's PTR contributions.
    fn reindex(&mut self, key: &Key) {
        self.generation = self.generation.wrapping_add(1);
        for (addr, name) in self.ptr_of.remove(key).unwrap_or_default() {
            if let Some(set) = self.ptr.get_mut(&addr) {
                set.remove(&name);
                if set.is_empty() {
                    self.ptr.remove(&addr);
                }
            }
        }
        let Some(svc) = self.services.get(key) else {
            return;
        };
        let base = format!("{}.{}.svc", key.1, key.0);
        let mut mine = Vec::new();
        if let Kind::ClusterIp(ips) = &svc.kind {
            mine.extend(ips.iter().map(|ip| (*ip, base.clone())));
        }
        if !matches!(svc.kind, Kind::ExternalName(_)) {
            for (ep, addr) in self.endpoints(key, true) {
                mine.push((addr, format!("{}.{base}", endpoint_label(ep, addr))));
            }
        }
        for (addr, name) in &mine {
            self.ptr.entry(*addr).or_default().insert(name.clone());
        }
        self.ptr_of.insert(key.clone(), mine);
    }

    pub fn service(&self, ns: &str, name: &str) -> Option<&Svc> {
        self.services.get(&(ns.to_string(), name.to_string()))
    }

    pub fn namespace_exists(&self, ns: &str) -> bool {
        self.namespaces.contains_key(ns)
    }

    /// The endpoints of a Service with each address: the ready ones, or all with
    /// `include_not_ready` (publishNotReadyAddresses).
    pub fn endpoints<'a>(
        &'a self,
        key: &Key,
        include_not_ready: bool,
    ) -> impl Iterator<Item = (&'a Endpoint, Ipv4Addr)> + 'a {
        let names = self.slices_of.get(key);
        let ns = key.0.clone();
        names
            .into_iter()
            .flatten()
            .filter_map(move |n| self.slices.get(&(ns.clone(), n.clone())))
            .flat_map(|s| s.endpoints.iter())
            .filter(move |e| include_not_ready || e.ready)
            .flat_map(|e| e.addrs.iter().map(move |a| (e, *a)))
    }

    /// The named ports the endpoints of a Service serve (from its slices), deduplicated.
    pub fn endpoint_ports(&self, key: &Key) -> BTreeSet<NamedPort> {
        self.slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|n| self.slices.get(&(key.0.clone(), n.clone())))
            .flat_map(|s| s.ports.iter().cloned())
            .collect()
    }

    /// Names (relative to the zone) an address has.
    pub fn ptr(&self, addr: Ipv4Addr) -> Option<&BTreeSet<String>> {
        self.ptr.get(&addr)
    }
}

fn reduce_service(s: &Service) -> Svc {
    let spec = s.spec.clone().unwrap_or_default();
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        Kind::ExternalName(
            spec.external_name
                .unwrap_or_default()
                .trim_end_matches('.')
                .to_ascii_lowercase(),
        )
    } else if spec.cluster_ip.as_deref() == Some("None") {
        Kind::Headless
    } else {
        let ips = spec
            .cluster_ips
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default();
        Kind::ClusterIp(ips.iter().filter_map(|ip| ip.parse().ok()).collect())
    };
    let ports = spec
        .ports
        .unwrap_or_default()
        .iter()
        .filter_map(|p| NamedPort::new(p.name.as_deref(), p.protocol.as_deref(), Some(p.port)))
        .collect();
    Svc {
        kind,
        ports,
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
    }
}

fn reduce_slice(s: &EndpointSlice) -> Option<Slice> {
    if s.address_type != "IPv4" {
        return None;
    }
    let service = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone();
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| Endpoint {
            addrs: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            hostname: e.hostname.as_ref().map(|h| h.to_ascii_lowercase()),
            // Unset `ready` means ready (the API's own reading).
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
        })
        .collect();
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| NamedPort::new(p.name.as_deref(), p.protocol.as_deref(), p.port))
        .collect();
    Some(Slice {
        service,
        endpoints,
        ports,
    })
}
