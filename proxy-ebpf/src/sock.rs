//! Connect-time load balancing: cgroup v2 `sock_addr` programs translate a frontend to a
//! backend once, when a socket connects (TCP, connected UDP) or sends a datagram (unconnected
//! UDP), so the flow's packets need no per-packet translation and no conntrack entry. The
//! reverse entries, keyed by socket cookie and backend, make `recvmsg` and `getpeername` show
//! the frontend the application asked for.
//!
//! Frontends with `loadBalancerSourceRanges` are left to the tc programs: a socket has no
//! source address yet when it connects, so only the packet path can check the ranges.

use aya_ebpf::helpers::{
    bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
};
use aya_ebpf::programs::SockAddrContext;
use aya_ebpf::EbpfContext as _;
use proxy_common::{
    AffinityKey, SockRevKey, SockRevValue, PROTO_TCP, PROTO_UDP, SVC_FLAG_SOURCE_RANGES,
};

use crate::lb::{self, Frontend};
use crate::maps::{REV_NAT, SOCK_REV};
use crate::metrics;

/// Verdicts of `sock_addr` programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// `connect()` (TCP and UDP) and `sendmsg()` with an address (unconnected UDP): a frontend
/// becomes one of its backends; a frontend without endpoints fails with ECONNREFUSED.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let fe = Frontend {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        proto,
    };
    let Some(head) = lb::frontend(fe) else {
        return ALLOW;
    };
    if head.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        return ALLOW;
    }
    let rev_nat_id = head.rev_nat_id;
    let now = unsafe { bpf_ktime_get_ns() };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(backend) = lb::select(fe, head, AffinityKey::by_netns(netns, rev_nat_id), now) else {
        metrics::count_refused(rev_nat_id);
        return refuse();
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let value = SockRevValue {
        addr: fe.addr,
        port: fe.port,
        rev_nat_id,
    };
    // Without its reverse entry the socket would see the backend's address: leave the
    // frontend to the tc programs then (an LRU insert practically never fails).
    if SOCK_REV.insert(&key, &value, 0).is_err() {
        return ALLOW;
    }
    sa.user_ip4 = backend.addr;
    sa.user_port = backend.port as u32;
    metrics::count_socket(rev_nat_id);
    ALLOW
}

/// `recvmsg()` of a UDP socket and `getpeername()`: a backend the socket was sent to shows
/// as the frontend, while that frontend exists.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        _pad: 0,
    };
    let Some(rev) = (unsafe { SOCK_REV.get(&key) }) else {
        return ALLOW;
    };
    let live = matches!(unsafe { REV_NAT.get(&rev.rev_nat_id) },
        Some(r) if r.addr == rev.addr && r.port == rev.port);
    if live {
        sa.user_ip4 = rev.addr;
        sa.user_port = rev.port as u32;
    } else {
        let _ = SOCK_REV.remove(&key);
    }
    ALLOW
}

/// Fails the call with ECONNREFUSED, as a Service without endpoints does under kube-proxy.
#[inline(always)]
fn refuse() -> i32 {
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}
