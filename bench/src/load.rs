//! The load generators the cluster scenarios share: the open-loop fixed-rate runner, closed-loop
//! HTTP/1.1 and h2c runners, a new-connection loop and the 1 KiB HTTP/1.1 exchange they use.
//!
//! Why our own fixed-rate runner rather than `oha`, `fortio` or `wrk2` (see bench/README.md): none
//! is packaged in Debian (performance anchors §4), building `oha` from crates.io would add minutes
//! to every CI run, and `hey -q` (the only packaged rate limiter) caps each worker's rate and
//! reports with 0.1 ms resolution. The runner below is coordinated-omission-safe by construction:
//! every request's latency counts from its scheduled send time. Closed-loop h2c load uses the
//! hyper-based client of `weft-echo` (`weft::echo::client`).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use weft::cluster::netns;

/// Size of each request body.
pub(crate) const REQUEST_BYTES: usize = 1024;

/// Latency percentiles in milliseconds (nearest rank).
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    pub(crate) samples: usize,
    pub(crate) errors: usize,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Latency {
    /// Percentiles of `samples`; all NaN when there are none.
    pub(crate) fn from_samples(mut samples: Vec<Duration>, errors: usize) -> Latency {
        samples.sort();
        let at = |q: f64| {
            if samples.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1e3
        };
        Latency {
            samples: samples.len(),
            errors,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "samples": self.samples, "errors": self.errors,
            "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99,
            "p99_9_ms": self.p999, "max_ms": self.max,
        })
    }

    /// `self − base` per percentile, as JSON `{"p50_ms", …}`.
    pub(crate) fn added_json(&self, base: &Latency) -> Value {
        json!({
            "p50_ms": self.p50 - base.p50, "p90_ms": self.p90 - base.p90,
            "p99_ms": self.p99 - base.p99, "p99_9_ms": self.p999 - base.p999,
            "max_ms": self.max - base.max,
        })
    }
}

/// Runs `exchange` on each of `conns` at a combined `rate` per second for `secs`, open loop:
/// every exchange has a scheduled start and its latency counts from that time, not from when it
/// actually started, so a stall also counts against the exchanges queued behind it (no
/// coordinated omission). One blocking thread per connection sleeps until each scheduled time
/// (Linux high-resolution sleeps; tokio's 1 ms timer is too coarse). A connection whose
/// exchange fails stops and counts as one error. Returns the latencies and the errors.
///
/// # Errors
/// A load thread panicked.
pub(crate) fn fixed_rate_over(
    conns: Vec<TcpStream>,
    rate: u32,
    secs: u64,
    exchange: fn(&mut TcpStream) -> std::io::Result<()>,
) -> Result<(Vec<Duration>, usize)> {
    let connections = u32::try_from(conns.len()).unwrap_or(u32::MAX).max(1);
    let interval = Duration::from_secs_f64(f64::from(connections) / f64::from(rate.max(1)));
    let per_connection = (secs as f64 / interval.as_secs_f64()).ceil() as u64;
    let start = Instant::now() + Duration::from_millis(100);
    let stagger = interval / connections;
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let first = start + stagger * u32::try_from(i).unwrap_or(0);
            std::thread::spawn(move || {
                let mut samples = Vec::with_capacity(per_connection as usize);
                let mut errors = 0;
                for n in 0..per_connection {
                    let scheduled = first + interval * u32::try_from(n).unwrap_or(u32::MAX);
                    let now = Instant::now();
                    if scheduled > now {
                        std::thread::sleep(scheduled - now);
                    }
                    if exchange(&mut conn).is_ok() {
                        samples.push(scheduled.elapsed());
                    } else {
                        errors += 1;
                        break;
                    }
                }
                (samples, errors)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let (s, e) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("latency thread panicked"))?;
        samples.extend(s);
        errors += e;
    }
    Ok((samples, errors))
}

/// `n` keep-alive HTTP/1.1 connections to `addr`, opened from network namespace `netns`.
///
/// # Errors
/// Entering the namespace or connecting.
pub(crate) fn open_http(netns: &str, addr: SocketAddr, n: u32) -> Result<Vec<TcpStream>> {
    netns::within(netns, move || -> Result<Vec<TcpStream>> {
        (0..n.max(1)).map(|_| connect_http(addr)).collect()
    })?
}

/// A keep-alive HTTP/1.1 connection to `addr` (`TCP_NODELAY`, 5 s read timeout).
///
/// # Errors
/// Connecting (3 s timeout).
pub(crate) fn connect_http(addr: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// One `POST /bench` with a 1 KiB body on a keep-alive connection; reads the whole response and
/// fails unless it is a 200.
///
/// # Errors
/// I/O errors, a response without `content-length`, or another status.
pub(crate) fn post(conn: &mut TcpStream) -> std::io::Result<()> {
    const HEAD: &[u8] =
        b"POST /bench HTTP/1.1\r\nhost: echo\r\ncontent-type: application/octet-stream\r\ncontent-length: 1024\r\n\r\n";
    let mut request = Vec::with_capacity(HEAD.len() + REQUEST_BYTES);
    request.extend_from_slice(HEAD);
    request.resize(HEAD.len() + REQUEST_BYTES, b'x');
    conn.write_all(&request)?;
    let mut reader = BufReader::new(&mut *conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let ok = line.split(' ').nth(1) == Some("200");
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let length = length.ok_or_else(|| std::io::Error::other("response without content-length"))?;
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    if !reader.buffer().is_empty() {
        return Err(std::io::Error::other("bytes after the response"));
    }
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("status line {line:?}")))
    }
}

