//! Packet parsing: the offsets of the headers the datapath reads and writes, and the `Flow`
//! (5-tuple, TCP flags, where the L4 header starts) of an IPv4 TCP/UDP packet.
//!
//! Everything the parser does not understand (non-IPv4, IPv6, other protocols, non-first
//! fragments, headers cut short) yields no flow, and the packet passes untouched.

use aya_ebpf::programs::TcContext;
use proxy_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_TOS_OFF: usize = ETH_HLEN + 1;
pub const IP_TOT_LEN_OFF: usize = ETH_HLEN + 2;
const IP_FRAG_OFF: usize = ETH_HLEN + 6;
pub const IP_TTL_OFF: usize = ETH_HLEN + 8;
pub const IP_PROTO_OFF: usize = ETH_HLEN + 9;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_CSUM_OFF: usize = 16;
const TCP_FLAGS_OFF: usize = 13;
const UDP_CSUM_OFF: usize = 6;
pub const SPORT_OFF: usize = 0;
pub const DPORT_OFF: usize = 2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The parts of a packet the load balancer looks at. Addresses and ports in network order.
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub l4_off: usize,
}

impl Flow {
    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == PROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            }
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    pub fn is_tcp_open(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A TCP segment that closes a connection (FIN or RST).
    #[inline(always)]
    pub fn is_tcp_close(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}

/// The flow of an IPv4 TCP/UDP packet; `Ok(None)` for traffic the load balancer leaves alone,
/// `Err` when a header the packet claims to have is cut short.
///
/// The common packet (IPv4 without options, every byte the parser reads in the linear part) is
/// read in place after one bounds check, as the verifier allows; any other is read through the
/// copying helper, which reaches into paged data too. One parser serves both.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Flow>, ()> {
    let data = ctx.data();
    if data + ETH_HLEN + IP_HLEN + L4_READ <= ctx.data_end()
        // SAFETY: within the bounds just checked.
        && unsafe { *((data + ETH_HLEN) as *const u8) } == IPV4_NO_OPTIONS
    {
        flow(&InPlace(data))
    } else {
        flow(&Copied(ctx))
    }
}

/// A header field at `off`: read in place when it is in the linear part (one bounds check),
/// else copied out by the helper.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let data = ctx.data();
    if data + off + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: within the packet's linear part, as just checked.
        Ok(unsafe { *((data + off) as *const T) })
    } else {
        ctx.load(off).map_err(|_| ())
    }
}

/// Bytes of an IPv4 header without options.
const IP_HLEN: usize = 20;
/// Version 4, five words of header: no options.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// The TCP header's bytes up to its flags: the most the parser reads of L4.
const L4_READ: usize = TCP_FLAGS_OFF + 1;

/// Where the parser's fields come from.
trait Fields {
    fn get<T: Copy>(&self, off: usize) -> Result<T, ()>;
    /// The IP header's length given its first byte (version and IHL).
    fn ip_hlen(&self, vihl: u8) -> usize;
}

/// The linear part at this address, checked by `parse` for every offset `flow` asks for: a
/// header without options, so the L4 offset is a constant the verifier can follow.
struct InPlace(usize);

impl Fields for InPlace {
    #[inline(always)]
    fn get<T: Copy>(&self, off: usize) -> Result<T, ()> {
        // SAFETY: within the bounds `parse` checked.
        Ok(unsafe { *((self.0 + off) as *const T) })
    }

    #[inline(always)]
    fn ip_hlen(&self, _vihl: u8) -> usize {
        IP_HLEN
    }
}

/// Any packet, through the copying helper.
struct Copied<'a>(&'a TcContext);

impl Fields for Copied<'_> {
    #[inline(always)]
    fn get<T: Copy>(&self, off: usize) -> Result<T, ()> {
        self.0.load(off).map_err(|_| ())
    }

    #[inline(always)]
    fn ip_hlen(&self, vihl: u8) -> usize {
        ((vihl & 0x0f) as usize) * 4
    }
}

#[inline(always)]
fn flow(f: &impl Fields) -> Result<Option<Flow>, ()> {
    let eth_proto = u16::from_be(f.get::<u16>(12)?);
    if eth_proto != ETH_P_IP {
        return Ok(None);
    }
    let vihl: u8 = f.get(ETH_HLEN)?;
    if vihl >> 4 != 4 {
        return Ok(None);
    }
    let ihl = f.ip_hlen(vihl);
    if ihl < IP_HLEN {
        return Ok(None);
    }
    let proto: u8 = f.get(IP_PROTO_OFF)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    // Non-first fragments carry no ports: leave them alone.
    let frag = u16::from_be(f.get::<u16>(IP_FRAG_OFF)?);
    if frag & 0x1fff != 0 {
        return Ok(None);
    }
    let l4_off = ETH_HLEN + ihl;
    let tcp_flags = if proto == PROTO_TCP {
        f.get::<u8>(l4_off + TCP_FLAGS_OFF)?
    } else {
        0
    };
    Ok(Some(Flow {
        saddr: f.get(IP_SRC_OFF)?,
        daddr: f.get(IP_DST_OFF)?,
        sport: f.get(l4_off + SPORT_OFF)?,
        dport: f.get(l4_off + DPORT_OFF)?,
        proto,
        tcp_flags,
        l4_off,
    }))
}
