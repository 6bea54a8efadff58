//! Connection tracking: a translated flow has two entries, keyed as `proxy_common::CtKey`
//! lays out. The forward entry (client -> frontend) holds the backend and the connection's
//! state; the reply entry (backend -> client as the backend sees it) holds the client, for
//! undoing the translation on the way back. The forward entry is the one that ages; the
//! daemon's collector removes a reply entry once its forward entry is gone.

use proxy_common::{
    ct_timeout, CtKey, CtValue, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_HAIRPIN, PROTO_TCP,
    PROTO_UDP,
};

use crate::lb::Selected;
use crate::maps::{hairpin_addr, CT, REPLY_ADDRS, REV_NAT};
use crate::parse::{Flow, TCP_ACK};

const NS: u64 = 1_000_000_000;

/// What a forward entry says about an established flow.
pub struct Established {
    pub backend_addr: u32,
    pub backend_port: u16,
    pub rev_nat_id: u16,
    pub hairpin: bool,
}

/// What a reply entry says about a backend's packet.
pub struct Reply {
    pub frontend_addr: u32,
    pub frontend_port: u16,
    /// The client's own address (the reply's destination is the hairpin address if `hairpin`).
    pub client_addr: u32,
    pub hairpin: bool,
}

/// The live forward entry of `flow`, refreshed. An expired entry, or a closing one whose
/// tuple a new connection reuses, is no match: its reply entry goes, so it cannot outlive it.
#[inline(always)]
pub fn lookup_forward(flow: &Flow, now: u64) -> Result<Option<Established>, ()> {
    let key = CtKey::forward(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    let Some(ct) = CT.get_ptr_mut(&key) else {
        return Ok(None);
    };
    let ct = unsafe { &mut *ct };
    let found = Established {
        backend_addr: ct.nat_addr,
        backend_port: ct.nat_port,
        rev_nat_id: ct.rev_nat_id,
        hairpin: ct.flags & CT_FLAG_HAIRPIN != 0,
    };
    let reopened = flow.is_tcp_open() && ct.flags & CT_FLAG_CLOSING != 0;
    if !reopened && ct.expires > now {
        refresh(ct, flow, now);
        return Ok(Some(found));
    }
    let client_seen_as = if found.hairpin {
        hairpin_addr()?
    } else {
        flow.saddr
    };
    let _ = CT.remove(&CtKey::reply(
        found.backend_addr,
        found.backend_port,
        client_seen_as,
        flow.sport,
        flow.proto,
    ));
    Ok(None)
}

/// The reply entry of a backend's packet. The connection's state lives in its forward entry,
/// which the client's packets keep fresh; a reply refreshes it when it closes the connection,
/// or for UDP (a stream of answers to one request). A reply entry whose frontend is gone is
/// an error: the packet passes untranslated.
#[inline(always)]
pub fn lookup_reply(flow: &Flow, now: u64) -> Result<Option<Reply>, ()> {
    if !may_reply(flow.saddr) {
        return Ok(None);
    }
    let key = CtKey {
        dir: proxy_common::CT_DIR_REPLY,
        ..CtKey::forward(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
    };
    let Some(ct) = (unsafe { CT.get(&key) }) else {
        return Ok(None);
    };
    let rev = unsafe { REV_NAT.get(ct.rev_nat_id) }.ok_or(())?;
    let reply = Reply {
        frontend_addr: rev.addr,
        frontend_port: rev.port,
        client_addr: ct.nat_addr,
        hairpin: ct.flags & CT_FLAG_HAIRPIN != 0,
    };
    if flow.proto == PROTO_UDP || flow.is_tcp_close() {
        let client_key = CtKey::forward(
            reply.client_addr,
            reply.frontend_addr,
            flow.dport,
            reply.frontend_port,
            flow.proto,
        );
        if let Some(fwd) = CT.get_ptr_mut(&client_key) {
            refresh(unsafe { &mut *fwd }, flow, now);
        }
    }
    Ok(Some(reply))
}

/// Records a new translated flow: the reply entry first (once the forward entry exists,
/// replies may already be on their way), then the forward entry. `client_seen_as` is the
/// source the backend will see (the hairpin address for hairpin flows).
#[inline(always)]
pub fn create(
    flow: &Flow,
    backend: &Selected,
    rev_nat_id: u16,
    client_seen_as: u32,
    now: u64,
) -> Result<(), ()> {
    let hairpin = backend.addr == flow.saddr;
    let lifetime = if flow.proto == PROTO_TCP {
        ct_timeout::TCP_SYN
    } else {
        ct_timeout::UDP
    };
    let forward = CtValue {
        backend_id: backend.backend_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        rev_nat_id,
        flags: if hairpin { CT_FLAG_HAIRPIN } else { 0 },
        _pad: 0,
        expires: now + lifetime * NS,
    };
    let reply = CtValue {
        nat_addr: flow.saddr,
        nat_port: flow.sport,
        ..forward
    };
    let reply_key = CtKey::reply(
        backend.addr,
        backend.port,
        client_seen_as,
        flow.sport,
        flow.proto,
    );
    let forward_key = CtKey::forward(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    // The address is marked before any entry exists: a reply can never find its entry
    // behind a missing mark.
    if !may_reply(backend.addr) {
        REPLY_ADDRS.insert(&backend.addr, &1, 0).map_err(|_| ())?;
    }
    CT.insert(&reply_key, &reply, 0).map_err(|_| ())?;
    CT.insert(&forward_key, &forward, 0).map_err(|_| ())
}

/// A new connection not for a Service (say, straight to a pod) may reuse the tuple of a
/// finished Service connection: forget that one's reply translation.
#[inline(always)]
pub fn forget_reused_tuple(flow: &Flow) {
    if flow.is_tcp_open() && may_reply(flow.daddr) {
        let _ = CT.remove(&CtKey::reply(
            flow.daddr, flow.dport, flow.saddr, flow.sport, flow.proto,
        ));
    }
}

/// Whether packets from `addr` may be replies of a translated flow (the tc programs sent a
/// flow to it): the small map's lookup spares every other packet the large table's.
#[inline(always)]
fn may_reply(addr: u32) -> bool {
    unsafe { REPLY_ADDRS.get(&addr) }.is_some()
}

/// Moves a forward entry along the TCP state machine and extends its lifetime.
#[inline(always)]
fn refresh(ct: &mut CtValue, flow: &Flow, now: u64) {
    let mut flags = ct.flags;
    let lifetime = if flow.proto == PROTO_TCP {
        if flow.is_tcp_close() {
            flags |= CT_FLAG_CLOSING;
        } else if flow.tcp_flags & TCP_ACK != 0 && flags & CT_FLAG_CLOSING == 0 {
            flags |= CT_FLAG_ESTABLISHED;
        }
        if flags & CT_FLAG_CLOSING != 0 {
            ct_timeout::TCP_CLOSE
        } else if flags & CT_FLAG_ESTABLISHED != 0 {
            ct_timeout::TCP_ESTABLISHED
        } else {
            ct_timeout::TCP_SYN
        }
    } else {
        ct_timeout::UDP
    };
    let expires = now + lifetime * NS;
    // Closing shortens the lifetime; otherwise write at most once a second per entry, so
    // busy flows do not bounce the cache line between CPUs.
    if flags != ct.flags || expires > ct.expires + NS {
        ct.flags = flags;
        ct.expires = expires;
    }
}
