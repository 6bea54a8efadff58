//! The versioned state in memory: every key's versions, leases, the revision, compaction.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::store::{Event, EventKind, KeyValue, Revision};

use super::codec::Record;

#[derive(Clone, Debug)]
pub(super) struct Version {
    pub(super) kv: KeyValue,
    /// A tombstone: the key was deleted at `kv.mod_revision`.
    pub(super) deleted: bool,
}

pub(super) struct Lease {
    pub(super) ttl: i64,
    pub(super) expires: Instant,
    pub(super) keys: HashSet<String>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) revision: Revision,
    pub(super) compacted: Revision,
    pub(super) next_lease: i64,
    /// Every key's versions, oldest first, back to the compacted revision.
    pub(super) keys: BTreeMap<String, Vec<Version>>,
    /// Every event after the compacted revision, oldest first.
    pub(super) events: VecDeque<Event>,
    pub(super) leases: HashMap<i64, Lease>,
}

impl State {
    pub(super) fn latest(&self, key: &str) -> Option<&KeyValue> {
        self.keys
            .get(key)
            .and_then(|v| v.last())
            .filter(|v| !v.deleted)
            .map(|v| &v.kv)
    }

    pub(super) fn at(&self, key: &str, revision: Revision) -> Option<&KeyValue> {
        let versions = self.keys.get(key)?;
        let i = versions.partition_point(|v| v.kv.mod_revision <= revision);
        let v = versions.get(i.checked_sub(1)?)?;
        (!v.deleted).then_some(&v.kv)
    }

    /// Applies a record (during recovery and after a commit); returns its event.
    pub(super) fn apply(&mut self, rec: &Record, now: Instant) -> Option<Event> {
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

    pub(super) fn compact(&mut self, revision: Revision) {
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
    pub(super) fn snapshot_records(&self) -> Vec<Record> {
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
