//! The embedded store: every key's versions in memory, a write-ahead log on disk.
//!
//! Writers hand their requests to one committer thread. It takes every request waiting,
//! checks each against the current state (plus the writes earlier in the same batch), appends
//! the batch to the log, syncs it once (group commit), and only then applies it to memory,
//! publishes the events and answers: nobody sees or is told of a write that is not on disk.
//!
//! On disk, `DIR/snapshot` holds the state at some point and `DIR/wal` every record after it.
//! Both are sequences of framed records (length, CRC-32, payload). Start-up reads the snapshot,
//! replays the log and cuts off a torn tail (a record the crash interrupted was never
//! acknowledged). When the log grows past a limit the committer writes a new snapshot and
//! empties the log.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use super::watch_buffer::spawn_fed;
use super::{
    Event, EventKind, KeyValue, ListOptions, ListResult, Precondition, Revision, Store, StoreError,
    StoreResult, WatchStream,
};

/// A snapshot is written and the log emptied when the log reaches this size.
const WAL_SNAPSHOT_BYTES: u64 = 64 << 20;
/// Largest number of requests committed with one sync.
const MAX_BATCH: usize = 4096;
/// Batches of events a watcher may fall behind before its watch ends (it then re-watches).
const WATCH_BACKLOG: usize = 8192;

// ---------------------------------------------------------------------------------------
// Records

#[derive(Clone, Debug, PartialEq)]
enum Record {
    /// First record of a snapshot.
    Header {
        revision: Revision,
        compacted: Revision,
        next_lease: i64,
    },
    Put {
        kv: KeyValue,
    },
    Delete {
        key: String,
        revision: Revision,
    },
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    Compact {
        revision: Revision,
    },
    /// Last record of a snapshot: a snapshot without it is incomplete.
    End,
}

struct Enc(Vec<u8>);

impl Enc {
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
    }
}

struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        if self.0.len() < n {
            bail!("record truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn i64(&mut self) -> anyhow::Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn bytes(&mut self) -> anyhow::Result<Vec<u8>> {
        let n = u32::from_le_bytes(self.take(4)?.try_into()?) as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> anyhow::Result<String> {
        String::from_utf8(self.bytes()?).context("key is not UTF-8")
    }
}

impl Record {
    /// Appends the framed record: payload length, CRC-32 of the payload, payload.
    fn encode(&self, out: &mut Vec<u8>) {
        let mut e = Enc(Vec::with_capacity(64));
        match self {
            Record::Header {
                revision,
                compacted,
                next_lease,
            } => {
                e.0.push(1);
                e.i64(*revision);
                e.i64(*compacted);
                e.i64(*next_lease);
            }
            Record::Put { kv } => {
                e.0.push(2);
                e.bytes(kv.key.as_bytes());
                e.bytes(&kv.value);
                e.i64(kv.create_revision);
                e.i64(kv.mod_revision);
                e.i64(kv.lease);
            }
            Record::Delete { key, revision } => {
                e.0.push(3);
                e.bytes(key.as_bytes());
                e.i64(*revision);
            }
            Record::LeaseGrant { id, ttl } => {
                e.0.push(4);
                e.i64(*id);
                e.i64(*ttl);
            }
            Record::LeaseRevoke { id } => {
                e.0.push(5);
                e.i64(*id);
            }
            Record::Compact { revision } => {
                e.0.push(6);
                e.i64(*revision);
            }
            Record::End => e.0.push(7),
        }
        out.extend_from_slice(&(e.0.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&e.0).to_le_bytes());
        out.extend_from_slice(&e.0);
    }

    fn decode(payload: &[u8]) -> anyhow::Result<Record> {
        let mut d = Dec(payload);
        Ok(match d.u8()? {
            1 => Record::Header {
                revision: d.i64()?,
                compacted: d.i64()?,
                next_lease: d.i64()?,
            },
            2 => {
                let key = d.string()?;
                let value = Bytes::from(d.bytes()?);
                Record::Put {
                    kv: KeyValue {
                        key,
                        value,
                        create_revision: d.i64()?,
                        mod_revision: d.i64()?,
                        lease: d.i64()?,
                    },
                }
            }
            3 => Record::Delete {
                key: d.string()?,
                revision: d.i64()?,
            },
            4 => Record::LeaseGrant {
                id: d.i64()?,
                ttl: d.i64()?,
            },
            5 => Record::LeaseRevoke { id: d.i64()? },
            6 => Record::Compact { revision: d.i64()? },
            7 => Record::End,
            t => bail!("unknown record type {t}"),
        })
    }
}

/// Reads framed records until the end or the first torn/corrupt one; returns them and the
/// length of the intact prefix.
fn read_records(buf: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 8 {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(buf[at + 4..at + 8].try_into().unwrap());
        let Some(payload) = buf.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        match Record::decode(payload) {
            Ok(r) => out.push(r),
            Err(_) => break,
        }
        at += 8 + len;
    }
    (out, at)
}

// ---------------------------------------------------------------------------------------
// In-memory state

#[derive(Clone, Debug)]
struct Version {
    kv: KeyValue,
    /// A tombstone: the key was deleted at `kv.mod_revision`.
    deleted: bool,
}

struct Lease {
    ttl: i64,
    expires: Instant,
    keys: HashSet<String>,
}

#[derive(Default)]
struct State {
    revision: Revision,
    compacted: Revision,
    next_lease: i64,
    /// Every key's versions, oldest first, back to the compacted revision.
    keys: BTreeMap<String, Vec<Version>>,
    /// Every event after the compacted revision, oldest first.
    events: VecDeque<Event>,
    leases: HashMap<i64, Lease>,
}

impl State {
    fn latest(&self, key: &str) -> Option<&KeyValue> {
        self.keys
            .get(key)
            .and_then(|v| v.last())
            .filter(|v| !v.deleted)
            .map(|v| &v.kv)
    }

    fn at(&self, key: &str, revision: Revision) -> Option<&KeyValue> {
        let versions = self.keys.get(key)?;
        let i = versions.partition_point(|v| v.kv.mod_revision <= revision);
        let v = versions.get(i.checked_sub(1)?)?;
        (!v.deleted).then_some(&v.kv)
    }

    /// Applies a record (during recovery and after a commit); returns its event.
    fn apply(&mut self, rec: &Record, now: Instant) -> Option<Event> {
        match rec {
            Record::Header {
                revision,
                compacted,
                next_lease,
            } => {
                self.revision = *revision;
                self.compacted = *compacted;
                self.next_lease = *next_lease;
                None
            }
            Record::Put { kv } => {
                let prev = self.latest(&kv.key).cloned();
                if let Some(p) = &prev {
                    if p.lease != 0 && p.lease != kv.lease {
                        if let Some(l) = self.leases.get_mut(&p.lease) {
                            l.keys.remove(&kv.key);
                        }
                    }
                }
                if kv.lease != 0 {
                    if let Some(l) = self.leases.get_mut(&kv.lease) {
                        l.keys.insert(kv.key.clone());
                    }
                }
                self.revision = self.revision.max(kv.mod_revision);
                self.keys.entry(kv.key.clone()).or_default().push(Version {
                    kv: kv.clone(),
                    deleted: false,
                });
                let ev = Event {
                    kind: EventKind::Put,
                    kv: kv.clone(),
                    prev,
                };
                self.events.push_back(ev.clone());
                Some(ev)
            }
            Record::Delete { key, revision } => {
                let prev = self.latest(key).cloned()?;
                if prev.lease != 0 {
                    if let Some(l) = self.leases.get_mut(&prev.lease) {
                        l.keys.remove(key);
                    }
                }
                self.revision = self.revision.max(*revision);
                let mut tomb = prev.clone();
                tomb.mod_revision = *revision;
                self.keys.entry(key.clone()).or_default().push(Version {
                    kv: tomb.clone(),
                    deleted: true,
                });
                let ev = Event {
                    kind: EventKind::Delete,
                    kv: tomb,
                    prev: Some(prev),
                };
                self.events.push_back(ev.clone());
                Some(ev)
            }
            Record::LeaseGrant { id, ttl } => {
                self.next_lease = self.next_lease.max(*id + 1);
                self.leases.insert(
                    *id,
                    Lease {
                        ttl: *ttl,
                        expires: now + Duration::from_secs(*ttl as u64),
                        keys: HashSet::new(),
                    },
                );
                None
            }
            Record::LeaseRevoke { id } => {
                self.leases.remove(id);
                None
            }
            Record::Compact { revision } => {
                self.compact(*revision);
                None
            }
            Record::End => None,
        }
    }

    fn compact(&mut self, revision: Revision) {
        if revision <= self.compacted {
            return;
        }
        self.compacted = revision;
        while self
            .events
            .front()
            .is_some_and(|e| e.kv.mod_revision <= revision)
        {
            self.events.pop_front();
        }
        self.keys.retain(|_, versions| {
            // Keep the newest version at or before the compacted revision (the value as of
            // then) unless it is a tombstone, and everything after it.
            let i = versions.partition_point(|v| v.kv.mod_revision <= revision);
            if i > 0 {
                let keep_from = if versions[i - 1].deleted { i } else { i - 1 };
                versions.drain(..keep_from);
            }
            !versions.is_empty()
        });
    }

    /// The records that rebuild this state (latest values only): a snapshot.
    fn snapshot_records(&self) -> Vec<Record> {
        let mut out = vec![Record::Header {
            revision: self.revision,
            compacted: self.revision,
            next_lease: self.next_lease,
        }];
        for (id, l) in &self.leases {
            out.push(Record::LeaseGrant {
                id: *id,
                ttl: l.ttl,
            });
        }
        for key in self.keys.keys() {
            if let Some(kv) = self.latest(key) {
                out.push(Record::Put { kv: kv.clone() });
            }
        }
        out.push(Record::End);
        out
    }
}

// ---------------------------------------------------------------------------------------
// Files

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
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
fn read_snapshot(path: &Path) -> anyhow::Result<Option<Vec<Record>>> {
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

fn write_snapshot(path: &Path, records: &[Record]) -> anyhow::Result<()> {
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
fn recover(dir: &Path) -> anyhow::Result<(State, u64)> {
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

fn lock_dir(dir: &Path) -> anyhow::Result<File> {
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

// ---------------------------------------------------------------------------------------
// The committer

enum Op {
    Put {
        key: String,
        value: Bytes,
        cond: Precondition,
        lease: i64,
    },
    Delete {
        key: String,
        cond: Precondition,
    },
    Grant {
        ttl: i64,
    },
    Revoke {
        id: i64,
    },
    Compact {
        revision: Revision,
    },
}

enum Reply {
    Put(KeyValue, Option<KeyValue>),
    Delete(KeyValue, Revision),
    Lease(i64),
    Done,
}

struct Request {
    op: Op,
    reply: oneshot::Sender<StoreResult<Reply>>,
}

struct Committer {
    state: Arc<RwLock<State>>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    dir: PathBuf,
    wal: File,
    wal_len: u64,
}

fn check(key: &str, cond: Precondition, current: Option<&KeyValue>) -> Result<(), StoreError> {
    match (cond, current) {
        (Precondition::None, _) => Ok(()),
        (Precondition::Absent, None) => Ok(()),
        (Precondition::Absent, Some(_)) => Err(StoreError::AlreadyExists(key.into())),
        (Precondition::Exists | Precondition::ModRevision(_), None) => {
            Err(StoreError::NotFound(key.into()))
        }
        (Precondition::Exists, Some(_)) => Ok(()),
        (Precondition::ModRevision(r), Some(kv)) if kv.mod_revision == r => Ok(()),
        (Precondition::ModRevision(r), Some(kv)) => Err(StoreError::Conflict {
            key: key.into(),
            expected: r,
            actual: kv.mod_revision,
        }),
    }
}

impl Committer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
        debug!("store committer stopped");
    }

    fn commit(&mut self, batch: Vec<Request>) {
        // Decide every request against the state plus this batch's earlier writes.
        let mut records: Vec<Record> = Vec::new();
        let mut results: Vec<(oneshot::Sender<StoreResult<Reply>>, StoreResult<Reply>)> =
            Vec::with_capacity(batch.len());
        {
            let st = self.state.read().unwrap();
            let mut overlay: HashMap<String, Option<KeyValue>> = HashMap::new();
            let mut rev = st.revision;
            let mut next_lease = st.next_lease.max(1);
            let mut leases_gone: HashSet<i64> = HashSet::new();
            let mut leases_new: HashSet<i64> = HashSet::new();
            let lookup =
                |overlay: &HashMap<String, Option<KeyValue>>, key: &str| match overlay.get(key) {
                    Some(v) => v.clone(),
                    None => st.latest(key).cloned(),
                };
            for req in batch {
                let res = match req.op {
                    Op::Put {
                        key,
                        value,
                        cond,
                        lease,
                    } => {
                        let cur = lookup(&overlay, &key);
                        let lease_ok = lease == 0
                            || leases_new.contains(&lease)
                            || (st.leases.contains_key(&lease) && !leases_gone.contains(&lease));
                        match check(&key, cond, cur.as_ref()) {
                            Err(e) => Err(e),
                            Ok(()) if !lease_ok => Err(StoreError::LeaseNotFound(lease)),
                            Ok(()) => {
                                rev += 1;
                                let kv = KeyValue {
                                    key: key.clone(),
                                    value,
                                    create_revision: cur
                                        .as_ref()
                                        .map_or(rev, |c| c.create_revision),
                                    mod_revision: rev,
                                    lease,
                                };
                                records.push(Record::Put { kv: kv.clone() });
                                overlay.insert(key, Some(kv.clone()));
                                Ok(Reply::Put(kv, cur))
                            }
                        }
                    }
                    Op::Delete { key, cond } => {
                        let cur = lookup(&overlay, &key);
                        match check(&key, cond, cur.as_ref()) {
                            Err(e) => Err(e),
                            Ok(()) => match cur {
                                None => Err(StoreError::NotFound(key)),
                                Some(kv) => {
                                    rev += 1;
                                    records.push(Record::Delete {
                                        key: key.clone(),
                                        revision: rev,
                                    });
                                    overlay.insert(key, None);
                                    Ok(Reply::Delete(kv, rev))
                                }
                            },
                        }
                    }
                    Op::Grant { ttl } => {
                        let id = next_lease;
                        next_lease += 1;
                        leases_new.insert(id);
                        records.push(Record::LeaseGrant { id, ttl });
                        Ok(Reply::Lease(id))
                    }
                    Op::Revoke { id } => {
                        if !st.leases.contains_key(&id) && !leases_new.contains(&id)
                            || leases_gone.contains(&id)
                        {
                            Err(StoreError::LeaseNotFound(id))
                        } else {
                            let mut keys: Vec<String> = st
                                .leases
                                .get(&id)
                                .map(|l| l.keys.iter().cloned().collect())
                                .unwrap_or_default();
                            // Keys attached earlier in this batch.
                            keys.extend(
                                overlay
                                    .iter()
                                    .filter(|(_, v)| v.as_ref().is_some_and(|kv| kv.lease == id))
                                    .map(|(k, _)| k.clone()),
                            );
                            keys.sort();
                            keys.dedup();
                            for key in keys {
                                let still = lookup(&overlay, &key).is_some_and(|kv| kv.lease == id);
                                if still {
                                    rev += 1;
                                    records.push(Record::Delete {
                                        key: key.clone(),
                                        revision: rev,
                                    });
                                    overlay.insert(key, None);
                                }
                            }
                            leases_gone.insert(id);
                            records.push(Record::LeaseRevoke { id });
                            Ok(Reply::Done)
                        }
                    }
                    Op::Compact { revision } => {
                        if revision > rev {
                            Err(StoreError::FutureRevision {
                                requested: revision,
                                current: rev,
                            })
                        } else {
                            if revision > st.compacted {
                                records.push(Record::Compact { revision });
                            }
                            Ok(Reply::Done)
                        }
                    }
                };
                results.push((req.reply, res));
            }
        }

        if !records.is_empty() {
            let mut buf = Vec::with_capacity(records.len() * 128);
            for r in &records {
                r.encode(&mut buf);
            }
            if let Err(e) = self.wal.write_all(&buf).and_then(|_| self.wal.sync_data()) {
                // Not durable: tell everyone, apply nothing, and cut the log back.
                warn!(error = %e, "write-ahead log write failed");
                let _ = self.wal.set_len(self.wal_len);
                for (tx, _) in results {
                    let _ = tx.send(Err(StoreError::Other(anyhow!("store write failed: {e}"))));
                }
                return;
            }
            self.wal_len += buf.len() as u64;
            let now = Instant::now();
            let mut st = self.state.write().unwrap();
            let mut events = Vec::new();
            for r in &records {
                if let Some(ev) = st.apply(r, now) {
                    events.push(ev);
                }
            }
            if !events.is_empty() {
                // Sent under the write lock so a new watcher gets each event exactly once:
                // from its backlog or from the channel.
                let _ = self.events.send(Arc::new(events));
            }
        }
        for (tx, res) in results {
            let _ = tx.send(res);
        }
        if self.wal_len >= WAL_SNAPSHOT_BYTES {
            if let Err(e) = self.snapshot() {
                warn!(error = %format!("{e:#}"), "snapshot failed; the log keeps growing");
            }
        }
    }

    fn snapshot(&mut self) -> anyhow::Result<()> {
        let records = self.state.read().unwrap().snapshot_records();
        write_snapshot(&self.dir.join("snapshot"), &records)?;
        self.wal.set_len(0)?;
        self.wal.sync_all()?;
        self.wal_len = 0;
        info!(
            records = records.len(),
            "store snapshot written, log emptied"
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The store

pub struct EmbeddedStore {
    state: Arc<RwLock<State>>,
    tx: mpsc::UnboundedSender<Request>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    _lock: File,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, recovering what the last process left.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Self>> {
        crate::files::private_dir(dir)
            .with_context(|| format!("preparing the data directory {}", dir.display()))?;
        let lock = lock_dir(dir)?;
        let (st, good) = recover(dir)?;
        info!(
            dir = %dir.display(),
            revision = st.revision,
            keys = st.keys.len(),
            "embedded store recovered"
        );
        let wal_path = dir.join("wal");
        let mut o = crate::files::private_options();
        o.create(true).append(true);
        let wal = crate::files::open_private(&wal_path, &o)?;
        if let Ok(snap) = File::open(dir.join("snapshot")) {
            use std::os::unix::fs::PermissionsExt;
            snap.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        // Cut off a torn tail so new records follow the last good one.
        wal.set_len(good)?;
        wal.sync_all()?;
        let state = Arc::new(RwLock::new(st));
        let (events, _) = broadcast::channel(WATCH_BACKLOG);
        let (tx, rx) = mpsc::unbounded_channel();
        let committer = Committer {
            state: state.clone(),
            events: events.clone(),
            dir: dir.to_path_buf(),
            wal,
            wal_len: good,
        };
        std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer.run(rx))?;
        let store = Arc::new(EmbeddedStore {
            state,
            tx,
            events,
            _lock: lock,
        });
        // Leases expire here: each expiry is a revoke through the committer.
        let weak = Arc::downgrade(&store);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(store) = weak.upgrade() else { break };
                let expired: Vec<i64> = {
                    let st = store.state.read().unwrap();
                    let now = Instant::now();
                    st.leases
                        .iter()
                        .filter(|(_, l)| l.expires <= now)
                        .map(|(id, _)| *id)
                        .collect()
                };
                for id in expired {
                    debug!(lease = id, "lease expired");
                    let _ = store.submit(Op::Revoke { id }).await;
                }
            }
        });
        Ok(store)
    }

    async fn submit(&self, op: Op) -> StoreResult<Reply> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { op, reply })
            .map_err(|_| StoreError::Other(anyhow!("store is closed")))?;
        rx.await
            .map_err(|_| StoreError::Other(anyhow!("store committer stopped")))?
    }
}

fn in_prefix(key: &str, prefix: &str) -> bool {
    key.starts_with(prefix)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn current_revision(&self) -> StoreResult<Revision> {
        Ok(self.state.read().unwrap().revision)
    }

    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        Ok(self.state.read().unwrap().latest(key).cloned())
    }

    async fn list(&self, opts: ListOptions<'_>) -> StoreResult<ListResult> {
        let st = self.state.read().unwrap();
        let revision = if opts.revision == 0 {
            st.revision
        } else {
            opts.revision
        };
        if revision < st.compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted: st.compacted,
            });
        }
        if revision > st.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: st.revision,
            });
        }
        let start = match opts.start_after {
            Some(s) if s >= opts.prefix => Bound::Excluded(s.to_string()),
            _ => Bound::Included(opts.prefix.to_string()),
        };
        let mut kvs = Vec::new();
        let mut more = false;
        for (key, _) in st.keys.range((start, Bound::Unbounded)) {
            if !in_prefix(key, opts.prefix) {
                break;
            }
            if let Some(kv) = st.at(key, revision) {
                if opts.limit > 0 && kvs.len() == opts.limit {
                    more = true;
                    break;
                }
                kvs.push(kv.clone());
            }
        }
        Ok(ListResult {
            kvs,
            more,
            revision,
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        cond: Precondition,
        lease: i64,
    ) -> StoreResult<(KeyValue, Option<KeyValue>)> {
        match self
            .submit(Op::Put {
                key: key.into(),
                value,
                cond,
                lease,
            })
            .await?
        {
            Reply::Put(kv, prev) => Ok((kv, prev)),
            _ => unreachable!("put answered with another reply"),
        }
    }

    async fn delete(&self, key: &str, cond: Precondition) -> StoreResult<(KeyValue, Revision)> {
        match self
            .submit(Op::Delete {
                key: key.into(),
                cond,
            })
            .await?
        {
            Reply::Delete(kv, rev) => Ok((kv, rev)),
            _ => unreachable!("delete answered with another reply"),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> StoreResult<WatchStream> {
        let (backlog, mut rx) = {
            let st = self.state.read().unwrap();
            if after < st.compacted {
                return Err(StoreError::Compacted {
                    requested: after,
                    compacted: st.compacted,
                });
            }
            let from = st.events.partition_point(|e| e.kv.mod_revision <= after);
            let backlog: Vec<Event> = st
                .events
                .range(from..)
                .filter(|e| in_prefix(&e.kv.key, prefix))
                .cloned()
                .collect();
            (backlog, self.events.subscribe())
        };
        let prefix = prefix.to_string();
        let stream = spawn_fed(move |tx| async move {
            let mut last = after;
            if !backlog.is_empty() {
                last = backlog.last().unwrap().kv.mod_revision;
                if tx.send(Ok(backlog)).is_err() {
                    return;
                }
            }
            loop {
                match rx.recv().await {
                    Ok(batch) => {
                        let evs: Vec<Event> = batch
                            .iter()
                            .filter(|e| e.kv.mod_revision > last && in_prefix(&e.kv.key, &prefix))
                            .cloned()
                            .collect();
                        if let Some(e) = evs.last() {
                            last = e.kv.mod_revision;
                            if tx.send(Ok(evs)).is_err() {
                                return;
                            }
                        } else if tx.is_gone() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx.send(Err(StoreError::Other(anyhow!(
                            "watcher fell {n} batches behind; watch again from revision {last}"
                        ))));
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(stream)
    }

    async fn grant_lease(&self, ttl_secs: i64) -> StoreResult<i64> {
        match self
            .submit(Op::Grant {
                ttl: ttl_secs.max(1),
            })
            .await?
        {
            Reply::Lease(id) => Ok(id),
            _ => unreachable!("grant answered with another reply"),
        }
    }

    async fn keep_alive(&self, lease: i64) -> StoreResult<()> {
        let mut st = self.state.write().unwrap();
        let l = st
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.expires = Instant::now() + Duration::from_secs(l.ttl as u64);
        Ok(())
    }

    async fn revoke_lease(&self, lease: i64) -> StoreResult<()> {
        self.submit(Op::Revoke { id: lease }).await.map(|_| ())
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        self.submit(Op::Compact { revision }).await.map(|_| ())
    }

    async fn compacted_revision(&self) -> StoreResult<Revision> {
        Ok(self.state.read().unwrap().compacted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_tail_is_cut() {
        let recs = vec![
            Record::Header {
                revision: 7,
                compacted: 3,
                next_lease: 2,
            },
            Record::Put {
                kv: KeyValue {
                    key: "/a".into(),
                    value: Bytes::from_static(b"v"),
                    create_revision: 4,
                    mod_revision: 7,
                    lease: 1,
                },
            },
            Record::Delete {
                key: "/b".into(),
                revision: 8,
            },
            Record::End,
        ];
        let mut buf = Vec::new();
        for r in &recs {
            r.encode(&mut buf);
        }
        let (back, len) = read_records(&buf);
        assert_eq!(back, recs);
        assert_eq!(len, buf.len());
        // A crash in the middle of the last record: everything before it survives.
        let (back, len) = read_records(&buf[..buf.len() - 3]);
        assert_eq!(back, recs[..3]);
        assert!(len < buf.len());
        // A flipped bit stops the replay at that record.
        let mut bad = buf.clone();
        let n = bad.len();
        bad[n - 2] ^= 0x40;
        assert_eq!(read_records(&bad).0.len(), 3);
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        crate::store::conformance::run(s, "/conf").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopened_store_has_every_acknowledged_write_and_snapshots_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let last;
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            for i in 0..100 {
                s.put(
                    &format!("/k/{i:03}"),
                    Bytes::from(vec![i as u8; 10]),
                    Precondition::None,
                    0,
                )
                .await
                .unwrap();
            }
            s.delete("/k/050", Precondition::None).await.unwrap();
            last = s.current_revision().await.unwrap();
            // A second open of a directory in use is refused.
            assert!(EmbeddedStore::open(dir.path()).is_err());
        }
        // The committer thread holds the lock until it notices the store is gone.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let saved = dir.path().join("backup.snap");
        assert_eq!(snapshot_save(dir.path(), &saved).unwrap(), last);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.current_revision().await.unwrap(), last);
        let l = s
            .list(ListOptions {
                prefix: "/k/",
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(l.kvs.len(), 99);
        drop(s);
        let restored = dir.path().join("restored");
        assert_eq!(snapshot_restore(&saved, &restored, false).unwrap(), last);
        assert!(
            snapshot_restore(&saved, &restored, false).is_err(),
            "refuses a used dir"
        );
        let r = EmbeddedStore::open(&restored).unwrap();
        assert_eq!(r.current_revision().await.unwrap(), last);
        assert!(r.get("/k/050").await.unwrap().is_none());
        assert_eq!(
            r.get("/k/007").await.unwrap().unwrap().value,
            Bytes::from(vec![7u8; 10])
        );
        // Writes after a restore continue the revisions.
        let (kv, _) = r
            .put("/k/new", Bytes::new(), Precondition::None, 0)
            .await
            .unwrap();
        assert_eq!(kv.mod_revision, last + 1);
    }
}
