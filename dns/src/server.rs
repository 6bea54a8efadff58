//! The server: UDP and TCP listeners, what each client may ask and how much, and the way from
//! a datagram to its answer (the cluster's records first, the forwarder for other names).
//!
//! Bounds, as for every server of Ferry: queries only from the allowed ranges (REFUSED
//! otherwise: no open resolver); a per-client token bucket (excess queries are dropped, the
//! client table is bounded); a bounded number of forwarded queries in flight; TCP connections
//! limited in number and closed when idle; answers cut to the client's payload size with TC
//! set, so it retries over TCP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::Record;
use ipnetwork::IpNetwork;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::answer::{self, Answer, Zone};
use crate::forward::Forwarder;
use crate::records::Records;
use crate::reply_cache::ReplyCache;
use crate::udp_batch::Batch;

/// The payload size this server advertises and uses for UDP answers to EDNS clients at most.
const OUR_PAYLOAD: u16 = 1232;
/// Largest UDP answer to a client that asks for more.
const MAX_UDP: usize = 4096;
/// Clients the rate limiter remembers at most.
const MAX_CLIENTS: usize = 65_536;
/// Receive buffer of each UDP socket (bursts of 10,000 queries wait there, not dropped).
const UDP_RECV_BUFFER: usize = 4 << 20;
/// Datagrams taken per receive call (and answers sent per send call).
const UDP_BATCH: usize = 32;
/// Encoded local answers kept (about 100 bytes of key and 200 of answer each).
const REPLY_CACHE_ENTRIES: usize = 20_000;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (UDP and TCP on each).
    pub listen: Vec<SocketAddr>,
    /// Source ranges allowed to ask (pods, nodes, loopback); others get REFUSED.
    pub allow: Vec<IpNetwork>,
    /// Queries per second one client address may send (0: unlimited); bursts of twice that.
    pub client_qps: u32,
    pub max_tcp_connections: usize,
    pub tcp_idle: Duration,
    /// Forwarded queries in flight at most; beyond it a query gets SERVFAIL at once.
    pub max_forwards: usize,
}

/// Counters since start.
#[derive(Default, Debug)]
pub struct Stats {
    pub queries: AtomicU64,
    pub local: AtomicU64,
    pub forwarded: AtomicU64,
    pub cache_hits: AtomicU64,
    pub refused: AtomicU64,
    pub rate_limited: AtomicU64,
    pub malformed: AtomicU64,
    pub servfail: AtomicU64,
    pub truncated: AtomicU64,
}

impl Stats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (name, value) of every counter.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("queries", g(&self.queries)),
            ("local", g(&self.local)),
            ("forwarded", g(&self.forwarded)),
            ("cache_hits", g(&self.cache_hits)),
            ("refused", g(&self.refused)),
            ("rate_limited", g(&self.rate_limited)),
            ("malformed", g(&self.malformed)),
            ("servfail", g(&self.servfail)),
            ("truncated", g(&self.truncated)),
        ]
    }
}

