//! Unit tests of the eBPF datapath program: packets built in Rust run through the loaded
//! program in the kernel (BPF_PROG_TEST_RUN); the bytes that come out and the conntrack and
//! affinity maps are checked. Needs root (the program is loaded for real).

use std::net::Ipv4Addr;

use ferry_testbed::packet::{self, Seen, Tcp};
use proxy::maps::DatapathMaps;
use proxy::testrun::{Frontend, TestBed};
use proxy_common::{
    CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_HAIRPIN, PROTO_TCP,
    PROTO_UDP,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const B1: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 2, 7), 8080);
const B2: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 3, 9), 8080);

fn bed() -> TestBed {
    TestBed::new(HAIRPIN).expect("loading the datapath (run as root)")
}

fn svc(addr: Ipv4Addr, port: u16, proto: u8) -> Frontend {
    Frontend {
        addr,
        port,
        proto,
        affinity: None,
    }
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// Runs `packet`, expects TC_ACT_OK and valid checksums; returns what came out.
fn pass(bed: &mut TestBed, packet: &[u8]) -> Seen {
    let out = bed.run(packet).expect("test run");
    assert_eq!(out.verdict, TC_ACT_OK, "verdict");
    packet::read(&out.packet).expect("a well-formed packet with correct checksums")
}

/// The packet leaves exactly as it came.
fn untouched(bed: &mut TestBed, packet: &[u8]) {
    let out = bed
        .run(packet)
        .unwrap_or_else(|e| panic!("test run of {} bytes: {e:#}", packet.len()));
    assert_eq!(out.verdict, TC_ACT_OK, "verdict");
    assert_eq!(out.packet, packet, "the packet was changed");
}

fn conntrack(bed: &TestBed) -> Vec<(CtKey, CtValue)> {
    bed.datapath.maps.conntrack().expect("conntrack dump")
}

#[test]
fn new_flow_is_translated_and_tracked_both_ways() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[B1]).unwrap();
    let syn = packet::tcp((CLIENT, 40_000), (VIP, 80), Tcp::Syn, &[]);
    let seen = pass(&mut bed, &syn);
    assert_eq!(seen.src, (CLIENT, 40_000));
    assert_eq!(seen.dst, B1);
    let ct = conntrack(&bed);
    assert_eq!(ct.len(), 2, "a forward and a reply entry: {ct:?}");
    let fwd = ct.iter().find(|(k, _)| k.dir == CT_DIR_FORWARD).unwrap();
    let want = CtKey::forward(
        be(CLIENT),
        be(VIP),
        40_000u16.to_be(),
        80u16.to_be(),
        PROTO_TCP,
    );
    assert_eq!(fwd.0, want);
    assert_eq!(fwd.1.nat_addr, be(B1.0));
    assert_eq!(fwd.1.nat_port, B1.1.to_be());
    let reply = ct.iter().find(|(k, _)| k.dir == CT_DIR_REPLY).unwrap();
    let want = CtKey::reply(
        be(B1.0),
        B1.1.to_be(),
        be(CLIENT),
        40_000u16.to_be(),
        PROTO_TCP,
    );
    assert_eq!(reply.0, want);
    assert_eq!(reply.1.nat_addr, be(CLIENT));
}

#[test]
fn established_flow_keeps_its_backend() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[B1, B2])
        .unwrap();
    for port in 40_000..40_016 {
        let c = (CLIENT, port);
        let first = pass(&mut bed, &packet::tcp(c, (VIP, 80), Tcp::Syn, &[]));
        assert!(first.dst == B1 || first.dst == B2, "{first:?}");
        for _ in 0..8 {
            let data = packet::tcp(c, (VIP, 80), Tcp::Ack, b"GET / HTTP/1.1\r\n\r\n");
            let next = pass(&mut bed, &data);
            assert_eq!(next.dst, first.dst, "an established flow changed backend");
        }
    }
    assert_eq!(conntrack(&bed).len(), 32, "one pair of entries per flow");
}

