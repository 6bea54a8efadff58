//! `ferry-ask`: an echo client for tests that must run as their own process (in a cgroup the
//! socket programs serve), printing what the application sees. One JSON line per request:
//! `{"server", "seen_client", "peer", "from"}` where `peer` is `getpeername()` and `from` is the
//! address `recvfrom()` reported, or `{"error", "errno"}`.
//! - `tcp`: a connection per request;
//! - `udp-connected`: one connected socket for every request; with `--reconnect`, a socket
//!   that fails (destroyed under it) is replaced, as a resolver would;
//! - `udp`: one unconnected socket, `sendto()` per request.
//!
//! Bounded: `--repeat` requests, `--interval-ms` apart.
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq)]
enum Mode {
    Tcp,
    UdpConnected,
    Udp,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    #[arg(long)]
    reconnect: bool,
}

const TIMEOUT: Duration = Duration::from_secs(1);

fn line(server: &str, peer: Option<SocketAddr>, from: Option<SocketAddr>) -> String {
    let mut it = server.split_whitespace();
    serde_json::json!({
        "server": it.next().unwrap_or(""),
        "seen_client": it.next().unwrap_or(""),
        "peer": peer.map(|p| p.to_string()),
        "from": from.map(|p| p.to_string()),
    })
    .to_string()
}

fn error(e: &std::io::Error) -> String {
    serde_json::json!({"error": e.to_string(), "errno": e.raw_os_error()}).to_string()
}

fn tcp(target: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let peer = s.peer_addr()?;
    s.write_all(b"?")?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    Ok(line(&answer, Some(peer), None))
}

fn udp_connected(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(target)?;
    Ok(s)
}

fn udp_ask(s: &UdpSocket, target: Option<SocketAddr>) -> std::io::Result<String> {
    match target {
        Some(t) => s.send_to(b"?", t)?,
        None => s.send(b"?")?,
    };
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    let peer = if target.is_none() {
        Some(s.peer_addr()?)
    } else {
        None
    };
    Ok(line(&String::from_utf8_lossy(&buf[..n]), peer, Some(from)))
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut connected = None;
    let unconnected = if args.mode == Mode::Udp {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Some(s)
    } else {
        None
    };
    let mut out = std::io::stdout();
    for i in 0..args.repeat {
        if i > 0 && args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let result = match args.mode {
            Mode::Tcp => tcp(args.target),
            Mode::Udp => udp_ask(unconnected.as_ref().unwrap(), Some(args.target)),
            Mode::UdpConnected => {
                if connected.is_none() {
                    connected = Some(udp_connected(args.target));
                }
                let r = match connected.as_ref().unwrap() {
                    Ok(s) => udp_ask(s, None),
                    Err(e) => Err(match e.raw_os_error() {
                        Some(code) => std::io::Error::from_raw_os_error(code),
                        None => std::io::Error::new(e.kind(), e.to_string()),
                    }),
                };
                if r.is_err() && args.reconnect {
                    connected = None;
                }
                r
            }
        };
        let text = match result {
            Ok(l) => l,
            Err(e) => error(&e),
        };
        writeln!(out, "{text}")?;
        out.flush()?;
    }
    Ok(())
}
