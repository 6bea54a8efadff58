//! ICMP errors about translated flows (destination unreachable, fragmentation needed, time
//! exceeded, parameter problem). The error quotes the packet as the backend saw it (client ->
//! backend), but the client's socket knows the flow as client -> frontend and would ignore it.
//! The quoted destination becomes the frontend again, and so does the error's own source when
//! the backend sent it itself, so "port unreachable" and path MTU discovery work through a
//! ClusterIP. The quoted L4 checksum is left as it is (nobody checks a quote's).
//!
//! Read-only on conntrack: an error neither creates nor refreshes a flow.

use aya_ebpf::programs::TcContext;
use proxy_common::{CtKey, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP};

use crate::maps::{CT, REV_NAT};
use crate::parse::{ETH_HLEN, IP_CSUM_OFF, IP_PROTO_OFF, IP_SRC_OFF};

const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Offsets, for an outer and a quoted IPv4 header without options.
const ICMP_OFF: usize = ETH_HLEN + 20;
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
const INNER: usize = ICMP_OFF + 8;

/// Translates an ICMP error about a translated flow back; `Ok(false)` when the packet is not
/// one (the caller lets it pass as it is either way).
#[inline(always)]
pub fn rev_nat_error(ctx: &TcContext) -> Result<bool, ()> {
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    let proto: u8 = ctx.load(IP_PROTO_OFF).map_err(|_| ())?;
    if vihl != 0x45 || proto != PROTO_ICMP {
        return Ok(false);
    }
    let ty: u8 = ctx.load(ICMP_OFF).map_err(|_| ())?;
    if !matches!(
        ty,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return Ok(false);
    }
    let inner_vihl: u8 = ctx.load(INNER).map_err(|_| ())?;
    let inner_proto: u8 = ctx.load(INNER + 9).map_err(|_| ())?;
    if inner_vihl != 0x45 || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP) {
        return Ok(false);
    }
    let client: u32 = ctx.load(INNER + 12).map_err(|_| ())?;
    let backend: u32 = ctx.load(INNER + 16).map_err(|_| ())?;
    let client_port: u16 = ctx.load(INNER + 20).map_err(|_| ())?;
    let backend_port: u16 = ctx.load(INNER + 22).map_err(|_| ())?;
    // The quoted packet went client -> backend: its flow's reply entry is backend -> client.
    let key = CtKey {
        dir: CT_DIR_REPLY,
        ..CtKey::forward(backend, client, backend_port, client_port, inner_proto)
    };
    let Some(ct) = (unsafe { CT.get(&key) }) else {
        return Ok(false);
    };
    let Some(rev) = (unsafe { REV_NAT.get(ct.rev_nat_id) }) else {
        return Ok(false);
    };
    let (frontend, frontend_port) = (rev.addr, rev.port);

    // The quoted destination: address (and the quoted header's checksum), then port. Every
    // changed word also changes the ICMP checksum, which covers the quote (no pseudo-header).
    let inner_csum_off = INNER + 10;
    let old_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| ())?;
    ctx.l3_csum_replace(inner_csum_off, backend as u64, frontend as u64, 4)
        .map_err(|_| ())?;
    let new_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| ())?;
    ctx.store(INNER + 16, &frontend, 0).map_err(|_| ())?;
    ctx.store(INNER + 22, &frontend_port, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, backend as u64, frontend as u64, 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, backend_port as u64, frontend_port as u64, 2)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(
        ICMP_CSUM_OFF,
        old_inner_csum as u64,
        new_inner_csum as u64,
        2,
    )
    .map_err(|_| ())?;
    // Sent by the backend itself: it comes from the frontend, as the flow's replies do.
    let source: u32 = ctx.load(IP_SRC_OFF).map_err(|_| ())?;
    if source == backend {
        ctx.l3_csum_replace(IP_CSUM_OFF, backend as u64, frontend as u64, 4)
            .map_err(|_| ())?;
        ctx.store(IP_SRC_OFF, &frontend, 0).map_err(|_| ())?;
    }
    Ok(true)
}