/// A token bucket per client address.
struct RateLimiter {
    qps: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    fn allow(&self, ip: IpAddr) -> bool {
        if self.qps <= 0.0 {
            return true;
        }
        let burst = self.qps * 2.0;
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap();
        if b.len() >= MAX_CLIENTS && !b.contains_key(&ip) {
            // Forget the clients whose bucket has refilled (quiet for the burst's length).
            let full = Duration::from_secs_f64(burst / self.qps);
            b.retain(|_, (_, last)| now.duration_since(*last) < full);
            if b.len() >= MAX_CLIENTS {
                return false;
            }
        }
        let (tokens, last) = b.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.qps).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A UDP socket on `addr` that others of this process may share (SO_REUSEPORT), with a
/// receive buffer for bursts.
fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(UDP_RECV_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// What the synchronous part of handling decided.
enum Step {
    Reply(Vec<u8>),
    Drop,
    /// Needs the forwarder: the request, and the local part of the answer for a CNAME chase.
    Forward {
        req: Box<Message>,
        query: Query,
        partial: Option<Box<Message>>,
        limit: usize,
    },
}

pub struct Server {
    zone: Zone,
    records: Arc<RwLock<Records>>,
    forwarder: Forwarder,
    cfg: ServerConfig,
    limiter: RateLimiter,
    forwards: Arc<Semaphore>,
    tcp_slots: Arc<Semaphore>,
    /// Encoded local answers of the current records, by query bytes (UDP).
    replies: ReplyCache,
    /// Who may ask (starts as `cfg.allow`; the daemon widens it as it learns the nodes).
    allow: RwLock<Vec<IpNetwork>>,
    pub stats: Stats,
}

impl Server {
    pub fn new(
        zone: Zone,
        records: Arc<RwLock<Records>>,
        forwarder: Forwarder,
        cfg: ServerConfig,
    ) -> Self {
        Self {
            limiter: RateLimiter {
                qps: cfg.client_qps as f64,
                buckets: Mutex::new(HashMap::new()),
            },
            forwards: Arc::new(Semaphore::new(cfg.max_forwards.max(1))),
            tcp_slots: Arc::new(Semaphore::new(cfg.max_tcp_connections.max(1))),
            replies: ReplyCache::new(REPLY_CACHE_ENTRIES),
            allow: RwLock::new(cfg.allow.clone()),
            zone,
            records,
            forwarder,
            cfg,
            stats: Stats::default(),
        }
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// Binds every listen address (so a taken port fails at start; port 0 picks one, the
    /// same for UDP and TCP) and serves until the process ends. Returns the bound addresses.
    pub async fn start(self: Arc<Self>) -> Result<Vec<SocketAddr>> {
        let mut bound = Vec::new();
        // One UDP socket per core on the same port (SO_REUSEPORT: the kernel spreads clients
        // over them), each with its own thread, as unbound does.
        let sockets = std::thread::available_parallelism().map_or(1, |n| n.get());
        for addr in self.cfg.listen.clone() {
            let first = udp_socket(addr).with_context(|| format!("DNS: binding UDP {addr}"))?;
            let addr = first.local_addr()?;
            let mut udp = vec![first];
            for _ in 1..sockets {
                udp.push(udp_socket(addr).with_context(|| format!("DNS: binding UDP {addr}"))?);
            }
            let tcp = TcpListener::bind(addr)
                .await
                .with_context(|| format!("DNS: binding TCP {addr}"))?;
            info!(%addr, zone = self.zone.domain(), upstreams = ?self.forwarder.upstreams(), udp_sockets = udp.len(), "DNS serving");
            for (i, sock) in udp.into_iter().enumerate() {
                let (me, rt) = (self.clone(), tokio::runtime::Handle::current());
                std::thread::Builder::new()
                    .name(format!("dns-udp-{i}"))
                    .spawn(move || me.serve_udp(sock, rt))
                    .context("DNS: starting a UDP thread")?;
            }
            tokio::spawn(self.clone().serve_tcp(tcp));
            bound.push(addr);
        }
        Ok(bound)
    }

    /// One UDP socket's loop, on a thread of its own (blocking receive and send, as
    /// unbound's threads do: no wake-ups of the async runtime per datagram), taking every
    /// query waiting in one system call and sending their answers in one. Forwarded queries
    /// go to the runtime and are answered from there.
    fn serve_udp(self: Arc<Self>, sock: std::net::UdpSocket, rt: tokio::runtime::Handle) {
        use std::os::fd::AsRawFd;
        let fd = sock.as_raw_fd();
        let mut batch = Batch::new(UDP_BATCH, MAX_UDP);
        let mut replies = Vec::with_capacity(UDP_BATCH);
        loop {
            let n = match batch.recv(fd) {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors of earlier answers surface here; the socket is fine.
                    debug!("DNS UDP receive: {e}");
                    continue;
                }
            };
            replies.clear();
            for i in 0..n {
                let Some((bytes, from)) = batch.datagram(i) else {
                    continue;
                };
                match self.step(bytes, from.ip(), false) {
                    Step::Reply(out) => replies.push((i, out)),
                    Step::Drop => {}
                    Step::Forward {
                        req,
                        query,
                        partial,
                        limit,
                    } => {
                        let Ok(permit) = self.forwards.clone().try_acquire_owned() else {
                            Stats::inc(&self.stats.servfail);
                            let r = answer::response_to(&req, ResponseCode::ServFail);
                            if let Some(out) = self.encode(&req, r, limit) {
                                replies.push((i, out));
                            }
                            continue;
                        };
                        let Ok(reply_sock) = sock.try_clone() else {
                            continue;
                        };
                        let me = self.clone();
                        rt.spawn(async move {
                            let out = me.forward(&req, &query, partial.map(|b| *b), limit).await;
                            drop(permit);
                            if let Some(out) = out {
                                // A datagram send does not wait for the peer.
                                let _ = reply_sock.send_to(&out, from);
                            }
                        });
                    }
                }
            }
            if let Err(e) = batch.send(fd, &replies) {
                debug!("DNS UDP send: {e}");
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (conn, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("DNS TCP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over the limit the connection is closed at once.
            let Ok(permit) = self.tcp_slots.clone().try_acquire_owned() else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.tcp_conn(conn, from).await {
                    debug!(%from, "DNS TCP connection: {e:#}");
                }
                drop(permit);
            });
        }
    }

    async fn tcp_conn(&self, mut conn: TcpStream, from: SocketAddr) -> Result<()> {
        let idle = self.cfg.tcp_idle;
        loop {
            let len = match tokio::time::timeout(idle, conn.read_u16()).await {
                Ok(Ok(l)) => l as usize,
                // Idle, or the client closed.
                _ => return Ok(()),
            };
            let mut buf = vec![0u8; len];
            tokio::time::timeout(idle, conn.read_exact(&mut buf))
                .await
                .context("idle in the middle of a query")??;
            let out = match self.step(&buf, from.ip(), true) {
                Step::Reply(out) => Some(out),
                Step::Drop => None,
                Step::Forward {
                    req,
                    query,
                    partial,
                    limit,
                } => match self.forwards.clone().try_acquire_owned() {
                    Ok(_permit) => self.forward(&req, &query, partial.map(|b| *b), limit).await,
                    Err(_) => {
                        Stats::inc(&self.stats.servfail);
                        let r = answer::response_to(&req, ResponseCode::ServFail);
                        self.encode(&req, r, limit)
                    }
                },
            };
            let Some(out) = out else {
                return Ok(());
            };
            let mut framed = Vec::with_capacity(out.len() + 2);
            framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
            framed.extend_from_slice(&out);
            // A client that does not read its answers is dropped like an idle one.
            tokio::time::timeout(idle, conn.write_all(&framed))
                .await
                .context("the client does not read its answer")??;
        }
    }

    /// Everything that needs no upstream: checks, limits, the cluster's answers.
    fn step(&self, bytes: &[u8], from: IpAddr, tcp: bool) -> Step {
        Stats::inc(&self.stats.queries);
        if !self.limiter.allow(from) {
            Stats::inc(&self.stats.rate_limited);
            return Step::Drop;
        }
        // A query repeating one already answered from these records: its bytes again.
        if !tcp && self.allowed(from) {
            let generation = self.records.read().unwrap().generation();
            if let Some(out) = self.replies.get(generation, bytes) {
                Stats::inc(&self.stats.local);
                return Step::Reply(out);
            }
        }
        let req = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => {
                Stats::inc(&self.stats.malformed);
                return match header_only_error(bytes, ResponseCode::FormErr) {
                    Some(out) => Step::Reply(out),
                    None => Step::Drop,
                };
            }
        };
        if req.message_type() == MessageType::Response {
            // Never answer an answer (reflection loops).
            Stats::inc(&self.stats.malformed);
            return Step::Drop;
        }
        let limit = if tcp {
            u16::MAX as usize
        } else {
            req.extensions()
                .as_ref()
                .map_or(512, |e| (e.max_payload() as usize).clamp(512, MAX_UDP))
        };
        if !self.allowed(from) {
            Stats::inc(&self.stats.refused);
            let r = answer::response_to(&req, ResponseCode::Refused);
            return self.reply(&req, r, limit);
        }
        if req.extensions().as_ref().is_some_and(|e| e.version() > 0) {
            let r = answer::response_to(&req, ResponseCode::BADVERS);
            return self.reply(&req, r, limit);
        }
        let query = match answer::check(&req) {
            Ok(q) => q.clone(),
            Err(code) => {
                if code == ResponseCode::FormErr {
                    Stats::inc(&self.stats.malformed);
                }
                let r = answer::response_to(&req, code);
                return self.reply(&req, r, limit);
            }
        };
        let (decided, generation) = {
            let records = self.records.read().unwrap();
            (
                answer::answer(&self.zone, &records, &req, &query),
                records.generation(),
            )
        };
        match decided {
            Answer::Local(resp) => {
                Stats::inc(&self.stats.local);
                let step = self.reply(&req, resp, limit);
                if let (Step::Reply(out), false) = (&step, tcp) {
                    self.replies.put(generation, bytes, out);
                }
                step
            }
            Answer::Forward => Step::Forward {
                req: Box::new(req),
                query,
                partial: None,
                limit,
            },
            Answer::Chase { response, target } => {
                let q = Query::query(target, query.query_type());
                Step::Forward {
                    req: Box::new(req),
                    query: q,
                    partial: Some(Box::new(response)),
                    limit,
                }
            }
        }
    }

    /// The forwarder's part: the upstream's answer, appended to a CNAME chase's local part.
    async fn forward(
        &self,
        req: &Message,
        q: &Query,
        partial: Option<Message>,
        limit: usize,
    ) -> Option<Vec<u8>> {
        Stats::inc(&self.stats.forwarded);
        let resp = match self.forwarder.resolve(q).await {
            Ok(u) => {
                if u.cached {
                    Stats::inc(&self.stats.cache_hits);
                }
                if u.code == ResponseCode::ServFail {
                    Stats::inc(&self.stats.servfail);
                }
                let mut r = match partial {
                    Some(mut p) => {
                        p.set_response_code(u.code);
                        p
                    }
                    None => answer::response_to(req, u.code),
                };
                r.add_answers(u.answers);
                r.add_name_servers(strip_opt(u.authority));
                r
            }
            Err(e) => {
                debug!(name = %q.name(), "forwarding failed: {e:#}");
                Stats::inc(&self.stats.servfail);
                answer::response_to(req, ResponseCode::ServFail)
            }
        };
        self.encode(req, resp, limit)
    }

    fn reply(&self, req: &Message, resp: Message, limit: usize) -> Step {
        match self.encode(req, resp, limit) {
            Some(out) => Step::Reply(out),
            None => Step::Drop,
        }
    }

    /// The response as bytes: with an OPT record when the query had one, cut to `limit` with
    /// TC set when it does not fit.
    fn encode(&self, req: &Message, mut resp: Message, limit: usize) -> Option<Vec<u8>> {
        if req.extensions().is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(OUR_PAYLOAD);
            resp.set_edns(edns);
        }
        let out = resp.to_vec().ok()?;
        if out.len() <= limit {
            return Some(out);
        }
        Stats::inc(&self.stats.truncated);
        resp.truncate().to_vec().ok()
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.read().unwrap().iter().any(|n| n.contains(ip))
    }

    /// Replaces the ranges allowed to ask.
    pub fn set_allow(&self, allow: Vec<IpNetwork>) {
        *self.allow.write().unwrap() = allow;
    }
}

/// An error response from the header of a message that did not parse (at least its id).
fn header_only_error(bytes: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
        return None;
    }
    let mut m = Message::new();
    m.set_id(u16::from_be_bytes([bytes[0], bytes[1]]))
        .set_message_type(MessageType::Response)
        .set_response_code(code);
    m.to_vec().ok()
}

fn strip_opt(records: Vec<Record>) -> Vec<Record> {
    records
        .into_iter()
        .filter(|r| r.record_type() != hickory_proto::rr::RecordType::OPT)
        .collect()
}
