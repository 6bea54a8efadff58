//! The echo protocol of the test bed: every request (any bytes) is answered with one line,
//! `<server name> <client address as the server saw it>\n`, over TCP and UDP. Over TCP, a
//! request containing `!` is answered once and the server closes; `GET ` gets an HTTP answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::netns::{in_netns, Netns};

/// Serves TCP and UDP on `port` until the process ends. `workers` TCP connections are served at
/// once (each worker accepts and serves one connection at a time).
pub fn serve(name: &str, port: u16, workers: usize) -> Result<()> {
    let tcp =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding TCP :{port}"))?;
    let udp = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("binding UDP :{port}"))?;
    let name = name.to_string();
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{udp_name} {}\n", peer.ip()).as_bytes(), peer);
        }
    });
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let tcp = tcp.try_clone()?;
        let name = name.clone();
        handles.push(std::thread::spawn(move || loop {
            if let Ok((conn, peer)) = tcp.accept() {
                let _ = serve_conn(conn, &name, peer);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn serve_conn(mut conn: TcpStream, name: &str, peer: SocketAddr) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let reply = format!("{name} {}\n", peer.ip());
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf)? {
            0 => return Ok(()),
            // Speak enough HTTP for `curl`: one answer, then close.
            n if buf[..n].starts_with(b"GET ") => {
                let http = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                return conn.write_all(http.as_bytes());
            }
            // `!` asks for one answer and a close by the server (connection-rate runs: the
            // server closes first, so TIME_WAIT stays on the server, see `serve` callers).
            n if buf[..n].contains(&b'!') => return conn.write_all(reply.as_bytes()),
            _ => conn.write_all(reply.as_bytes())?,
        }
    }
}

/// The answer of one echo request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Name of the server that answered.
    pub server: String,
    /// Client address as the server saw it.
    pub seen_client: String,
    /// Address the answer came from, as the client saw it.
    pub from: SocketAddr,
}

fn parse(line: &str, from: SocketAddr) -> Result<Answer> {
    let mut it = line.split_whitespace();
    match (it.next(), it.next()) {
        (Some(s), Some(c)) => Ok(Answer {
            server: s.into(),
            seen_client: c.into(),
            from,
        }),
        _ => bail!("malformed echo answer {line:?}"),
    }
}

/// One TCP connection, one request, one answer.
pub fn tcp_ask(addr: SocketAddr, timeout: Duration) -> Result<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"?")?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .with_context(|| format!("reading from {addr}"))?;
    parse(&line, s.peer_addr()?)
}

/// One UDP request from `sock`, one answer (with the address it came from).
pub fn udp_ask(sock: &UdpSocket, addr: SocketAddr, timeout: Duration) -> Result<Answer> {
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(b"?", addr)?;
    let mut buf = [0u8; 512];
    let (n, from) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("waiting for a UDP answer from {addr}"))?;
    parse(&String::from_utf8_lossy(&buf[..n]), from)
}

/// `tcp_ask` from inside a namespace.
pub fn tcp_ask_from(ns: &Netns, addr: SocketAddr) -> Result<Answer> {
    in_netns(ns, move || tcp_ask(addr, Duration::from_secs(2)))?
}

/// Asks `to` `n` times from inside `ns` (`timeout` each); the servers that answered.
pub fn servers_seen(
    ns: &Netns,
    to: SocketAddr,
    n: usize,
    timeout: Duration,
) -> std::collections::BTreeSet<String> {
    in_netns(ns, move || {
        (0..n)
            .filter_map(|_| tcp_ask(to, timeout).ok())
            .map(|a| a.server)
            .collect()
    })
    .unwrap_or_default()
}

/// Waits until something answers on `addr` from inside `ns`.
pub fn wait_listening(ns: &Netns, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tcp_ask_from(ns, addr) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{addr} never answered")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
