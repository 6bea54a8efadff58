//! Liveness and readiness probes: exec (through CRI), httpGet and tcpSocket (from the node to
//! the pod's address), with Kubernetes' timing fields and thresholds.

use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cri::Cri;

/// One probe's state for one container run.
#[derive(Debug)]
pub struct Prober {
    probe: Probe,
    started: Instant,
    last: Option<Instant>,
    successes: i32,
    failures: i32,
    /// The current verdict (after thresholds).
    pub ok: bool,
    /// The last failure's message.
    pub message: String,
    /// Whether the last run failed.
    pub failed_now: bool,
}

impl Prober {
    /// `initial`: the verdict before the first result (readiness: false, liveness: true).
    pub fn new(probe: Probe, initial: bool) -> Prober {
        Prober {
            probe,
            started: Instant::now(),
            last: None,
            successes: 0,
            failures: 0,
            ok: initial,
            message: String::new(),
            failed_now: false,
        }
    }

    fn due(&self) -> bool {
        let delay =
            Duration::from_secs(self.probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        let period = Duration::from_secs(self.probe.period_seconds.unwrap_or(10).max(1) as u64);
        self.started.elapsed() >= delay && self.last.is_none_or(|l| l.elapsed() >= period)
    }

    /// Runs the probe if it is due; returns whether the verdict changed.
    pub async fn tick(
        &mut self,
        cri: &mut Cri,
        container_id: &str,
        pod_ip: &str,
        c: &Container,
    ) -> bool {
        if !self.due() {
            return false;
        }
        self.last = Some(Instant::now());
        let result = run(&self.probe, cri, container_id, pod_ip, c).await;
        let before = self.ok;
        self.failed_now = result.is_err();
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes += 1;
                if self.successes >= self.probe.success_threshold.unwrap_or(1).max(1) {
                    self.ok = true;
                }
            }
            Err(msg) => {
                self.successes = 0;
                self.failures += 1;
                self.message = msg;
                if self.failures >= self.probe.failure_threshold.unwrap_or(3).max(1) {
                    self.ok = false;
                }
            }
        }
        before != self.ok
    }
}

/// A named or numbered port of the container.
fn port(p: &IntOrString, c: &Container) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} is out of range")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| format!("the container has no port named {name:?}")),
    }
}

async fn run(
    probe: &Probe,
    cri: &mut Cri,
    id: &str,
    pod_ip: &str,
    c: &Container,
) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(exec) = &probe.exec {
        let cmd = exec.command.clone().unwrap_or_default();
        return match cri
            .exec_sync(id, cmd.clone(), timeout.as_secs() as i64)
            .await
        {
            Ok((0, _)) => Ok(()),
            Ok((code, out)) => Err(format!("exec {cmd:?} exited with {code}: {}", out.trim())),
            Err(e) => Err(format!("exec {cmd:?}: {e:#}")),
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let host = tcp.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let port = port(&tcp.port, c)?;
        return match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
            Err(_) => Err(format!(
                "dial tcp {host}:{port}: timed out after {timeout:?}"
            )),
        };
    }
    if let Some(http) = &probe.http_get {
        let host = http.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let port = port(&http.port, c)?;
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let url = format!("http://{host}:{port}{path}");
        return match tokio::time::timeout(timeout, http_get(&host, port, &path)).await {
            Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
            Ok(Ok(code)) => Err(format!("HTTP probe failed with statuscode: {code} ({url})")),
            Ok(Err(e)) => Err(format!("Get {url:?}: {e}")),
            Err(_) => Err(format!("Get {url:?}: timed out after {timeout:?}")),
        };
    }
    Err("the probe names no handler (exec, httpGet or tcpSocket)".into())
}

async fn http_get(host: &str, port: u16, path: &str) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("Host", format!("{host}:{port}"))
        .header("User-Agent", "kube-probe/1.32")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}
