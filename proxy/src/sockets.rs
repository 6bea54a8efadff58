//! Destroying connected UDP sockets whose backend is gone.
//!
//! The socket programs translate a connected UDP socket once, at `connect()`: its datagrams
//! then go to the backend's address with no further lookup, so when that backend leaves its
//! Service the socket would keep sending into the void. Such sockets are destroyed (sock_diag
//! `SOCK_DESTROY`, kernel option `CONFIG_INET_DIAG_DESTROY`): the application's next call
//! fails (ECONNABORTED, then EDESTADDRREQ: the socket is no longer connected) and a fresh
//! socket reaches a live backend. Sockets live in the
//! network namespace of whoever made them (pods, the node), so the walk enters every
//! namespace a process of the node holds, and destroys only sockets whose cookie the
//! reconciler named (cookies are unique on the machine).
//!
//! No crate of the field speaks `SOCK_DESTROY`, so the few netlink structures are written here.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use tracing::{debug, info, warn};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, `struct inet_diag_sockid`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_sockid`: sport, dport, src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;
/// Offset of the sockid in `struct inet_diag_msg` (after family, state, timer, retrans).
const MSG_SOCKID_AT: usize = 4;

/// Destroys the UDP sockets among `cookies`, in every network namespace; returns how many.
/// Runs on its own thread (it changes the thread's network namespace).
pub fn destroy_udp(cookies: HashSet<u64>) -> Result<usize> {
    if cookies.is_empty() {
        return Ok(0);
    }
    let namespaces = network_namespaces();
    let handle = std::thread::Builder::new()
        .name("sock-destroy".into())
        .spawn(move || {
            let mut destroyed = 0;
            for path in namespaces {
                match in_namespace(&path, &cookies) {
                    Ok(n) => destroyed += n,
                    // A process that exited took its namespace with it: nothing to do there.
                    Err(e) => debug!(netns = %path.display(), error = %format!("{e:#}"), "namespace skipped"),
                }
            }
            destroyed
        })
        .context("starting the socket walk")?;
    let destroyed = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the socket walk panicked"))?;
    if destroyed > 0 {
        info!(
            destroyed,
            "destroyed connected UDP sockets of removed backends"
        );
    }
    Ok(destroyed)
}

/// One `/proc/<pid>/ns/net` per distinct network namespace of the machine.
fn network_namespaces() -> Vec<PathBuf> {
    let mut seen: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in proc_dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        if let Ok(meta) = std::fs::metadata(&path) {
            seen.entry((meta.dev(), meta.ino())).or_insert(path);
        }
    }
    seen.into_values().collect()
}

fn in_namespace(path: &PathBuf, cookies: &HashSet<u64>) -> Result<usize> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("setns");
    }
    let sock = DiagSocket::open()?;
    let mut doomed = Vec::new();
    sock.dump_udp(|sockid| {
        let cookie = sockid_cookie(sockid);
        if cookies.contains(&cookie) {
            doomed.push(*sockid);
        }
    })?;
    let mut n = 0;
    for sockid in doomed {
        match sock.destroy_udp(&sockid) {
            Ok(()) => n += 1,
            // Closed meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                warn!(error = %e, "SOCK_DESTROY failed (the kernel needs CONFIG_INET_DIAG_DESTROY)")
            }
        }
    }
    Ok(n)
}

fn sockid_cookie(sockid: &[u8; SOCKID_LEN]) -> u64 {
    let lo = u32::from_ne_bytes(sockid[40..44].try_into().unwrap()) as u64;
    let hi = u32::from_ne_bytes(sockid[44..48].try_into().unwrap()) as u64;
    lo | hi << 32
}

struct DiagSocket(OwnedFd);

impl DiagSocket {
    fn open() -> Result<Self> {
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a sock_diag socket");
        }
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, kind: u16, flags: u16, sockid: Option<&[u8; SOCKID_LEN]>) -> io::Result<()> {
        let mut msg = [0u8; NLMSG_HDRLEN + REQ_LEN];
        let total = msg.len() as u32;
        msg[0..4].copy_from_slice(&total.to_ne_bytes());
        msg[4..6].copy_from_slice(&kind.to_ne_bytes());
        msg[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        let req = &mut msg[NLMSG_HDRLEN..];
        req[0] = libc::AF_INET as u8;
        req[1] = libc::IPPROTO_UDP as u8;
        req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
        if let Some(id) = sockid {
            req[8..8 + SOCKID_LEN].copy_from_slice(id);
        }
        let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies until the dump ends (or, for a request with ACK, until its status),
    /// handing each socket's id to `each`.
    fn read(&self, mut each: impl FnMut(&[u8; SOCKID_LEN])) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0usize;
            let n = n as usize;
            while at + NLMSG_HDRLEN <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                if len < NLMSG_HDRLEN || at + len > n {
                    return Err(io::Error::other("truncated sock_diag message"));
                }
                let body = &buf[at + NLMSG_HDRLEN..at + len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(body[0..4].try_into().unwrap());
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    SOCK_DIAG_BY_FAMILY if body.len() >= MSG_SOCKID_AT + SOCKID_LEN => {
                        let id: [u8; SOCKID_LEN] = body[MSG_SOCKID_AT..MSG_SOCKID_AT + SOCKID_LEN]
                            .try_into()
                            .unwrap();
                        each(&id);
                    }
                    _ => {}
                }
                at += (len + 3) & !3;
            }
        }
    }

    fn dump_udp(&self, each: impl FnMut(&[u8; SOCKID_LEN])) -> Result<()> {
        self.send(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, None)
            .context("asking for the UDP sockets")?;
        self.read(each).context("reading the UDP sockets")
    }

    fn destroy_udp(&self, sockid: &[u8; SOCKID_LEN]) -> io::Result<()> {
        self.send(SOCK_DESTROY, NLM_F_ACK, Some(sockid))?;
        self.read(|_| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    /// A connected UDP socket of this process is found by its cookie and destroyed: its next
    /// send fails. Needs root (CAP_NET_ADMIN); skipped otherwise.
    #[test]
    fn a_connected_udp_socket_is_destroyed_by_cookie() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        client.send(b"x").unwrap();
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        other.connect(server.local_addr().unwrap()).unwrap();
        let destroyed = destroy_udp([cookie].into()).unwrap();
        assert!(destroyed >= 1, "the socket was not found");
        // The destroyed socket is no longer connected: it reports the abort once, then has no
        // destination.
        let err = client.send(b"x").unwrap_err();
        assert!(
            matches!(
                err.raw_os_error(),
                Some(libc::ECONNABORTED | libc::EDESTADDRREQ)
            ),
            "{err}"
        );
        // Only the named socket.
        other.send(b"y").expect("another socket is untouched");
    }
}
