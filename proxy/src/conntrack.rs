//! Conntrack garbage collection.
//!
//! The datapath keeps a connection's state (flags, expiry) in its forward entry; the reply
//! entry only maps replies back. A forward entry past its expiry is removed together with its
//! reply entry; a reply entry whose forward entry is gone (expired, or evicted by the LRU) goes
//! too.

use std::collections::HashMap;

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
}

/// The forward key a reply entry belongs to, given its frontend (from the rev-NAT map).
fn forward_key_of(reply: &CtKey, v: &CtValue, frontend: (u32, u16)) -> CtKey {
    CtKey::forward(v.nat_addr, frontend.0, reply.dport, frontend.1, reply.proto)
}

pub fn gc(maps: &mut dyn DatapathMaps, now: u64) -> Result<GcStats> {
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
        }
    }
    for k in &doomed {
        maps.delete_conntrack(*k)?;
    }
    Ok(GcStats {
        removed: doomed.len(),
        connections,
    })
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
        let s = gc(&mut maps, 100).unwrap();
        assert_eq!(
            s,
            GcStats {
                removed: 3,
                connections: 1
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
}
