//! Encryption at rest, as kube-apiserver's `--encryption-provider-config`: the values of the
//! configured resources (Secrets, usually) are encrypted before they reach the store, so the
//! log, snapshots, `snapshot save` files and etcd hold ciphertext.
//!
//! The file is Kubernetes' `EncryptionConfiguration`. The first provider of a resource writes;
//! every provider is tried when reading. Stored values carry Kubernetes' prefixes:
//! `k8s:enc:aescbc:v1:<key>:` + IV (16 bytes) + AES-CBC with PKCS#7, and
//! `k8s:enc:secretbox:v1:<key>:` + nonce (24 bytes) + XSalsa20-Poly1305. `identity` stores
//! plain values; a plain value is read as it is (written before encryption was turned on).

use std::path::Path;

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use anyhow::{anyhow, bail, Context as _, Result};
use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use crypto_secretbox::aead::{Aead, KeyInit};
use futures::StreamExt;
use serde::Deserialize;
use std::sync::Arc;

use super::{
    Event, KeyValue, ListOptions, ListResult, Precondition, Revision, Store, StoreError,
    StoreResult, WatchStream,
};

const PREFIX: &[u8] = b"k8s:enc:";

#[derive(Clone)]
enum Cipher {
    AesCbc(Vec<u8>),
    SecretBox([u8; 32]),
}

#[derive(Clone)]
struct Key {
    name: String,
    cipher: Cipher,
}

impl Key {
    fn prefix(&self) -> Vec<u8> {
        let kind = match self.cipher {
            Cipher::AesCbc(_) => "aescbc",
            Cipher::SecretBox(_) => "secretbox",
        };
        format!("k8s:enc:{kind}:v1:{}:", self.name).into_bytes()
    }

    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut out = self.prefix();
        match &self.cipher {
            Cipher::AesCbc(k) => {
                let iv: [u8; 16] = rand::random();
                out.extend_from_slice(&iv);
                let ct = match k.len() {
                    16 => cbc::Encryptor::<aes::Aes128>::new_from_slices(k, &iv)
                        .expect("key length checked on load")
                        .encrypt_padded_vec_mut::<Pkcs7>(plain),
                    24 => cbc::Encryptor::<aes::Aes192>::new_from_slices(k, &iv)
                        .expect("key length checked on load")
                        .encrypt_padded_vec_mut::<Pkcs7>(plain),
                    _ => cbc::Encryptor::<aes::Aes256>::new_from_slices(k, &iv)
                        .expect("key length checked on load")
                        .encrypt_padded_vec_mut::<Pkcs7>(plain),
                };
                out.extend_from_slice(&ct);
            }
            Cipher::SecretBox(k) => {
                let nonce: [u8; 24] = rand::random();
                let sb = crypto_secretbox::XSalsa20Poly1305::new(k.into());
                let ct = sb
                    .encrypt(&nonce.into(), plain)
                    .expect("secretbox encryption does not fail");
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&ct);
            }
        }
        out
    }

    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>> {
        match &self.cipher {
            Cipher::AesCbc(k) => {
                if sealed.len() < 32 || !sealed.len().is_multiple_of(16) {
                    bail!("aescbc value of {} bytes is not IV + blocks", sealed.len());
                }
                let (iv, ct) = sealed.split_at(16);
                let r = match k.len() {
                    16 => cbc::Decryptor::<aes::Aes128>::new_from_slices(k, iv)?
                        .decrypt_padded_vec_mut::<Pkcs7>(ct),
                    24 => cbc::Decryptor::<aes::Aes192>::new_from_slices(k, iv)?
                        .decrypt_padded_vec_mut::<Pkcs7>(ct),
                    _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(k, iv)?
                        .decrypt_padded_vec_mut::<Pkcs7>(ct),
                };
                r.map_err(|_| anyhow!("aescbc: bad padding (wrong key?)"))
            }
            Cipher::SecretBox(k) => {
                if sealed.len() < 24 + 16 {
                    bail!("secretbox value of {} bytes is too short", sealed.len());
                }
                let (nonce, ct) = sealed.split_at(24);
                let sb = crypto_secretbox::XSalsa20Poly1305::new(k.into());
                sb.decrypt(nonce.into(), ct)
                    .map_err(|_| anyhow!("secretbox: authentication failed (wrong key?)"))
            }
        }
    }
}

