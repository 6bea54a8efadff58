//! `ferry-loadgen`: a bounded load generator for the echo protocol.
//! - `crr`: one request per TCP connection (connect, ask, close), like netperf's TCP_CRR;
//! - `rr`: requests back to back on persistent connections, like netperf's TCP_RR;
//! - `refused`: connects that must be refused (ECONNREFUSED), timed; any other outcome is an
//!   error;
//! - `probe`: `crr` until the server named `--want` answers; prints when (wall clock, µs). With
//!   `--pause-us` it sleeps between tries, so that it does not take a core from whatever it is
//!   waiting for (on a 2-core machine a back-to-back prober and its echo server hold both).
//!
//! Stops after `--seconds` or `--max` transactions, whichever comes first, and prints one JSON
//! line: transactions, rate, latency percentiles, errors.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Mode {
    Crr,
    Rr,
    Refused,
    Probe,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    /// Target address(es); each worker thread takes the next one in turn (see `--spread`).
    /// Repeatable.
    #[arg(long = "target", required = true)]
    targets: Vec<SocketAddr>,
    /// Each connection to a target picked at random among all (as a Service picks a backend)
    /// instead of each worker keeping its own.
    #[arg(long)]
    spread: bool,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Upper bound on transactions, whatever the time.
    #[arg(long, default_value_t = 5_000_000)]
    max: u64,
    /// With `probe`: the server name to wait for.
    #[arg(long)]
    want: Option<String>,
    /// Source address of every connection (default: the kernel's choice).
    #[arg(long)]
    source: Option<std::net::Ipv4Addr>,
    /// With `probe`: pause between tries, µs (0: back to back).
    #[arg(long, default_value_t = 0)]
    pause_us: u64,
}

fn connect(target: SocketAddr, source: Option<std::net::Ipv4Addr>) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(src) = source {
        // Port 0 with IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect time, per tuple.
        let one: libc::c_int = 1;
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of_val(&one) as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        s.bind(&SocketAddr::from((src, 0)).into())?;
    }
    s.connect_timeout(&target.into(), Duration::from_secs(2))?;
    let s: TcpStream = s.into();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

fn ask(s: &mut TcpStream, buf: &mut [u8], req: &[u8]) -> std::io::Result<usize> {
    s.write_all(req)?;
    // Answers are one short line: read until the newline.
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
        if buf[..got].contains(&b'\n') {
            return Ok(got);
        }
    }
}

/// Connects until the wanted server answers; prints the wall-clock time it first did.
fn probe(a: &Args) {
    let want = a.want.clone().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let mut buf = [0u8; 256];
    let mut tries = 0u64;
    while Instant::now() < deadline && tries < a.max {
        if tries > 0 && a.pause_us > 0 {
            std::thread::sleep(Duration::from_micros(a.pause_us));
        }
        tries += 1;
        let answer = connect(a.targets[0], a.source).and_then(|mut s| ask(&mut s, &mut buf, b"!"));
        if let Ok(n) = answer {
            let line = String::from_utf8_lossy(&buf[..n]);
            if line.split_whitespace().next() == Some(want.as_str()) {
                let us = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or(0);
                println!(
                    "{}",
                    serde_json::json!({"seen_unix_us": us as u64, "tries": tries})
                );
                return;
            }
        }
    }
    println!("{}", serde_json::json!({"seen_unix_us": 0, "tries": tries}));
}

fn main() {
    let a = Args::parse();
    if matches!(a.mode, Mode::Probe) {
        return probe(&a);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut threads = Vec::new();
    for w in 0..a.concurrency {
        let own = a.targets[w % a.targets.len()];
        let targets = a.targets.clone();
        let spread = a.spread;
        // xorshift64 seeded per worker and run: cheap, and plenty for picking among targets.
        let mut x = (seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        let mut next_target = move || {
            if !spread {
                return own;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            targets[(x % targets.len() as u64) as usize]
        };
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        let (mode, max, source) = (a.mode, a.max, a.source);
        threads.push(std::thread::spawn(move || {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut buf = [0u8; 256];
            let mut conn: Option<TcpStream> = None;
            while !stop.load(Ordering::Relaxed) {
                if done.fetch_add(1, Ordering::Relaxed) >= max || Instant::now() >= deadline {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                let t0 = Instant::now();
                let ok = match mode {
                    Mode::Crr => connect(next_target(), source)
                        .and_then(|mut s| {
                            // The server answers and closes first (no TIME_WAIT on the client).
                            ask(&mut s, &mut buf, b"!")?;
                            while s.read(&mut buf)? > 0 {}
                            Ok(())
                        })
                        .is_ok(),
                    Mode::Refused => matches!(
                        connect(next_target(), source),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                    ),
                    Mode::Probe => unreachable!("handled in main"),
                    Mode::Rr => {
                        if conn.is_none() {
                            conn = connect(next_target(), source).ok();
                        }
                        match conn.as_mut().map(|s| ask(s, &mut buf, b"?")) {
                            Some(Ok(_)) => true,
                            _ => {
                                conn = None;
                                false
                            }
                        }
                    }
                };
                if ok {
                    lat.push(t0.elapsed().as_nanos() as u64);
                } else {
                    done.fetch_sub(1, Ordering::Relaxed);
                    errors.fetch_add(1, Ordering::Relaxed);
                    if errors.load(Ordering::Relaxed) > 1000 {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut lat: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .collect();
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let out = serde_json::json!({
        "mode": format!("{:?}", a.mode).to_lowercase(),
        "transactions": lat.len(),
        "seconds": secs,
        "rate": lat.len() as f64 / secs,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "errors": errors.load(Ordering::Relaxed),
    });
    println!("{out}");
}
