//! Ferry's Service load balancer, attached as a tc classifier on the ingress of the host side of
//! pod interfaces and of node interfaces that receive NodePort traffic.
//!
//! For each IPv4 TCP/UDP packet:
//! 1. a forward conntrack hit sends the flow to the backend it already has (DNAT);
//! 2. otherwise a service-map hit (VIP or node address, port, protocol) picks a backend (session
//!    affinity first, else a random slot), records the flow in conntrack and translates it;
//! 3. otherwise a reply conntrack hit translates a backend's reply back to the frontend (rev-NAT);
//! 4. everything else (ICMP, non-service traffic) passes untouched.
//!
//! A pod that reaches a Service and is picked as its own backend (hairpin) gets its source
//! translated to the hairpin address, so the reply comes back through this program.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    bpf_fib_lookup__bindgen_ty_1, bpf_fib_lookup__bindgen_ty_2, bpf_fib_lookup__bindgen_ty_3,
    bpf_fib_lookup__bindgen_ty_4, bpf_fib_lookup__bindgen_ty_5,
};
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect,
        bpf_redirect_neigh, bpf_redirect_peer,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use proxy_common::{
    ct_timeout, limits, AffinityKey, AffinityValue, Backend, CtKey, CtValue, RevNat, ServiceKey,
    ServiceStats, ServiceValue, CONFIG_FLAGS, CONFIG_F_HOST_ROUTING, CONFIG_HAIRPIN_ADDR,
    CONFIG_LEN, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED,
    CT_FLAG_HAIRPIN, CT_FLAG_SYN, PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY,
};

// Maps the daemon fills are allocated entry by entry (BPF_F_NO_PREALLOC): their memory follows
// the number of Services instead of the maximum. The conntrack and affinity maps are LRU maps,
// which the kernel always preallocates.
#[map(name = "FERRY_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(limits::SERVICES, BPF_F_NO_PREALLOC);
#[map(name = "FERRY_BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(limits::BACKENDS, BPF_F_NO_PREALLOC);
#[map(name = "FERRY_REV_NAT")]
static REV_NAT: HashMap<u16, RevNat> = HashMap::pinned(limits::REV_NAT, BPF_F_NO_PREALLOC);
#[map(name = "FERRY_CT")]
// Per-CPU LRU lists: inserts on a full map evict without a global lock.
static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(limits::CONNTRACK, BPF_F_NO_COMMON_LRU);
#[map(name = "FERRY_AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(limits::AFFINITY, 0);
#[map(name = "FERRY_STATS")]
static STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(limits::REV_NAT, 0);
/// Attached interfaces that are the host side of a veth pair (keyed by ifindex): a packet for
/// one of them can be handed straight to the peer's ingress in the pod (bpf_redirect_peer).
#[map(name = "FERRY_VETH_PEERS")]
static VETH_PEERS: HashMap<u32, u32> = HashMap::pinned(limits::VETH_PEERS, BPF_F_NO_PREALLOC);
#[map(name = "FERRY_CONFIG")]
static CONFIG: Array<u32> = Array::pinned(CONFIG_LEN, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_NO_PREALLOC: u32 = 1 << 0;
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const NS: u64 = 1_000_000_000;

#[classifier]
pub fn ferry_ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(action) => action,
        // A packet we cannot parse or translate is left to the kernel, never dropped silently.
        Err(()) => TC_ACT_OK,
    }
}

/// The parts of a packet the load balancer looks at.
struct Flow {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    l4_off: usize,
}

