//! Load balancing: the frontend a packet is for, and the backend a new flow goes to (the
//! client's affinity entry while it is fresh, else a random slot of the frontend).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{AffinityKey, AffinityValue, ServiceKey, ServiceValue, SVC_FLAG_AFFINITY};

use crate::maps::{AFFINITY, BACKENDS, SERVICES};
use crate::parse::Flow;

const NS: u64 = 1_000_000_000;

/// The chosen backend of a new flow.
pub struct Selected {
    pub backend_id: u32,
    pub addr: u32,
    pub port: u16,
}

/// The header (slot 0) of the frontend the packet is addressed to.
#[inline(always)]
pub fn frontend(flow: &Flow) -> Option<&'static ServiceValue> {
    let key = ServiceKey::new(flow.daddr, flow.dport, flow.proto, 0);
    unsafe { SERVICES.get(&key) }
}

/// Picks the backend of a new flow; `None` when the frontend has no usable backend (the flow
/// is refused, as kube-proxy refuses connections to a Service without endpoints).
#[inline(always)]
pub fn select(flow: &Flow, head: &ServiceValue, now: u64) -> Option<Selected> {
    let count = head.count;
    if count == 0 {
        return None;
    }
    let affinity_key = AffinityKey {
        client: flow.saddr,
        rev_nat_id: head.rev_nat_id,
        _pad: 0,
    };
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
        let slot_key = ServiceKey::new(flow.daddr, flow.dport, flow.proto, slot);
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
