//! The buffer between a store's change feed and one watcher: bounded in events and bytes.
//!
//! A watcher that does not read (a stalled client, a full TCP window) must not make the server
//! hold every change for it. As kube-apiserver does with an "unresponsive watcher", a watcher
//! whose buffer is full is closed: what it held is freed at once, and it gets one error item
//! telling it to watch again (clients re-list or resume from their last resource version).
//!
//! A batch offered to an empty buffer is always taken, whatever its size: the backlog a new
//! watcher starts with is bounded by the store's history, and one commit by the request size.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use tokio::sync::Notify;

use super::{Event, StoreError, StoreResult, WatchStream};

/// How much one watcher may have waiting before it is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchLimits {
    pub events: usize,
    pub bytes: usize,
}

/// Kubernetes-like defaults: a thousand events, or 64 MiB of object data.
pub const DEFAULT_LIMITS: WatchLimits = WatchLimits {
    events: 1000,
    bytes: 64 << 20,
};

static LIMIT_EVENTS: AtomicUsize = AtomicUsize::new(DEFAULT_LIMITS.events);
static LIMIT_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_LIMITS.bytes);

/// Sets the bound of every watch started from now on (the server's `--watch-buffer-*` flags).
pub fn set_limits(l: WatchLimits) {
    LIMIT_EVENTS.store(l.events.max(1), Ordering::Relaxed);
    LIMIT_BYTES.store(l.bytes.max(1), Ordering::Relaxed);
}

pub fn limits() -> WatchLimits {
    WatchLimits {
        events: LIMIT_EVENTS.load(Ordering::Relaxed),
        bytes: LIMIT_BYTES.load(Ordering::Relaxed),
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<StoreResult<Vec<Event>>>,
    events: usize,
    bytes: usize,
    /// No more items will come (the sender went, or the watcher was closed).
    done: bool,
    /// The receiving stream was dropped.
    gone: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
}

/// The feeding half; the store's watch task holds it.
pub struct WatchSender {
    shared: Arc<Shared>,
    limits: WatchLimits,
}

/// Why a send was not taken: stop feeding.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// Nobody reads this watch any more.
    Gone,
    /// The watcher fell too far behind and was closed.
    Overflow,
}

fn size_of(batch: &[Event]) -> usize {
    batch
        .iter()
        .map(|e| e.kv.key.len() + e.kv.value.len() + e.prev.as_ref().map_or(0, |p| p.value.len()))
        .sum()
}

impl WatchSender {
    /// Queues a batch without waiting. An error item ends the watch after what is queued.
    pub fn send(&self, item: StoreResult<Vec<Event>>) -> Result<(), Closed> {
        let mut q = self.shared.queue.lock().unwrap();
        if q.gone {
            return Err(Closed::Gone);
        }
        if q.done {
            return Err(Closed::Overflow);
        }
        let (events, bytes) = match &item {
            Ok(b) => (b.len(), size_of(b)),
            Err(_) => (0, 0),
        };
        let empty = q.items.is_empty();
        if !empty && (q.events + events > self.limits.events || q.bytes + bytes > self.limits.bytes)
        {
            let (held_events, held_bytes) = (q.events, q.bytes);
            q.items.clear();
            q.events = 0;
            q.bytes = 0;
            q.done = true;
            q.items.push_back(Err(StoreError::Other(anyhow!(
                "watcher did not read its events ({held_events} events, {held_bytes} bytes waiting; limits {} events, {} bytes): closed, watch again",
                self.limits.events,
                self.limits.bytes
            ))));
            drop(q);
            tracing::info!(held_events, held_bytes, "closing an unresponsive watcher");
            self.shared.ready.notify_one();
            return Err(Closed::Overflow);
        }
        let end = item.is_err();
        q.events += events;
        q.bytes += bytes;
        q.items.push_back(item);
        q.done |= end;
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// The reader went away: the feeding task may stop.
    pub fn is_gone(&self) -> bool {
        self.shared.queue.lock().unwrap().gone
    }
}

impl Drop for WatchSender {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().done = true;
        self.shared.ready.notify_one();
    }
}

