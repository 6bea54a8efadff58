//! How the API server reaches a pod's kubelet (for `pods/log`, `exec`, `attach`,
//! `portforward` and resource metrics): the node's InternalIP and daemonEndpoints port, over TLS with the API
//! server's kubelet client certificate (`kube-apiserver-kubelet-client`, group
//! `system:masters`), the only identity the kubelet's port accepts. The kubelet's serving
//! certificate is not verified (as kube-apiserver without `--kubelet-certificate-authority`;
//! kubelets make their own).

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;

use super::status::ApiError;
use super::{resources, Api, ApiResult, Query};

pub type KubeletStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// `GET path` on a kubelet connection: the response when the kubelet answered 200, its
/// answer as a Status otherwise (404 stays NotFound; other refusals are BadRequest, or 502
/// when the kubelet cannot be talked to).
pub(super) async fn kubelet_get(
    authority: &str,
    stream: KubeletStream,
    path: &str,
) -> ApiResult<hyper::Response<hyper::body::Incoming>> {
    use axum::http::{header, StatusCode};
    use http_body_util::{BodyExt as _, Empty};
    let unreachable = |e: String| {
        ApiError::new(
            502,
            "InternalError",
            format!("Get \"https://{authority}{path}\": {e}"),
        )
    };
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(header::HOST, authority)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    if status != StatusCode::OK {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        let reason = if status == StatusCode::NOT_FOUND {
            "NotFound"
        } else {
            "BadRequest"
        };
        return Err(ApiError::new(status.as_u16(), reason, body));
    }
    Ok(resp)
}

/// The TLS configuration toward kubelets, from the API server's kubelet client certificate
/// and key (PEM).
pub fn kubelet_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(tls_config(cert_pem, key_pem)?))
}

fn tls_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context as _;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("the kubelet client certificate")?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .context("the kubelet client key")?
        .context("no private key for the kubelet client certificate")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyKubelet(provider)))
        .with_client_auth_cert(certs, key)
        .context("the kubelet client certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts any kubelet serving certificate (signatures still checked).
#[derive(Debug)]
struct AnyKubelet(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyKubelet {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn names(pod: &Value, field: &str) -> Vec<String> {
    pod["spec"][field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

/// The container the request names, or the pod's only one.
pub(super) fn container(pod: &Value, name: &str, q: &Query) -> ApiResult<String> {
    let apps = names(pod, "containers");
    let all: Vec<String> = names(pod, "initContainers")
        .into_iter()
        .chain(apps.clone())
        .collect();
    match q.get("container") {
        Some(c) if all.iter().any(|n| n == c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if apps.len() == 1 => Ok(apps[0].clone()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            all.join(" ")
        ))),
    }
}

/// The kubelet's address: the node's InternalIP and its daemonEndpoints port.
fn kubelet_address(node: &Value) -> Option<(String, u16)> {
    let ip = node["status"]["addresses"]
        .as_array()?
        .iter()
        .find(|a| a["type"] == "InternalIP")?["address"]
        .as_str()?
        .to_string();
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap_or(10250) as u16;
    Some((ip, port))
}

impl Api {
    /// The pod `ns/name` and a TLS connection to its kubelet, with the kubelet's authority
    /// (`ip:port`). `path` only names the request in errors.
    pub(super) async fn kubelet_of(
        &self,
        ns: &str,
        name: &str,
        path: impl Fn(&Value) -> ApiResult<String>,
    ) -> ApiResult<(Value, String, String, KubeletStream)> {
        let pods = resources::find("", "v1", "pods").expect("pods are served");
        let nodes = resources::find("", "v1", "nodes").expect("nodes are served");
        let (pod, _) = self.get_object(pods, Some(ns), name).await?;
        let path = path(&pod)?;
        let node_name = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        if node_name.is_empty() {
            return Err(ApiError::bad_request(format!(
                "pod {name} does not have a host assigned"
            )));
        }
        let (node, _) = self.get_object(nodes, None, node_name).await?;
        let (authority, stream) = self.kubelet_conn(&node, &path).await?;
        Ok((pod, authority, path, stream))
    }

    /// A TLS connection to `node`'s kubelet, with its authority (`ip:port`). `path` only names
    /// the request in errors.
    pub(super) async fn kubelet_conn(
        &self,
        node: &Value,
        path: &str,
    ) -> ApiResult<(String, KubeletStream)> {
        let node_name = node["metadata"]["name"].as_str().unwrap_or_default();
        let (ip, port) = kubelet_address(node).ok_or_else(|| {
            ApiError::bad_request(format!("node {node_name} has no InternalIP address"))
        })?;
        let authority = format!("{ip}:{port}");
        let unreachable = |e: String| {
            ApiError::new(
                502,
                "InternalError",
                format!("Get \"https://{authority}{path}\": {e}"),
            )
        };
        let tls = self
            .cfg
            .kubelet_tls
            .clone()
            .ok_or_else(|| unreachable("no kubelet client certificate configured".into()))?;
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((ip.as_str(), port)),
        )
        .await
        .map_err(|_| unreachable("dial timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        let server_name = ServerName::try_from(ip.clone())
            .map_err(|e| unreachable(e.to_string()))?
            .to_owned();
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
        )
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| unreachable(format!("TLS: {e}")))?;
        Ok((authority, stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn q(pairs: &[(&str, &str)]) -> Query {
        Query(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        )
    }

    #[test]
    fn picks_the_container_or_names_the_choices() {
        let pod = json!({"spec": {"initContainers": [{"name": "init"}],
                                  "containers": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(
            container(&pod, "p", &q(&[("container", "b")])).unwrap(),
            "b"
        );
        assert_eq!(
            container(&pod, "p", &q(&[("container", "init")])).unwrap(),
            "init"
        );
        let e = container(&pod, "p", &q(&[])).unwrap_err();
        assert!(
            format!("{e:?}").contains("choose one of: [init a b]"),
            "{e:?}"
        );
        let e = container(&pod, "p", &q(&[("container", "zz")])).unwrap_err();
        assert!(format!("{e:?}").contains("container zz is not valid for pod p"));
        let one = json!({"spec": {"containers": [{"name": "only"}]}});
        assert_eq!(container(&one, "p", &q(&[])).unwrap(), "only");
    }

    #[test]
    fn kubelet_address_from_the_node() {
        let n = json!({"status": {"addresses": [{"type": "Hostname", "address": "n"},
                                                {"type": "InternalIP", "address": "10.0.0.2"}],
                                  "daemonEndpoints": {"kubeletEndpoint": {"Port": 10251}}}});
        assert_eq!(kubelet_address(&n), Some(("10.0.0.2".into(), 10251)));
        assert_eq!(kubelet_address(&json!({})), None);
    }
}
