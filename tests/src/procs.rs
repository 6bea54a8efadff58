//! Processes and mounts left by daemons that outlive their parent (containerd's shims, a
//! containerd started by a kubelet), found by command line and mount point for cleanup.

use std::path::Path;
use std::time::Duration;

/// Kills processes whose command line (arguments joined by spaces) matches; `gently`: SIGTERM
/// first and up to 5 s to exit.
pub fn kill_matching(matches: impl Fn(&str) -> bool, gently: bool) {
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            matches(&cmdline).then_some(pid)
        })
        .collect();
    if gently {
        for &p in &pids {
            unsafe { libc::kill(p, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline
            && pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}/cmdline")).exists() && !zombie(*p))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for &p in &pids {
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Detaches whatever is still mounted below `dirs` (rootfs overlays, shm), deepest first.
pub fn unmount_below(dirs: &[&Path]) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| dirs.iter().any(|d| Path::new(p).starts_with(d)))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
