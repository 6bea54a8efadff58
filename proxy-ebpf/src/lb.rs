//! Load balancing: the frontend a packet or a socket is for, and the backend a new flow goes to
//! (the client's affinity entry while it is fresh, else a random slot of the frontend). Shared by
//! the tc programs (per packet) and the socket programs (per connect).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    AffinityKey, AffinityValue, ServiceKey, ServiceValue, SourceRangeKey, SVC_FLAG_AFFINITY,
    SVC_FLAG_SOURCE_RANGES,
};

use crate::maps::{AFFINITY, BACKENDS, FRONTEND_ADDRS, SERVICES, SOURCE_RANGES};

const NS: u64 = 1_000_000_000;

/// The chosen backend of a new flow.
pub struct Selected {
    pub backend_id: u32,
    pub addr: u32,
    pub port: u16,
}

/// A frontend: address, port (network order) and protocol.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
}

/// Whether some frontend has this address (the cheap test before the service and forward
/// conntrack lookups).
#[inline(always)]
pub fn is_frontend_addr(addr: u32) -> bool {
    unsafe { FRONTEND_ADDRS.get(&addr) }.is_some()
}

/// The header (slot 0) of a frontend, if it is one.
#[inline(always)]
pub fn frontend(fe: Frontend) -> Option<&'static ServiceValue> {
    let key = ServiceKey::new(fe.addr, fe.port, fe.proto, 0);
    unsafe { SERVICES.get(&key) }
}

/// Whether a new flow from `client` may reach the frontend: always, unless the frontend has
/// `loadBalancerSourceRanges` and none of them holds the client.
#[inline(always)]
pub fn source_allowed(head: &ServiceValue, client: u32) -> bool {
    if head.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SourceRangeKey {
            rev_nat_id: head.rev_nat_id,
            _pad: 0,
            addr: client,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// Picks the backend of a new flow to `fe` (whose header is `head`) for the client of
/// `affinity_key`; `None` when the frontend has no usable backend.
#[inline(always)]
pub fn select(
    fe: Frontend,
    head: &ServiceValue,
    affinity_key: AffinityKey,
    now: u64,
) -> Option<Selected> {
    let count = head.count;
    if count == 0 {
        return None;
    }
    let affinity = head.flags & SVC_FLAG_AFFINITY != 0;
    let mut backend_id = 0u32;
    if affinity {
        if let Some(a) = AFFINITY.get_ptr_mut(&affinity_key) {
            let a = unsafe { &mut *a };
            let timeout = head.affinity_timeout as u64 * NS;
            if now.saturating_sub(a.last_used) <= timeout {
                backend_id = a.backend_id;
            }
        }
    }
    let mut backend = None;
    if backend_id != 0 {
        backend = unsafe { BACKENDS.get(backend_id) };
    }
    if backend.is_none() {
        let slot = (unsafe { bpf_get_prandom_u32() } % count as u32) as u16 + 1;
        let slot_key = ServiceKey::new(fe.addr, fe.port, fe.proto, slot);
        let s = unsafe { SERVICES.get(&slot_key) }?;
        backend_id = s.backend_id;
        backend = unsafe { BACKENDS.get(backend_id) };
    }
    let backend = backend?;
    if affinity {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used: now,
        };
        let _ = AFFINITY.insert(&affinity_key, &value, 0);
    }
    Some(Selected {
        backend_id,
        addr: backend.addr,
        port: backend.port,
    })
}
