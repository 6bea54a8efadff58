//! Encoded answers of the cluster zone, keyed by the query's bytes after its ID: a query that
//! repeats one already answered (same name in the same case, type, class, flags and EDNS
//! options) gets the same bytes back with its own ID, without being parsed, answered or
//! encoded again. Valid for one generation of the records: any change empties it. Only
//! answers decided from the records alone go in (never a refusal, which depends on the
//! source, nor a forwarded answer).

use std::collections::HashMap;
use std::sync::RwLock;

pub struct ReplyCache {
    inner: RwLock<Inner>,
    capacity: usize,
}

#[derive(Default)]
struct Inner {
    generation: u32,
    map: HashMap<Box<[u8]>, Box<[u8]>>,
}

/// The smallest message with an ID.
const ID_LEN: usize = 2;

impl ReplyCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            capacity,
        }
    }

    /// The answer to `query` for this `generation` of the records, with the query's ID.
    pub fn get(&self, generation: u32, query: &[u8]) -> Option<Vec<u8>> {
        if query.len() <= ID_LEN {
            return None;
        }
        let inner = self.inner.read().unwrap();
        if inner.generation != generation {
            return None;
        }
        let reply = inner.map.get(&query[ID_LEN..])?;
        let mut out = reply.to_vec();
        out[..ID_LEN].copy_from_slice(&query[..ID_LEN]);
        Some(out)
    }

    pub fn put(&self, generation: u32, query: &[u8], reply: &[u8]) {
        if query.len() <= ID_LEN || reply.len() < ID_LEN || self.capacity == 0 {
            return;
        }
        let mut inner = self.inner.write().unwrap();
        // A new generation, or full: start over (bounded, and cheap to refill).
        if inner.generation != generation || inner.map.len() >= self.capacity {
            inner.map.clear();
            inner.generation = generation;
        }
        inner.map.insert(query[ID_LEN..].into(), reply.into());
    }
}

#[cfg(test)]
mod tests {
    use super::ReplyCache;

    #[test]
    fn answers_repeat_with_their_own_id_within_a_generation() {
        let c = ReplyCache::new(2);
        c.put(1, b"\x00\x01question", b"\x00\x01answer");
        assert_eq!(c.get(1, b"\x12\x34question").unwrap(), b"\x12\x34answer");
        // Another case of the name is another key (the answer echoes the question's case).
        assert!(c.get(1, b"\x12\x34QUESTION").is_none());
        // A change of the records empties it.
        assert!(c.get(2, b"\x12\x34question").is_none());
        c.put(2, b"\x00\x01other", b"\x00\x01x");
        assert!(c.get(2, b"\x00\x09question").is_none());
        // Bounded.
        c.put(2, b"\x00\x01a", b"\x00\x01a");
        c.put(2, b"\x00\x01b", b"\x00\x01b");
        assert!(c.get(2, b"\x00\x01other").is_none());
        assert!(c.get(2, b"\x00\x01b").is_some());
        assert!(c.get(2, b"\x00").is_none());
    }
}
