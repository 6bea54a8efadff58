//! Conntrack garbage collection.
//!
//! The datapath keeps a connection's state (flags, expiry) in its forward entry; the reply
//! entry only maps replies back. A forward entry past its expiry is removed together with its
//! reply entry; a reply entry whose forward entry is gone (expired, or evicted by the LRU) goes
//! too.
//!
//! The same pass keeps the reply address marks (`FERRY_REPLY_ADDRS`) true: every address a
//! reply entry has is marked (the datapath marks before it creates entries; this heals marks
//! lost to a daemon of an older layout), and a mark goes once its address is no backend and no
//! reply entry has it, two passes in a row (a flow the datapath was creating while the first
//! pass read the maps had picked its backend before it was removed, and is seen by the second).

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use proxy_common::{CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY};

use crate::maps::DatapathMaps;

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub removed: usize,
    /// Live connections (forward entries) after the pass.
    pub connections: usize,
    /// Reply address marks removed by the pass.
    pub unmarked: usize,
}

/// The collector's memory between passes.
#[derive(Default)]
pub struct Collector {
    /// Marked addresses the previous pass found unused.
    unused_marks: HashSet<u32>,
}

/// The forward key a reply entry belongs to, given its frontend (from the rev-NAT map).
fn forward_key_of(reply: &CtKey, v: &CtValue, frontend: (u32, u16)) -> CtKey {
    CtKey::forward(v.nat_addr, frontend.0, reply.dport, frontend.1, reply.proto)
}

impl Collector {
    /// One pass: expired and orphaned entries, then the reply address marks.
    pub fn pass(&mut self, maps: &mut dyn DatapathMaps, now: u64) -> Result<GcStats> {
        // Backends and marks are read before the entries: a flow created after this read has
        // a backend in the set or its entries in the walk.
        let backends: HashSet<u32> = maps.backends()?.into_iter().map(|(_, b)| b.addr).collect();
        let marks = maps.reply_addrs()?;
        let (mut stats, replying) = gc(maps, now)?;
        let marked: HashSet<u32> = marks.iter().copied().collect();
        for addr in replying.difference(&marked) {
            maps.set_reply_addr(*addr)?;
        }
        let mut unused = HashSet::new();
        for addr in marks {
            if replying.contains(&addr) || backends.contains(&addr) {
                continue;
            }
            if self.unused_marks.contains(&addr) {
                maps.delete_reply_addr(addr)?;
                stats.unmarked += 1;
            } else {
                unused.insert(addr);
            }
        }
        self.unused_marks = unused;
        Ok(stats)
    }
}

