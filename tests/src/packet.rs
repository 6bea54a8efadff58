//! Packets built in Rust for the datapath's unit tests and `cargo xtask bench prog`, and a
//! reader that checks what the program made of them (addresses, ports, both checksums).

use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Result};
use etherparse::{
    IpFragOffset, IpNumber, Ipv4Header, NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
};

const SRC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// TCP flags of a built segment.
#[derive(Clone, Copy, Debug)]
pub enum Tcp {
    Syn,
    Ack,
    Fin,
    Rst,
}

/// An endpoint: address and port.
pub type Ep = (Ipv4Addr, u16);

/// An IPv4 TCP segment with `payload`, checksums correct.
pub fn tcp(src: Ep, dst: Ep, flags: Tcp, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 65_535);
    let b = match flags {
        Tcp::Syn => b.syn(),
        Tcp::Ack => b.ack(1),
        Tcp::Fin => b.fin().ack(1),
        Tcp::Rst => b.rst(),
    };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("writing to a Vec");
    out
}

/// An IPv4 UDP datagram with `payload`, checksum correct.
pub fn udp(src: Ep, dst: Ep, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("writing to a Vec");
    out
}

/// A UDP datagram whose sender left the checksum out (zero), as UDP over IPv4 allows.
pub fn udp_without_checksum(src: Ep, dst: Ep, payload: &[u8]) -> Vec<u8> {
    let mut p = udp(src, dst, payload);
    let l4 = 14 + 20;
    p[l4 + 6] = 0;
    p[l4 + 7] = 0;
    p
}

/// A TCP segment whose IP header carries `options` (a multiple of 4 bytes).
pub fn tcp_with_ip_options(src: Ep, dst: Ep, options: &[u8]) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, src.0.octets(), dst.0.octets())
        .expect("a valid IPv4 header");
    ip.options = options.try_into().expect("options of a valid length");
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(src.1, dst.1, 1000, 65_535)
        .syn();
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("writing to a Vec");
    out
}

/// A non-first fragment of a UDP datagram (offset `offset_8` * 8 bytes): no ports in it.
pub fn udp_fragment(src: Ep, dst: Ep, offset_8: u16) -> Vec<u8> {
    let mut p = udp(src, dst, &[0xab; 32]);
    let mut ip = Ipv4Header::from_slice(&p[14..]).expect("own header").0;
    ip.fragment_offset = IpFragOffset::try_new(offset_8).expect("offset in range");
    ip.header_checksum = ip.calc_header_checksum();
    p[14..34].copy_from_slice(&ip.to_bytes());
    p
}

/// An IPv6 TCP SYN.
pub fn tcp_v6(dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(40_000, dport, 1000, 65_535)
        .syn();
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("writing to a Vec");
    out
}

/// An ICMP echo request.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(7, 1);
    let mut out = Vec::new();
    b.write(&mut out, &[1, 2, 3, 4]).expect("writing to a Vec");
    out
}

/// What a packet says, after the program had it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: Ep,
    pub dst: Ep,
}

/// Reads an IPv4 TCP/UDP packet and checks its IP header checksum and its L4 checksum
/// (recomputed from scratch; a UDP checksum of zero means none and is not checked).
pub fn read(packet: &[u8]) -> Result<Seen> {
    let sliced = SlicedPacket::from_ethernet(packet).map_err(|e| anyhow!("unparsable: {e}"))?;
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
        bail!("not IPv4");
    };
    let header = ip.header().to_header();
    if header.header_checksum != header.calc_header_checksum() {
        bail!("IP header checksum wrong after translation");
    }
    let (src, dst) = (
        Ipv4Addr::from(header.source),
        Ipv4Addr::from(header.destination),
    );
    let (sport, dport) = match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t
                .to_header()
                .calc_checksum_ipv4(&header, t.payload())
                .map_err(|e| anyhow!("{e}"))?;
            if t.checksum() != want {
                bail!("TCP checksum {:#06x}, should be {want:#06x}", t.checksum());
            }
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let want = u
                    .to_header()
                    .calc_checksum_ipv4(&header, u.payload())
                    .map_err(|e| anyhow!("{e}"))?;
                if u.checksum() != want {
                    bail!("UDP checksum {:#06x}, should be {want:#06x}", u.checksum());
                }
            }
            (u.source_port(), u.destination_port())
        }
        _ => bail!("neither TCP nor UDP"),
    };
    Ok(Seen {
        src: (src, sport),
        dst: (dst, dport),
    })
}

