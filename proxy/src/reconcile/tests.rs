//! The reconciler against the in-memory maps, which check the packets' invariant after every
//! write.

use super::*;
use crate::maps::fake::FakeMaps;
use crate::model::Proto;
use proxy_common::{CtKey, CtValue};

fn fe(i: u8, proto: Proto) -> Frontend {
    Frontend {
        addr: Ipv4Addr::new(10, 96, 0, i),
        port: 80,
        proto,
    }
}

fn spec(backends: &[u8], proto: Proto) -> FrontendSpec {
    FrontendSpec {
        service: "default/web".into(),
        nodeport: false,
        affinity_timeout: None,
        source_ranges: None,
        backends: backends
            .iter()
            .map(|b| BackendAddr {
                addr: Ipv4Addr::new(10, 244, 0, *b),
                port: 8080,
                proto,
            })
            .collect(),
    }
}

#[test]
fn slots_stay_put_and_holes_are_compacted() {
    assert_eq!(assign_slots(&[1, 2, 3], &[1, 3]), vec![1, 3]);
    assert_eq!(assign_slots(&[1, 2, 3], &[1, 2, 3, 4]), vec![1, 2, 3, 4]);
    assert_eq!(assign_slots(&[1, 2, 3], &[3, 4, 1]), vec![1, 4, 3]);
    assert_eq!(assign_slots(&[1, 2, 3, 4], &[4]), vec![4]);
    assert_eq!(assign_slots(&[], &[5, 6]), vec![5, 6]);
    assert_eq!(assign_slots(&[5, 6], &[]), Vec::<u32>::new());
}

#[test]
fn only_changes_are_written_and_invariants_hold_at_every_step() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::default();
    let mut desired = DesiredState::new();
    for i in 1..=20 {
        desired.insert(fe(i, Proto::Tcp), spec(&[1, 2, 3], Proto::Tcp));
    }
    let s = r.apply(&mut maps, &desired).unwrap();
    // 3 shared backends + 20 x (address + rev-NAT + header + 3 slots).
    assert_eq!(s.writes, 3 + 20 * 6);
    assert_eq!(r.apply(&mut maps, &desired).unwrap().writes, 0);

    // Remove one backend of one frontend: the moved slot, the header, the stale slot.
    desired.insert(fe(7, Proto::Tcp), spec(&[1, 3], Proto::Tcp));
    let s = r.apply(&mut maps, &desired).unwrap();
    assert_eq!((s.writes, s.frontends_changed), (3, 1));

    // A restarted daemon rebuilds its state from the maps and writes nothing.
    let mut r2 = Reconciler::recover(&mut maps).unwrap();
    assert_eq!(r2.apply(&mut maps, &desired).unwrap().writes, 0);

    // Removing every frontend empties every map.
    r2.apply(&mut maps, &DesiredState::new()).unwrap();
    assert!(maps.services.is_empty() && maps.backends.is_empty() && maps.rev.is_empty());
    assert!(maps.addrs.is_empty());
}

#[test]
fn frontend_addresses_are_counted_and_rebuilt_for_older_maps() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::default();
    let https = Frontend {
        port: 443,
        ..fe(1, Proto::Tcp)
    };
    let mut desired = DesiredState::new();
    desired.insert(fe(1, Proto::Tcp), spec(&[1], Proto::Tcp));
    desired.insert(https, spec(&[1], Proto::Tcp));
    desired.insert(fe(2, Proto::Tcp), spec(&[1], Proto::Tcp));
    r.apply(&mut maps, &desired).unwrap();
    let addr = |i: u8| be(Ipv4Addr::new(10, 96, 0, i));
    assert_eq!(
        maps.addrs.keys().copied().collect::<Vec<_>>(),
        vec![addr(1), addr(2)]
    );
    // One of two ports of an address goes: the address stays.
    desired.remove(&https);
    r.apply(&mut maps, &desired).unwrap();
    assert!(maps.addrs.contains_key(&addr(1)));
    // Maps pinned by a Ferry without the address map: a restart writes the addresses.
    maps.addrs.clear();
    let mut r2 = Reconciler::recover(&mut maps).unwrap();
    assert_eq!(maps.addrs.len(), 2);
    assert_eq!(r2.apply(&mut maps, &desired).unwrap().writes, 0);
    desired.remove(&fe(1, Proto::Tcp));
    r2.apply(&mut maps, &desired).unwrap();
    assert_eq!(
        maps.addrs.keys().copied().collect::<Vec<_>>(),
        vec![addr(2)]
    );
}