#[test]
fn new_flows_spread_over_backends() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[B1, B2])
        .unwrap();
    let mut to_b1 = 0;
    for port in 41_000..41_064 {
        let seen = pass(
            &mut bed,
            &packet::tcp((CLIENT, port), (VIP, 80), Tcp::Syn, &[]),
        );
        to_b1 += usize::from(seen.dst == B1);
    }
    // 64 fair coin flips all landing on one side: p = 2^-63.
    assert!((1..64).contains(&to_b1), "{to_b1} of 64 flows to B1");
}

#[test]
fn replies_appear_from_the_frontend() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 53, PROTO_UDP), &[B1]).unwrap();
    let c = (CLIENT, 33_000);
    let q = pass(&mut bed, &packet::udp(c, (VIP, 53), b"query"));
    assert_eq!(q.dst, B1);
    let answer = pass(&mut bed, &packet::udp(B1, c, b"answer"));
    assert_eq!(answer.src, (VIP, 53));
    assert_eq!(answer.dst, c);
    // A reply to a flow nobody opened is not translated.
    untouched(&mut bed, &packet::udp(B1, (CLIENT, 33_001), b"stray"));
}

#[test]
fn only_marked_backends_have_their_replies_looked_up() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 53, PROTO_UDP), &[B1]).unwrap();
    assert!(bed.datapath.maps.reply_addrs().unwrap().is_empty());
    let c = (CLIENT, 33_100);
    pass(&mut bed, &packet::udp(c, (VIP, 53), b"query"));
    assert_eq!(
        bed.datapath.maps.reply_addrs().unwrap(),
        vec![be(B1.0)],
        "a new flow marks its backend's address"
    );
    // Without the mark the reply entry is not even looked up: the packet passes as it is.
    bed.datapath.maps.delete_reply_addr(be(B1.0)).unwrap();
    untouched(&mut bed, &packet::udp(B1, c, b"answer"));
    bed.datapath.maps.set_reply_addr(be(B1.0)).unwrap();
    let answer = pass(&mut bed, &packet::udp(B1, c, b"answer"));
    assert_eq!(answer.src, (VIP, 53));
}

#[test]
fn tcp_close_and_reopen_of_a_tuple() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[B1]).unwrap();
    let c = (CLIENT, 42_000);
    pass(&mut bed, &packet::tcp(c, (VIP, 80), Tcp::Syn, &[]));
    pass(&mut bed, &packet::tcp(c, (VIP, 80), Tcp::Ack, &[]));
    let reply = pass(&mut bed, &packet::tcp(B1, c, Tcp::Fin, &[]));
    assert_eq!(reply.src, (VIP, 80));
    pass(&mut bed, &packet::tcp(c, (VIP, 80), Tcp::Rst, &[]));
    let fwd = conntrack(&bed)
        .into_iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .unwrap();
    assert_ne!(
        fwd.1.flags & CT_FLAG_CLOSING,
        0,
        "FIN/RST mark the entry closing"
    );
    // The same tuple opens a new connection: tracked afresh, still one pair of entries.
    let again = pass(&mut bed, &packet::tcp(c, (VIP, 80), Tcp::Syn, &[]));
    assert_eq!(again.dst, B1);
    let ct = conntrack(&bed);
    assert_eq!(ct.len(), 2, "{ct:?}");
    assert!(ct.iter().all(|(_, v)| v.flags & CT_FLAG_CLOSING == 0));
}

#[test]
fn session_affinity_sends_a_client_to_one_backend() {
    let mut bed = bed();
    let mut fe = svc(VIP, 80, PROTO_TCP);
    fe.affinity = Some(600);
    bed.add_service(&fe, &[B1, B2]).unwrap();
    let first = pass(
        &mut bed,
        &packet::tcp((CLIENT, 43_000), (VIP, 80), Tcp::Syn, &[]),
    );
    for port in 43_001..43_040 {
        let seen = pass(
            &mut bed,
            &packet::tcp((CLIENT, port), (VIP, 80), Tcp::Syn, &[]),
        );
        assert_eq!(seen.dst, first.dst, "affinity broken at port {port}");
    }
    let aff = bed.datapath.maps.affinity().unwrap();
    assert_eq!(aff.len(), 1, "{aff:?}");
    assert_eq!(aff[0].0.client, be(CLIENT));
}