/// What a closed-loop run did: requests (or connections) completed, failures, wall seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Closed {
    pub(crate) done: u64,
    pub(crate) failed: u64,
    pub(crate) wall_secs: f64,
}

impl Closed {
    pub(crate) fn per_sec(&self) -> f64 {
        self.done as f64 / self.wall_secs
    }
}

/// Closed loop: `conns` HTTP/1.1 keep-alive connections from `netns` to `addr`, each sending
/// [`post`] back to back for `secs`.
///
/// # Errors
/// Opening the connections; a load thread panicked.
pub(crate) fn closed_loop_h1(
    netns: &str,
    addr: SocketAddr,
    conns: u32,
    secs: u64,
) -> Result<Closed> {
    let conns = open_http(netns, addr, conns)?;
    let started = Instant::now();
    let until = started + Duration::from_secs(secs.max(1));
    let threads: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            std::thread::spawn(move || {
                let mut done = 0u64;
                while Instant::now() < until {
                    if post(&mut conn).is_err() {
                        return (done, 1);
                    }
                    done += 1;
                }
                (done, 0)
            })
        })
        .collect();
    let mut result = Closed {
        done: 0,
        failed: 0,
        wall_secs: 0.0,
    };
    for thread in threads {
        let (d, f) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        result.done += d;
        result.failed += f;
    }
    result.wall_secs = started.elapsed().as_secs_f64();
    Ok(result)
}

/// Closed loop over h2c: `weft-echo`'s client (hyper) from `netns` to `addr`, `conns`
/// connections with one request in flight each, 1 KiB `POST`s, for about `secs` (a short probe
/// sizes the request count).
///
/// # Errors
/// Entering the namespace or building the runtime; an invalid URL.
pub(crate) fn closed_loop_h2(
    netns: &str,
    addr: SocketAddr,
    conns: u32,
    secs: u64,
) -> Result<Closed> {
    let run = move |count: u64| -> Result<Closed> {
        let mut config = weft::echo::ClientConfig::new(format!("http://{addr}/bench").parse()?);
        config.method = http::Method::POST;
        config.body = vec![b'x'; REQUEST_BYTES].into();
        config.http2 = true;
        config.concurrency = conns.max(1) as usize;
        config.count = count;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let started = Instant::now();
        let mut failed = 0;
        let summary = runtime.block_on(weft::echo::client(config, |exchange| {
            if !exchange.outcome.as_ref().is_ok_and(|r| r.status == 200) {
                failed += 1;
            }
        }))?;
        Ok(Closed {
            done: summary.total - failed,
            failed,
            wall_secs: started.elapsed().as_secs_f64(),
        })
    };
    let netns = netns.to_owned();
    netns::within(&netns, move || -> Result<Closed> {
        let probe = run(200)?;
        let count = (probe.per_sec() * secs.max(1) as f64).clamp(200.0, 5e6) as u64;
        run(count)
    })?
}

/// New connections as fast as `threads` threads in `netns` can open them for `secs`: each
/// connects to the TCP echo port at `addr`, reads the greeting line and closes. A thread stops at
/// its first failure.
///
/// # Errors
/// Entering the namespace; a thread panicked.
pub(crate) fn new_connections(
    netns: &str,
    addr: SocketAddr,
    threads: u32,
    secs: u64,
) -> Result<Closed> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (d, f) = (done.clone(), failed.clone());
    let wall_secs = netns::within(netns, move || -> Result<f64> {
        let started = Instant::now();
        let until = started + Duration::from_secs(secs.max(1));
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let (d, f) = (d.clone(), f.clone());
                std::thread::spawn(move || {
                    while Instant::now() < until {
                        match connect_echo(addr) {
                            Ok(_) => d.fetch_add(1, Ordering::Relaxed),
                            Err(_) => {
                                f.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        };
                    }
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("connection thread panicked"))?;
        }
        Ok(started.elapsed().as_secs_f64())
    })??;
    Ok(Closed {
        done: done.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        wall_secs,
    })
}

/// A connection to `weft-echo`'s TCP echo port with the server's greeting line consumed.
///
/// # Errors
/// Connecting, or no greeting within 5 s (the path refused the connection).
pub(crate) fn connect_echo(addr: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    if !greeting.ends_with('\n') {
        bail!("no greeting from {addr} (connection refused by the path?)");
    }
    if !reader.buffer().is_empty() {
        bail!("unexpected bytes after the greeting");
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let l = Latency::from_samples(samples, 2);
        assert_eq!(l.samples, 1000);
        assert_eq!(l.errors, 2);
        assert!((l.p50 - 0.500).abs() < 1e-9, "{}", l.p50);
        assert!((l.p99 - 0.990).abs() < 1e-9, "{}", l.p99);
        assert!((l.p999 - 0.999).abs() < 1e-9, "{}", l.p999);
        assert!((l.max - 1.000).abs() < 1e-9, "{}", l.max);
        assert!(Latency::from_samples(Vec::new(), 0).p50.is_nan());
    }

    #[test]
    fn fixed_rate_runs_every_scheduled_exchange() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // 200/s over 2 connections for 1 s: 100 exchanges each; the exchange does no I/O.
        let (samples, errors) = fixed_rate_over(conns, 200, 1, |_| Ok(())).unwrap();
        assert_eq!(errors, 0);
        assert_eq!(samples.len(), 200);
    }
}
