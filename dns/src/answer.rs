//! Answers from the cluster's records, as the Kubernetes DNS specification (and CoreDNS's
//! `kubernetes` plugin, its reference) gives them:
//!
//! - `<svc>.<ns>.svc.<zone>`: A of the cluster IP; a headless Service's ready endpoints
//!   (NXDOMAIN when it has none; not-ready ones too with publishNotReadyAddresses); an
//!   ExternalName's CNAME;
//! - `<endpoint>.<svc>.<ns>.svc.<zone>` for a headless Service's endpoints (the hostname, or
//!   the address with dashes);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for named ports, the targets' A records in
//!   the additional section;
//! - `<a-b-c-d>.<ns>.pod.<zone>`: A of the address (CoreDNS's "pods insecure");
//! - PTR of cluster IPs and endpoint addresses; `dns-version.<zone>` TXT; the zone's SOA.
//!
//! Names are matched case-insensitively; answers carry the name as asked. A missing name is
//! NXDOMAIN, a name with no data of the asked type NOERROR with no answer; both carry the SOA
//! so resolvers cache the negative answer. Other names are left to the forwarder.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::records::{endpoint_label, Key, Kind, Records};

/// The version of the specification served (`dns-version.<zone>`).
pub const SPEC_VERSION: &str = "1.1.0";
/// How deep a CNAME inside the zone is followed.
const MAX_CHAIN: usize = 8;

/// The cluster's zone and the TTL of its answers.
#[derive(Clone, Debug)]
pub struct Zone {
    /// Lowercase, without the trailing dot: `cluster.local`.
    domain: String,
    name: Name,
    pub ttl: u32,
}

impl Zone {
    pub fn new(domain: &str, ttl: u32) -> Result<Self, String> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let valid = !domain.is_empty()
            && domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "cluster domain {domain:?} is not a DNS name (labels of letters, digits and '-')"
            ));
        }
        let name = Name::from_ascii(format!("{domain}.")).map_err(|e| e.to_string())?;
        Ok(Self { domain, name, ttl })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// `rel` under the zone, as an absolute name.
    fn fqdn(&self, rel: &str) -> Option<Name> {
        Name::from_ascii(format!("{rel}.{}.", self.domain)).ok()
    }

    fn soa(&self, serial: u32) -> Record {
        let mname = self.fqdn("ns.dns").unwrap_or_else(|| self.name.clone());
        let rname = self.fqdn("hostmaster").unwrap_or_else(|| self.name.clone());
        Record::from_rdata(
            self.name.clone(),
            self.ttl,
            RData::SOA(SOA::new(mname, rname, serial, 7200, 1800, 86400, self.ttl)),
        )
    }
}

/// What to do with a query.
#[derive(Debug)]
pub enum Answer {
    /// The response, complete.
    Local(Message),
    /// Not a cluster name: the forwarder answers.
    Forward,
    /// A CNAME out of the zone: the forwarder resolves `target` and its answers are appended.
    Chase { response: Message, target: Name },
}

/// Why a query gets an error before any lookup.
pub fn check(req: &Message) -> Result<&Query, ResponseCode> {
    if req.message_type() != MessageType::Query || req.op_code() != OpCode::Query {
        return Err(ResponseCode::NotImp);
    }
    let [q] = req.queries() else {
        return Err(ResponseCode::FormErr);
    };
    if !req.answers().is_empty() || !req.name_servers().is_empty() {
        return Err(ResponseCode::FormErr);
    }
    if q.query_class() != DNSClass::IN {
        return Err(ResponseCode::NotImp);
    }
    match q.query_type() {
        // RFC 8482 allows refusing ANY; zone transfers are not served.
        RecordType::ANY | RecordType::AXFR | RecordType::IXFR => Err(ResponseCode::NotImp),
        RecordType::OPT => Err(ResponseCode::FormErr),
        _ => Ok(q),
    }
}

/// A response to `req` with its question, and nothing else yet.
pub fn response_to(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::new();
    m.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    m.add_queries(req.queries().iter().cloned());
    m
}

