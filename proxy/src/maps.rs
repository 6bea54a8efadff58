//! The datapath's maps as the daemon's logic sees them: the `DatapathMaps` interface, the
//! whole-map operations built on it, and (for unit tests) an in-memory fake that checks the
//! invariant packets rely on after every write. `datapath::Maps` is the real implementation
//! over the pinned eBPF maps; the reconciler, the conntrack collector and the test runs of the
//! program all go through this interface.

use anyhow::Result;
use ipnetwork::Ipv4Network;
use proxy_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, RevNat, ServiceKey, ServiceValue,
    SockRevKey, SockRevValue,
};

/// The datapath's maps, as the reconciler and the conntrack collector see them.
/// `datapath::Maps` is the real implementation; unit tests use `fake::FakeMaps`.
pub trait DatapathMaps {
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<()>;
    fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    fn set_rev_nat(&mut self, id: u16, rev: RevNat) -> Result<()>;
    fn delete_rev_nat(&mut self, id: u16) -> Result<()>;
    fn reset_stats(&mut self, id: u16) -> Result<()>;
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>>;
    fn backends(&self) -> Result<Vec<(u32, Backend)>>;
    fn rev_nats(&self) -> Result<Vec<(u16, RevNat)>>;
    fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>>;
    fn delete_conntrack(&mut self, key: CtKey) -> Result<()>;
    fn affinity(&self) -> Result<Vec<(AffinityKey, AffinityValue)>>;
    fn delete_affinity(&mut self, key: AffinityKey) -> Result<()>;
    /// Frontend addresses, with how many frontends have each.
    fn set_frontend_addr(&mut self, addr: u32, frontends: u32) -> Result<()>;
    fn delete_frontend_addr(&mut self, addr: u32) -> Result<()>;
    fn frontend_addrs(&self) -> Result<Vec<(u32, u32)>>;
    /// Backend addresses the tc programs may see replies from (they mark them; the conntrack
    /// collector adds missing marks and removes those of addresses gone from every flow).
    fn set_reply_addr(&mut self, addr: u32) -> Result<()>;
    fn delete_reply_addr(&mut self, addr: u32) -> Result<()>;
    fn reply_addrs(&self) -> Result<Vec<u32>>;
    /// The socket programs' reverse entries (sockets sent to a backend).
    fn sock_rev(&self) -> Result<Vec<(SockRevKey, SockRevValue)>>;
    fn delete_sock_rev(&mut self, key: SockRevKey) -> Result<()>;
    /// `loadBalancerSourceRanges` of a frontend, by rev-NAT id.
    fn set_source_range(&mut self, rev_nat_id: u16, range: Ipv4Network) -> Result<()>;
    fn delete_source_range(&mut self, rev_nat_id: u16, range: Ipv4Network) -> Result<()>;
    fn source_ranges(&self) -> Result<Vec<(u16, Ipv4Network)>>;
}

/// Deletes the conntrack entries `pred` selects; returns how many.
pub fn flush_conntrack(
    maps: &mut dyn DatapathMaps,
    pred: impl Fn(&CtKey, &CtValue) -> bool,
) -> Result<usize> {
    let entries = maps.conntrack()?;
    flush(entries, pred, |k| maps.delete_conntrack(k))
}

/// Deletes the session-affinity entries `pred` selects; returns how many.
pub fn flush_affinity(
    maps: &mut dyn DatapathMaps,
    pred: impl Fn(&AffinityKey, &AffinityValue) -> bool,
) -> Result<usize> {
    let entries = maps.affinity()?;
    flush(entries, pred, |k| maps.delete_affinity(k))
}

