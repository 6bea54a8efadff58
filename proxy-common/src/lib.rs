//! Map keys and values shared by the eBPF datapath (`proxy-ebpf`) and the node daemon (`proxy`).
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree on the byte layout.
//! Addresses and ports are stored in network byte order, exactly as they appear in packets,
//! so the datapath never converts them.
#![no_std]

/// Names of the maps, as pinned under the daemon's bpffs directory.
pub mod names {
    pub const SERVICES: &str = "FERRY_SERVICES";
    pub const BACKENDS: &str = "FERRY_BACKENDS";
    pub const REV_NAT: &str = "FERRY_REV_NAT";
    pub const CONNTRACK: &str = "FERRY_CT";
    pub const AFFINITY: &str = "FERRY_AFFINITY";
    pub const STATS: &str = "FERRY_STATS";
    pub const CONFIG: &str = "FERRY_CONFIG";
    pub const VETH_PEERS: &str = "FERRY_VETH_PEERS";
    pub const SOCK_REV: &str = "FERRY_SOCK_REV";
    pub const SOURCE_RANGES: &str = "FERRY_SOURCE_RANGES";
    pub const FRONTEND_ADDRS: &str = "FERRY_FRONTEND_ADDRS";
    pub const REPLY_ADDRS: &str = "FERRY_REPLY_ADDRS";
    /// Every map of the datapath object: the daemon's tests check the object holds exactly these.
    pub const MAPS: [&str; 12] = [
        SERVICES,
        BACKENDS,
        REV_NAT,
        CONNTRACK,
        AFFINITY,
        STATS,
        CONFIG,
        VETH_PEERS,
        SOCK_REV,
        SOURCE_RANGES,
        FRONTEND_ADDRS,
        REPLY_ADDRS,
    ];
    /// The tc classifier attached to the ingress of pod and node interfaces.
    pub const PROG_INGRESS: &str = "ferry_ingress";
    /// The tc classifier on the egress of the same interfaces: replies the node itself sends.
    pub const PROG_EGRESS: &str = "ferry_egress";
    /// The socket programs (cgroup v2 `sock_addr` hooks) of connect-time load balancing.
    pub const PROG_CONNECT4: &str = "ferry_connect4";
    pub const PROG_SENDMSG4: &str = "ferry_sendmsg4";
    pub const PROG_RECVMSG4: &str = "ferry_recvmsg4";
    pub const PROG_GETPEERNAME4: &str = "ferry_getpeername4";
}

/// Map sizes. The daemon refuses input that would not fit instead of half-programming a map.
pub mod limits {
    pub const SERVICES: u32 = 1 << 19;
    pub const BACKENDS: u32 = 1 << 18;
    pub const REV_NAT: u32 = 1 << 16;
    pub const CONNTRACK: u32 = 1 << 19;
    pub const AFFINITY: u32 = 1 << 16;
    pub const VETH_PEERS: u32 = 1 << 14;
    /// Sockets the socket programs translated (reverse entries, LRU).
    pub const SOCK_REV: u32 = 1 << 17;
    /// Distinct frontend addresses (at most one per frontend). Small on purpose: the tc program
    /// looks every packet's destination up here first, and a small table stays in cache.
    pub const FRONTEND_ADDRS: u32 = 1 << 16;
    /// Distinct backend addresses the tc programs translated a flow to (small for the same
    /// reason: every packet's source is looked up here before the conntrack reply lookup).
    pub const REPLY_ADDRS: u32 = 1 << 16;
    /// `loadBalancerSourceRanges` prefixes, over all frontends.
    pub const SOURCE_RANGES: u32 = 1 << 14;
    /// Largest backend count of one frontend (slots 1..=MAX_BACKENDS).
    pub const MAX_BACKENDS_PER_SERVICE: u16 = 4096;
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Key of the service map: one frontend (address, port, protocol) and a slot.
/// Slot 0 is the frontend's header (backend count, flags); slots 1..=count name backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl ServiceKey {
    pub const fn new(addr: u32, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            slot,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Service flag: ClientIP session affinity is on; `affinity_timeout` holds its seconds.
pub const SVC_FLAG_AFFINITY: u16 = 1 << 0;
/// Service flag: new flows are accepted only from the frontend's `loadBalancerSourceRanges`
/// (the source-range map, keyed by rev-NAT id and prefix). The socket programs leave such
/// frontends to the tc programs, which see the client's address.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 1;

/// Value of the service map. In slot 0: `count`, `flags`, `rev_nat_id`, `affinity_timeout`.
/// In slots 1..=count: `backend_id` (and `rev_nat_id`, repeated for convenience).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
    pub rev_nat_id: u16,
    pub _pad: u16,
    pub affinity_timeout: u32,
}

/// Value of the backend map, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the reverse-NAT map, keyed by a `u16` rev-NAT id: the frontend a reply must appear from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Conntrack direction: the tuple of a client's packets towards the frontend.
pub const CT_DIR_FORWARD: u8 = 0;
/// Conntrack direction: the tuple of the backend's replies, after translation.
pub const CT_DIR_REPLY: u8 = 1;

/// Key of the conntrack map (LRU hash), the 5-tuple as seen in the packet plus a direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The key of a client's packets towards a frontend (as they arrive, before translation).
    #[inline(always)]
    pub const fn forward(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        }
    }

    /// The key under which a backend's replies to a translated flow are found: from the
    /// backend to the client as the backend saw it (the hairpin address for hairpin flows).
    #[inline(always)]
    pub const fn reply(
        backend: u32,
        backend_port: u16,
        client: u32,
        client_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            saddr: backend,
            daddr: client,
            sport: backend_port,
            dport: client_port,
            proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        }
    }
}