impl Flow {
    fn csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == PROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            }
    }

    fn l4_flags(&self) -> u64 {
        if self.proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0
        } else {
            0
        }
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Option<Flow>, ()> {
    let eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    if eth_proto != ETH_P_IP {
        return Ok(None);
    }
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if vihl >> 4 != 4 {
        return Ok(None);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Ok(None);
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    // Non-first fragments carry no ports: leave them alone.
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).map_err(|_| ())?);
    if frag & 0x1fff != 0 {
        return Ok(None);
    }
    let l4_off = ETH_HLEN + ihl;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4_off + 13).map_err(|_| ())?
    } else {
        0
    };
    Ok(Some(Flow {
        saddr: ctx.load(IP_SRC_OFF).map_err(|_| ())?,
        daddr: ctx.load(IP_DST_OFF).map_err(|_| ())?,
        sport: ctx.load(l4_off).map_err(|_| ())?,
        dport: ctx.load(l4_off + 2).map_err(|_| ())?,
        proto,
        tcp_flags,
        l4_off,
    }))
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let Some(flow) = parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let now = unsafe { bpf_ktime_get_ns() };

    // 1. An established flow towards a frontend.
    let fwd_key = CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    if let Some(ct) = CT.get_ptr_mut(&fwd_key) {
        let ct = unsafe { &mut *ct };
        let reopened = flow.proto == PROTO_TCP
            && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && ct.flags & CT_FLAG_CLOSING != 0;
        let hairpin = ct.flags & CT_FLAG_HAIRPIN != 0;
        let (addr, port) = (ct.nat_addr, ct.nat_port);
        if !reopened && ct.expires > now {
            refresh(ct, &flow, now);
            count(ct.rev_nat_id, ctx.len());
            translate_forward(ctx, &flow, addr, port, hairpin)?;
            return Ok(forward(ctx, &flow));
        }
        // The tuple is reused by a new connection: its old reply entry must not outlive it.
        let client_seen_as = if hairpin { hairpin_addr()? } else { flow.saddr };
        let _ = CT.remove(&reply_key_of(
            addr,
            port,
            client_seen_as,
            flow.sport,
            flow.proto,
        ));
    }

    // 2. A backend's reply (before the service lookup: replies are far more common than
    //    new flows).
    let reply_key = CtKey {
        dir: CT_DIR_REPLY,
        ..fwd_key
    };
    if let Some(ct) = unsafe { CT.get(&reply_key) } {
        let Some(rev) = (unsafe { REV_NAT.get(ct.rev_nat_id) }) else {
            return Ok(TC_ACT_OK);
        };
        let (frontend_addr, frontend_port) = (rev.addr, rev.port);
        let hairpin = ct.flags & CT_FLAG_HAIRPIN != 0;
        let client_addr = ct.nat_addr;
        // The connection's state lives in its forward entry, which the client's packets keep
        // fresh; a reply updates it when it closes the connection, or for UDP (a stream of
        // answers to one request).
        if flow.proto == PROTO_UDP || flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            let client_key = CtKey {
                saddr: client_addr,
                daddr: frontend_addr,
                sport: flow.dport,
                dport: frontend_port,
                proto: flow.proto,
                dir: CT_DIR_FORWARD,
                _pad: [0; 2],
            };
            if let Some(fwd) = CT.get_ptr_mut(&client_key) {
                refresh(unsafe { &mut *fwd }, &flow, now);
            }
        }
        set_addr(ctx, &flow, IP_SRC_OFF, flow.saddr, frontend_addr)?;
        set_port(ctx, &flow, flow.l4_off, flow.sport, frontend_port)?;
        if hairpin {
            set_addr(ctx, &flow, IP_DST_OFF, flow.daddr, client_addr)?;
        }
        return Ok(forward(ctx, &flow));
    }

    // 3. A new flow towards a frontend.
    let head_key = ServiceKey::new(flow.daddr, flow.dport, flow.proto, 0);
    if let Some(head) = unsafe { SERVICES.get(&head_key) } {
        return new_flow(ctx, &flow, &fwd_key, head, now);
    }

    // 4. Not for a Service. A new connection (say, straight to a pod) may reuse the tuple of a
    //    finished Service connection: forget that one's reply translation.
    if flow.proto == PROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        let reverse = reply_key_of(flow.daddr, flow.dport, flow.saddr, flow.sport, flow.proto);
        let _ = CT.remove(&reverse);
    }
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    flow: &Flow,
    fwd_key: &CtKey,
    head: &ServiceValue,
    now: u64,
) -> Result<i32, ()> {
    let count_ = head.count;
    let rev_nat_id = head.rev_nat_id;
    if count_ == 0 {
        // A Service without endpoints: refuse the flow, as kube-proxy does.
        return Ok(TC_ACT_SHOT);
    }
    let affinity_key = AffinityKey {
        client: flow.saddr,
        rev_nat_id,
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
        let slot = (unsafe { bpf_get_prandom_u32() } % count_ as u32) as u16 + 1;
        let slot_key = ServiceKey::new(flow.daddr, flow.dport, flow.proto, slot);
        let Some(s) = (unsafe { SERVICES.get(&slot_key) }) else {
            return Ok(TC_ACT_SHOT);
        };
        backend_id = s.backend_id;
        backend = unsafe { BACKENDS.get(backend_id) };
    }
    let Some(backend) = backend else {
        return Ok(TC_ACT_SHOT);
    };
    let (backend_addr, backend_port) = (backend.addr, backend.port);
    if affinity {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used: now,
        };
        let _ = AFFINITY.insert(&affinity_key, &value, 0);
    }

    let hairpin = backend_addr == flow.saddr;
    let mut flags = if hairpin { CT_FLAG_HAIRPIN } else { 0 };
    let lifetime = if flow.proto == PROTO_TCP {
        flags |= CT_FLAG_SYN;
        ct_timeout::TCP_SYN
    } else {
        ct_timeout::UDP
    };
    let client_seen_as = if hairpin { hairpin_addr()? } else { flow.saddr };
    let value = CtValue {
        backend_id,
        nat_addr: backend_addr,
        nat_port: backend_port,
        rev_nat_id,
        flags,
        _pad: 0,
        expires: now + lifetime * NS,
    };
    let reply_key = reply_key_of(
        backend_addr,
        backend_port,
        client_seen_as,
        flow.sport,
        flow.proto,
    );
    let reply = CtValue {
        nat_addr: flow.saddr,
        nat_port: flow.sport,
        ..value
    };
    // Reply entry first: once the forward entry exists, replies may already be on their way.
    if CT.insert(&reply_key, &reply, 0).is_err() || CT.insert(fwd_key, &value, 0).is_err() {
        return Ok(TC_ACT_SHOT);
    }
    count(rev_nat_id, ctx.len());
    translate_forward(ctx, flow, backend_addr, backend_port, hairpin)?;
    Ok(forward(ctx, flow))
}