fn flush<K, V>(
    entries: Vec<(K, V)>,
    pred: impl Fn(&K, &V) -> bool,
    mut delete: impl FnMut(K) -> Result<()>,
) -> Result<usize> {
    let mut n = 0;
    for (k, _) in entries.into_iter().filter(|(k, v)| pred(k, v)) {
        delete(k)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
pub mod fake {
    use std::collections::BTreeMap;

    use super::*;

    /// In-memory maps that also check, after every single write, the invariant a packet relies
    /// on: every slot 1..=count of every header names an existing backend.
    #[derive(Default)]
    pub struct FakeMaps {
        pub services: BTreeMap<ServiceKey, ServiceValue>,
        pub backends: BTreeMap<u32, Backend>,
        pub rev: BTreeMap<u16, RevNat>,
        pub ct: Vec<(CtKey, CtValue)>,
        pub aff: Vec<(AffinityKey, AffinityValue)>,
        pub sock_rev: Vec<(SockRevKey, SockRevValue)>,
        pub ranges: std::collections::BTreeSet<(u16, Ipv4Network)>,
        pub addrs: BTreeMap<u32, u32>,
        pub reply_addrs: std::collections::BTreeSet<u32>,
        pub ops: u64,
    }

    impl FakeMaps {
        fn check(&self) {
            for (k, v) in &self.services {
                if k.slot != 0 {
                    continue;
                }
                assert!(
                    self.addrs.contains_key(&k.addr),
                    "header whose address is not in the frontend address map"
                );
                assert!(
                    self.rev.contains_key(&v.rev_nat_id),
                    "header without rev-NAT entry"
                );
                for s in 1..=v.count {
                    let slot = self
                        .services
                        .get(&ServiceKey { slot: s, ..*k })
                        .expect("slot below count missing");
                    assert!(
                        self.backends.contains_key(&slot.backend_id),
                        "slot names a missing backend"
                    );
                }
            }
        }
    }

    impl DatapathMaps for FakeMaps {
        fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
            self.services.insert(key, value);
            self.ops += 1;
            self.check();
            Ok(())
        }
        fn delete_service(&mut self, key: ServiceKey) -> Result<()> {
            self.services.remove(&key);
            self.ops += 1;
            self.check();
            Ok(())
        }
        fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
            self.backends.insert(id, backend);
            self.ops += 1;
            Ok(())
        }
        fn delete_backend(&mut self, id: u32) -> Result<()> {
            self.backends.remove(&id);
            self.ops += 1;
            self.check();
            Ok(())
        }
        fn set_rev_nat(&mut self, id: u16, rev: RevNat) -> Result<()> {
            self.rev.insert(id, rev);
            Ok(())
        }
        fn delete_rev_nat(&mut self, id: u16) -> Result<()> {
            self.rev.remove(&id);
            self.check();
            Ok(())
        }
        fn reset_stats(&mut self, _id: u16) -> Result<()> {
            Ok(())
        }
        fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
            Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn backends(&self) -> Result<Vec<(u32, Backend)>> {
            Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn rev_nats(&self) -> Result<Vec<(u16, RevNat)>> {
            Ok(self.rev.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
            Ok(self.ct.clone())
        }
        fn delete_conntrack(&mut self, key: CtKey) -> Result<()> {
            self.ct.retain(|(k, _)| *k != key);
            Ok(())
        }
        fn affinity(&self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
            Ok(self.aff.clone())
        }
        fn delete_affinity(&mut self, key: AffinityKey) -> Result<()> {
            self.aff.retain(|(k, _)| *k != key);
            Ok(())
        }
        fn set_frontend_addr(&mut self, addr: u32, frontends: u32) -> Result<()> {
            self.addrs.insert(addr, frontends);
            self.ops += 1;
            Ok(())
        }
        fn delete_frontend_addr(&mut self, addr: u32) -> Result<()> {
            self.addrs.remove(&addr);
            self.ops += 1;
            self.check();
            Ok(())
        }
        fn frontend_addrs(&self) -> Result<Vec<(u32, u32)>> {
            Ok(self.addrs.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn set_reply_addr(&mut self, addr: u32) -> Result<()> {
            self.reply_addrs.insert(addr);
            Ok(())
        }
        fn delete_reply_addr(&mut self, addr: u32) -> Result<()> {
            self.reply_addrs.remove(&addr);
            Ok(())
        }
        fn reply_addrs(&self) -> Result<Vec<u32>> {
            Ok(self.reply_addrs.iter().copied().collect())
        }
        fn sock_rev(&self) -> Result<Vec<(SockRevKey, SockRevValue)>> {
            Ok(self.sock_rev.clone())
        }
        fn delete_sock_rev(&mut self, key: SockRevKey) -> Result<()> {
            self.sock_rev.retain(|(k, _)| *k != key);
            Ok(())
        }
        fn set_source_range(&mut self, rev_nat_id: u16, range: Ipv4Network) -> Result<()> {
            self.ranges.insert((rev_nat_id, range));
            self.ops += 1;
            Ok(())
        }
        fn delete_source_range(&mut self, rev_nat_id: u16, range: Ipv4Network) -> Result<()> {
            self.ranges.remove(&(rev_nat_id, range));
            self.ops += 1;
            Ok(())
        }
        fn source_ranges(&self) -> Result<Vec<(u16, Ipv4Network)>> {
            Ok(self.ranges.iter().copied().collect())
        }
    }
}
