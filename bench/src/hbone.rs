//! The `hbone` scenario: single-stream loopback throughput of three paths, each moving the same
//! byte count from a sender to a sink on 127.0.0.1:
//!
//! 1. plain TCP: sender → TCP → sink;
//! 2. plain mTLS: sender → TLS 1.3 (weft-core's HBONE client/server configs) → sink;
//! 3. HBONE: sender → [`Pool`] stream (HTTP/2 `CONNECT` over the same mTLS) → HBONE [`Server`] →
//!    TCP → sink.
//!
//! A run is timed from the first write to the moment the sender reads back the sink's byte count,
//! which the sink writes once it has seen EOF (so every byte has arrived). Connection set-up
//! (TCP connect, TLS and HTTP/2 handshakes, `CONNECT`) is not timed. Each run checks that the sink
//! received exactly the bytes sent, and fails otherwise.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use http::HeaderMap;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_core::cert_manager::LocalCa;
use weft_core::hbone::{
    Authority, CertificateSource, ConnectRequest, Decision, Handler, Key, Pool, PoolConfig,
    Refusal, Server, Settings, TcpConnector,
};
use weft_core::{SpiffeId, WorkloadCertificate, ca, drain, tls};

use crate::report::{HboneResult, PathResult};

/// Read and write buffer size on every hop the benchmark controls, in bytes.
pub(crate) const BUFFER_BYTES: usize = 256 * 1024;

/// Bytes of the unmeasured warm-up run per path (or `--bytes`, if smaller).
pub(crate) const WARMUP_BYTES: u64 = 64 * 1024 * 1024;

/// How long the HBONE server gets to finish its connections at the end.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

const TRUST_DOMAIN: &str = "cluster.local";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Arguments of the `hbone` scenario.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "hbone_args")]
pub(crate) struct Args {
    /// Bytes sent per measured run, per path.
    #[arg(
        long,
        default_value_t = 2 * 1024 * 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(1..),
    )]
    pub(crate) bytes: u64,

    /// Measured runs per path (after one unmeasured warm-up run).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
}

/// The three measured paths, in the order they are run and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Tcp,
    Mtls,
    Hbone,
}

impl Path {
    const ALL: [Path; 3] = [Path::Tcp, Path::Mtls, Path::Hbone];

    /// Name in the table.
    fn label(self) -> &'static str {
        match self {
            Path::Tcp => "plain TCP",
            Path::Mtls => "plain mTLS",
            Path::Hbone => "HBONE",
        }
    }

    /// Name in the JSON.
    fn key(self) -> &'static str {
        match self {
            Path::Tcp => "tcp",
            Path::Mtls => "mtls",
            Path::Hbone => "hbone",
        }
    }
}

/// Runs the scenario: sets up CA, certificates, sinks and the HBONE server, then measures each
/// path (warm-up, then `args.runs` runs of `args.bytes`).
///
/// # Errors
/// Set-up failures, I/O errors on any path, or a sink receiving a different byte count.
pub(crate) async fn run(args: &Args) -> Result<HboneResult> {
    let bench = Bench::start().await?;
    let warmup_bytes = WARMUP_BYTES.min(args.bytes);
    let mut results = Vec::with_capacity(Path::ALL.len());
    for path in Path::ALL {
        bench
            .run_once(path, warmup_bytes)
            .await
            .with_context(|| format!("{} warm-up ({warmup_bytes} bytes)", path.label()))?;
        let mut gbps = Vec::new();
        for run in 1..=args.runs {
            let elapsed = bench
                .run_once(path, args.bytes)
                .await
                .with_context(|| format!("{} run {run}/{}", path.label(), args.runs))?;
            let rate = gbit_per_s(args.bytes, elapsed);
            eprintln!(
                "{} run {run}/{}: {} bytes in {:.3} s = {rate:.2} Gbit/s",
                path.label(),
                args.runs,
                args.bytes,
                elapsed.as_secs_f64(),
            );
            gbps.push(rate);
        }
        results.push(PathResult::new(path.label(), path.key(), gbps));
    }
    bench.stop().await;
    let [tcp, mtls, hbone] = <[PathResult; 3]>::try_from(results)
        .map_err(|r| anyhow!("expected 3 path results, got {}", r.len()))?;
    Ok(HboneResult {
        bytes: args.bytes,
        runs: args.runs,
        warmup_bytes,
        buffer_bytes: BUFFER_BYTES,
        tcp,
        mtls,
        hbone,
    })
}