#[test]
fn source_ranges_follow_the_spec_and_are_recovered() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::default();
    let net = |s: &str| s.parse::<Ipv4Network>().unwrap();
    let with = |ranges: Option<&[&str]>| {
        let mut d = DesiredState::new();
        let mut sp = spec(&[1, 2], Proto::Tcp);
        sp.source_ranges = ranges.map(|r| r.iter().map(|s| net(s)).collect());
        d.insert(fe(1, Proto::Tcp), sp);
        d
    };
    let header = |maps: &FakeMaps| *maps.services.values().find(|v| v.count == 2).unwrap();
    r.apply(&mut maps, &with(Some(&["10.0.0.0/8", "192.0.2.0/24"])))
        .unwrap();
    let rev = header(&maps).rev_nat_id;
    assert_ne!(header(&maps).flags & SVC_FLAG_SOURCE_RANGES, 0);
    assert_eq!(
        maps.ranges,
        [(rev, net("10.0.0.0/8")), (rev, net("192.0.2.0/24"))].into()
    );
    // A changed set: one added, one removed, the header untouched.
    let s = r
        .apply(&mut maps, &with(Some(&["10.0.0.0/8", "198.51.100.0/24"])))
        .unwrap();
    assert_eq!(s.writes, 2);
    assert_eq!(
        maps.ranges,
        [(rev, net("10.0.0.0/8")), (rev, net("198.51.100.0/24"))].into()
    );
    // A restarted daemon finds them and writes nothing.
    let mut r2 = Reconciler::recover(&mut maps).unwrap();
    let same = with(Some(&["10.0.0.0/8", "198.51.100.0/24"]));
    assert_eq!(r2.apply(&mut maps, &same).unwrap().writes, 0);
    // An empty set still restricts (no IPv4 client); no set lifts the restriction.
    r2.apply(&mut maps, &with(Some(&[]))).unwrap();
    assert!(maps.ranges.is_empty());
    assert_ne!(header(&maps).flags & SVC_FLAG_SOURCE_RANGES, 0);
    r2.apply(&mut maps, &with(None)).unwrap();
    assert_eq!(header(&maps).flags & SVC_FLAG_SOURCE_RANGES, 0);
    // Removing the frontend removes its ranges.
    r2.apply(&mut maps, &with(Some(&["10.0.0.0/8"]))).unwrap();
    r2.apply(&mut maps, &DesiredState::new()).unwrap();
    assert!(maps.ranges.is_empty());
}

#[test]
fn sockets_sent_to_a_removed_udp_backend_are_named_for_destruction() {
    use proxy_common::{SockRevKey, SockRevValue};
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::default();
    let mut desired = DesiredState::new();
    desired.insert(fe(1, Proto::Udp), spec(&[1, 2], Proto::Udp));
    desired.insert(fe(2, Proto::Tcp), spec(&[1, 2], Proto::Tcp));
    r.apply(&mut maps, &desired).unwrap();
    let rev_of = |maps: &FakeMaps, f: Frontend| maps.services[&service_key(&f, 0)].rev_nat_id;
    let (udp_rev, tcp_rev) = (
        rev_of(&maps, fe(1, Proto::Udp)),
        rev_of(&maps, fe(2, Proto::Tcp)),
    );
    let sock = |cookie: u64, backend: u8, rev: u16| {
        (
            SockRevKey {
                cookie,
                addr: be(Ipv4Addr::new(10, 244, 0, backend)),
                port: 8080u16.to_be(),
                _pad: 0,
            },
            SockRevValue {
                addr: be(Ipv4Addr::new(10, 96, 0, 1)),
                port: 80u16.to_be(),
                rev_nat_id: rev,
            },
        )
    };
    maps.sock_rev = vec![
        sock(1, 1, udp_rev),
        sock(2, 2, udp_rev),
        sock(3, 2, tcp_rev),
    ];
    desired.insert(fe(1, Proto::Udp), spec(&[1], Proto::Udp));
    desired.insert(fe(2, Proto::Tcp), spec(&[1], Proto::Tcp));
    r.apply(&mut maps, &desired).unwrap();
    // Only the UDP socket of the removed backend; TCP connections live on.
    assert_eq!(r.take_stale_sockets(), [2].into());
    assert_eq!(maps.sock_rev.len(), 2);
    assert!(r.take_stale_sockets().is_empty());
    // A removed frontend takes every socket of its own.
    desired.remove(&fe(1, Proto::Udp));
    r.apply(&mut maps, &desired).unwrap();
    assert_eq!(r.take_stale_sockets(), [1].into());
}

#[test]
fn removed_udp_backend_loses_its_conntrack_entries() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::default();
    let mut desired = DesiredState::new();
    desired.insert(fe(1, Proto::Udp), spec(&[1, 2], Proto::Udp));
    r.apply(&mut maps, &desired).unwrap();
    let rev = maps
        .services
        .values()
        .find(|v| v.count == 2)
        .unwrap()
        .rev_nat_id;
    let doomed = *maps
        .backends
        .iter()
        .find(|(_, b)| b.addr == be(Ipv4Addr::new(10, 244, 0, 2)))
        .unwrap()
        .0;
    let entry = |sport: u16, backend_id: u32| {
        let k = CtKey {
            saddr: 1,
            daddr: 2,
            sport,
            dport: 53,
            proto: PROTO_UDP,
            dir: 0,
            _pad: [0; 2],
        };
        (
            k,
            CtValue {
                backend_id,
                rev_nat_id: rev,
                ..Default::default()
            },
        )
    };
    maps.ct = vec![entry(1000, doomed), entry(1001, doomed + 100)];
    desired.insert(fe(1, Proto::Udp), spec(&[1], Proto::Udp));
    let s = r.apply(&mut maps, &desired).unwrap();
    assert_eq!(s.conntrack_flushed, 1);
    assert_eq!(maps.ct.len(), 1);
    assert_eq!(maps.ct[0].0.sport, 1001);
}

#[test]
fn capacity_is_checked_before_writing() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::default();
    let mut desired = DesiredState::new();
    let many: Vec<u8> = (0..=255).collect();
    let mut s = spec(&many, Proto::Tcp);
    s.backends = (0..5000u32)
        .map(|i| BackendAddr {
            addr: Ipv4Addr::from(0x0af4_0000 + i),
            port: 80,
            proto: Proto::Tcp,
        })
        .collect();
    desired.insert(fe(1, Proto::Tcp), s);
    let err = r.apply(&mut maps, &desired).unwrap_err();
    assert!(err.to_string().contains("at most 4096"), "{err}");
    assert_eq!(maps.ops, 0);
}
