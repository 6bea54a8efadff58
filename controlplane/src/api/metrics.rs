//! The API server's own Prometheus metrics at `/metrics`, named and labelled as
//! kube-apiserver's so its dashboards and alerts read them: `apiserver_request_total` and
//! `apiserver_request_duration_seconds` by verb, group, version, resource, subresource and scope
//! (and code), `apiserver_longrunning_requests` (open watches and followed logs) and
//! `apiserver_current_inflight_requests` (readOnly, mutating). Labels come from the routed
//! request (the served resources, a fixed set of verbs and codes), never from what a client
//! wrote, so a client cannot grow the series. Reading them takes `get` on the path `/metrics`
//! (`system:monitoring`, as Kubernetes).

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::Method;
use bytes::Bytes;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// What a request was, in the metrics' terms.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    pub verb: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    /// `resource` (one object), `namespace`, `cluster`, or empty for a path.
    pub scope: String,
    pub component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Answered {
    verb: String,
    group: String,
    version: String,
    resource: String,
    subresource: String,
    scope: String,
    component: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    request_kind: &'static str,
}

fn latency() -> Histogram {
    // kube-apiserver's buckets, in seconds.
    Histogram::new([
        0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
        10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    ])
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Answered, Counter>,
    duration: Family<Request, Histogram, fn() -> Histogram>,
    long_running: Family<Request, Gauge>,
    inflight: Family<Kind, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            long_running: Family::default(),
            inflight: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap();
            r.register(
                "apiserver_request",
                "Requests answered, by verb, group, version, resource, subresource, scope, component and HTTP code",
                m.requests.clone(),
            );
            r.register(
                "apiserver_request_duration_seconds",
                "Time from a request's arrival to its answer (to the start of a watch's or stream's body)",
                m.duration.clone(),
            );
            r.register(
                "apiserver_longrunning_requests",
                "Open long-running requests (watches, followed logs)",
                m.long_running.clone(),
            );
            r.register(
                "apiserver_current_inflight_requests",
                "Requests being served, by kind (readOnly, mutating); watches are not counted",
                m.inflight.clone(),
            );
        }
        m
    }
}

/// Kubernetes' verb label: the request verb upper-cased, CONNECT for streams.
pub fn verb_label(verb: &str, method: &Method, streaming: bool) -> String {
    if streaming {
        return "CONNECT".into();
    }
    match verb {
        "create" => "POST".into(),
        "update" => "PUT".into(),
        "" => method.as_str().to_string(),
        v => v.to_ascii_uppercase(),
    }
}

/// A request's labels in the API server's metrics (see `metrics.rs`): from the routed target,
/// never from free text the client wrote.
pub(super) fn request_labels(method: &Method, path: &str, q: Option<&str>) -> Request {
    let known = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    let method_label = if known.contains(method) {
        method.as_str().to_string()
    } else {
        "OTHER".into()
    };
    let component = "apiserver".to_string();
    match super::parse_target(path) {
        Ok(Some(t)) => {
            let verb = super::verb_of(method, &t, &super::Query::parse(q));
            let streaming = t
                .sub
                .as_deref()
                .is_some_and(|s| super::streaming::STREAMING.contains(&s));
            let scope = match (&t.name, &t.ns) {
                (Some(_), _) => "resource",
                (None, Some(_)) => "namespace",
                (None, None) => "cluster",
            };
            Request {
                verb: if verb == "unknown" {
                    method_label
                } else {
                    verb_label(verb, method, streaming)
                },
                group: t.info.group.into(),
                version: t.info.version.into(),
                resource: t.info.plural.into(),
                subresource: t.sub.clone().unwrap_or_default(),
                scope: scope.into(),
                component,
            }
        }
        _ => Request {
            verb: method_label,
            component,
            ..Default::default()
        },
    }
}

impl Metrics {
    /// Counts an answered request and its duration.
    pub fn answered(&self, r: &Request, code: u16, secs: f64) {
        self.requests
            .get_or_create(&Answered {
                verb: r.verb.clone(),
                group: r.group.clone(),
                version: r.version.clone(),
                resource: r.resource.clone(),
                subresource: r.subresource.clone(),
                scope: r.scope.clone(),
                component: r.component.clone(),
                code: code.to_string(),
            })
            .inc();
        self.duration.get_or_create(r).observe(secs);
    }

    /// Counts `body` as an open long-running request until it is dropped.
    pub fn long_running(&self, r: &Request, body: Body) -> Body {
        let g = self.long_running.get_or_create(r).clone();
        g.inc();
        Body::new(Tracked {
            inner: body,
            gauge: g,
        })
    }

    /// The text exposition, with the in-flight gauges as of now.
    pub fn render(&self, reads: i64, writes: i64) -> String {
        self.inflight
            .get_or_create(&Kind {
                request_kind: "readOnly",
            })
            .set(reads);
        self.inflight
            .get_or_create(&Kind {
                request_kind: "mutating",
            })
            .set(writes);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry.lock().unwrap());
        out
    }
}

/// A body that holds one on its gauge while the client reads it.
struct Tracked {
    inner: Body,
    gauge: Gauge,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_long_running_ones_are_counted() {
        let m = Metrics::default();
        let pods = Request {
            verb: "LIST".into(),
            version: "v1".into(),
            resource: "pods".into(),
            scope: "namespace".into(),
            component: "apiserver".into(),
            ..Default::default()
        };
        m.answered(&pods, 200, 0.003);
        m.answered(&pods, 200, 0.3);
        let watch = Request {
            verb: "WATCH".into(),
            ..pods.clone()
        };
        let body = m.long_running(&watch, Body::empty());
        let text = m.render(2, 1);
        assert!(text.contains(r#"apiserver_request_total{verb="LIST",group="",version="v1",resource="pods",subresource="",scope="namespace",component="apiserver",code="200"} 2"#), "{text}");
        assert!(
            text.contains(r#"apiserver_request_duration_seconds_bucket{le="0.005",verb="LIST""#)
                || text.contains(r#"apiserver_request_duration_seconds_bucket{verb="LIST""#),
            "{text}"
        );
        assert!(text.contains(r#"apiserver_longrunning_requests{verb="WATCH",group="",version="v1",resource="pods",subresource="",scope="namespace",component="apiserver"} 1"#), "{text}");
        assert!(
            text.contains(r#"apiserver_current_inflight_requests{request_kind="readOnly"} 2"#),
            "{text}"
        );
        drop(body);
        assert!(m.render(0, 0).contains(r#"apiserver_longrunning_requests{verb="WATCH",group="",version="v1",resource="pods",subresource="",scope="namespace",component="apiserver"} 0"#));
        assert_eq!(verb_label("create", &Method::POST, false), "POST");
        assert_eq!(
            verb_label("deletecollection", &Method::DELETE, false),
            "DELETECOLLECTION"
        );
        assert_eq!(verb_label("create", &Method::GET, true), "CONNECT");
    }
}
