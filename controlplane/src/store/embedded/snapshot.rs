//! On disk: the snapshot file, recovery at start-up (snapshot, then the log), saving and
//! restoring snapshots, and the directory lock.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _};
use tracing::warn;

use crate::store::Revision;

use super::codec::{read_records, Record};
use super::state::State;

pub(super) fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    }
    Ok(buf)
}

/// Reads a snapshot file; fails unless it is complete.
pub(super) fn read_snapshot(path: &Path) -> anyhow::Result<Option<Vec<Record>>> {
    let buf = read_file(path)?;
    if buf.is_empty() {
        return Ok(None);
    }
    let (recs, _) = read_records(&buf);
    if !matches!(recs.first(), Some(Record::Header { .. })) || recs.last() != Some(&Record::End) {
        bail!(
            "{} is not a complete snapshot (torn or corrupt); restore it from a backup",
            path.display()
        );
    }
    Ok(Some(recs))
}

pub(super) fn write_snapshot(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    for r in records {
        r.encode(&mut buf);
    }
    let tmp = path.with_extension("tmp");
    let mut f = crate::files::create_private(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The state of a data directory: snapshot plus the intact part of the log.
pub(super) fn recover(dir: &Path) -> anyhow::Result<(State, u64)> {
    let now = Instant::now();
    let mut st = State::default();
    if let Some(recs) = read_snapshot(&dir.join("snapshot"))? {
        for r in &recs {
            st.apply(r, now);
        }
    }
    // Revisions before the snapshot's are not kept.
    st.events.clear();
    st.compacted = st.revision;
    let wal = read_file(&dir.join("wal"))?;
    let (recs, good) = read_records(&wal);
    for r in &recs {
        let skip = match r {
            Record::Put { kv } => kv.mod_revision <= st.compacted,
            Record::Delete { revision, .. } => *revision <= st.compacted,
            _ => false,
        };
        if !skip {
            st.apply(r, now);
        }
    }
    if good < wal.len() {
        warn!(
            torn_bytes = wal.len() - good,
            "write-ahead log ends in an incomplete record (a crash during a write that was never acknowledged); cutting it off"
        );
    }
    Ok((st, good as u64))
}

/// `snapshot save`: a consistent copy of a data directory's state (the server may be running).
pub fn snapshot_save(dir: &Path, out: &Path) -> anyhow::Result<Revision> {
    let (st, _) = recover(dir)?;
    write_snapshot(out, &st.snapshot_records())?;
    Ok(st.revision)
}

/// `snapshot restore`: makes `dir` hold exactly the state in `file`; refuses a directory that
/// already has data unless `force`.
pub fn snapshot_restore(file: &Path, dir: &Path, force: bool) -> anyhow::Result<Revision> {
    let recs = read_snapshot(file)?.with_context(|| format!("{} is empty", file.display()))?;
    let Some(Record::Header { revision, .. }) = recs.first() else {
        bail!("{} has no header", file.display());
    };
    crate::files::private_dir(dir)?;
    let has_data = ["snapshot", "wal"]
        .iter()
        .any(|f| std::fs::metadata(dir.join(f)).is_ok_and(|m| m.len() > 0));
    if has_data && !force {
        bail!(
            "{} already holds a store; restore into an empty directory or pass --force",
            dir.display()
        );
    }
    let _lock = lock_dir(dir)?;
    write_snapshot(&dir.join("snapshot"), &recs)?;
    crate::files::create_private(&dir.join("wal"))?.sync_all()?;
    Ok(*revision)
}

pub(super) fn lock_dir(dir: &Path) -> anyhow::Result<File> {
    let mut o = crate::files::private_options();
    o.create(true).truncate(false).write(true);
    let f = crate::files::open_private(&dir.join("LOCK"), &o)?;
    use std::os::fd::AsRawFd;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "{} is in use by another process (another ferry-controlplane?)",
            dir.display()
        );
    }
    Ok(f)
}
