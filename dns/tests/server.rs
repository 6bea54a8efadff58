//! The DNS server over real UDP and TCP sockets on loopback: the cluster's records as the
//! Kubernetes DNS specification gives them, forwarding (to a second instance of the server as
//! the upstream), and what bad or excessive input gets.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dns::{ForwardConfig, Forwarder, Records, Server, ServerConfig, Zone};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

fn service(ns: &str, name: &str, spec: serde_json::Value) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .unwrap()
}

/// A slice of `svc` with endpoints (address, hostname, ready) and ports (name, port, proto).
fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    eps: &[(&str, Option<&str>, bool)],
    ports: &[(&str, i32, &str)],
) -> EndpointSlice {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": eps.iter().map(|(a, h, r)| {
            let mut e = serde_json::json!({"addresses": [a], "conditions": {"ready": r}});
            if let Some(h) = h { e["hostname"] = serde_json::json!(h); }
            e
        }).collect::<Vec<_>>(),
        "ports": ports.iter().map(|(n, p, proto)| serde_json::json!({"name": n, "port": p, "protocol": proto})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.into(), name.into())
}

struct Dns {
    addr: SocketAddr,
    records: Arc<RwLock<Records>>,
    _rt: tokio::runtime::Runtime,
}

fn start(zone: &str, upstreams: Vec<SocketAddr>, allow: &[&str], client_qps: u32) -> Dns {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let records = Arc::new(RwLock::new(Records::default()));
    let server = Arc::new(Server::new(
        Zone::new(zone, 5).unwrap(),
        records.clone(),
        Forwarder::new(ForwardConfig {
            upstreams,
            timeout: Duration::from_millis(500),
            cache_entries: 1000,
        }),
        ServerConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            client_qps,
            max_tcp_connections: 4,
            tcp_idle: Duration::from_secs(2),
            max_forwards: 16,
        },
    ));
    let addr = rt.block_on(server.start()).unwrap()[0];
    Dns {
        addr,
        records,
        _rt: rt,
    }
}

fn query(name: &str, t: RecordType, edns: bool) -> Message {
    let mut m = Message::new();
    m.set_id(rand_id())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static N: AtomicU16 = AtomicU16::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}

fn udp_raw(to: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    s.send_to(bytes, to).unwrap();
    let mut buf = [0u8; 65535];
    let n = s.recv(&mut buf).ok()?;
    Some(Message::from_vec(&buf[..n]).expect("the server's answer parses"))
}

fn udp(d: &Dns, name: &str, t: RecordType) -> Message {
    let q = query(name, t, true);
    let r = udp_raw(d.addr, &q.to_vec().unwrap()).expect("an answer over UDP");
    assert_eq!(r.id(), q.id());
    assert_eq!(r.queries(), q.queries(), "the question is echoed");
    r
}