pub fn answer(zone: &Zone, records: &Records, req: &Message, q: &Query) -> Answer {
    let asked = q.name().to_ascii().to_ascii_lowercase();
    let asked = asked.trim_end_matches('.');
    if let Some(rel) = relative(asked, &zone.domain) {
        let mut out = Out::default();
        let code = lookup(zone, records, rel, q.name(), q.query_type(), &mut out, 0);
        let mut resp = response_to(req, code);
        resp.set_authoritative(true);
        resp.add_answers(out.answers);
        resp.add_additionals(out.additionals);
        if code == ResponseCode::NXDomain || resp.answers().is_empty() {
            resp.add_name_server(zone.soa(records.generation()));
        }
        return match out.chase {
            Some(target) => Answer::Chase {
                response: resp,
                target,
            },
            None => Answer::Local(resp),
        };
    }
    if let Some(addr) = reverse_v4(asked) {
        if let Some(names) = records.ptr(addr) {
            let mut resp = response_to(req, ResponseCode::NoError);
            resp.set_authoritative(true);
            if q.query_type() == RecordType::PTR {
                for n in names {
                    if let Some(target) = zone.fqdn(n) {
                        resp.add_answer(Record::from_rdata(
                            q.name().clone(),
                            zone.ttl,
                            RData::PTR(PTR(target)),
                        ));
                    }
                }
            }
            return Answer::Local(resp);
        }
    }
    Answer::Forward
}

#[derive(Default)]
struct Out {
    answers: Vec<Record>,
    additionals: Vec<Record>,
    chase: Option<Name>,
}

/// `name` relative to `zone` ("" for the apex), if it is in it.
fn relative<'a>(name: &'a str, zone: &str) -> Option<&'a str> {
    if name == zone {
        return Some("");
    }
    let rel = name.strip_suffix(zone)?.strip_suffix('.')?;
    Some(rel)
}

/// A name that stands for `addrs`: NXDOMAIN when there are none, their A records when asked
/// for A, no data otherwise.
fn addresses(
    out: &mut Out,
    owner: &Name,
    ttl: u32,
    qtype: RecordType,
    addrs: &[Ipv4Addr],
) -> ResponseCode {
    if addrs.is_empty() {
        return ResponseCode::NXDomain;
    }
    if qtype == RecordType::A {
        out.answers
            .extend(addrs.iter().map(|ip| a(owner, ttl, *ip)));
    }
    ResponseCode::NoError
}

/// `4.3.2.1.in-addr.arpa` as 1.2.3.4.
fn reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let mut o = [0u8; 4];
    let mut labels = rest.split('.');
    for i in (0..4).rev() {
        o[i] = labels.next()?.parse().ok()?;
    }
    labels.next().is_none().then_some(Ipv4Addr::from(o))
}

/// `a-b-c-d` as an address.
fn undashed(label: &str) -> Option<Ipv4Addr> {
    let mut o = [0u8; 4];
    let mut parts = label.split('-');
    for b in &mut o {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(o))
}

fn a(owner: &Name, ttl: u32, addr: Ipv4Addr) -> Record {
    Record::from_rdata(owner.clone(), ttl, RData::A(A(addr)))
}

