//! A private OCI registry for tests: Debian's `docker-registry` (distribution) on an address of
//! one of the test's namespaces, over TLS with its own certificate and with htpasswd (bcrypt)
//! basic authentication; images pushed into it with `skopeo`. Stopped and its files removed
//! when dropped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testbed::Netns;

pub struct Registry {
    child: Child,
    dir: PathBuf,
    netns: Netns,
    /// `<ip>:<port>`, the registry part of image references.
    pub host: String,
    user: String,
    password: String,
}

impl Registry {
    /// Starts the registry in `netns` on `ip:port`, accepting `user`/`password`.
    pub fn start(netns: &Netns, ip: Ipv4Addr, port: u16, user: &str, password: &str) -> Registry {
        let dir =
            std::env::temp_dir().join(format!("ferry-registry-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec![ip.to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        // skopeo's --dest-cert-dir takes the CA roots as *.crt.
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        std::fs::write(dir.join("certs/ca.crt"), cert.cert.pem()).unwrap();
        let hash = bcrypt::hash(password, 6).unwrap();
        std::fs::write(dir.join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
        let host = format!("{ip}:{port}");
        let config = format!(
            "version: 0.1
log: {{level: info}}
storage:
  filesystem: {{rootdirectory: {data}}}
http:
  addr: {host}
  tls: {{certificate: {d}/cert.pem, key: {d}/key.pem}}
auth:
  htpasswd: {{realm: ferry-test, path: {d}/htpasswd}}
",
            data = dir.join("data").display(),
            d = dir.display(),
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = netns
            .spawn(
                Command::new("docker-registry")
                    .arg("serve")
                    .arg(dir.join("config.yml"))
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log),
            )
            .expect("docker-registry (Debian's docker-registry package; cargo xtask setup)");
        let reg = Registry {
            child,
            dir,
            netns: netns.clone(),
            host,
            user: user.into(),
            password: password.into(),
        };
        // Up when /v2/ answers (401 without credentials).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = reg.netns.exec(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--cacert",
                    reg.dir.join("cert.pem").to_str().unwrap(),
                    &format!("https://{}/v2/", reg.host),
                ],
            );
            if up.is_ok_and(|code| code.trim() == "401") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the registry did not start: {}",
                std::fs::read_to_string(reg.dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        reg
    }

    /// Pushes an OCI image archive (one of `cargo xtask images`) as `<host>/<name>`.
    pub fn push(&self, archive: &Path, name: &str) {
        let dest = format!("docker://{}/{name}", self.host);
        let creds = format!("{}:{}", self.user, self.password);
        self.netns
            .exec(
                "skopeo",
                &[
                    "copy",
                    "--quiet",
                    "--dest-cert-dir",
                    self.dir.join("certs").to_str().unwrap(),
                    "--dest-creds",
                    &creds,
                    &format!("oci-archive:{}", archive.display()),
                    &dest,
                ],
            )
            .unwrap_or_else(|e| panic!("skopeo copy to {dest}: {e:#}"));
    }

    /// Makes containerd (whose registry `config_path` is `hosts_dir`) trust the registry's
    /// certificate, as an operator does in `/etc/containerd/certs.d/<host>/hosts.toml`.
    pub fn trust(&self, hosts_dir: &Path) {
        let d = hosts_dir.join(&self.host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"https://{h}\"\nca = \"{ca}\"\n\n[host.\"https://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n",
                h = self.host,
                ca = self.dir.join("cert.pem").display()
            ),
        )
        .unwrap();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("--- docker-registry log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