fn tcp(d: &Dns, q: &Message) -> Message {
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let b = q.to_vec().unwrap();
    s.write_all(&(b.len() as u16).to_be_bytes()).unwrap();
    s.write_all(&b).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addrs(m: &Message) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn has_soa(m: &Message) -> bool {
    m.name_servers()
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

fn cluster() -> Dns {
    let d = start("cluster.local", vec![], &["127.0.0.0/8"], 0);
    {
        let mut r = d.records.write().unwrap();
        r.set_service(
            &key("default", "web"),
            Some(&service(
                "default",
                "web",
                serde_json::json!({"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                            {"port": 8080, "protocol": "TCP"}]}),
            )),
        );
        r.set_slice(
            &key("default", "web-abc"),
            Some(&slice(
                "default",
                "web-abc",
                "web",
                &[("10.244.1.5", None, true)],
                &[("http", 8080, "TCP")],
            )),
        );
        r.set_service(
            &key("db", "nginx"),
            Some(&service(
                "db",
                "nginx",
                serde_json::json!({"clusterIP": "None",
                  "ports": [{"name": "web", "port": 80, "protocol": "TCP"}]}),
            )),
        );
        r.set_slice(
            &key("db", "nginx-1"),
            Some(&slice(
                "db",
                "nginx-1",
                "nginx",
                &[
                    ("10.244.1.10", Some("web-0"), true),
                    ("10.244.2.11", Some("web-1"), true),
                    ("10.244.2.12", Some("web-2"), false),
                ],
                &[("web", 80, "TCP")],
            )),
        );
        r.set_service(
            &key("db", "empty"),
            Some(&service(
                "db",
                "empty",
                serde_json::json!({"clusterIP": "None"}),
            )),
        );
    }
    d
}

#[test]
fn service_names_resolve_as_the_specification_says() {
    let d = cluster();
    // A ClusterIP Service, any letter case.
    let r = udp(&d, "WEB.Default.svc.Cluster.Local.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(r.authoritative());
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 96, 0, 20)]);
    assert_eq!(
        r.answers()[0].name().to_ascii(),
        "WEB.Default.svc.Cluster.Local."
    );
    // No AAAA in an IPv4 cluster: no data, not "no such name".
    let r = udp(&d, "web.default.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(r.answers().is_empty() && has_soa(&r));
    // Missing names: NXDOMAIN with the SOA, for negative caching.
    for missing in [
        "nope.default.svc.cluster.local.",
        "web.nons.svc.cluster.local.",
        "nons.svc.cluster.local.",
        "a.b.c.d.e.f.cluster.local.",
    ] {
        let r = udp(&d, missing, RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::NXDomain, "{missing}");
        assert!(has_soa(&r), "{missing}");
    }
    // A namespace with Services exists (no data of its own).
    let r = udp(&d, "default.svc.cluster.local.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NoError);

    // SRV of a named port: the Service name as target, its address in the additional section.
    let r = udp(
        &d,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(r.response_code(), ResponseCode::NoError);
    let srv: Vec<(u16, String)> = r
        .answers()
        .iter()
        .filter_map(|a| match a.data() {
            RData::SRV(s) => Some((s.port(), s.target().to_ascii())),
            _ => None,
        })
        .collect();
    assert_eq!(
        srv,
        vec![(80, "web.default.svc.cluster.local.".to_string())]
    );
    assert_eq!(r.additionals().len(), 1);
    let r = udp(
        &d,
        "_nope._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(r.response_code(), ResponseCode::NXDomain);

    // Headless: the ready endpoints; each by its hostname; SRV per endpoint.
    let r = udp(&d, "nginx.db.svc.cluster.local.", RecordType::A);
    assert_eq!(
        addrs(&r),
        vec![Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 2, 11)]
    );
    let r = udp(&d, "web-1.nginx.db.svc.cluster.local.", RecordType::A);
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 244, 2, 11)]);
    let r = udp(&d, "web-2.nginx.db.svc.cluster.local.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NXDomain, "not ready");
    let r = udp(&d, "_web._tcp.nginx.db.svc.cluster.local.", RecordType::SRV);
    let mut targets: Vec<String> = r
        .answers()
        .iter()
        .filter_map(|a| match a.data() {
            RData::SRV(s) => Some(s.target().to_ascii()),
            _ => None,
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![
            "web-0.nginx.db.svc.cluster.local.".to_string(),
            "web-1.nginx.db.svc.cluster.local.".to_string()
        ]
    );
    assert_eq!(r.additionals().len(), 2);
    // Headless without endpoints: NXDOMAIN.
    let r = udp(&d, "empty.db.svc.cluster.local.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NXDomain);

    // Reverse: a cluster IP and an endpoint address.
    let r = udp(&d, "20.0.96.10.in-addr.arpa.", RecordType::PTR);
    let ptr: Vec<String> = r
        .answers()
        .iter()
        .filter_map(|a| match a.data() {
            RData::PTR(p) => Some(p.0.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(ptr, vec!["web.default.svc.cluster.local.".to_string()]);
    let r = udp(&d, "10.1.244.10.in-addr.arpa.", RecordType::PTR);
    assert!(matches!(r.answers()[0].data(), RData::PTR(p)
        if p.0.to_ascii() == "web-0.nginx.db.svc.cluster.local."));

    // Pods by address; the specification's version.
    let r = udp(&d, "10-244-3-4.any.pod.cluster.local.", RecordType::A);
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 244, 3, 4)]);
    let r = udp(&d, "10-244-3-999.any.pod.cluster.local.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
    let r = udp(&d, "dns-version.cluster.local.", RecordType::TXT);
    assert!(matches!(r.answers()[0].data(), RData::TXT(t) if t.to_string() == "1.1.0"));

    // A change is answered at once: the Service goes, its name and PTR with it.
    d.records
        .write()
        .unwrap()
        .set_service(&key("default", "web"), None);
    let r = udp(&d, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
    let r = udp(&d, "20.0.96.10.in-addr.arpa.", RecordType::PTR);
    assert!(r.answers().is_empty());
}

#[test]
fn other_names_are_forwarded_and_external_names_chased() {
    // The upstream: another instance, authoritative for its own zone.
    let up = start("example.test", vec![], &["127.0.0.0/8"], 0);
    up.records.write().unwrap().set_service(
        &key("ns", "db"),
        Some(&service(
            "ns",
            "db",
            serde_json::json!({"clusterIP": "10.1.2.3", "clusterIPs": ["10.1.2.3"]}),
        )),
    );
    let d = start("cluster.local", vec![up.addr], &["127.0.0.0/8"], 0);
    d.records.write().unwrap().set_service(
        &key("default", "ext"),
        Some(&service(
            "default",
            "ext",
            serde_json::json!({"type": "ExternalName", "externalName": "db.ns.svc.example.test"}),
        )),
    );
    let r = udp(&d, "db.ns.svc.example.test.", RecordType::A);
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 1, 2, 3)]);
    assert!(r.recursion_available());
    // NXDOMAIN from upstream is passed on (and cached with the upstream's SOA).
    let r = udp(&d, "nothing.ns.svc.example.test.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
    assert!(has_soa(&r));

    // ExternalName: the CNAME and the upstream's answer for its target.
    let r = udp(&d, "ext.default.svc.cluster.local.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(matches!(r.answers()[0].data(), RData::CNAME(c)
        if c.0.to_ascii() == "db.ns.svc.example.test."));
    assert_eq!(addrs(&r), vec![Ipv4Addr::new(10, 1, 2, 3)]);

    // The upstream's change shows once the cached answer's TTL (5 s) has passed; the cache
    // answers meanwhile even with the upstream gone.
    drop(up);
    let r = udp(&d, "db.ns.svc.example.test.", RecordType::A);
    assert_eq!(
        addrs(&r),
        vec![Ipv4Addr::new(10, 1, 2, 3)],
        "from the cache"
    );
    // Without an upstream: SERVFAIL, not silence.
    let lonely = start("cluster.local", vec![], &["127.0.0.0/8"], 0);
    let r = udp(&lonely, "example.org.", RecordType::A);
    assert_eq!(r.response_code(), ResponseCode::ServFail);
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let d = start("cluster.local", vec![], &["127.0.0.0/8"], 0);
    let eps: Vec<String> = (0..120)
        .map(|i| format!("10.244.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let eps: Vec<(&str, Option<&str>, bool)> =
        eps.iter().map(|a| (a.as_str(), None, true)).collect();
    {
        let mut r = d.records.write().unwrap();
        r.set_service(
            &key("default", "big"),
            Some(&service(
                "default",
                "big",
                serde_json::json!({"clusterIP": "None"}),
            )),
        );
        r.set_slice(
            &key("default", "big-1"),
            Some(&slice("default", "big-1", "big", &eps, &[])),
        );
    }
    // No EDNS: 512 bytes at most, so TC and no answers.
    let q = query("big.default.svc.cluster.local.", RecordType::A, false);
    let r = udp_raw(d.addr, &q.to_vec().unwrap()).unwrap();
    assert!(r.truncated());
    assert!(r.answers().is_empty());
    // EDNS 1232: still too big for 120 records (16 bytes each).
    let r = udp(&d, "big.default.svc.cluster.local.", RecordType::A);
    assert!(r.truncated());
    // TCP: every endpoint.
    let r = tcp(&d, &q);
    assert!(!r.truncated());
    assert_eq!(r.answers().len(), 120);
}

#[test]
fn bad_input_gets_an_error_code_or_a_bounded_drop() {
    let d = start("cluster.local", vec![], &["127.0.0.0/8"], 0);
    // Garbage with a readable header: FORMERR with its id.
    let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 40]);
    let r = udp_raw(d.addr, &junk).expect("an answer to junk");
    assert_eq!(r.id(), 0x1234);
    assert_eq!(r.response_code(), ResponseCode::FormErr);
    // Too short for a header: nothing to answer to.
    assert!(udp_raw(d.addr, &[1, 2, 3]).is_none());
    // ANY and zone transfers: not implemented.
    let r = udp(&d, "web.default.svc.cluster.local.", RecordType::ANY);
    assert_eq!(r.response_code(), ResponseCode::NotImp);
    let r = udp(&d, "cluster.local.", RecordType::AXFR);
    assert_eq!(r.response_code(), ResponseCode::NotImp);
    // Two questions.
    let mut two = query("a.cluster.local.", RecordType::A, false);
    two.add_query(Query::query(
        Name::from_ascii("b.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let r = udp_raw(d.addr, &two.to_vec().unwrap()).unwrap();
    assert_eq!(r.response_code(), ResponseCode::FormErr);
    // A response sent to the server is not answered (no reflection loops).
    let mut resp = query("a.cluster.local.", RecordType::A, false);
    resp.set_message_type(MessageType::Response);
    assert!(udp_raw(d.addr, &resp.to_vec().unwrap()).is_none());
    // TCP: a connection that sends nothing is closed after the idle time; the limit of 4
    // connections holds and the server still answers afterwards.
    let idle: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(d.addr).unwrap())
        .collect();
    let mut over = idle.into_iter().last().unwrap();
    over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(over.read(&mut b).unwrap_or(0), 0, "closed: over the limit");
    std::thread::sleep(Duration::from_millis(2500));
    let r = tcp(
        &d,
        &query("dns-version.cluster.local.", RecordType::TXT, false),
    );
    assert_eq!(r.response_code(), ResponseCode::NoError);

    // Outside the allowed ranges: REFUSED.
    let closed = start("cluster.local", vec![], &["10.0.0.0/8"], 0);
    let r = udp(&closed, "dns-version.cluster.local.", RecordType::TXT);
    assert_eq!(r.response_code(), ResponseCode::Refused);
}

#[test]
fn one_client_flooding_is_held_to_its_rate() {
    let d = start("cluster.local", vec![], &["127.0.0.0/8"], 50);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let q = query("dns-version.cluster.local.", RecordType::TXT, false)
        .to_vec()
        .unwrap();
    for _ in 0..1000 {
        s.send_to(&q, d.addr).unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 512];
    while s.recv(&mut buf).is_ok() {
        answered += 1;
    }
    // A burst of 100 (twice the rate) plus what refills while the loop runs, not 1000.
    assert!((1..=300).contains(&answered), "{answered} of 1000 answered");
}
