//! Forwarding a packet. With host routing on, the program looks the route up in the kernel's
//! FIB and redirects the packet to the egress interface itself (as Cilium's BPF host routing
//! does), skipping the host IP stack; into the pod's side directly when the egress is a pod
//! veth. Translated packets go wherever the FIB says; untranslated ones (pod to pod, and every
//! packet of a socket the socket programs translated) only into a pod of this node. Whatever
//! the FIB cannot answer (no route, forwarding off, TTL running out, needs fragmenting) goes
//! through the stack as usual.

use aya_ebpf::bindings::{
    bpf_fib_lookup, bpf_fib_lookup__bindgen_ty_1, bpf_fib_lookup__bindgen_ty_2,
    bpf_fib_lookup__bindgen_ty_3, bpf_fib_lookup__bindgen_ty_4, bpf_fib_lookup__bindgen_ty_5,
    BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
};
use aya_ebpf::helpers::{
    bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
};
use aya_ebpf::programs::TcContext;

use crate::maps::{host_routing, VETH_PEERS};
use crate::parse::{
    read, Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TOS_OFF, IP_TOT_LEN_OFF, IP_TTL_OFF,
};

/// The tc verdict for a translated packet: forwarded wherever the FIB says.
#[inline(always)]
pub fn forward(ctx: &TcContext, flow: &Flow) -> i32 {
    route(ctx, flow, false)
}

/// The tc verdict for a packet no program translated (pod to pod, every packet of a socket the
/// socket programs translated at connect): handed straight to a pod of this node, as the
/// translated ones are, and to the host stack for anything else (the node itself, other nodes,
/// the outside world, whose masquerading and filtering the stack does).
#[inline(always)]
pub fn pass(ctx: &TcContext, flow: &Flow) -> i32 {
    route(ctx, flow, true)
}

#[inline(always)]
fn route(ctx: &TcContext, flow: &Flow, only_to_pods: bool) -> i32 {
    if !host_routing() {
        return TC_ACT_OK;
    }
    let (Ok(saddr), Ok(daddr), Ok(ttl_proto), Ok(tot_len), Ok(tos)) = (
        read::<u32>(ctx, IP_SRC_OFF),
        read::<u32>(ctx, IP_DST_OFF),
        read::<u16>(ctx, IP_TTL_OFF),
        read::<u16>(ctx, IP_TOT_LEN_OFF),
        read::<u8>(ctx, IP_TOS_OFF),
    ) else {
        return TC_ACT_OK;
    };
    // TTL is the first byte of the (TTL, protocol) word, in network order.
    let ttl = (u16::from_be(ttl_proto) >> 8) as u8;
    if ttl <= 1 {
        return TC_ACT_OK; // the stack sends ICMP time exceeded
    }
    let mut p = bpf_fib_lookup {
        family: 2, // AF_INET
        l4_protocol: flow.proto,
        sport: 0,
        dport: 0,
        __bindgen_anon_1: bpf_fib_lookup__bindgen_ty_1 {
            tot_len: u16::from_be(tot_len),
        },
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        __bindgen_anon_2: bpf_fib_lookup__bindgen_ty_2 {
            rt_metric: tos as u32,
        },
        __bindgen_anon_3: bpf_fib_lookup__bindgen_ty_3 {
            ipv6_src: [saddr, 0, 0, 0],
        },
        __bindgen_anon_4: bpf_fib_lookup__bindgen_ty_4 {
            ipv6_dst: [daddr, 0, 0, 0],
        },
        __bindgen_anon_5: bpf_fib_lookup__bindgen_ty_5 { tbid: 0 },
        smac: [0; 6],
        dmac: [0; 6],
    };
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_OK;
    }
    let ifindex = p.ifindex;
    let to_pod =
        rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && unsafe { VETH_PEERS.get(ifindex) }.is_some();
    if only_to_pods && !to_pod {
        return TC_ACT_OK; // untouched: the stack routes it
    }
    // Forwarding decrements the TTL; the IP checksum follows.
    let new_ttl_proto = u16::to_be(u16::from_be(ttl_proto) - 0x100);
    if ctx
        .l3_csum_replace(IP_CSUM_OFF, ttl_proto as u64, new_ttl_proto as u64, 2)
        .is_err()
        || ctx.store(IP_TTL_OFF, &new_ttl_proto, 0).is_err()
    {
        return TC_ACT_OK;
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let (dmac, smac) = (p.dmac, p.smac);
        if ctx.store(0, &dmac, 0).is_err() || ctx.store(6, &smac, 0).is_err() {
            return TC_ACT_SHOT;
        }
        if to_pod {
            // Into the pod's own ingress: no second pass through a backlog queue.
            unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
        } else {
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
    } else {
        // No neighbour entry yet: the kernel resolves it and fills in the addresses.
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    }
}
