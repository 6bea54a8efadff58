//! Names outside the cluster: asked of the node's upstream resolvers (UDP, TCP when the answer
//! is truncated), with a bounded cache that keeps positive answers for their smallest TTL and
//! negative ones (NXDOMAIN, no data) for the SOA's minimum, as RFC 2308 says.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

/// Longest time an answer is kept, whatever its TTL.
const MAX_TTL: u32 = 3600;
/// Longest time a negative answer is kept.
const MAX_NEGATIVE_TTL: u32 = 300;
/// A server failure is kept this long, so a dead upstream is not asked again per query.
const SERVFAIL_TTL: u32 = 5;

#[derive(Clone, Debug)]
pub struct ForwardConfig {
    pub upstreams: Vec<SocketAddr>,
    /// Per upstream try.
    pub timeout: Duration,
    /// Cached answers at most.
    pub cache_entries: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    name: String,
    qtype: RecordType,
}

struct Cached {
    code: ResponseCode,
    answers: Vec<Record>,
    authority: Vec<Record>,
    stored: Instant,
    expires: Instant,
}

/// What an upstream said, ready to be put in a response.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub cached: bool,
}

pub struct Forwarder {
    cfg: ForwardConfig,
    cache: Mutex<HashMap<CacheKey, Cached>>,
}

