//! The kubelet's HTTP endpoint (the Node's daemonEndpoints port, served over TLS to the API
//! server only: `serving.rs`): container logs for the API server's `pods/log` (`kubectl
//! logs`), the streams of `exec`, `attach` and `port-forward` (`streaming.rs`), resource usage
//! at `/stats/summary` (`stats.rs`), and /healthz.
//!
//! Logs are the files containerd writes in CRI's format, one per container attempt
//! (`<pod dir>/logs/<container>/<attempt>.log`), each line
//! `<RFC 3339 time> <stdout|stderr> <F|P> <text>` (P: a partial line continued by the next).

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use k8s_openapi::chrono::{DateTime, Utc};

pub fn router(pods_dir: PathBuf, cri: crate::cri::Cri, stats: crate::stats::Stats) -> Router {
    use crate::streaming;
    let streams = Router::new()
        .route(
            "/exec/{ns}/{pod}/{container}",
            get(streaming::exec).post(streaming::exec),
        )
        .route(
            "/attach/{ns}/{pod}/{container}",
            get(streaming::attach).post(streaming::attach),
        )
        .route(
            "/portForward/{ns}/{pod}",
            get(streaming::port_forward).post(streaming::port_forward),
        )
        .with_state(cri);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .with_state(Arc::new(pods_dir))
        .merge(streams)
        .merge(
            Router::new()
                .route("/stats/summary", get(crate::stats::summary))
                .with_state(stats),
        )
}

fn bad(code: StatusCode, msg: String) -> Response {
    (code, msg).into_response()
}

/// The pod's directory (the newest, should a pod of the same name have run before).
fn pod_dir(pods_dir: &Path, ns: &str, pod: &str) -> Option<PathBuf> {
    let prefix = format!("{ns}_{pod}_");
    std::fs::read_dir(pods_dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// The container's log files by attempt, oldest first.
fn attempts(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_suffix(".log")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// One CRI log record.
struct Record<'a> {
    time: &'a str,
    partial: bool,
    text: &'a str,
}

fn parse(line: &str) -> Option<Record<'_>> {
    let mut it = line.splitn(4, ' ');
    let time = it.next()?;
    let _stream = it.next()?;
    let tag = it.next()?;
    Some(Record {
        time,
        partial: tag == "P",
        text: it.next().unwrap_or(""),
    })
}

#[derive(Default)]
struct Options {
    timestamps: bool,
    since: Option<DateTime<Utc>>,
}

/// Turns complete CRI lines into the log's text lines (partials joined).
fn render(lines: &str, o: &Options, pending: &mut String) -> Vec<String> {
    let mut out = Vec::new();
    for line in lines.lines() {
        let Some(r) = parse(line) else { continue };
        if let Some(since) = o.since {
            if DateTime::parse_from_rfc3339(r.time).is_ok_and(|t| t < since) {
                continue;
            }
        }
        if pending.is_empty() && o.timestamps {
            pending.push_str(r.time);
            pending.push(' ');
        }
        pending.push_str(r.text);
        if !r.partial {
            pending.push('\n');
            out.push(std::mem::take(pending));
        }
    }
    out
}

async fn container_logs(
    State(pods_dir): State<Arc<PathBuf>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let flag = |k: &str| matches!(q.get(k).map(String::as_str), Some("true") | Some("1"));
    let Some(dir) = pod_dir(&pods_dir, &ns, &pod) else {
        return bad(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} has no logs on this node"),
        );
    };
    let files = attempts(&dir.join("logs").join(&container));
    let file = if flag("previous") {
        files.len().checked_sub(2).map(|i| files[i].clone())
    } else {
        files.last().cloned()
    };
    let Some(file) = file else {
        let msg = if flag("previous") {
            format!("previous terminated container \"{container}\" in pod \"{pod}\" not found")
        } else {
            format!("container \"{container}\" in pod \"{pod}\" is waiting to start")
        };
        return bad(StatusCode::BAD_REQUEST, msg);
    };
    let mut o = Options {
        timestamps: flag("timestamps"),
        ..Default::default()
    };
    if let Some(s) = q.get("sinceSeconds").and_then(|s| s.parse::<i64>().ok()) {
        o.since = Some(Utc::now() - k8s_openapi::chrono::Duration::seconds(s));
    }
    if let Some(t) = q
        .get("sinceTime")
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        o.since = Some(t.with_timezone(&Utc));
    }
    let mut f = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(e) => {
            return bad(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {}: {e}", file.display()),
            )
        }
    };
    let mut text = String::new();
    if let Err(e) = f.read_to_string(&mut text) {
        return bad(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the log: {e}"),
        );
    }
    // Only complete lines now; a follower picks up the rest.
    let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let mut pending = String::new();
    let mut lines = render(&text[..complete], &o, &mut pending);
    if let Some(n) = q.get("tailLines").and_then(|n| n.parse::<usize>().ok()) {
        lines = lines.split_off(lines.len().saturating_sub(n));
    }
    let mut first: String = lines.concat();
    if let Some(n) = q.get("limitBytes").and_then(|n| n.parse::<usize>().ok()) {
        let mut cut = n.min(first.len());
        while !first.is_char_boundary(cut) {
            cut -= 1;
        }
        first.truncate(cut);
        return first.into_response();
    }
    if !flag("follow") {
        return first.into_response();
    }
    // Follow: new complete lines as they are written, until the client goes away or the
    // container restarts (a newer attempt's file appears).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(16);
    let attempts_dir = dir.join("logs").join(&container);
    tokio::spawn(async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        let mut offset = complete as u64;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut chunk = String::new();
            if f.seek(SeekFrom::Start(offset)).is_err() || f.read_to_string(&mut chunk).is_err() {
                return;
            }
            let complete = chunk.rfind('\n').map(|i| i + 1).unwrap_or(0);
            offset += complete as u64;
            let out = render(&chunk[..complete], &o, &mut pending).concat();
            if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                return;
            }
            if tx.is_closed() || attempts(&attempts_dir).last() != Some(&file) {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Body::from_stream(stream).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cri_lines_joining_partials() {
        let cri = "2026-01-01T00:00:00.1Z stdout F one\n\
                   2026-01-01T00:00:01.1Z stdout P tw\n\
                   2026-01-01T00:00:01.2Z stdout F o\n\
                   2026-01-01T00:00:02.1Z stderr F three and more\n";
        let mut pending = String::new();
        let plain = render(cri, &Options::default(), &mut pending);
        assert_eq!(plain, ["one\n", "two\n", "three and more\n"]);
        let o = Options {
            timestamps: true,
            since: Some("2026-01-01T00:00:01Z".parse().unwrap()),
        };
        let stamped = render(cri, &o, &mut pending);
        assert_eq!(
            stamped,
            [
                "2026-01-01T00:00:01.1Z two\n",
                "2026-01-01T00:00:02.1Z three and more\n"
            ]
        );
    }

    #[test]
    fn attempts_sort_by_number() {
        let dir = std::env::temp_dir().join(format!("ferry-kubelet-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in [0, 10, 2] {
            std::fs::write(dir.join(format!("{n}.log")), "").unwrap();
        }
        let names: Vec<String> = attempts(&dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["0.log", "2.log", "10.log"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