// The file's shape (apiserver.config.k8s.io/v1 EncryptionConfiguration).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    kind: Option<String>,
    resources: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    resources: Vec<String>,
    providers: Vec<ProviderSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
struct ProviderSpec {
    aescbc: Option<KeysSpec>,
    secretbox: Option<KeysSpec>,
    identity: Option<serde_json::Value>,
    aesgcm: Option<KeysSpec>,
    kms: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct KeysSpec {
    keys: Vec<KeySpec>,
}

#[derive(Deserialize)]
struct KeySpec {
    name: String,
    secret: String,
}

/// The resources to encrypt and, for each, the key that writes (None: identity) and all
/// keys that may read.
#[derive(Clone)]
pub struct EncryptionConfig {
    rules: Vec<(Vec<String>, Option<Key>, Vec<Key>)>,
}

fn keys(spec: &KeysSpec, kind: &str, at: &str) -> Result<Vec<Key>> {
    if spec.keys.is_empty() {
        bail!("{at}.{kind}.keys: give at least one key");
    }
    spec.keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let at = format!("{at}.{kind}.keys[{i}]");
            if k.name.is_empty() || k.name.contains(':') {
                bail!("{at}.name: give a name without ':'");
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(k.secret.trim())
                .with_context(|| format!("{at}.secret: not base64"))?;
            let cipher = match kind {
                "aescbc" if [16, 24, 32].contains(&raw.len()) => Cipher::AesCbc(raw),
                "aescbc" => bail!(
                    "{at}.secret: an aescbc key is 16, 24 or 32 bytes, this one is {} (make one with: head -c 32 /dev/urandom | base64)",
                    raw.len()
                ),
                _ => Cipher::SecretBox(raw.as_slice().try_into().map_err(|_| {
                    anyhow!(
                        "{at}.secret: a secretbox key is 32 bytes, this one is {} (make one with: head -c 32 /dev/urandom | base64)",
                        raw.len()
                    )
                })?),
            };
            Ok(Key {
                name: k.name.clone(),
                cipher,
            })
        })
        .collect()
}

impl EncryptionConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let f: File = serde_yaml::from_str(text).context("not an EncryptionConfiguration")?;
        if f.kind
            .as_deref()
            .is_some_and(|k| k != "EncryptionConfiguration")
        {
            bail!("kind: expected EncryptionConfiguration");
        }
        let mut rules = Vec::new();
        for (i, r) in f.resources.iter().enumerate() {
            let at = format!("resources[{i}]");
            if r.resources.is_empty() {
                bail!("{at}.resources: name at least one resource, e.g. secrets");
            }
            let mut write = None;
            let mut read = Vec::new();
            for (j, p) in r.providers.iter().enumerate() {
                let at = format!("{at}.providers[{j}]");
                let ks = if let Some(s) = &p.aescbc {
                    keys(s, "aescbc", &at)?
                } else if let Some(s) = &p.secretbox {
                    keys(s, "secretbox", &at)?
                } else if p.identity.is_some() {
                    Vec::new()
                } else if p.aesgcm.is_some() || p.kms.is_some() {
                    bail!("{at}: only aescbc, secretbox and identity are supported");
                } else {
                    bail!("{at}: name a provider (aescbc, secretbox or identity)");
                };
                if j == 0 {
                    write = ks.first().cloned();
                }
                read.extend(ks);
            }
            if r.providers.is_empty() {
                bail!("{at}.providers: give at least one provider");
            }
            rules.push((r.resources.clone(), write, read));
        }
        Ok(EncryptionConfig { rules })
    }

    /// The resource names the file configures (`secrets`, `deployments.apps`...).
    pub fn resources(&self) -> Vec<String> {
        self.rules.iter().flat_map(|r| r.0.clone()).collect()
    }
}

/// How the values under one key prefix are stored.
struct PrefixRule {
    prefix: String,
    /// The key that writes (None: plain).
    write: Option<Key>,
    /// The keys that read.
    read: Vec<Key>,
}

