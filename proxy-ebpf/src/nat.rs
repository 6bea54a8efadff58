//! Address and port translation with incremental checksum updates (IP header and the L4
//! pseudo-header sum).

use aya_ebpf::programs::TcContext;
use proxy_common::PROTO_UDP;

use crate::conntrack::Reply;
use crate::maps::hairpin_addr;
use crate::parse::{Flow, DPORT_OFF, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, SPORT_OFF};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// UDP: a zero checksum means "none" and must stay zero.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Client -> frontend becomes client -> backend (DNAT); a hairpin flow's source becomes the
/// hairpin address, so the backend (the client itself) replies through the datapath.
#[inline(always)]
pub fn dnat(ctx: &TcContext, flow: &Flow, addr: u32, port: u16, hairpin: bool) -> Result<(), ()> {
    if hairpin {
        set_addr(ctx, flow, IP_SRC_OFF, flow.saddr, hairpin_addr()?)?;
    }
    set_addr(ctx, flow, IP_DST_OFF, flow.daddr, addr)?;
    set_port(ctx, flow, flow.l4_off + DPORT_OFF, flow.dport, port)
}

/// Backend -> client becomes frontend -> client (reverse NAT); a hairpin reply goes back to
/// the client's own address.
#[inline(always)]
pub fn rev_nat(
    ctx: &TcContext,
    flow: &Flow,
    frontend_addr: u32,
    frontend_port: u16,
    client_addr: Option<u32>,
) -> Result<(), ()> {
    set_addr(ctx, flow, IP_SRC_OFF, flow.saddr, frontend_addr)?;
    set_port(
        ctx,
        flow,
        flow.l4_off + SPORT_OFF,
        flow.sport,
        frontend_port,
    )?;
    if let Some(client) = client_addr {
        set_addr(ctx, flow, IP_DST_OFF, flow.daddr, client)?;
    }
    Ok(())
}

/// `rev_nat` for the reply entry conntrack found: a hairpin reply goes back to the client.
#[inline(always)]
pub fn rev_nat_reply(ctx: &TcContext, flow: &Flow, reply: &Reply) -> Result<(), ()> {
    let hairpin_client = reply.hairpin.then_some(reply.client_addr);
    rev_nat(
        ctx,
        flow,
        reply.frontend_addr,
        reply.frontend_port,
        hairpin_client,
    )
}

#[inline(always)]
fn l4_flags(flow: &Flow) -> u64 {
    if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
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
        BPF_F_PSEUDO_HDR | l4_flags(flow) | 4,
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
    ctx.l4_csum_replace(flow.csum_off(), old as u64, new as u64, l4_flags(flow) | 2)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}
