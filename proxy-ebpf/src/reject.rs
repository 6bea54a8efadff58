//! Refusing a new flow to a frontend without endpoints, as kube-proxy's REJECT rule does: the
//! packet is turned into an ICMP "port unreachable" to its sender and sent back out of the
//! interface it came in on, so a TCP `connect()` fails at once with ECONNREFUSED and a
//! connected UDP socket's next call gets it too, instead of waiting for a timeout.
//!
//! The reply is written in place: the packet is cut (or padded) to Ethernet + IPv4 + ICMP +
//! the original IPv4 header and the first 8 bytes of its L4 header (RFC 792), then those bytes
//! are stored whole with both checksums computed here. It comes from the address the client
//! asked for (the frontend), which is what the client's stack matches it against anyway.
//! Packets with IP options are dropped instead (the quoted header would not fit the layout).
//!
//! Only packets that came from a socket on this node (a pod's) can carry a partial checksum
//! (`CHECKSUM_PARTIAL`), and those go back to the same veth, whose receiver trusts it; a
//! device completing it is never on that way.

use aya_ebpf::bindings::TC_ACT_SHOT;
use aya_ebpf::helpers::{bpf_redirect, bpf_skb_change_tail};
use aya_ebpf::programs::TcContext;

use crate::parse::{Flow, ETH_HLEN};

const IP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// What the ICMP error quotes: the original IPv4 header and 8 bytes of what follows.
const QUOTE: usize = IP_HLEN + 8;
/// The reply after the Ethernet header.
const REPLY: usize = IP_HLEN + ICMP_HLEN + QUOTE;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const PROTO_ICMP: u8 = 1;

/// Turns the packet into the ICMP error and returns the verdict that sends it (or drops the
/// packet when it cannot be built).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, flow: &Flow) -> i32 {
    match build(ctx, flow) {
        Ok(()) => unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 },
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn build(ctx: &TcContext, flow: &Flow) -> Result<(), ()> {
    if flow.l4_off != ETH_HLEN + IP_HLEN {
        return Err(());
    }
    let mut out = [0u8; REPLY];
    // The quote first, while the packet is whole (a UDP packet may have nothing after its 8
    // header bytes; every TCP/UDP packet the parser accepted has those 8).
    // (Fixed-size loads: the verifier refuses a read whose length may be zero.)
    let quote: [u8; QUOTE] = ctx.load(ETH_HLEN).map_err(|_| ())?;
    out[IP_HLEN + ICMP_HLEN..].copy_from_slice(&quote);
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;

    // IPv4 header: from the frontend the client asked for, back to the client.
    out[0] = 0x45;
    out[1] = 0xc0; // precedence "internetwork control", as the kernel's ICMP errors
    out[2..4].copy_from_slice(&(REPLY as u16).to_be_bytes());
    out[8] = 64;
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&flow.daddr.to_ne_bytes());
    out[16..20].copy_from_slice(&flow.saddr.to_ne_bytes());
    let ip_sum = checksum(&out[..IP_HLEN]);
    out[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // ICMP header and its checksum over header and quote.
    out[IP_HLEN] = ICMP_DEST_UNREACH;
    out[IP_HLEN + 1] = ICMP_PORT_UNREACH;
    let icmp_sum = checksum(&out[IP_HLEN..]);
    out[IP_HLEN + 2..IP_HLEN + 4].copy_from_slice(&icmp_sum.to_be_bytes());

    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + REPLY) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(ETH_HLEN, &out, 0).map_err(|_| ())?;
    // Back where it came from: the sender's MAC becomes the destination.
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &eth, 0).map_err(|_| ())?;
    Ok(())
}

/// The Internet checksum (RFC 1071) of an even-length buffer of at most 2^15 bytes (two
/// folds of the carries are then enough; a fixed count, so the verifier sees the end).
#[inline(always)]
fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < b.len() {
        sum += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