/// Sends a translated packet on its way. With host routing on, the program looks the route up
/// in the kernel's FIB and redirects the packet to the egress interface itself (as Cilium's BPF
/// host routing does), skipping the host IP stack; into the pod's side directly when the egress
/// is a pod veth; whatever the FIB cannot answer (no route,
/// forwarding off, TTL running out, needs fragmenting) goes through the stack as usual.
#[inline(always)]
fn forward(ctx: &TcContext, flow: &Flow) -> i32 {
    let on = matches!(CONFIG.get(CONFIG_FLAGS), Some(f) if *f & CONFIG_F_HOST_ROUTING != 0);
    if !on {
        return TC_ACT_OK;
    }
    let (Ok(saddr), Ok(daddr), Ok(ttl_proto), Ok(tot_len), Ok(tos)) = (
        ctx.load::<u32>(IP_SRC_OFF),
        ctx.load::<u32>(IP_DST_OFF),
        ctx.load::<u16>(ETH_HLEN + 8),
        ctx.load::<u16>(ETH_HLEN + 2),
        ctx.load::<u8>(ETH_HLEN + 1),
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
    // Forwarding decrements the TTL; the IP checksum follows.
    let new_ttl_proto = u16::to_be(u16::from_be(ttl_proto) - 0x100);
    if ctx
        .l3_csum_replace(IP_CSUM_OFF, ttl_proto as u64, new_ttl_proto as u64, 2)
        .is_err()
        || ctx.store(ETH_HLEN + 8, &new_ttl_proto, 0).is_err()
    {
        return TC_ACT_OK;
    }
    let ifindex = p.ifindex;
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let (dmac, smac) = (p.dmac, p.smac);
        if ctx.store(0, &dmac, 0).is_err() || ctx.store(6, &smac, 0).is_err() {
            return TC_ACT_SHOT;
        }
        if unsafe { VETH_PEERS.get(ifindex) }.is_some() {
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

/// The key under which replies of a translated flow are found.
#[inline(always)]
fn reply_key_of(
    backend: u32,
    backend_port: u16,
    client: u32,
    client_port: u16,
    proto: u8,
) -> CtKey {
    CtKey {
        saddr: backend,
        daddr: client,
        sport: backend_port,
        dport: client_port,
        proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// The source address of hairpin flows, configured by the daemon.
#[inline(always)]
fn hairpin_addr() -> Result<u32, ()> {
    match CONFIG.get(CONFIG_HAIRPIN_ADDR) {
        Some(a) if *a != 0 => Ok(*a),
        _ => Err(()),
    }
}

/// Moves a conntrack entry along the TCP state machine and extends its lifetime.
#[inline(always)]
fn refresh(ct: &mut CtValue, flow: &Flow, now: u64) {
    let mut flags = ct.flags;
    let lifetime = if flow.proto == PROTO_TCP {
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
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

#[inline(always)]
fn count(rev_nat_id: u16, len: u32) {
    if let Some(s) = STATS.get_ptr_mut(rev_nat_id as u32) {
        let s = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += len as u64;
    }
}

#[inline(always)]
fn translate_forward(
    ctx: &TcContext,
    flow: &Flow,
    addr: u32,
    port: u16,
    hairpin: bool,
) -> Result<(), ()> {
    if hairpin {
        set_addr(ctx, flow, IP_SRC_OFF, flow.saddr, hairpin_addr()?)?;
    }
    set_addr(ctx, flow, IP_DST_OFF, flow.daddr, addr)?;
    set_port(ctx, flow, flow.l4_off + 2, flow.dport, port)
}

#[inline(always)]
fn set_addr(ctx: &TcContext, flow: &Flow, off: usize, old: u32, new: u32) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        flow.csum_off(),
        old as u64,
        new as u64,
        BPF_F_PSEUDO_HDR | flow.l4_flags() | 4,
    )
    .map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

#[inline(always)]
fn set_port(ctx: &TcContext, flow: &Flow, off: usize, old: u16, new: u16) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(flow.csum_off(), old as u64, new as u64, flow.l4_flags() | 2)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
