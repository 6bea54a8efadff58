//! The datapath's maps and the daemon's configuration array.
//!
//! Map names are those of `proxy_common::names` (the daemon finds them by those names, and its
//! tests check the object holds exactly that set). Maps the daemon fills are allocated entry by
//! entry (BPF_F_NO_PREALLOC): their memory follows the number of Services instead of the
//! maximum. The conntrack and affinity maps are LRU maps, which the kernel always preallocates.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use proxy_common::{
    limits, AffinityKey, AffinityValue, Backend, CtKey, CtValue, RevNat, ServiceKey, ServiceStats,
    ServiceValue, SockRevKey, SockRevValue, SourceRangeKey, CONFIG_FLAGS, CONFIG_F_HOST_ROUTING,
    CONFIG_HAIRPIN_ADDR, CONFIG_LEN,
};

const BPF_F_NO_PREALLOC: u32 = 1 << 0;
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Addresses that are some frontend's (value: how many frontends have it, kept by the daemon):
/// a packet to any other address is not for a Service and skips the service and forward
/// conntrack lookups, whose large tables cost a cache miss each.
#[map(name = "FERRY_FRONTEND_ADDRS")]
pub static FRONTEND_ADDRS: HashMap<u32, u32> =
    HashMap::pinned(limits::FRONTEND_ADDRS, BPF_F_NO_PREALLOC);
/// Backend addresses the tc programs sent a flow to (value unused): only a packet from one of
/// them can be a reply to translate back, so any other skips the conntrack reply lookup. Set
/// before a flow's conntrack entries; the daemon's collector removes an address once it is no
/// backend and no reply entry has it.
#[map(name = "FERRY_REPLY_ADDRS")]
pub static REPLY_ADDRS: HashMap<u32, u32> = HashMap::pinned(limits::REPLY_ADDRS, BPF_F_NO_PREALLOC);
/// Frontends (slot 0) and their backend slots (1..=count).
#[map(name = "FERRY_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(limits::SERVICES, BPF_F_NO_PREALLOC);
#[map(name = "FERRY_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(limits::BACKENDS, BPF_F_NO_PREALLOC);
#[map(name = "FERRY_REV_NAT")]
pub static REV_NAT: HashMap<u16, RevNat> = HashMap::pinned(limits::REV_NAT, BPF_F_NO_PREALLOC);
/// Per-CPU LRU lists: inserts on a full map evict without a global lock.
#[map(name = "FERRY_CT")]
pub static CT: LruHashMap<CtKey, CtValue> =
    LruHashMap::pinned(limits::CONNTRACK, BPF_F_NO_COMMON_LRU);
#[map(name = "FERRY_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(limits::AFFINITY, 0);
#[map(name = "FERRY_STATS")]
pub static STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(limits::REV_NAT, 0);
/// Attached interfaces that are the host side of a veth pair (keyed by ifindex): a packet for
/// one of them can be handed straight to the peer's ingress in the pod (bpf_redirect_peer).
#[map(name = "FERRY_VETH_PEERS")]
pub static VETH_PEERS: HashMap<u32, u32> = HashMap::pinned(limits::VETH_PEERS, BPF_F_NO_PREALLOC);
/// Sockets the socket programs sent to a backend, for `recvmsg` and `getpeername` (LRU: a
/// socket that is gone leaves an entry that ages out).
#[map(name = "FERRY_SOCK_REV")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(limits::SOCK_REV, 0);
/// `loadBalancerSourceRanges` of the frontends flagged `SVC_FLAG_SOURCE_RANGES`.
#[map(name = "FERRY_SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::pinned(limits::SOURCE_RANGES, 0);
#[map(name = "FERRY_CONFIG")]
static CONFIG: Array<u32> = Array::pinned(CONFIG_LEN, 0);

/// The source address of hairpin flows, configured by the daemon.
#[inline(always)]
pub fn hairpin_addr() -> Result<u32, ()> {
    match CONFIG.get(CONFIG_HAIRPIN_ADDR) {
        Some(a) if *a != 0 => Ok(*a),
        _ => Err(()),
    }
}

/// Whether the program forwards translated packets itself (BPF host routing).
#[inline(always)]
pub fn host_routing() -> bool {
    matches!(CONFIG.get(CONFIG_FLAGS), Some(f) if *f & CONFIG_F_HOST_ROUTING != 0)
}