type Rules = Arc<Vec<PrefixRule>>;

/// A store that encrypts the values under some key prefixes (one per configured resource).
pub struct EncryptedStore {
    inner: Arc<dyn Store>,
    by_prefix: Rules,
}

impl EncryptedStore {
    /// `prefix_of` names the store prefix of a configured resource name, or says why not.
    pub fn new(
        inner: Arc<dyn Store>,
        cfg: EncryptionConfig,
        prefix_of: impl Fn(&str) -> Result<String>,
    ) -> Result<Self> {
        let mut by_prefix = Vec::new();
        for (names, write, read) in cfg.rules {
            for n in names {
                by_prefix.push(PrefixRule {
                    prefix: prefix_of(&n)?,
                    write: write.clone(),
                    read: read.clone(),
                });
            }
        }
        Ok(EncryptedStore {
            inner,
            by_prefix: Arc::new(by_prefix),
        })
    }
}

fn rule<'a>(rules: &'a Rules, key: &str) -> Option<&'a PrefixRule> {
    rules.iter().find(|r| key.starts_with(r.prefix.as_str()))
}

fn seal(rules: &Rules, key: &str, value: Bytes) -> Bytes {
    match rule(rules, key).and_then(|r| r.write.as_ref()) {
        Some(k) => Bytes::from(k.seal(&value)),
        None => value,
    }
}

fn open(rules: &Rules, kv: &mut KeyValue) -> StoreResult<()> {
    if !kv.value.starts_with(PREFIX) {
        return Ok(());
    }
    let Some(PrefixRule { read, .. }) = rule(rules, &kv.key) else {
        return Err(StoreError::Other(anyhow!(
            "{} is encrypted but the encryption config has no provider for it",
            kv.key
        )));
    };
    for k in read {
        let p = k.prefix();
        if let Some(sealed) = kv.value.strip_prefix(p.as_slice()) {
            let plain = k
                .open(sealed)
                .map_err(|e| StoreError::Other(e.context(format!("decrypting {}", kv.key))))?;
            kv.value = Bytes::from(plain);
            return Ok(());
        }
    }
    Err(StoreError::Other(anyhow!(
        "{}: no key of the encryption config matches its prefix",
        kv.key
    )))
}

fn open_event(rules: &Rules, mut ev: Event) -> StoreResult<Event> {
    open(rules, &mut ev.kv)?;
    if let Some(p) = ev.prev.as_mut() {
        open(rules, p)?;
    }
    Ok(ev)
}