/// Marks the queue gone when the stream is dropped, so the feeding task stops.
struct Reader(Arc<Shared>);

impl Drop for Reader {
    fn drop(&mut self) {
        let mut q = self.0.queue.lock().unwrap();
        q.gone = true;
        q.items.clear();
    }
}

/// A bounded buffer with the current limits: the sending half and the stream a watcher reads.
pub fn channel() -> (WatchSender, WatchStream) {
    channel_with(limits())
}

pub fn channel_with(limits: WatchLimits) -> (WatchSender, WatchStream) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        ready: Notify::new(),
    });
    let reader = Reader(shared.clone());
    let stream = futures::stream::unfold(reader, |reader| async move {
        loop {
            let item = {
                let notified = reader.0.ready.notified();
                tokio::pin!(notified);
                // Registered before looking, so a send between the look and the wait wakes us.
                notified.as_mut().enable();
                let next = {
                    let mut q = reader.0.queue.lock().unwrap();
                    match q.items.pop_front() {
                        Some(item) => {
                            if let Ok(b) = &item {
                                q.events -= b.len();
                                q.bytes -= size_of(b);
                            }
                            Some(Some(item))
                        }
                        None if q.done => Some(None),
                        None => None,
                    }
                };
                match next {
                    Some(found) => found,
                    None => {
                        notified.await;
                        continue;
                    }
                }
            };
            return item.map(|i| (i, reader));
        }
    });
    (WatchSender { shared, limits }, Box::pin(stream))
}

/// A stream fed by a task: `f` gets the sending half of a bounded watch buffer.
pub(crate) fn spawn_fed<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(WatchSender) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = channel();
    tokio::spawn(f(tx));
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EventKind, KeyValue};
    use bytes::Bytes;
    use futures::StreamExt;

    fn ev(rev: i64, size: usize) -> Event {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: "k".into(),
                value: Bytes::from(vec![b'x'; size]),
                create_revision: 1,
                mod_revision: rev,
                lease: 0,
            },
            prev: None,
        }
    }

    #[tokio::test]
    async fn a_reader_gets_every_batch_in_order() {
        let (tx, mut rx) = channel_with(WatchLimits {
            events: 10,
            bytes: 1000,
        });
        for r in 1..=5 {
            tx.send(Ok(vec![ev(r, 10)])).unwrap();
            let got = rx.next().await.unwrap().unwrap();
            assert_eq!(got[0].kv.mod_revision, r);
        }
        drop(tx);
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn a_watcher_that_does_not_read_is_closed_and_its_events_freed() {
        let (tx, mut rx) = channel_with(WatchLimits {
            events: 3,
            bytes: 1 << 20,
        });
        // The first batch is taken whatever its size (a backlog).
        tx.send(Ok((1..=5).map(|r| ev(r, 1)).collect())).unwrap();
        assert_eq!(tx.send(Ok(vec![ev(6, 1)])), Err(Closed::Overflow));
        assert_eq!(tx.send(Ok(vec![ev(7, 1)])), Err(Closed::Overflow));
        // What was queued is gone; the reader sees one error, then the end.
        let e = rx.next().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("watch again"), "{e}");
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn bytes_bound_as_well_as_events() {
        let (tx, mut rx) = channel_with(WatchLimits {
            events: 1000,
            bytes: 100,
        });
        tx.send(Ok(vec![ev(1, 60)])).unwrap();
        assert_eq!(tx.send(Ok(vec![ev(2, 60)])), Err(Closed::Overflow));
        assert!(rx.next().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_dropped_reader_stops_the_feeder() {
        let (tx, rx) = channel();
        drop(rx);
        assert!(tx.is_gone());
        assert_eq!(tx.send(Ok(vec![ev(1, 1)])), Err(Closed::Gone));
    }
}