/// bits/s = bytes × 8 / seconds, in units of 10⁹.
fn gbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
}

/// Everything the paths share: the payload, the sinks, the HBONE server and client pool.
struct Bench {
    payload: Vec<u8>,
    tcp_sink: SocketAddr,
    tls_sink: SocketAddr,
    tls_client: TlsConnector,
    pool: Pool,
    hbone_key: Key,
    drain: drain::Trigger,
}

impl Bench {
    async fn start() -> Result<Self> {
        let signer = Arc::new(
            ca::Signer::generate_root(TRUST_DOMAIN, ca::Config::default())
                .context("generating the CA root")?,
        );
        let local_ca = LocalCa::new(signer, Duration::from_secs(3600));
        let client_id = SpiffeId::new(TRUST_DOMAIN, "bench", "client")?;
        let server_id = SpiffeId::new(TRUST_DOMAIN, "bench", "server")?;
        let issue = |id: &SpiffeId| {
            local_ca
                .issue(id)
                .map(Arc::new)
                .map_err(|err| anyhow!("issuing a certificate for {id}: {err}"))
        };
        let client_cert: Arc<WorkloadCertificate> = issue(&client_id)?;
        let server_cert: Arc<WorkloadCertificate> = issue(&server_id)?;

        // Plain TCP sink; also the upstream of the HBONE server.
        let tcp_listener = listen().await?;
        let tcp_sink = tcp_listener.local_addr()?;
        tokio::spawn(serve_sinks(tcp_listener, None));

        // Plain mTLS sink with the same server config the HBONE server uses.
        let tls_listener = listen().await?;
        let tls_sink = tls_listener.local_addr()?;
        let acceptor = TlsAcceptor::from(tls::server_config(&server_cert)?);
        tokio::spawn(serve_sinks(tls_listener, Some(acceptor)));
        let tls_client =
            TlsConnector::from(tls::client_config(&client_cert, vec![server_id.clone()])?);

        // HBONE server forwarding every stream to the TCP sink, and the client pool.
        let hbone_listener = listen().await?;
        let hbone_addr = hbone_listener.local_addr()?;
        let (drain, watch) = drain::channel();
        let server = Arc::new(Server::new(
            Settings::default(),
            server_cert,
            Arc::new(ToSink { sink: tcp_sink }),
        ));
        tokio::spawn(async move {
            if let Err(err) = server.serve(hbone_listener, watch).await {
                eprintln!("hbone server stopped: {err}");
            }
        });
        let certificates: Arc<dyn CertificateSource> = Arc::new(client_cert);
        let pool = Pool::new(PoolConfig::default(), Arc::new(TcpConnector), certificates);
        let hbone_key = Key::new(client_id, vec![server_id], hbone_addr, None);

        Ok(Bench {
            payload: payload(),
            tcp_sink,
            tls_sink,
            tls_client,
            pool,
            hbone_key,
            drain,
        })
    }

