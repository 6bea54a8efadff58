//! Pod addresses from the node's pod CIDR, kept as files under `<data dir>/<network>/`.
//!
//! Each allocation is a file named by the address holding `<containerID>\n<ifname>\n`,
//! created with O_EXCL so two ADDs can never take the same address; every operation holds
//! an exclusive `flock` on the directory's `lock` file. An ADD killed after taking its
//! address leaves only that file, which GC (or a DEL for the container) releases. The
//! first address of the CIDR is the gateway; the search starts after the last address
//! handed out, so a released address is not reused at once.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

use crate::spec::{Attachment, CniError, Code, Result};

pub struct Pool {
    dir: PathBuf,
    cidr: Ipv4Network,
    gateway: Ipv4Addr,
    _lock: File,
}

fn io(what: String, e: std::io::Error) -> CniError {
    CniError::new(Code::Io, "IPAM I/O error", format!("{what}: {e}"))
}

impl Pool {
    /// Opens (and locks) the pool of network `name`.
    pub fn open(data_dir: &Path, name: &str, cidr: Ipv4Network, gateway: Ipv4Addr) -> Result<Pool> {
        let dir = data_dir.join(name);
        fs::create_dir_all(&dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(format!("opening {}", lock_path.display()), e))?;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(
                format!("locking {}", lock_path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Pool {
            dir,
            cidr,
            gateway,
            _lock: lock,
        })
    }

    fn owner(&self, ip: Ipv4Addr) -> Option<Attachment> {
        let text = fs::read_to_string(self.dir.join(ip.to_string())).ok()?;
        let mut lines = text.lines();
        Some(Attachment {
            container_id: lines.next()?.to_string(),
            ifname: lines.next().unwrap_or_default().to_string(),
        })
    }

    /// Every allocation: (address, owner).
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, Attachment)>> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| io(format!("reading {}", self.dir.display()), e))?;
        for e in entries.flatten() {
            let Some(ip) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if let Some(owner) = self.owner(ip) {
                out.push((ip, owner));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The address held by this container's interface, if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>> {
        Ok(self
            .allocations()?
            .into_iter()
            .find(|(_, o)| o.container_id == container_id && o.ifname == ifname)
            .map(|(ip, _)| ip))
    }

    fn usable(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let first = u32::from(self.cidr.network()) + 1;
        let last = u32::from(self.cidr.broadcast()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .filter(move |ip| *ip != self.gateway)
    }

    pub fn capacity(&self) -> usize {
        self.usable().count()
    }

    /// An address for the container's interface (the one it has, if ADD is repeated).
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<Ipv4Addr> {
        if let Some(ip) = self.find(container_id, ifname)? {
            return Ok(ip);
        }
        let last_path = self.dir.join("last_reserved");
        let last: Option<Ipv4Addr> = fs::read_to_string(&last_path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let all: Vec<Ipv4Addr> = self.usable().collect();
        let start = last
            .and_then(|l| all.iter().position(|ip| *ip == l))
            .map_or(0, |i| i + 1);
        for ip in all[start..].iter().chain(all[..start].iter()) {
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{container_id}\n{ifname}\n").as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(|e| io(format!("writing {}", path.display()), e))?;
                    let _ = fs::write(&last_path, ip.to_string());
                    return Ok(*ip);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(format!("creating {}", path.display()), e)),
            }
        }
        Err(CniError::new(
            Code::RangeExhausted,
            "no free address",
            format!(
                "the pod CIDR {} is exhausted: all {} addresses are in use; remove pods or give the node a larger podCIDR",
                self.cidr,
                all.len()
            ),
        ))
    }

    /// Releases what the container's interface holds; nothing held is fine.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>> {
        let Some(ip) = self.find(container_id, ifname)? else {
            return Ok(None);
        };
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(Some(ip)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("removing {}", path.display()), e)),
        }
    }

    /// Releases every allocation whose owner is not in `valid` (CNI GC); returns them.
    pub fn collect(&self, valid: &[Attachment]) -> Result<Vec<Ipv4Addr>> {
        let mut freed = Vec::new();
        for (ip, owner) in self.allocations()? {
            if !valid.contains(&owner) {
                let path = self.dir.join(ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => freed.push(ip),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io(format!("removing {}", path.display()), e)),
                }
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &Path, cidr: &str) -> Pool {
        let cidr: Ipv4Network = cidr.parse().unwrap();
        Pool::open(
            dir,
            "net",
            cidr,
            Ipv4Addr::from(u32::from(cidr.network()) + 1),
        )
        .unwrap()
    }

    #[test]
    fn allocates_uniquely_reuses_for_the_same_container_and_exhausts_clearly() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path(), "10.1.0.0/29"); // .1 gateway, .2-.6 for pods
        assert_eq!(p.capacity(), 5);
        let a = p.allocate("c1", "eth0").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(
            p.allocate("c1", "eth0").unwrap(),
            a,
            "ADD repeated: same address"
        );
        for i in 2..=5 {
            p.allocate(&format!("c{i}"), "eth0").unwrap();
        }
        let e = p.allocate("c6", "eth0").unwrap_err();
        assert_eq!(e.code, Code::RangeExhausted);
        assert!(e.details.contains("10.1.0.0/29 is exhausted"), "{e}");
        assert_eq!(
            p.release("c3", "eth0").unwrap(),
            Some(Ipv4Addr::new(10, 1, 0, 4))
        );
        assert_eq!(p.release("c3", "eth0").unwrap(), None, "DEL twice is fine");
        assert_eq!(
            p.allocate("c6", "eth0").unwrap(),
            Ipv4Addr::new(10, 1, 0, 4)
        );
    }

    #[test]
    fn gc_keeps_only_valid_attachments() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path(), "10.1.0.0/24");
        for c in ["a", "b", "c"] {
            p.allocate(c, "eth0").unwrap();
        }
        let keep = [Attachment {
            container_id: "b".into(),
            ifname: "eth0".into(),
        }];
        assert_eq!(p.collect(&keep).unwrap().len(), 2);
        let left: Vec<String> = p
            .allocations()
            .unwrap()
            .into_iter()
            .map(|(_, o)| o.container_id)
            .collect();
        assert_eq!(left, ["b"]);
    }
}