impl Forwarder {
    pub fn new(cfg: ForwardConfig) -> Self {
        Self {
            cfg,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.cfg.upstreams
    }

    /// The answer to `q`, from the cache or an upstream.
    pub async fn resolve(&self, q: &Query) -> Result<Upstream> {
        let key = CacheKey {
            name: q.name().to_ascii().to_ascii_lowercase(),
            qtype: q.query_type(),
        };
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        if self.cfg.upstreams.is_empty() {
            bail!("no upstream resolver configured");
        }
        let mut last = anyhow!("no upstream answered");
        for up in &self.cfg.upstreams {
            match self.ask(*up, q).await {
                Ok(resp) => {
                    let got = Upstream {
                        code: resp.response_code(),
                        answers: resp.answers().to_vec(),
                        authority: resp.name_servers().to_vec(),
                        cached: false,
                    };
                    self.store(key, &got);
                    return Ok(got);
                }
                Err(e) => {
                    debug!(upstream = %up, "upstream failed: {e:#}");
                    last = e;
                }
            }
        }
        self.store(
            key,
            &Upstream {
                code: ResponseCode::ServFail,
                answers: vec![],
                authority: vec![],
                cached: false,
            },
        );
        Err(last)
    }

    fn cached(&self, key: &CacheKey) -> Option<Upstream> {
        let cache = self.cache.lock().unwrap();
        let c = cache.get(key)?;
        let now = Instant::now();
        if now >= c.expires {
            return None;
        }
        // TTLs count down from when the answer was stored.
        let aged = now.duration_since(c.stored).as_secs() as u32;
        let age = |r: &Record| {
            let mut r = r.clone();
            r.set_ttl(r.ttl().saturating_sub(aged).max(1));
            r
        };
        Some(Upstream {
            code: c.code,
            answers: c.answers.iter().map(age).collect(),
            authority: c.authority.iter().map(age).collect(),
            cached: true,
        })
    }

    fn store(&self, key: CacheKey, u: &Upstream) {
        let ttl = match u.code {
            ResponseCode::NoError if !u.answers.is_empty() => u
                .answers
                .iter()
                .map(|r| r.ttl())
                .min()
                .unwrap_or(0)
                .min(MAX_TTL),
            ResponseCode::NoError | ResponseCode::NXDomain => negative_ttl(&u.authority),
            ResponseCode::ServFail => SERVFAIL_TTL,
            _ => 0,
        };
        if ttl == 0 || self.cfg.cache_entries == 0 {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= self.cfg.cache_entries && !cache.contains_key(&key) {
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= self.cfg.cache_entries {
                // Still full of live answers: the ones closest to expiry make room.
                let mut by_expiry: Vec<(Instant, CacheKey)> =
                    cache.iter().map(|(k, c)| (c.expires, k.clone())).collect();
                by_expiry.sort_by_key(|(e, _)| *e);
                for (_, k) in by_expiry.into_iter().take(cache.len() / 8 + 1) {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            Cached {
                code: u.code,
                answers: u.answers.clone(),
                authority: u.authority.clone(),
                stored: now,
                expires: now + Duration::from_secs(ttl.into()),
            },
        );
    }

    pub fn cache_len(&self) -> usize {
        self.cache.lock().unwrap().len()
    }

    /// One upstream, over UDP, again over TCP when the answer was truncated.
    async fn ask(&self, up: SocketAddr, q: &Query) -> Result<Message> {
        let id: u16 = rand::random();
        let mut req = Message::new();
        req.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true);
        req.add_query(q.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        req.set_edns(edns);
        let bytes = req.to_vec().context("encoding the query")?;

        let bind: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind).await.context("upstream socket")?;
        sock.connect(up)
            .await
            .context("connecting to the upstream")?;
        sock.send(&bytes).await.context("sending to the upstream")?;
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        let resp = loop {
            let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
                .await
                .map_err(|_| anyhow!("no answer from {up} in {:?}", self.cfg.timeout))?
                .context("receiving from the upstream")?;
            // Anything that is not the answer to this query (a late answer to another, a
            // forgery) is ignored.
            match Message::from_vec(&buf[..n]) {
                Ok(m) if matches_query(&m, id, q) => break m,
                _ => continue,
            }
        };
        if !resp.truncated() {
            return Ok(resp);
        }
        let tcp = tokio::time::timeout_at(deadline, ask_tcp(up, &bytes))
            .await
            .map_err(|_| anyhow!("no TCP answer from {up} in {:?}", self.cfg.timeout))??;
        if !matches_query(&tcp, id, q) {
            bail!("{up} answered another question over TCP");
        }
        Ok(tcp)
    }
}

fn matches_query(m: &Message, id: u16, q: &Query) -> bool {
    m.id() == id && m.message_type() == MessageType::Response && m.queries() == [q.clone()]
}

async fn ask_tcp(up: SocketAddr, query: &[u8]) -> Result<Message> {
    let mut s = TcpStream::connect(up)
        .await
        .context("TCP to the upstream")?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
    framed.extend_from_slice(query);
    s.write_all(&framed).await?;
    let len = s.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Message::from_vec(&buf).context("decoding the upstream's TCP answer")
}

/// How long a negative answer is kept: the SOA's minimum (bounded by its own TTL), RFC 2308.
fn negative_ttl(authority: &[Record]) -> u32 {
    authority
        .iter()
        .find_map(|r| match r.data() {
            RData::SOA(soa) => Some(soa.minimum().min(r.ttl())),
            _ => None,
        })
        .unwrap_or(0)
        .min(MAX_NEGATIVE_TTL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;

    fn fwd(entries: usize) -> Forwarder {
        Forwarder::new(ForwardConfig {
            upstreams: vec![],
            timeout: Duration::from_millis(100),
            cache_entries: entries,
        })
    }

    fn key(n: &str) -> CacheKey {
        CacheKey {
            name: n.into(),
            qtype: RecordType::A,
        }
    }

    #[test]
    fn positive_answers_live_for_their_smallest_ttl_and_negative_for_the_soa_minimum() {
        let name = Name::from_ascii("example.org.").unwrap();
        let rec = |ttl| Record::from_rdata(name.clone(), ttl, RData::A(A::new(1, 2, 3, 4)));
        let soa = Record::from_rdata(
            name.clone(),
            600,
            RData::SOA(SOA::new(name.clone(), name.clone(), 1, 1, 1, 1, 30)),
        );
        let f = fwd(10);
        f.store(
            key("a."),
            &Upstream {
                code: ResponseCode::NoError,
                answers: vec![rec(300), rec(60)],
                authority: vec![],
                cached: false,
            },
        );
        f.store(
            key("nx."),
            &Upstream {
                code: ResponseCode::NXDomain,
                answers: vec![],
                authority: vec![soa],
                cached: false,
            },
        );
        // Without a SOA a negative answer is not cached at all.
        f.store(
            key("nosoa."),
            &Upstream {
                code: ResponseCode::NXDomain,
                answers: vec![],
                authority: vec![],
                cached: false,
            },
        );
        let cache = f.cache.lock().unwrap();
        let life = |k: &str| {
            let c = &cache[&key(k)];
            c.expires.duration_since(c.stored).as_secs()
        };
        assert_eq!(life("a."), 60);
        assert_eq!(life("nx."), 30);
        assert!(!cache.contains_key(&key("nosoa.")));
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let name = Name::from_ascii("example.org.").unwrap();
        let f = fwd(16);
        for i in 0..100 {
            f.store(
                key(&format!("n{i}.")),
                &Upstream {
                    code: ResponseCode::NoError,
                    answers: vec![Record::from_rdata(
                        name.clone(),
                        100 + i,
                        RData::A(A::new(1, 2, 3, 4)),
                    )],
                    authority: vec![],
                    cached: false,
                },
            );
            assert!(f.cache_len() <= 16, "{} entries", f.cache_len());
        }
        // The latest answer is always kept.
        assert!(f.cached(&key("n99.")).is_some());
    }
}