    /// Opens a fresh connection (TCP, mTLS) or stream (HBONE, on the pooled connection) for
    /// `path`, then times sending `bytes` through it.
    async fn run_once(&self, path: Path, bytes: u64) -> Result<Duration> {
        match path {
            Path::Tcp => {
                let tcp = connect(self.tcp_sink).await?;
                send(tcp, bytes, &self.payload).await
            }
            Path::Mtls => {
                let tcp = connect(self.tls_sink).await?;
                // No SNI is sent; rustls still wants a name, which the verifier ignores.
                let tls = self
                    .tls_client
                    .connect(ServerName::IpAddress(LOOPBACK.into()), tcp)
                    .await
                    .context("mTLS handshake")?;
                send(tls, bytes, &self.payload).await
            }
            Path::Hbone => {
                let stream = self
                    .pool
                    .connect(
                        &self.hbone_key,
                        &self.tcp_sink.to_string(),
                        HeaderMap::new(),
                    )
                    .await
                    .context("opening the HBONE stream")?;
                send(stream, bytes, &self.payload).await
            }
        }
    }

    async fn stop(self) {
        drop(self.pool);
        let _ = self.drain.drain(DRAIN_DEADLINE).await;
    }
}

/// The HBONE handler: accepts `CONNECT`s to the sink only, spliced to a fresh TCP connection.
struct ToSink {
    sink: SocketAddr,
}

impl Handler for ToSink {
    type Upstream = TcpStream;

    async fn decide(&self, request: &ConnectRequest) -> Decision<TcpStream> {
        if request.authority != Authority::Addr(self.sink) {
            eprintln!("hbone: refusing CONNECT to {:?}", request.authority);
            return Decision::Refuse(Refusal::BadRequest);
        }
        match connect(self.sink).await {
            Ok(upstream) => Decision::Accept {
                upstream,
                headers: HeaderMap::new(),
            },
            Err(err) => {
                eprintln!("hbone: connecting to the sink: {err:#}");
                Decision::Refuse(Refusal::Unavailable)
            }
        }
    }
}

/// The bytes written, `BUFFER_BYTES` of a non-constant pattern.
fn payload() -> Vec<u8> {
    (0..BUFFER_BYTES).map(|i| (i % 251) as u8).collect()
}

async fn listen() -> Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(LOOPBACK, 0))
        .await
        .context("binding a loopback listener")
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_nodelay(true)?;
    socket
        .connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// Writes `bytes` bytes, half-closes, reads the sink's 8-byte big-endian count and then EOF.
/// Returns the time from the first write to reading the count.
async fn send<S>(mut stream: S, bytes: u64, payload: &[u8]) -> Result<Duration>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(payload.len(), |left| left.min(payload.len()));
        stream
            .write_all(&payload[..n])
            .await
            .with_context(|| format!("writing after {} of {bytes} bytes", bytes - left))?;
        left -= n as u64;
    }
    stream
        .shutdown()
        .await
        .context("half-closing after the last write")?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .await
        .context("reading the sink's byte count (the sink closed without one)")?;
    let elapsed = start.elapsed();
    let received = u64::from_be_bytes(count);
    ensure!(
        received == bytes,
        "sink received {received} bytes but {bytes} were sent"
    );
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .context("waiting for the sink to close")?;
    ensure!(
        rest.is_empty(),
        "sink sent {} unexpected bytes after its count",
        rest.len()
    );
    Ok(elapsed)
}

/// Accepts connections (terminating TLS when `acceptor` is set) and runs [`sink`] on each.
async fn serve_sinks(listener: TcpListener, acceptor: Option<TlsAcceptor>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(err) => {
                eprintln!("sink: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let result = match acceptor {
                None => sink(tcp).await,
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => sink(tls).await,
                    Err(err) => Err(err),
                },
            };
            if let Err(err) = result {
                eprintln!("sink: {err}");
            }
        });
    }
}

/// Reads until EOF, then writes the byte count (8 bytes, big-endian) and closes.
async fn sink<S>(mut stream: S) -> io::Result<u64>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf).await? {
            0 => break,
            n => total += n as u64,
        }
    }
    stream.write_all(&total.to_be_bytes()).await?;
    stream.shutdown().await?;
    Ok(total)
}
