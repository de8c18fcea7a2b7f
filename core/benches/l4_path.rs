//! The L4 mesh data path on loopback, for profiling (callgrind) and CPU-per-byte figures:
//!
//! app → TCP → [outbound: `copy_bidirectional(tcp, pool stream)`] → HBONE (mTLS + HTTP/2) →
//! [`Server`] → [inbound: `copy_bidirectional(stream, tcp)`] → TCP → sink
//!
//! Both ztunnel copy loops, the pool, the server, TLS and h2 run in this one process (no netns,
//! no conntrack). Modes:
//!
//! * `bulk [MiB]` (default 1024): one stream, the app writes MiB then half-closes; the sink
//!   answers with the byte count. Prints Gbit/s and process CPU-seconds per GB.
//! * `rate [rps] [connections] [secs]` (default 1000, 16, 10): 1 KiB request → echo at a fixed
//!   rate (open loop); p50/p99 round trip and process CPU cores. `rate-direct` does the same
//!   straight to the echo sink (no mesh), to subtract the app's own cost.
//! * `rr [connections] [requests]` (default 16, 20000): 1 KiB request → 1 KiB echo, closed loop,
//!   `requests` in total spread over `connections` concurrent connections. Prints process
//!   CPU-microseconds per request and the mean round trip.
//!
//! `WORKERS` (default 2) sets the tokio worker threads. Run with `cargo bench -p weft-core --bench
//! l4_path -- bulk 1024`, or the built binary under `valgrind --tool=callgrind`.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use weft_core::cert_manager::LocalCa;
use weft_core::hbone::{
    CertificateSource, ConnectRequest, Decision, Handler, Key, Pool, PoolConfig, Server, Settings,
    TcpConnector,
};
use weft_core::{SpiffeId, WorkloadCertificate, ca, drain};

const TRUST_DOMAIN: &str = "cluster.local";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const APP_BUFFER: usize = 128 * 1024;
const REQUEST: usize = 1024;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let workers = std::env::var("WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(run(&args))
}

async fn run(args: &[String]) -> Result<()> {
    let mode = args.first().map_or("bulk", String::as_str);
    let num = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
    };
    let echo = mode.starts_with("r");
    let path = Path::start(echo).await?;
    match mode {
        "bulk" => {
            let bytes = num(1, 1024) * 1024 * 1024;
            // Warm-up: pool connection, buffers, TCP windows.
            path.bulk(16 * 1024 * 1024).await?;
            let cpu = cpu_seconds();
            let start = Instant::now();
            path.bulk(bytes).await?;
            let elapsed = start.elapsed();
            let cpu = cpu_seconds() - cpu;
            let gb = bytes as f64 / 1e9;
            println!(
                "bulk: {bytes} bytes in {:.3} s = {:.2} Gbit/s; CPU {cpu:.3} s = {:.3} CPU-s/GB",
                elapsed.as_secs_f64(),
                gb * 8.0 / elapsed.as_secs_f64(),
                cpu / gb,
            );
        }
        "rr" => {
            let connections = num(1, 16).max(1);
            let requests = num(2, 20_000);
            let per = requests / connections;
            path.rr(connections, 20).await?;
            let cpu = cpu_seconds();
            let start = Instant::now();
            path.rr(connections, per).await?;
            let elapsed = start.elapsed();
            let cpu = cpu_seconds() - cpu;
            let total = (per * connections) as f64;
            println!(
                "rr: {total} requests over {connections} connections in {:.3} s; mean round trip \
                 {:.1} us; CPU {cpu:.3} s = {:.1} CPU-us/request",
                elapsed.as_secs_f64(),
                elapsed.as_secs_f64() * 1e6 * connections as f64 / total,
                cpu * 1e6 / total,
            );
        }
        "rate" | "rate-direct" => {
            // Fixed rate (open loop): `rps` 1 KiB exchanges per second over `connections`
            // for `secs`; through the mesh path, or straight to the echo sink (`rate-direct`)
            // to subtract the app's own cost.
            let rps = num(1, 1000).max(1);
            let connections = num(2, 16).max(1);
            let secs = num(3, 10).max(1);
            let target = if mode == "rate" {
                path.outbound
            } else {
                path.sink
            };
            path.rr_to(target, connections, 20).await?;
            let cpu = cpu_seconds();
            let mut samples = rate(target, rps, connections, secs).await?;
            let cpu = cpu_seconds() - cpu;
            samples.sort_unstable();
            let pct =
                |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
            println!(
                "{mode}: {} exchanges at {rps}/s over {connections} connections; p50 {:.1} us \
                 p99 {:.1} us; CPU {cpu:.3} s = {:.4} cores = {:.1} CPU-us/exchange",
                samples.len(),
                pct(0.5).as_secs_f64() * 1e6,
                pct(0.99).as_secs_f64() * 1e6,
                cpu / secs as f64,
                cpu * 1e6 / samples.len() as f64,
            );
        }
        other => anyhow::bail!("unknown mode {other} (bulk | rr | rate | rate-direct)"),
    }
    Ok(())
}

/// Process CPU time (user + system), seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command: state is index 0, utime 11, stime 12; 100 ticks per second.
    (ticks(11) + ticks(12)) / 100.0
}

