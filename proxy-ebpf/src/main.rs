//! Ferry's Service load balancer: tc classifiers on the ingress and egress of the host side of
//! pod interfaces and of node interfaces that receive NodePort traffic (per packet), and cgroup
//! socket programs that translate once per connect (`sock`, connect-time load balancing).
//!
//! This file holds only the steps of a packet's way; each concern has its module:
//! `parse` (headers and the flow), `conntrack` (entries, lookup, refresh), `lb` (frontend and
//! backend choice, affinity), `nat` (translation and checksums), `forward` (FIB and redirect),
//! `metrics` (counters), `maps` (the maps and the daemon's configuration), `reject` (the
//! ICMP answer for a Service without endpoints), `icmp` (ICMP errors about translated flows), `sock` (the socket programs).
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod icmp;
mod lb;
mod maps;
mod metrics;
mod nat;
mod parse;
mod reject;
mod sock;

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{cgroup_sock_addr, classifier};
use aya_ebpf::programs::{SockAddrContext, TcContext};
use proxy_common::AffinityKey;

#[classifier]
pub fn ferry_ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(action) => action,
        // A packet we cannot parse or translate is left to the kernel, never dropped silently.
        Err(()) => TC_ACT_OK,
    }
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<i32, ()> {
    // 0. Only IPv4 TCP/UDP with ports is for us; the rest (ICMP, IPv6, fragments) passes,
    //    ICMP errors about a translated flow translated back.
    let Some(flow) = parse::parse(ctx)? else {
        let _ = icmp::rev_nat_error(ctx);
        return Ok(TC_ACT_OK);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Only an address some frontend has can start or continue a flow to a frontend: for any
    // other (pod to pod, a socket the socket programs translated) steps 1 and 3 are skipped.
    let to_frontend = lb::is_frontend_addr(flow.daddr);

    // 1. An established flow towards a frontend keeps its backend.
    if to_frontend {
        if let Some(ct) = conntrack::lookup_forward(&flow, now)? {
            metrics::count(ct.rev_nat_id, ctx.len());
            nat::dnat(ctx, &flow, ct.backend_addr, ct.backend_port, ct.hairpin)?;
            return Ok(forward::forward(ctx, &flow));
        }
    }

    // 2. A backend's reply appears to come from the frontend (before the service lookup:
    //    replies are far more common than new flows).
    if let Some(reply) = conntrack::lookup_reply(&flow, now)? {
        nat::rev_nat_reply(ctx, &flow, &reply)?;
        return Ok(forward::forward(ctx, &flow));
    }

    // 3. A new flow towards a frontend: pick a backend, track the flow, translate it. A pod
    //    picked as its own backend (hairpin) is seen by itself as the hairpin address, so the
    //    reply comes back through this program.
    let fe = lb::Frontend {
        addr: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
    };
    let head = if to_frontend { lb::frontend(fe) } else { None };
    if let Some(head) = head {
        let rev_nat_id = head.rev_nat_id;
        if !lb::source_allowed(head, flow.saddr) {
            // Outside the load balancer's source ranges: dropped, as kube-proxy does.
            return Ok(TC_ACT_SHOT);
        }
        if head.count == 0 {
            // No endpoint: refused at once, as kube-proxy does.
            metrics::count_refused(rev_nat_id);
            return Ok(reject::port_unreachable(ctx, &flow));
        }
        let client = AffinityKey::by_address(flow.saddr, rev_nat_id);
        let Some(backend) = lb::select(fe, head, client, now) else {
            return Ok(TC_ACT_SHOT);
        };
        let hairpin = backend.addr == flow.saddr;
        let client_seen_as = if hairpin {
            maps::hairpin_addr()?
        } else {
            flow.saddr
        };
        if conntrack::create(&flow, &backend, rev_nat_id, client_seen_as, now).is_err() {
            return Ok(TC_ACT_SHOT);
        }
        metrics::count(rev_nat_id, ctx.len());
        nat::dnat(ctx, &flow, backend.addr, backend.port, hairpin)?;
        return Ok(forward::forward(ctx, &flow));
    }

    // 4. Not for a Service: passes untranslated, straight into the pod when it is for one of
    //    this node's.
    conntrack::forget_reused_tuple(&flow);
    Ok(forward::pass(ctx, &flow))
}

/// The egress of the same interfaces. A backend that is the node itself (the API server behind
/// the `kubernetes` Service, a hostNetwork pod) answers from the node's stack, so its replies
/// never cross an ingress hook: they are translated back to the frontend here. Nothing else is
/// touched, and packets the ingress hook redirected into a pod never pass here.
#[classifier]
pub fn ferry_egress(ctx: TcContext) -> i32 {
    let _ = try_egress(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<(), ()> {
    // Only what the node's own stack sends can be such a reply (or an ICMP error about a
    // translated flow): a forwarded packet (pod to pod) carries the interface it arrived on
    // and is left alone without a lookup.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return Ok(());
    }
    let Some(flow) = parse::parse(ctx)? else {
        let _ = icmp::rev_nat_error(ctx);
        return Ok(());
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(reply) = conntrack::lookup_reply(&flow, now)? {
        nat::rev_nat_reply(ctx, &flow, &reply)?;
    }
    Ok(())
}

/// Socket programs, attached to a cgroup v2 (the root: every process of the node).
#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ferry_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ferry_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ferry_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