/// Fills `out` for `rel` (relative to the zone); returns the response code.
fn lookup(
    zone: &Zone,
    records: &Records,
    rel: &str,
    owner: &Name,
    qtype: RecordType,
    out: &mut Out,
    depth: usize,
) -> ResponseCode {
    use ResponseCode::{NXDomain, NoError};
    let labels: Vec<&str> = if rel.is_empty() {
        vec![]
    } else {
        rel.split('.').collect()
    };
    let ttl = zone.ttl;
    match labels.as_slice() {
        [] => {
            if qtype == RecordType::SOA {
                out.answers.push(zone.soa(records.generation()));
            }
            NoError
        }
        ["dns-version"] => {
            if qtype == RecordType::TXT {
                out.answers.push(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::TXT(TXT::new(vec![SPEC_VERSION.to_string()])),
                ));
            }
            NoError
        }
        ["svc"] | ["pod"] => NoError,
        [ns, "svc"] => {
            if records.namespace_exists(ns) {
                NoError
            } else {
                NXDomain
            }
        }
        [svc, ns, "svc"] => {
            let Some(s) = records.service(ns, svc) else {
                return NXDomain;
            };
            let key: Key = (ns.to_string(), svc.to_string());
            match &s.kind {
                Kind::ClusterIp(ips) => {
                    if qtype == RecordType::A {
                        out.answers.extend(ips.iter().map(|ip| a(owner, ttl, *ip)));
                    }
                    NoError
                }
                Kind::Headless => {
                    let mut addrs: Vec<Ipv4Addr> = records
                        .endpoints(&key, s.publish_not_ready)
                        .map(|(_, a)| a)
                        .collect();
                    addrs.sort_unstable();
                    addrs.dedup();
                    addresses(out, owner, ttl, qtype, &addrs)
                }
                Kind::ExternalName(target) => {
                    let Ok(target_name) = Name::from_ascii(format!("{target}.")) else {
                        return ResponseCode::ServFail;
                    };
                    out.answers.push(Record::from_rdata(
                        owner.clone(),
                        ttl,
                        RData::CNAME(CNAME(target_name.clone())),
                    ));
                    if qtype == RecordType::CNAME {
                        return NoError;
                    }
                    match relative(target, &zone.domain) {
                        Some(inner) if depth < MAX_CHAIN => {
                            lookup(zone, records, inner, &target_name, qtype, out, depth + 1)
                        }
                        Some(_) => ResponseCode::ServFail,
                        None => {
                            out.chase = Some(target_name);
                            NoError
                        }
                    }
                }
            }
        }
        [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => srv(
            zone,
            records,
            (&port[1..], &proto[1..]),
            (ns, svc),
            owner,
            qtype,
            out,
        ),
        [ep, svc, ns, "svc"] => {
            let Some(s) = records.service(ns, svc) else {
                return NXDomain;
            };
            if s.kind != Kind::Headless {
                return NXDomain;
            }
            let key: Key = (ns.to_string(), svc.to_string());
            let addrs: Vec<Ipv4Addr> = records
                .endpoints(&key, s.publish_not_ready)
                .filter(|(e, addr)| endpoint_label(e, *addr) == *ep)
                .map(|(_, a)| a)
                .collect();
            addresses(out, owner, ttl, qtype, &addrs)
        }
        [ip, _ns, "pod"] => match undashed(ip) {
            Some(addr) => {
                if qtype == RecordType::A {
                    out.answers.push(a(owner, ttl, addr));
                }
                NoError
            }
            None => NXDomain,
        },
        _ => NXDomain,
    }
}

/// SRV records of `_<port>._<proto>.<svc>.<ns>.svc`.
fn srv(
    zone: &Zone,
    records: &Records,
    (port, proto): (&str, &str),
    (ns, svc): (&str, &str),
    owner: &Name,
    qtype: RecordType,
    out: &mut Out,
) -> ResponseCode {
    let Some(s) = records.service(ns, svc) else {
        return ResponseCode::NXDomain;
    };
    let key: Key = (ns.to_string(), svc.to_string());
    let base = format!("{svc}.{ns}.svc");
    // (target relative to the zone, its address, port)
    let mut targets: Vec<(String, Ipv4Addr, u16)> = Vec::new();
    match &s.kind {
        Kind::ClusterIp(ips) => {
            for p in &s.ports {
                if p.name == port && p.proto.label() == proto {
                    targets.extend(ips.iter().map(|ip| (base.clone(), *ip, p.port)));
                }
            }
        }
        Kind::Headless => {
            let ports: Vec<u16> = records
                .endpoint_ports(&key)
                .into_iter()
                .filter(|p| p.name == port && p.proto.label() == proto)
                .map(|p| p.port)
                .collect();
            for (e, addr) in records.endpoints(&key, s.publish_not_ready) {
                for p in &ports {
                    targets.push((format!("{}.{base}", endpoint_label(e, addr)), addr, *p));
                }
            }
        }
        Kind::ExternalName(_) => {}
    }
    targets.sort();
    targets.dedup();
    if targets.is_empty() {
        return ResponseCode::NXDomain;
    }
    if qtype != RecordType::SRV {
        return ResponseCode::NoError;
    }
    let weight = (100 / targets.len()).max(1) as u16;
    let mut seen = std::collections::BTreeSet::new();
    for (target, addr, port) in &targets {
        let Some(name) = zone.fqdn(target) else {
            continue;
        };
        out.answers.push(Record::from_rdata(
            owner.clone(),
            zone.ttl,
            RData::SRV(SRV::new(0, weight, *port, name.clone())),
        ));
        if seen.insert((target.clone(), *addr)) {
            out.additionals.push(a(&name, zone.ttl, *addr));
        }
    }
    ResponseCode::NoError
}