/// An ICMP "fragmentation needed" from `router` to `to`, quoting the first 28 bytes of the IP
/// packet in `quoted` (an Ethernet frame built here).
pub fn icmp_frag_needed(router: Ipv4Addr, to: Ipv4Addr, mtu: u16, quoted: &[u8]) -> Vec<u8> {
    use etherparse::icmpv4::DestUnreachableHeader;
    use etherparse::Icmpv4Type;
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(router.octets(), to.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ));
    let mut out = Vec::new();
    b.write(&mut out, &quoted[14..14 + 28])
        .expect("writing to a Vec");
    out
}

/// An ICMP error's outer source and destination and the addresses and ports it quotes, with
/// every checksum checked (outer IP, ICMP, quoted IP header).
pub fn read_icmp_error(packet: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr, Seen)> {
    icmp_error(packet).map(|e| (e.src, e.dst, e.quoted))
}

struct IcmpError {
    kind: etherparse::Icmpv4Type,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    quoted: Seen,
    quote_len: usize,
}

fn icmp_error(packet: &[u8]) -> Result<IcmpError> {
    let sliced = SlicedPacket::from_ethernet(packet).map_err(|e| anyhow!("unparsable: {e}"))?;
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
        bail!("not IPv4");
    };
    let header = ip.header().to_header();
    if header.header_checksum != header.calc_header_checksum() {
        bail!("IP header checksum wrong");
    }
    let Some(TransportSlice::Icmpv4(icmp)) = &sliced.transport else {
        bail!("not ICMP");
    };
    let want = icmp.icmp_type().calc_checksum(icmp.payload());
    if icmp.checksum() != want {
        bail!(
            "ICMP checksum {:#06x}, should be {want:#06x}",
            icmp.checksum()
        );
    }
    let q = icmp.payload();
    if q.len() < 28 {
        bail!(
            "quotes {} bytes, less than an IPv4 header and 8 more",
            q.len()
        );
    }
    let quoted = Ipv4Header::from_slice(q)
        .map_err(|e| anyhow!("quoted header: {e}"))?
        .0;
    if quoted.header_checksum != quoted.calc_header_checksum() {
        bail!("quoted IP header checksum wrong");
    }
    let port = |i: usize| u16::from_be_bytes([q[20 + i], q[21 + i]]);
    Ok(IcmpError {
        kind: icmp.icmp_type(),
        src: Ipv4Addr::from(header.source),
        dst: Ipv4Addr::from(header.destination),
        quoted: Seen {
            src: (Ipv4Addr::from(quoted.source), port(0)),
            dst: (Ipv4Addr::from(quoted.destination), port(2)),
        },
        quote_len: q.len(),
    })
}

/// An ICMP "port unreachable" the program answered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreachable {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The quoted original: its addresses and ports.
    pub quoted: Seen,
    /// The Ethernet header went back where the packet came from (MACs swapped).
    pub turned_around: bool,
}

/// Reads an ICMP destination unreachable / port unreachable to the sender of a packet built
/// here, checking both checksums, and the quoted header and ports of the original.
pub fn read_unreachable(packet: &[u8]) -> Result<Unreachable> {
    use etherparse::icmpv4::DestUnreachableHeader;
    use etherparse::Icmpv4Type;
    let e = icmp_error(packet)?;
    if e.kind != Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port) {
        bail!("not port unreachable: {:?}", e.kind);
    }
    if e.quote_len != 28 {
        bail!(
            "quotes {} bytes, not the IPv4 header and 8 more",
            e.quote_len
        );
    }
    Ok(Unreachable {
        src: e.src,
        dst: e.dst,
        quoted: e.quoted,
        turned_around: packet[..6] == SRC_MAC && packet[6..12] == DST_MAC,
    })
}

/// The UDP checksum field of a packet built by `udp` (no IP options).
pub fn udp_checksum(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[14 + 20 + 6], packet[14 + 20 + 7]])
}