#[test]
fn hairpin_flow_comes_back_through_the_program() {
    let mut bed = bed();
    let me = (CLIENT, 8080);
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[me]).unwrap();
    let c = (CLIENT, 44_000);
    let out = pass(&mut bed, &packet::tcp(c, (VIP, 80), Tcp::Syn, &[]));
    assert_eq!(
        out.src,
        (HAIRPIN, 44_000),
        "source becomes the hairpin address"
    );
    assert_eq!(out.dst, me);
    let ct = conntrack(&bed);
    assert_eq!(ct.len(), 2);
    assert!(ct.iter().all(|(_, v)| v.flags & CT_FLAG_HAIRPIN != 0));
    let back = pass(&mut bed, &packet::tcp(me, (HAIRPIN, 44_000), Tcp::Ack, &[]));
    assert_eq!(back.src, (VIP, 80));
    assert_eq!(back.dst, c);
}

#[test]
fn nodeport_frontend_on_a_node_address() {
    let mut bed = bed();
    bed.add_service(&svc(NODE, 30_080, PROTO_TCP), &[B1])
        .unwrap();
    let outside = (Ipv4Addr::new(192, 168, 50, 100), 50_000);
    let seen = pass(
        &mut bed,
        &packet::tcp(outside, (NODE, 30_080), Tcp::Syn, &[]),
    );
    assert_eq!(seen.dst, B1);
    let reply = pass(&mut bed, &packet::tcp(B1, outside, Tcp::Ack, &[]));
    assert_eq!(reply.src, (NODE, 30_080));
    // The node's other ports are not a frontend.
    untouched(&mut bed, &packet::tcp(outside, (NODE, 22), Tcp::Syn, &[]));
}

#[test]
fn service_without_endpoints_answers_port_unreachable() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[]).unwrap();
    bed.add_service(&svc(VIP, 53, PROTO_UDP), &[]).unwrap();
    let c = (CLIENT, 45_000);
    for (what, p) in [
        ("SYN", packet::tcp(c, (VIP, 80), Tcp::Syn, &[])),
        ("UDP", packet::udp(c, (VIP, 53), &[7; 300])),
        ("empty UDP", packet::udp(c, (VIP, 53), &[])),
    ] {
        let out = bed.run(&p).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}: sent back");
        assert_eq!(out.packet.len(), 14 + 56, "{what}");
        let u = packet::read_unreachable(&out.packet).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(
            (u.src, u.dst),
            (VIP, CLIENT),
            "{what}: from the frontend to the client"
        );
        assert_eq!(u.quoted.src, c, "{what}: quotes the client's packet");
        assert_eq!(u.quoted.dst.0, VIP, "{what}");
        assert!(u.turned_around, "{what}: MACs swapped");
    }
    assert!(conntrack(&bed).is_empty(), "a refused flow is not tracked");
    // A packet with IP options cannot be quoted in the fixed layout: dropped as before.
    let opts = packet::tcp_with_ip_options(c, (VIP, 80), &[1, 1, 1, 1]);
    assert_eq!(bed.run(&opts).unwrap().verdict, TC_ACT_SHOT);
}

#[test]
fn icmp_errors_about_a_translated_flow_quote_the_frontend() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[B1]).unwrap();
    let c = (CLIENT, 47_000);
    pass(&mut bed, &packet::tcp(c, (VIP, 80), Tcp::Syn, &[]));
    // A router on the way to the backend: fragmentation needed, quoting client -> backend.
    let router = Ipv4Addr::new(10, 0, 0, 1);
    let as_sent = packet::tcp(c, B1, Tcp::Ack, &[0; 100]);
    let out = bed
        .run(&packet::icmp_frag_needed(router, CLIENT, 1400, &as_sent))
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
    let (src, dst, quoted) = packet::read_icmp_error(&out.packet).unwrap();
    assert_eq!(
        (src, dst),
        (router, CLIENT),
        "the router's own address stays"
    );
    assert_eq!(quoted.src, c);
    assert_eq!(
        quoted.dst,
        (VIP, 80),
        "the quote names the frontend the client knows"
    );
    // Sent by the backend itself: it comes from the frontend too.
    let out = bed
        .run(&packet::icmp_frag_needed(B1.0, CLIENT, 1400, &as_sent))
        .unwrap();
    let (src, _, quoted) = packet::read_icmp_error(&out.packet).unwrap();
    assert_eq!((src, quoted.dst), (VIP, (VIP, 80)));
    // About a flow Ferry never translated: untouched.
    let stranger = packet::tcp((CLIENT, 47_001), B2, Tcp::Ack, &[]);
    untouched(
        &mut bed,
        &packet::icmp_frag_needed(router, CLIENT, 1400, &stranger),
    );
}

