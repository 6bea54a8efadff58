//! Raw HTTPS requests to a test control plane as one of its identities (a kubeconfig's client
//! certificate), through curl: for bodies, headers and methods kubectl would not send, with the
//! answer's code, headers and body.

use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use ferry_testbed::controlplane::ControlPlane;

pub struct Answer {
    pub code: u16,
    /// Response headers, lower-cased names.
    pub headers: String,
    pub text: String,
}

impl Answer {
    /// The body as JSON (Null when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or(serde_json::Value::Null)
    }
    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Writes the client certificate and key of `who`'s kubeconfig next to it, once.
pub fn identity(cp: &ControlPlane, who: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        cp.dir.join(format!("{who}.crt.pem")),
        cp.dir.join(format!("{who}.key.pem")),
    );
    if !cert.exists() {
        let cfg: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig(who)).unwrap()).unwrap();
        let b = |k: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(cfg["users"][0]["user"][k].as_str().unwrap())
                .unwrap()
        };
        std::fs::write(&cert, b("client-certificate-data")).unwrap();
        std::fs::write(&key, b("client-key-data")).unwrap();
    }
    (cert, key)
}

/// `curl` as `who` (a kubeconfig name: admin, node-n1...) with `args` (method, headers, data,
/// and the URL, relative to the server when it starts with '/').
pub fn curl_as(cp: &ControlPlane, who: &str, args: &[&str]) -> Answer {
    let (cert, key) = identity(cp, who);
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with('/') {
                format!("{}{a}", cp.url)
            } else {
                a.to_string()
            }
        })
        .collect();
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "60",
            "-D",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(cp.dir.join("pki/ca.crt"))
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(&args)
        .output()
        .expect("curl runs");
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = all.rsplit_once('\n').unwrap_or(("", "0"));
    let (headers, text) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    Answer {
        code: code.trim().parse().unwrap_or(0),
        headers: headers.to_lowercase(),
        text: text.to_string(),
    }
}

/// `curl_as` the admin.
pub fn curl(cp: &ControlPlane, args: &[&str]) -> Answer {
    curl_as(cp, "admin", args)
}

/// A request with a JSON (or other `content_type`) body.
/// Bodies go through a file (an argument is limited to 128 KiB).
pub fn send(
    cp: &ControlPlane,
    who: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Answer {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let file = cp.dir.join(format!(
        "body-{}.tmp",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&file, body).unwrap();
    let ct = format!("Content-Type: {content_type}");
    let at = format!("@{}", file.display());
    let a = curl_as(
        cp,
        who,
        &["-X", method, "-H", &ct, "--data-binary", &at, path],
    );
    let _ = std::fs::remove_file(&file);
    a
}