/// Removes expired and orphaned entries; returns the addresses the remaining reply entries have.
fn gc(maps: &mut dyn DatapathMaps, now: u64) -> Result<(GcStats, HashSet<u32>)> {
    let entries: HashMap<CtKey, CtValue> = maps.conntrack()?.into_iter().collect();
    let frontends: HashMap<u16, (u32, u16)> = maps
        .rev_nats()?
        .into_iter()
        .map(|(id, r)| (id, (r.addr, r.port)))
        .collect();
    // A reply entry lives while the forward entry it belongs to does, with the same backend
    // (the tuple may have been reused by a connection to another backend).
    let live = |k: &CtKey, backend: (u32, u16)| {
        entries
            .get(k)
            .is_some_and(|v| v.expires > now && (v.nat_addr, v.nat_port) == backend)
    };
    let mut doomed = Vec::new();
    let mut connections = 0;
    let mut replying = HashSet::new();
    for (k, v) in &entries {
        let keep = match k.dir {
            CT_DIR_REPLY => frontends
                .get(&v.rev_nat_id)
                .is_some_and(|fe| live(&forward_key_of(k, v, *fe), (k.saddr, k.sport))),
            _ => v.expires > now,
        };
        if !keep {
            doomed.push(*k);
        } else if k.dir == CT_DIR_FORWARD {
            connections += 1;
        } else {
            replying.insert(k.saddr);
        }
    }
    for k in &doomed {
        maps.delete_conntrack(*k)?;
    }
    let stats = GcStats {
        removed: doomed.len(),
        connections,
        unmarked: 0,
    };
    Ok((stats, replying))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::fake::FakeMaps;
    use proxy_common::{RevNat, PROTO_TCP};

    #[test]
    fn expired_pairs_and_orphan_replies_are_removed() {
        let mut maps = FakeMaps::default();
        maps.rev.insert(
            1,
            RevNat {
                addr: 100,
                port: 80,
                _pad: 0,
            },
        );
        let fwd = |sport, expires| {
            (
                CtKey {
                    saddr: 7,
                    daddr: 100,
                    sport,
                    dport: 80,
                    proto: PROTO_TCP,
                    dir: CT_DIR_FORWARD,
                    _pad: [0; 2],
                },
                CtValue {
                    nat_addr: 50,
                    nat_port: 8080,
                    rev_nat_id: 1,
                    expires,
                    ..Default::default()
                },
            )
        };
        let reply = |cport| {
            (
                CtKey {
                    saddr: 50,
                    daddr: 7,
                    sport: 8080,
                    dport: cport,
                    proto: PROTO_TCP,
                    dir: CT_DIR_REPLY,
                    _pad: [0; 2],
                },
                CtValue {
                    nat_addr: 7,
                    nat_port: cport,
                    rev_nat_id: 1,
                    expires: 0,
                    ..Default::default()
                },
            )
        };
        // 1000 live, 1001 expired, 1002 only has a reply entry.
        maps.ct = vec![
            fwd(1000, 500),
            reply(1000),
            fwd(1001, 50),
            reply(1001),
            reply(1002),
        ];
        let (s, replying) = gc(&mut maps, 100).unwrap();
        assert_eq!(replying, HashSet::from([50]));
        assert_eq!(
            s,
            GcStats {
                removed: 3,
                connections: 1,
                unmarked: 0,
            }
        );
        let left: Vec<u16> = maps
            .ct
            .iter()
            .map(|(k, _)| {
                if k.dir == CT_DIR_FORWARD {
                    k.sport
                } else {
                    k.dport
                }
            })
            .collect();
        assert_eq!(left, vec![1000, 1000]);
    }

    #[test]
    fn reply_marks_follow_backends_and_reply_entries() {
        let mut maps = FakeMaps::default();
        maps.rev.insert(
            1,
            RevNat {
                addr: 100,
                port: 80,
                _pad: 0,
            },
        );
        // 50 has a live flow but lost its mark (an older daemon's maps); 60 is a backend
        // without flows; 70 is neither any more.
        let key = |saddr, dir| CtKey {
            saddr,
            daddr: if dir == CT_DIR_FORWARD { 100 } else { 7 },
            sport: if dir == CT_DIR_FORWARD { 1000 } else { 8080 },
            dport: if dir == CT_DIR_FORWARD { 80 } else { 1000 },
            proto: PROTO_TCP,
            dir,
            _pad: [0; 2],
        };
        let value = |nat_addr, nat_port| CtValue {
            nat_addr,
            nat_port,
            rev_nat_id: 1,
            expires: 500,
            ..Default::default()
        };
        maps.ct = vec![
            (key(7, CT_DIR_FORWARD), value(50, 8080)),
            (key(50, CT_DIR_REPLY), value(7, 1000)),
        ];
        maps.backends.insert(
            1,
            proxy_common::Backend {
                addr: 60,
                ..Default::default()
            },
        );
        maps.reply_addrs = [60, 70].into();
        let mut collector = Collector::default();

        let first = collector.pass(&mut maps, 100).unwrap();
        assert_eq!(first.unmarked, 0, "an unused mark survives its first pass");
        assert_eq!(
            maps.reply_addrs,
            [50, 60, 70].into(),
            "a missing mark is healed"
        );

        let second = collector.pass(&mut maps, 100).unwrap();
        assert_eq!(second.unmarked, 1);
        assert_eq!(maps.reply_addrs, [50, 60].into());

        // Once the flow expires, 50 is unmarked two passes later (it is no backend).
        let third = collector.pass(&mut maps, 1000).unwrap();
        assert_eq!((third.removed, third.unmarked), (2, 0));
        let fourth = collector.pass(&mut maps, 1000).unwrap();
        assert_eq!(fourth.unmarked, 1);
        assert_eq!(maps.reply_addrs, [60].into());
    }
}
