//! Connect-time load balancing: the socket programs loaded from the same object as the tc
//! programs (they share its maps) and attached to a cgroup v2, their links pinned under
//! `sock/`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use proxy_common::names;
use tracing::{info, warn};

use super::{program_of, Datapath};

/// The socket programs and the directory of their pinned cgroup links.
const SOCK_PROGRAMS: [&str; 4] = [
    names::PROG_CONNECT4,
    names::PROG_SENDMSG4,
    names::PROG_RECVMSG4,
    names::PROG_GETPEERNAME4,
];
const SOCK_LINKS: &str = "sock";

/// The cgroup v2 hierarchy's root (where the socket programs serve every process), from the
/// mount table: /sys/fs/cgroup on a unified layout, /sys/fs/cgroup/unified on a hybrid one.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|l| {
            // `<id> <parent> <dev> <root> <mount point> <options> ... - <fstype> ...`
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| anyhow!("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified, or run with --socket-lb=false)"))
}

impl Datapath {
    /// Connect-time load balancing: loads the socket programs and attaches them to `cgroup`
    /// (a cgroup v2 directory; its processes and those of every cgroup below it are served).
    /// Links pinned by an earlier daemon are replaced without a gap.
    pub fn attach_socket_lb(&mut self, cgroup: &Path) -> Result<()> {
        let dir = self.pin_dir.join(SOCK_LINKS);
        fs::create_dir_all(&dir)?;
        let cg = fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program_of(&mut self.ebpf, name)?;
            prog.load().with_context(|| {
                format!("the kernel refused the socket program {name} (connect-time load balancing needs Linux >= 5.18)")
            })?;
            // A bpf link (what aya creates on Linux >= 5.7) always lets other programs run
            // beside it; the link API takes no attach flags.
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into().map_err(|e| {
                anyhow!("{name}: not a bpf link ({e:?}); Ferry needs Linux >= 5.18")
            })?;
            let pin = dir.join(name);
            let fresh = dir.join(format!("{name}_new")); // bpffs names take no dots
            let _ = fs::remove_file(&fresh);
            link.pin(&fresh)
                .with_context(|| format!("pinning {}", fresh.display()))?;
            // Over the old pin: its link (an earlier daemon's program) goes.
            fs::rename(&fresh, &pin).with_context(|| format!("renaming to {}", pin.display()))?;
        }
        info!(cgroup = %cgroup.display(), "socket load balancing attached");
        Ok(())
    }

    /// Detaches the socket programs an earlier daemon left (`--socket-lb=false`).
    pub fn detach_socket_lb(&self) {
        let dir = self.pin_dir.join(SOCK_LINKS);
        if dir.exists() {
            match fs::remove_dir_all(&dir) {
                Ok(()) => info!("socket load balancing detached"),
                Err(e) => {
                    warn!(error = %e, dir = %dir.display(), "could not detach the socket programs")
                }
            }
        }
    }
}
