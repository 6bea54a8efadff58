//! `up`'s daemons: each started in the node's namespace with its log under `DATA/logs`, and
//! supervised as systemd's `Restart=always` would: one that exits is started again after a
//! delay that doubles while it keeps exiting.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use ferry_testbed::Netns;

use super::DATA;

/// A daemon `up` started and keeps running: restarted with back-off whenever it exits, as
/// systemd's `Restart=always` does for kube-proxy and the kubelet.
pub(super) struct Daemon {
    pub(super) name: &'static str,
    pub(super) bin: PathBuf,
    pub(super) args: Vec<String>,
    /// None while it waits to be started again.
    pub(super) child: Option<Child>,
    pub(super) started: Instant,
    pub(super) restarts: u32,
    /// When it is started again, after it exited.
    pub(super) restart_at: Option<Instant>,
    pub(super) backoff: Duration,
}

/// The first restart's delay, doubled each time it exits again soon after.
pub(super) const RESTART_BACKOFF: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A daemon that ran this long restarts with the first delay again.
const RESTART_RESET: Duration = Duration::from_secs(60);

pub(super) fn start_daemon(node: &Netns, name: &str, bin: &Path, args: &[String]) -> Result<Child> {
    let logs = Path::new(DATA).join("logs");
    std::fs::create_dir_all(&logs)?;
    // Appended to: a restarted daemon's log follows the one of the run that exited.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Their own process group: Ctrl-C reaches `up` only, which stops them in order.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    node.spawn(&mut cmd)
        .with_context(|| format!("starting {name} ({})", bin.display()))
}

pub(super) fn lock(d: &Mutex<Vec<Daemon>>) -> std::sync::MutexGuard<'_, Vec<Daemon>> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn supervise_one(node: &Netns, d: &mut Daemon) {
    if let Some(child) = d.child.as_mut() {
        let Ok(Some(status)) = child.try_wait() else {
            return;
        };
        d.child = None;
        if d.started.elapsed() >= RESTART_RESET {
            d.backoff = RESTART_BACKOFF;
        }
        eprintln!(
            "[up] {} exited ({status}); starting it again in {:?} (see {DATA}/logs/{}.log)",
            d.name, d.backoff, d.name
        );
        d.restart_at = Some(Instant::now() + d.backoff);
        d.backoff = (d.backoff * 2).min(RESTART_BACKOFF_MAX);
        return;
    }
    if d.restart_at.is_some_and(|t| Instant::now() >= t) {
        match start_daemon(node, d.name, &d.bin, &d.args) {
            Ok(child) => {
                d.restarts += 1;
                eprintln!(
                    "[up] {} started again (pid {}, restart {})",
                    d.name,
                    child.id(),
                    d.restarts
                );
                d.child = Some(child);
                d.started = Instant::now();
                d.restart_at = None;
            }
            Err(e) => {
                eprintln!("[up] {}: {e:#}; trying again in {:?}", d.name, d.backoff);
                d.restart_at = Some(Instant::now() + d.backoff);
                d.backoff = (d.backoff * 2).min(RESTART_BACKOFF_MAX);
            }
        }
    }
}