#[test]
fn icmp_and_non_service_traffic_pass_untouched() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[B1]).unwrap();
    let c = (CLIENT, 46_000);
    untouched(&mut bed, &packet::icmp_echo(CLIENT, VIP));
    untouched(&mut bed, &packet::tcp(c, B1, Tcp::Syn, &[]));
    untouched(&mut bed, &packet::tcp(c, (VIP, 81), Tcp::Syn, &[]));
    untouched(&mut bed, &packet::udp(c, (VIP, 80), b"wrong protocol"));
    assert!(conntrack(&bed).is_empty());
}

#[test]
fn malformed_and_unsupported_packets_pass_untranslated() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[B1]).unwrap();
    bed.add_service(&svc(VIP, 53, PROTO_UDP), &[B1]).unwrap();
    let c = (CLIENT, 47_000);
    let syn = packet::tcp(c, (VIP, 80), Tcp::Syn, &[]);
    let dgram = packet::udp(c, (VIP, 53), b"q");
    // Cut at every length from the end of the IP header (the kernel's test run refuses an
    // IPv4 frame shorter than that) to one byte short of the TCP flags and of the UDP ports:
    // nothing is translated, nothing is tracked.
    for cut in 34..(14 + 20 + 14) {
        untouched(&mut bed, &syn[..cut]);
    }
    for cut in 34..(14 + 20 + 4) {
        untouched(&mut bed, &dgram[..cut]);
    }
    // An IHL below 5 is not IPv4 we can read; one of 15 (60 bytes) claims options the packet
    // does not have, which puts the ports past its end.
    for vihl in [0x44, 0x4f] {
        let mut bad_ihl = syn.clone();
        bad_ihl[14] = vihl;
        untouched(&mut bed, &bad_ihl);
    }
    // Not a first fragment: no ports in it.
    untouched(&mut bed, &packet::udp_fragment(c, (VIP, 53), 8));
    // IPv6 is not load-balanced by this program.
    untouched(&mut bed, &packet::tcp_v6(80));
    let ct = conntrack(&bed);
    assert!(ct.is_empty(), "{ct:?}");
}

#[test]
fn unusual_but_valid_packets_are_translated_correctly() {
    let mut bed = bed();
    bed.add_service(&svc(VIP, 80, PROTO_TCP), &[B1]).unwrap();
    bed.add_service(&svc(VIP, 53, PROTO_UDP), &[B1]).unwrap();
    // IP options (router alert): the L4 header starts after them, checksums still right.
    let opts = packet::tcp_with_ip_options((CLIENT, 48_000), (VIP, 80), &[0x94, 0x04, 0, 0]);
    assert_eq!(pass(&mut bed, &opts).dst, B1);
    // An empty UDP payload.
    let empty = packet::udp((CLIENT, 48_001), (VIP, 53), &[]);
    assert_eq!(pass(&mut bed, &empty).dst, B1);
    // A UDP datagram sent without a checksum keeps having none.
    let unsummed = packet::udp_without_checksum((CLIENT, 48_002), (VIP, 53), b"q");
    let out = bed.run(&unsummed).unwrap();
    assert_eq!(packet::read(&out.packet).unwrap().dst, B1);
    assert_eq!(packet::udp_checksum(&out.packet), 0);
}

#[test]
fn the_object_holds_exactly_the_maps_the_daemon_knows() {
    let bed = bed();
    let mut found = bed.pinned_maps().unwrap();
    found.sort();
    let mut want: Vec<String> = proxy_common::names::MAPS
        .iter()
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(found, want);
}
