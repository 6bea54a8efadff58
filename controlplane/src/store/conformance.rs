//! The behaviour every [`Store`] backend must show; run against each backend by its tests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::*;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next_events(w: &mut WatchStream) -> Vec<Event> {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch delivered nothing within 10 s")
        .expect("watch ended")
        .expect("watch failed")
}

/// Runs every check against `s`, which must be empty and used by nobody else; keys are
/// under `root` so backends shared with other data stay apart.
pub async fn run(s: Arc<dyn Store>, root: &str) {
    let k = |n: &str| format!("{root}/{n}");
    let start = s.current_revision().await.unwrap();

    // Create, get, create again (refused).
    let (a, prev) = s
        .put(&k("a/1"), b("one"), Precondition::Absent, 0)
        .await
        .unwrap();
    assert!(prev.is_none());
    assert!(a.mod_revision > start);
    assert_eq!(a.create_revision, a.mod_revision);
    assert_eq!(s.get(&k("a/1")).await.unwrap().unwrap().value, b("one"));
    assert!(matches!(
        s.put(&k("a/1"), b("x"), Precondition::Absent, 0).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(s.get(&k("a/none")).await.unwrap().is_none());

    // Compare-and-swap on the mod revision.
    let (a2, prev) = s
        .put(
            &k("a/1"),
            b("two"),
            Precondition::ModRevision(a.mod_revision),
            0,
        )
        .await
        .unwrap();
    assert_eq!(prev.unwrap().value, b("one"));
    assert!(a2.mod_revision > a.mod_revision);
    assert_eq!(a2.create_revision, a.create_revision);
    match s
        .put(
            &k("a/1"),
            b("stale"),
            Precondition::ModRevision(a.mod_revision),
            0,
        )
        .await
    {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, a2.mod_revision),
        other => panic!("stale write was not refused: {other:?}"),
    }
    assert!(matches!(
        s.put(&k("a/none"), b("x"), Precondition::ModRevision(5), 0)
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.get(&k("a/1")).await.unwrap().unwrap().value, b("two"));

    // Lists: prefix, order, limit and continuation, at a past revision.
    for i in 2..=5 {
        s.put(
            &k(&format!("a/{i}")),
            b(&format!("v{i}")),
            Precondition::None,
            0,
        )
        .await
        .unwrap();
    }
    s.put(&k("b/1"), b("other"), Precondition::None, 0)
        .await
        .unwrap();
    let prefix = k("a/");
    let all = s
        .list(ListOptions {
            prefix: &prefix,
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(
        keys,
        (1..=5).map(|i| k(&format!("a/{i}"))).collect::<Vec<_>>()
    );
    assert!(!all.more);
    let page1 = s
        .list(ListOptions {
            prefix: &prefix,
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page1.kvs.len(), 2);
    assert!(page1.more);
    let last = page1.kvs[1].key.clone();
    // Changes after the first page do not show in later pages read at its revision.
    s.put(&k("a/4"), b("changed"), Precondition::None, 0)
        .await
        .unwrap();
    let page2 = s
        .list(ListOptions {
            prefix: &prefix,
            start_after: Some(&last),
            limit: 10,
            revision: page1.revision,
        })
        .await
        .unwrap();
    assert_eq!(page2.kvs.len(), 3);
    assert!(!page2.more);
    assert_eq!(
        page2.kvs[1].value,
        b("v4"),
        "page read at the first page's revision"
    );

    // Delete with a precondition; a deleted key is gone from get and list.
    let cur = s.get(&k("a/5")).await.unwrap().unwrap();
    assert!(matches!(
        s.delete(&k("a/5"), Precondition::ModRevision(cur.mod_revision - 1))
            .await,
        Err(StoreError::Conflict { .. })
    ));
    let (gone, del_rev) = s
        .delete(&k("a/5"), Precondition::ModRevision(cur.mod_revision))
        .await
        .unwrap();
    assert_eq!(gone.value, b("v5"));
    assert!(del_rev > cur.mod_revision);
    assert!(s.get(&k("a/5")).await.unwrap().is_none());
    assert!(matches!(
        s.delete(&k("a/5"), Precondition::None).await,
        Err(StoreError::NotFound(_))
    ));

    // Watch from a past revision replays, then follows live; only keys under the prefix.
    let mut w = s.watch(&prefix, a2.mod_revision).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 6 {
        seen.extend(next_events(&mut w).await);
    }
    // a/2..a/5 puts, the a/4 change, the a/5 delete.
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen
        .windows(2)
        .all(|p| p[0].kv.mod_revision < p[1].kv.mod_revision));
    assert_eq!(seen[5].kind, EventKind::Delete);
    assert_eq!(seen[5].kv.key, k("a/5"));
    assert_eq!(seen[5].kv.mod_revision, del_rev);
    assert_eq!(seen[5].prev.as_ref().unwrap().value, b("v5"));
    let (live, _) = s
        .put(&k("a/6"), b("live"), Precondition::Absent, 0)
        .await
        .unwrap();
    s.put(&k("b/2"), b("not mine"), Precondition::None, 0)
        .await
        .unwrap();
    let evs = next_events(&mut w).await;
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].kind, EventKind::Put);
    assert_eq!(evs[0].kv, live);

    // Leases: keys go when the lease is revoked or expires.
    let lease = s.grant_lease(1).await.unwrap();
    s.put(&k("l/1"), b("leased"), Precondition::None, lease)
        .await
        .unwrap();
    s.keep_alive(lease).await.unwrap();
    let lease2 = s.grant_lease(60).await.unwrap();
    s.put(&k("l/2"), b("leased"), Precondition::None, lease2)
        .await
        .unwrap();
    s.revoke_lease(lease2).await.unwrap();
    assert!(s.get(&k("l/2")).await.unwrap().is_none());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while s.get(&k("l/1")).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "leased key outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(matches!(
        s.put(&k("l/3"), b("x"), Precondition::None, lease2).await,
        Err(StoreError::LeaseNotFound(_))
    ));

    // Compaction: older revisions are refused to watches and lists, newer ones still work.
    let now = s.current_revision().await.unwrap();
    s.compact(now).await.unwrap();
    assert!(s.compacted_revision().await.unwrap() >= now);
    assert!(matches!(
        s.watch(&prefix, a.mod_revision).await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(matches!(
        s.list(ListOptions {
            prefix: &prefix,
            revision: a.mod_revision,
            ..Default::default()
        })
        .await,
        Err(StoreError::Compacted { .. })
    ));
    let after = s
        .list(ListOptions {
            prefix: &prefix,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(after.kvs.len(), 5, "compaction keeps the current values");
    let mut w = s.watch(&prefix, now).await.unwrap();
    s.put(&k("a/7"), b("after"), Precondition::None, 0)
        .await
        .unwrap();
    assert_eq!(next_events(&mut w).await[0].kv.key, k("a/7"));

    // Concurrent creates of one key: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        let key = k("race");
        tasks.push(tokio::spawn(async move {
            s.put(&key, b(&i.to_string()), Precondition::Absent, 0)
                .await
        }));
    }
    let mut won = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            won += 1;
        }
    }
    assert_eq!(won, 1);
}