// Bit 0 was "SYN seen": never read, so no longer written. An entry with neither of the next
// two flags is a connection still opening.
/// The connection is established (a non-SYN packet was seen after the SYN).
pub const CT_FLAG_ESTABLISHED: u16 = 1 << 1;
/// A FIN or RST was seen: the entry lives only for the short close timeout.
pub const CT_FLAG_CLOSING: u16 = 1 << 2;
/// The client is its own backend: the source is translated to the hairpin address.
pub const CT_FLAG_HAIRPIN: u16 = 1 << 3;

/// Value of the conntrack map.
/// Forward entries: `nat_addr:nat_port` is the backend the flow was sent to.
/// Reply entries: `nat_addr:nat_port` is the client (used to undo the hairpin source translation);
/// `rev_nat_id` names the frontend the reply must appear from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub backend_id: u32,
    pub nat_addr: u32,
    pub nat_port: u16,
    pub rev_nat_id: u16,
    pub flags: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) after which the entry is garbage.
    pub expires: u64,
}

/// Conntrack lifetimes, in seconds (the same figures Cilium uses by default).
pub mod ct_timeout {
    pub const TCP_SYN: u64 = 60;
    pub const TCP_ESTABLISHED: u64 = 21_600;
    pub const TCP_CLOSE: u64 = 10;
    pub const UDP: u64 = 60;
}

/// Key of the session-affinity map (LRU hash). The tc programs know a client by its address
/// (`netns` 0); the socket programs, which run before the socket has an address, by its network
/// namespace (`client` 0): a pod is one namespace, the node's own processes share one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns: u64,
    pub client: u32,
    pub rev_nat_id: u16,
    pub _pad: u16,
}

impl AffinityKey {
    #[inline(always)]
    pub const fn by_address(client: u32, rev_nat_id: u16) -> Self {
        Self {
            netns: 0,
            client,
            rev_nat_id,
            _pad: 0,
        }
    }
    #[inline(always)]
    pub const fn by_netns(netns_cookie: u64, rev_nat_id: u16) -> Self {
        Self {
            netns: netns_cookie,
            client: 0,
            rev_nat_id,
            _pad: 0,
        }
    }
}

/// Key of the socket reverse map: a socket the socket programs connected (or sent from) to a
/// backend, by its cookie and that backend. `recvmsg` and `getpeername` find the frontend there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of the socket reverse map: the frontend the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevValue {
    pub addr: u32,
    pub port: u16,
    pub rev_nat_id: u16,
}

/// Data of a source-range key (an LPM trie key: the prefix length counts the 32 bits of
/// `rev_nat_id` and `_pad`, then the bits of the address prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    pub rev_nat_id: u16,
    pub _pad: u16,
    pub addr: u32,
}

/// Value of the session-affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last new flow that used this entry.
    pub last_used: u64,
}

/// Per-CPU counters of one frontend, indexed by rev-NAT id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Packets (and their bytes) the tc programs sent to a backend.
    pub packets: u64,
    pub bytes: u64,
    /// Connects (and datagrams of unconnected UDP sockets) the socket programs sent to a
    /// backend.
    pub sockets: u64,
    /// New flows and connects refused because the frontend had no endpoint (both ways).
    pub refused: u64,
}

impl ServiceStats {
    /// The sum of two counter sets (per-CPU values into one).
    pub fn plus(self, o: Self) -> Self {
        Self {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
            sockets: self.sockets + o.sockets,
            refused: self.refused + o.refused,
        }
    }

    /// The growth since `last`, or `None` when a counter went back (a reused rev-NAT id
    /// starts from zero again).
    pub fn since(self, last: Self) -> Option<Self> {
        Some(Self {
            packets: self.packets.checked_sub(last.packets)?,
            bytes: self.bytes.checked_sub(last.bytes)?,
            sockets: self.sockets.checked_sub(last.sockets)?,
            refused: self.refused.checked_sub(last.refused)?,
        })
    }
}

/// Index in the config array: the hairpin source address (network order).
pub const CONFIG_HAIRPIN_ADDR: u32 = 0;
/// Index in the config array: `CONFIG_F_*` flags.
pub const CONFIG_FLAGS: u32 = 1;
/// Translated packets are forwarded by the program itself (FIB lookup and redirect to the
/// egress interface), skipping the host's IP stack.
pub const CONFIG_F_HOST_ROUTING: u32 = 1 << 0;
pub const CONFIG_LEN: u32 = 4;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
}
