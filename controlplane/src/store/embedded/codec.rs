//! The records of the log and the snapshot, and their framing (length, CRC-32, payload):
//! a torn tail (a record a crash interrupted) is found and cut.

use anyhow::{bail, Context as _};
use bytes::Bytes;

use crate::store::{KeyValue, Revision};

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Record {
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

pub(super) struct Enc(Vec<u8>);

impl Enc {
    pub(super) fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
    }
}

pub(super) struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    pub(super) fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        if self.0.len() < n {
            bail!("record truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(super) fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn i64(&mut self) -> anyhow::Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into()?))
    }
    pub(super) fn bytes(&mut self) -> anyhow::Result<Vec<u8>> {
        let n = u32::from_le_bytes(self.take(4)?.try_into()?) as usize;
        Ok(self.take(n)?.to_vec())
    }
    pub(super) fn string(&mut self) -> anyhow::Result<String> {
        String::from_utf8(self.bytes()?).context("key is not UTF-8")
    }
}

impl Record {
    /// Appends the framed record: payload length, CRC-32 of the payload, payload.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
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

    pub(super) fn decode(payload: &[u8]) -> anyhow::Result<Record> {
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
pub(super) fn read_records(buf: &[u8]) -> (Vec<Record>, usize) {
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