/// Open-loop exchanges: each connection sends one request every `connections / rps` seconds
/// (staggered) and times request → echo.
async fn rate(target: SocketAddr, rps: u64, connections: u64, secs: u64) -> Result<Vec<Duration>> {
    let interval = Duration::from_secs_f64(connections as f64 / rps as f64);
    let per = secs * rps / connections;
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for i in 0..connections {
        let mut app = connect(target).await?;
        let first = start + interval.mul_f64(i as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let request = [0x5au8; REQUEST];
            let mut response = [0u8; REQUEST];
            let mut ticks = tokio::time::interval_at(first, interval);
            let mut samples = Vec::with_capacity(per as usize);
            for _ in 0..per {
                ticks.tick().await;
                let sent = Instant::now();
                app.write_all(&request).await?;
                app.read_exact(&mut response).await?;
                samples.push(sent.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

struct Path {
    outbound: SocketAddr,
    sink: SocketAddr,
    _drain: drain::Trigger,
}

impl Path {
    async fn start(echo: bool) -> Result<Self> {
        let signer = Arc::new(ca::Signer::generate_root(
            TRUST_DOMAIN,
            ca::Config::default(),
        )?);
        let local_ca = LocalCa::new(signer, Duration::from_secs(3600));
        let client_id = SpiffeId::new(TRUST_DOMAIN, "bench", "client")?;
        let server_id = SpiffeId::new(TRUST_DOMAIN, "bench", "server")?;
        let client_cert: Arc<WorkloadCertificate> = Arc::new(
            local_ca
                .issue(&client_id)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let server_cert: Arc<WorkloadCertificate> = Arc::new(
            local_ca
                .issue(&server_id)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );

        let sink_listener = TcpListener::bind(SocketAddr::new(LOOPBACK, 0)).await?;
        let sink = sink_listener.local_addr()?;
        tokio::spawn(serve_sink(sink_listener, echo));

        let hbone_listener = TcpListener::bind(SocketAddr::new(LOOPBACK, 0)).await?;
        let hbone_addr = hbone_listener.local_addr()?;
        let (trigger, watch) = drain::channel();
        let server = Arc::new(Server::new(
            Settings::default(),
            server_cert,
            Arc::new(ToSink { sink }),
        ));
        tokio::spawn(async move {
            let _ = server.serve(hbone_listener, watch).await;
        });

        let certificates: Arc<dyn CertificateSource> = Arc::new(client_cert);
        let pool = Pool::new(PoolConfig::default(), Arc::new(TcpConnector), certificates);
        let key = Key::new(client_id, vec![server_id], hbone_addr, None);
        let outbound_listener = TcpListener::bind(SocketAddr::new(LOOPBACK, 0)).await?;
        let outbound = outbound_listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let Ok((mut downstream, _)) = outbound_listener.accept().await else {
                    continue;
                };
                let _ = downstream.set_nodelay(true);
                let pool = pool.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let mut upstream = match pool
                        .connect(&key, &sink.to_string(), HeaderMap::new())
                        .await
                    {
                        Ok(stream) => stream,
                        Err(err) => {
                            eprintln!("outbound: {err}");
                            return;
                        }
                    };
                    let _ =
                        weft_core::hbone::copy_bidirectional(&mut downstream, &mut upstream).await;
                });
            }
        });
        Ok(Path {
            outbound,
            sink,
            _drain: trigger,
        })
    }

    async fn bulk(&self, bytes: u64) -> Result<()> {
        let mut app = connect(self.outbound).await?;
        let payload: Vec<u8> = (0..APP_BUFFER).map(|i| (i % 251) as u8).collect();
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left).map_or(APP_BUFFER, |l| l.min(APP_BUFFER));
            app.write_all(&payload[..n]).await?;
            left -= n as u64;
        }
        app.shutdown().await?;
        let mut count = [0u8; 8];
        app.read_exact(&mut count).await.context("sink count")?;
        ensure!(u64::from_be_bytes(count) == bytes, "byte count mismatch");
        Ok(())
    }

    async fn rr(&self, connections: u64, per_connection: u64) -> Result<()> {
        self.rr_to(self.outbound, connections, per_connection).await
    }

    async fn rr_to(&self, target: SocketAddr, connections: u64, per_connection: u64) -> Result<()> {
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let mut app = connect(target).await?;
            tasks.push(tokio::spawn(async move {
                let request = [0x5au8; REQUEST];
                let mut response = [0u8; REQUEST];
                for _ in 0..per_connection {
                    app.write_all(&request).await?;
                    app.read_exact(&mut response).await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(())
    }
}

struct ToSink {
    sink: SocketAddr,
}

impl Handler for ToSink {
    type Upstream = TcpStream;

    async fn decide(&self, _request: &ConnectRequest) -> Decision<TcpStream> {
        match connect(self.sink).await {
            Ok(upstream) => Decision::Accept {
                upstream,
                headers: HeaderMap::new(),
            },
            Err(_) => Decision::Refuse(weft_core::hbone::Refusal::Unavailable),
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_nodelay(true)?;
    Ok(socket.connect(addr).await?)
}

async fn serve_sink(listener: TcpListener, echo: bool) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; APP_BUFFER];
            let mut total = 0u64;
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n as u64;
                        if echo && tcp.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if !echo {
                let _ = tcp.write_all(&total.to_be_bytes()).await;
            }
            let _ = tcp.shutdown().await;
        });
    }
}
