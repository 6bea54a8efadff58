//! Watch: a chunked stream of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`
//! lines, from a resource version (events after it), or from now with the current objects
//! as ADDED first (resourceVersion unset or "0"). A compacted start gets an ERROR event with
//! a 410 Expired Status, as from Kubernetes. Objects that stop matching the selectors are
//! sent as DELETED, those that start matching as ADDED.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::VecDeque;

use super::resources::ResourceInfo;
use super::status::{ApiError, ApiResult};
use super::verbs::Listed;
use super::{decode, splice_rv, table, wants_table, Api, Query};
use crate::store::{EventKind, KeyValue, StoreError};
use ferry_common::selectors::{labels_of, FieldSelector, LabelSelector};

/// Bookmarks go out this often to watchers that asked for them.
const BOOKMARK_EVERY: Duration = Duration::from_secs(15);

struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
    fn matches(&self, obj: &Value) -> bool {
        (self.labels.is_empty() || self.labels.matches(&labels_of(obj)))
            && (self.fields.is_empty() || self.fields.matches(obj))
    }
}

fn line(kind: &str, object: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(object.len() + 32);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    out.extend_from_slice(object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

pub async fn watch(
    api: Arc<Api>,
    info: &'static ResourceInfo,
    ns: Option<String>,
    name: Option<String>,
    q: &Query,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let mut fields = q.get("fieldSelector").unwrap_or_default().to_string();
    if let Some(n) = &name {
        // The legacy /watch/.../name path: a watch of one object.
        if !fields.is_empty() {
            fields.push(',');
        }
        fields.push_str(&format!("metadata.name={n}"));
    }
    let filter = Filter {
        labels: LabelSelector::parse(q.get("labelSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(&fields, &info.field_selectable())
            .map_err(ApiError::bad_request)?,
    };
    let as_table = wants_table(headers);
    let bookmarks = q.flag("allowWatchBookmarks");
    let initial_events = q.flag("sendInitialEvents");
    let timeout = q
        .count("timeoutSeconds")?
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800 + rand::random::<u64>() % 1800));
    let rv_param = q.get("resourceVersion").map(String::from);

    // The starting point: from a given revision, or from now with the current objects.
    let mut initial: Vec<Value> = Vec::new();
    let start: i64 = match rv_param.as_deref() {
        Some(rv) if rv != "0" && !initial_events => rv.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "invalid resourceVersion \"{rv}\": must be an integer"
            ))
        })?,
        _ => {
            let mut lq = Query(q.0.clone());
            lq.0.remove("limit");
            lq.0.remove("continue");
            lq.0.insert("fieldSelector".into(), fields.clone());
            lq.0.remove("resourceVersion");
            let Listed(items, rev, _) = api.list_objects(info, ns.as_deref(), &lq).await?;
            initial = items;
            rev
        }
    };
    let prefix = info.list_prefix(ns.as_deref());
    let stream = api.store.watch(&prefix, start).await;
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    let mut stream = match stream {
        Ok(s) => Some(s),
        Err(e) => {
            pending.push_back(error_line(&e, start));
            None
        }
    };
    if stream.is_some() {
        for obj in &initial {
            pending.push_back(line("ADDED", &encode_obj(info, as_table, obj)));
        }
        if initial_events && bookmarks {
            pending.push_back(bookmark(info, start, true));
        }
    }
    let tick =
        tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
    let deadline = tokio::time::Instant::now() + timeout;
    let plain = filter.is_empty() && !as_table;
    // The response body pulls events itself: no task or channel between the store and the
    // connection. A client that goes away drops the body, and with it the store watch.
    let state = WatchState {
        pending,
        stream: stream.take(),
        tick,
        deadline,
        last: start,
        plain,
        bookmarks,
        filter,
        info,
        as_table,
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.pending.pop_front() {
                return Some((Ok::<_, std::io::Error>(b), st));
            }
            let stream = st.stream.as_mut()?;
            tokio::select! {
                _ = tokio::time::sleep_until(st.deadline) => return None,
                _ = st.tick.tick(), if st.bookmarks => st.pending.push_back(bookmark(st.info, st.last, false)),
                batch = stream.next() => match batch {
                    None => return None,
                    Some(Err(e)) => {
                        st.pending.push_back(error_line(&e, st.last));
                        st.stream = None;
                    }
                    Some(Ok(evs)) => {
                        for ev in evs {
                            st.last = ev.kv.mod_revision;
                            let out = if st.plain {
                                // No parsing: the stored bytes with the revision spliced in.
                                let kind = match (&ev.kind, &ev.prev) {
                                    (EventKind::Delete, _) => "DELETED",
                                    (EventKind::Put, None) => "ADDED",
                                    (EventKind::Put, Some(_)) => "MODIFIED",
                                };
                                Some(line(kind, &splice_rv(&ev.kv.value, ev.kv.mod_revision)))
                            } else {
                                classify(&st.filter, &ev.kind, &ev.kv, ev.prev.as_ref())
                                    .map(|(k, o)| line(k, &encode_obj(st.info, st.as_table, &o)))
                            };
                            st.pending.extend(out);
                        }
                    }
                },
            }
        }
    });
    Ok((
        StatusCode::OK,
        [
            (axum::http::header::CONTENT_TYPE, "application/json"),
            (axum::http::header::CACHE_CONTROL, "no-cache, private"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

struct WatchState {
    pending: VecDeque<Bytes>,
    stream: Option<crate::store::WatchStream>,
    tick: tokio::time::Interval,
    deadline: tokio::time::Instant,
    last: i64,
    plain: bool,
    bookmarks: bool,
    filter: Filter,
    info: &'static ResourceInfo,
    as_table: bool,
}

fn encode_obj(info: &'static ResourceInfo, as_table: bool, obj: &Value) -> Vec<u8> {
    if as_table {
        serde_json::to_vec(&table::table(info, std::slice::from_ref(obj), json!({})))
            .unwrap_or_default()
    } else {
        serde_json::to_vec(obj).unwrap_or_default()
    }
}

/// A BOOKMARK event at `rv`; `initial_end` marks the end of `sendInitialEvents`.
fn bookmark(info: &'static ResourceInfo, rv: i64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let obj = json!({"kind": info.kind, "apiVersion": info.api_version(), "metadata": meta});
    line("BOOKMARK", &serde_json::to_vec(&obj).unwrap_or_default())
}

/// The event a filtered watcher sees for a change, if any.
fn classify(
    f: &Filter,
    kind: &EventKind,
    kv: &KeyValue,
    prev: Option<&KeyValue>,
) -> Option<(&'static str, Value)> {
    let new = decode(kv);
    let old_matches = prev.map(|p| f.matches(&decode(p))).unwrap_or(false);
    match kind {
        EventKind::Delete => old_matches.then_some(("DELETED", new)),
        EventKind::Put => {
            let now_matches = f.matches(&new);
            match (old_matches, now_matches) {
                (false, true) => Some(("ADDED", new)),
                (true, true) => Some(("MODIFIED", new)),
                (true, false) => Some(("DELETED", new)),
                (false, false) => None,
            }
        }
    }
}

fn error_line(e: &StoreError, rv: i64) -> Bytes {
    let err = match e {
        StoreError::Compacted { compacted, .. } => {
            ApiError::gone(format!("too old resource version: {rv} ({compacted})"))
        }
        other => ApiError::internal(format!("watch ended: {other}")),
    };
    line(
        "ERROR",
        &serde_json::to_vec(&err.to_status()).unwrap_or_default(),
    )
}
