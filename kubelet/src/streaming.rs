//! The kubelet's streaming endpoints, which the API server's `pods/exec`, `pods/attach` and
//! `pods/portforward` lead to: `/exec/<ns>/<pod>/<container>`, `/attach/<ns>/<pod>/<container>`
//! and `/portForward/<ns>/<pod>`. Each finds the container (or sandbox) through CRI, asks the
//! runtime for a stream (CRI Exec, Attach, PortForward: containerd's streaming server, on the
//! node's loopback) and proxies the client's upgrade to it, so the WebSocket or SPDY protocol
//! the client offers is answered by the runtime itself.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_common::upgrade;

use crate::cri::{v1 as api, Cri};

/// An idle stream is closed after this (the kubelet's `--streaming-connection-idle-timeout`
/// is 4 h; a debugging session that moves nothing for an hour is over).
pub const IDLE: Duration = Duration::from_secs(3600);

fn bad(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, msg.into()).into_response()
}

/// The query's parameters in order (`command` repeats).
fn params(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn flag(p: &[(String, String)], key: &str) -> bool {
    p.iter()
        .any(|(k, v)| k == key && matches!(v.as_str(), "1" | "true" | "True"))
}

/// The ready sandbox of pod `ns/name`.
async fn sandbox(cri: &mut Cri, ns: &str, name: &str) -> Result<String, Response> {
    let boxes = cri
        .sandboxes()
        .await
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    boxes
        .into_iter()
        .filter(|s| s.state == api::PodSandboxState::SandboxReady as i32)
        .find(|s| {
            s.metadata
                .as_ref()
                .is_some_and(|m| m.namespace == ns && m.name == name)
        })
        .map(|s| s.id)
        .ok_or_else(|| {
            bad(
                StatusCode::NOT_FOUND,
                format!("pod {ns}/{name} is not running on this node"),
            )
        })
}

/// The running container `container` of pod `ns/name`.
async fn container(
    cri: &mut Cri,
    ns: &str,
    name: &str,
    container: &str,
) -> Result<String, Response> {
    let sb = sandbox(cri, ns, name).await?;
    let list = cri
        .containers(&sb)
        .await
        .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    list.into_iter()
        .filter(|c| c.state == api::ContainerState::ContainerRunning as i32)
        .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == container))
        .map(|c| c.id)
        .ok_or_else(|| {
            bad(
                StatusCode::NOT_FOUND,
                format!("container {container} of pod {ns}/{name} is not running"),
            )
        })
}

