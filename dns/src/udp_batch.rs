//! Datagrams in batches: `recvmmsg(2)` takes every query waiting on a socket in one system call
//! (blocking until at least one is there), `sendmmsg(2)` sends their answers in one. Under
//! load this halves the system calls per query; with one query waiting it is a plain receive.
//! Nothing in the standard library, tokio or socket2 offers these calls, hence libc here.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

/// Buffers, source addresses and the message headers pointing at them: the pointers stay
/// valid because nothing is pushed after `new` (the heap parts never move).
pub struct Batch {
    bufs: Vec<Box<[u8]>>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Batch {
    pub fn new(size: usize, buf_len: usize) -> Self {
        let mut b = Batch {
            bufs: (0..size)
                .map(|_| vec![0u8; buf_len].into_boxed_slice())
                .collect(),
            names: (0..size).map(|_| unsafe { zeroed() }).collect(),
            iovs: Vec::with_capacity(size),
            hdrs: Vec::with_capacity(size),
        };
        for i in 0..size {
            b.iovs.push(libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: buf_len,
            });
        }
        for i in 0..size {
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_iov = &mut b.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            b.hdrs.push(h);
        }
        b
    }

    /// Waits for at least one datagram and takes all that are there, up to the batch's size;
    /// how many.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for h in &mut self.hdrs {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The `i`-th datagram of the last `recv` (what fit of it in the buffer, as `recv_from`
    /// gives it) and its source.
    pub fn datagram(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(self.bufs[i].len());
        Some((&self.bufs[i][..len], to_std(&self.names[i])?))
    }

    /// Sends `replies` (the index of the datagram each answers, and the answer) to their
    /// datagrams' sources; a failure drops the rest, as a lost datagram would.
    pub fn send(&mut self, fd: RawFd, replies: &[(usize, Vec<u8>)]) -> io::Result<()> {
        let mut iovs: Vec<libc::iovec> = replies
            .iter()
            .map(|(_, r)| libc::iovec {
                iov_base: r.as_ptr() as *mut libc::c_void,
                iov_len: r.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = replies
            .iter()
            .zip(iovs.iter_mut())
            .map(|((i, _), iov)| {
                let mut h: libc::mmsghdr = unsafe { zeroed() };
                h.msg_hdr.msg_name = (&mut self.names[*i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = self.hdrs[*i].msg_hdr.msg_namelen;
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let mut sent = 0;
        while sent < hdrs.len() {
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    hdrs[sent..].as_mut_ptr(),
                    (hdrs.len() - sent) as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            sent += n as usize;
        }
        Ok(())
    }
}

fn to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::Batch;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_takes_what_waits_and_answers_each_source() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (i, c) in clients.iter().enumerate() {
            c.send_to(format!("q{i}").as_bytes(), to).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut b = Batch::new(8, 64);
        let n = b.recv(server.as_raw_fd()).unwrap();
        assert_eq!(n, 3, "the three waiting datagrams in one call");
        let mut replies = Vec::new();
        for i in 0..n {
            let (data, from) = b.datagram(i).unwrap();
            let who = clients
                .iter()
                .position(|c| c.local_addr().unwrap() == from)
                .expect("a client's address");
            assert_eq!(data, format!("q{who}").as_bytes());
            replies.push((i, format!("a{who}").into_bytes()));
        }
        b.send(server.as_raw_fd(), &replies).unwrap();
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 16];
            c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let (len, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(from, to);
            assert_eq!(&buf[..len], format!("a{i}").as_bytes());
        }
        // A datagram larger than the buffer comes cut to it.
        clients[0].send_to(&[7u8; 100], to).unwrap();
        assert_eq!(b.recv(server.as_raw_fd()).unwrap(), 1);
        assert_eq!(b.datagram(0).unwrap().0, &[7u8; 64][..]);
    }
}