#[async_trait]
impl Store for EncryptedStore {
    async fn current_revision(&self) -> StoreResult<Revision> {
        self.inner.current_revision().await
    }
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let mut kv = self.inner.get(key).await?;
        if let Some(kv) = kv.as_mut() {
            open(&self.by_prefix, kv)?;
        }
        Ok(kv)
    }
    async fn list(&self, opts: ListOptions<'_>) -> StoreResult<ListResult> {
        let mut l = self.inner.list(opts).await?;
        for kv in &mut l.kvs {
            open(&self.by_prefix, kv)?;
        }
        Ok(l)
    }
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        cond: Precondition,
        lease: i64,
    ) -> StoreResult<(KeyValue, Option<KeyValue>)> {
        let stored = seal(&self.by_prefix, key, value.clone());
        let (mut kv, mut prev) = self.inner.put(key, stored, cond, lease).await?;
        kv.value = value;
        if let Some(p) = prev.as_mut() {
            open(&self.by_prefix, p)?;
        }
        Ok((kv, prev))
    }
    async fn delete(&self, key: &str, cond: Precondition) -> StoreResult<(KeyValue, Revision)> {
        let (mut kv, rev) = self.inner.delete(key, cond).await?;
        open(&self.by_prefix, &mut kv)?;
        Ok((kv, rev))
    }
    async fn watch(&self, prefix: &str, after: Revision) -> StoreResult<WatchStream> {
        let rules = self.by_prefix.clone();
        let s = self.inner.watch(prefix, after).await?;
        Ok(Box::pin(s.map(move |batch| {
            batch.and_then(|evs| {
                evs.into_iter()
                    .map(|e| open_event(&rules, e))
                    .collect::<StoreResult<Vec<_>>>()
            })
        })))
    }
    async fn grant_lease(&self, ttl_secs: i64) -> StoreResult<i64> {
        self.inner.grant_lease(ttl_secs).await
    }
    async fn keep_alive(&self, lease: i64) -> StoreResult<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: i64) -> StoreResult<()> {
        self.inner.revoke_lease(lease).await
    }
    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        self.inner.compact(revision).await
    }
    async fn compacted_revision(&self) -> StoreResult<Revision> {
        self.inner.compacted_revision().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    const AES: &str = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aescbc:\n      keys:\n      - {name: key1, secret: ZmVycnktdGVzdC1rZXktMDEyMzQ1Njc4OWFiY2RlZiE=}\n  - identity: {}\n";

    fn prefix_of(n: &str) -> Result<String> {
        Ok(format!("/registry/core/{n}/"))
    }

    #[test]
    fn both_ciphers_round_trip_and_bad_keys_are_named() {
        for kind in ["aescbc", "secretbox"] {
            let text = AES.replace("aescbc", kind);
            let cfg = EncryptionConfig::parse(&text).unwrap();
            let k = cfg.rules[0].1.clone().unwrap();
            let sealed = k.seal(b"{\"data\":\"hunter2\"}");
            assert!(sealed.starts_with(format!("k8s:enc:{kind}:v1:key1:").as_bytes()));
            assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
            let body = &sealed[k.prefix().len()..];
            assert_eq!(k.open(body).unwrap(), b"{\"data\":\"hunter2\"}");
        }
        let short = AES.replace("ZmVycnktdGVzdC1rZXktMDEyMzQ1Njc4OWFiY2RlZiE=", "c2hvcnQ=");
        let e = format!("{:#}", EncryptionConfig::parse(&short).err().unwrap());
        assert!(
            e.contains("resources[0].providers[0].aescbc.keys[0].secret"),
            "{e}"
        );
        let kms = AES.replace("aescbc:", "kms:");
        assert!(
            format!("{:#}", EncryptionConfig::parse(&kms).err().unwrap())
                .contains("only aescbc, secretbox and identity")
        );
    }

    #[tokio::test]
    async fn secrets_are_ciphertext_in_the_store_and_plain_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = EmbeddedStore::open(dir.path()).unwrap();
        let cfg = EncryptionConfig::parse(AES).unwrap();
        let s = EncryptedStore::new(inner.clone(), cfg, prefix_of).unwrap();
        let key = "/registry/core/secrets/default/db";
        let mut w = s.watch("/registry/core/secrets/", 0).await.unwrap();
        s.put(
            key,
            Bytes::from_static(b"{\"metadata\":{},\"data\":\"hunter2\"}"),
            Precondition::Absent,
            0,
        )
        .await
        .unwrap();
        s.put(
            "/registry/core/configmaps/default/c",
            Bytes::from_static(b"{\"plain\":1}"),
            Precondition::Absent,
            0,
        )
        .await
        .unwrap();
        let raw = inner.get(key).await.unwrap().unwrap();
        assert!(raw.value.starts_with(b"k8s:enc:aescbc:v1:key1:"));
        assert!(!raw.value.windows(7).any(|w| w == b"hunter2"));
        let got = s.get(key).await.unwrap().unwrap();
        assert_eq!(&got.value[..], b"{\"metadata\":{},\"data\":\"hunter2\"}");
        let cm = inner
            .get("/registry/core/configmaps/default/c")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&cm.value[..], b"{\"plain\":1}");
        let ev = w.next().await.unwrap().unwrap();
        assert_eq!(
            &ev[0].kv.value[..],
            b"{\"metadata\":{},\"data\":\"hunter2\"}"
        );
        let l = s
            .list(ListOptions {
                prefix: "/registry/core/secrets/",
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            &l.kvs[0].value[..],
            b"{\"metadata\":{},\"data\":\"hunter2\"}"
        );
        // The log on disk holds no plaintext of the Secret.
        drop((s, w));
        let wal = std::fs::read(dir.path().join("wal")).unwrap();
        assert!(!wal.windows(7).any(|w| w == b"hunter2"));
    }
}