/// Proxies the client's upgrade to the runtime's stream at `url`.
async fn to_runtime(url: &str, mut req: Request<Body>) -> Response {
    let (authority, path) = match upgrade::split_http_url(url) {
        Ok(x) => x,
        Err(e) => return bad(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    if !upgrade::is_upgrade(req.headers()) {
        return bad(
            StatusCode::BAD_REQUEST,
            "this endpoint streams: the request must ask for an upgrade (WebSocket or SPDY/3.1)",
        );
    }
    let client = hyper::upgrade::on(&mut req);
    let answer = match tokio::net::TcpStream::connect(&authority).await {
        Ok(io) => upgrade::proxy(
            io,
            &authority,
            req.method().clone(),
            &path,
            req.headers(),
            client,
            IDLE,
        )
        .await
        .unwrap_or_else(|e| upgrade::unreachable_answer("the runtime's streaming server", &e)),
        Err(e) => upgrade::unreachable_answer(
            "the runtime's streaming server",
            &anyhow::anyhow!("connecting to {authority}: {e}"),
        ),
    };
    let mut resp = Response::new(Body::from(answer.body));
    *resp.status_mut() = answer.status;
    *resp.headers_mut() = answer.headers;
    resp
}

/// Finds the running container, asks the runtime for a stream with `ask`, and proxies the
/// client's upgrade to it (what exec and attach share).
async fn container_stream<F, Fut>(
    mut cri: Cri,
    (ns, pod, name): (String, String, String),
    req: Request<Body>,
    ask: F,
) -> Response
where
    F: FnOnce(Cri, String) -> Fut,
    Fut: std::future::Future<Output = Result<String, tonic::Status>>,
{
    let id = match container(&mut cri, &ns, &pod, &name).await {
        Ok(id) => id,
        Err(r) => return r,
    };
    match ask(cri, id).await {
        Ok(url) => to_runtime(&url, req).await,
        Err(s) => bad(StatusCode::INTERNAL_SERVER_ERROR, s.message().to_string()),
    }
}

pub async fn exec(
    State(cri): State<Cri>,
    UrlPath(names): UrlPath<(String, String, String)>,
    RawQuery(q): RawQuery,
    req: Request<Body>,
) -> Response {
    let p = params(q.as_deref());
    let cmd: Vec<String> = p
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if cmd.is_empty() {
        return bad(StatusCode::BAD_REQUEST, "exec needs a command");
    }
    container_stream(cri, names, req, |mut cri, id| async move {
        let r = cri
            .runtime
            .exec(api::ExecRequest {
                container_id: id,
                cmd,
                tty: flag(&p, "tty"),
                stdin: flag(&p, "stdin"),
                stdout: flag(&p, "stdout"),
                stderr: flag(&p, "stderr"),
            })
            .await?;
        Ok(r.into_inner().url)
    })
    .await
}

pub async fn attach(
    State(cri): State<Cri>,
    UrlPath(names): UrlPath<(String, String, String)>,
    RawQuery(q): RawQuery,
    req: Request<Body>,
) -> Response {
    let p = params(q.as_deref());
    container_stream(cri, names, req, |mut cri, id| async move {
        let r = cri
            .runtime
            .attach(api::AttachRequest {
                container_id: id,
                stdin: flag(&p, "stdin"),
                tty: flag(&p, "tty"),
                stdout: flag(&p, "stdout"),
                stderr: flag(&p, "stderr"),
            })
            .await?;
        Ok(r.into_inner().url)
    })
    .await
}

/// The `port` parameters of a port-forward (WebSocket clients name their ports there; SPDY
/// clients in each stream's headers, so none).
fn ports(p: &[(String, String)]) -> Result<Vec<i32>, String> {
    p.iter()
        .filter(|(k, _)| k == "port")
        .map(|(_, v)| match v.parse::<u16>() {
            Ok(n) if n > 0 => Ok(i32::from(n)),
            _ => Err(format!(
                "port {v:?}: a port must be a number between 1 and 65535"
            )),
        })
        .collect()
}

pub async fn port_forward(
    State(mut cri): State<Cri>,
    UrlPath((ns, pod)): UrlPath<(String, String)>,
    RawQuery(q): RawQuery,
    req: Request<Body>,
) -> Response {
    let port = match ports(&params(q.as_deref())) {
        Ok(p) => p,
        Err(e) => return bad(StatusCode::BAD_REQUEST, e),
    };
    let id = match sandbox(&mut cri, &ns, &pod).await {
        Ok(id) => id,
        Err(r) => return r,
    };
    // The runtime serves a WebSocket port-forward the ports of this request (containerd
    // ignores the URL's query); SPDY streams name theirs in their headers.
    let r = cri
        .runtime
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: id,
            port,
        })
        .await;
    match r {
        Ok(r) => {
            let mut url = r.into_inner().url;
            if let Some(q) = req.uri().query() {
                url = format!("{url}?{q}");
            }
            to_runtime(&url, req).await
        }
        Err(s) => bad(StatusCode::INTERNAL_SERVER_ERROR, s.message().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forward_ports_come_from_the_query() {
        assert_eq!(
            ports(&params(Some("port=80&port=8080"))).unwrap(),
            vec![80, 8080]
        );
        assert_eq!(ports(&params(None)).unwrap(), Vec::<i32>::new());
        for bad in ["port=0", "port=65536", "port=http"] {
            let e = ports(&params(Some(bad))).unwrap_err();
            assert!(e.contains("between 1 and 65535"), "{bad}: {e}");
        }
    }
}
