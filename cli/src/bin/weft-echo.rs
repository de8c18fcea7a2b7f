//! `weft-echo`: the mesh test application — an HTTP/TCP echo server and its clients.
//!
//! `weft-echo serve` answers HTTP requests with JSON describing what it saw (shaped by the
//! `status`, `delay` and `fail_every` controls), serves the gRPC `weft.echo.v1.Echo` service on
//! the HTTP port and echoes TCP; `weft-echo client`, `weft-echo grpc` and `weft-echo tcp` drive
//! it and print one JSON line per request, call or connection on stdout. Logs go to stderr.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use weft::echo;

#[derive(Debug, Parser)]
#[command(name = "weft-echo", version, about = "Weft's mesh test application")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTP/1.1 + h2c (JSON echo of each request; gRPC weft.echo.v1.Echo for
    /// `content-type: application/grpc`) and TCP echo. Answers can be shaped per request with
    /// `?status=<code>`, `?delay=<200ms|1s>`, `?fail_every=<n>` (every n-th such request gets
    /// 503) or the headers `x-echo-status`, `x-echo-delay`, `x-echo-fail-every`.
    Serve(ServeArgs),
    /// Send HTTP requests and print one JSON line per response (exit 1 if any failed).
    Client(ClientArgs),
    /// Probe a TCP echo port and print one JSON line per connection (exit 1 if any failed).
    Tcp(TcpArgs),
    /// Call the gRPC Echo service and print one JSON line per call (exit 1 if any failed).
    Grpc(GrpcArgs),
}

#[derive(Debug, clap::Args)]
struct GrpcArgs {
    /// Server address: host:port or http://host:port (h2c).
    #[arg(long)]
    target: String,
    /// The RPC: Echo (message back) or Reverse (message reversed).
    #[arg(long, value_enum, default_value = "Echo")]
    method: echo::GrpcMethod,
    /// The request message.
    #[arg(long, default_value = "hello")]
    message: String,
    /// Metadata `name: value` sent with every call (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Number of calls, made one after the other.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Per-call timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// HTTP (HTTP/1.1 and h2c) port; 0 picks a free one.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// TCP echo port; 0 picks a free one.
    #[arg(long, default_value_t = 9000)]
    tcp_port: u16,
    /// Address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    bind: IpAddr,
    /// Pod name reported in answers (default: the hostname).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Namespace reported in answers (default: empty).
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// Largest request body read, in bytes; larger ones get 413.
    #[arg(long, default_value_t = echo::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// How long in-flight work may continue after SIGTERM/SIGINT, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    drain_timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Target URL: http://host[:port]/path.
    url: Uri,
    /// Number of requests.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Requests in flight at once (one keep-alive connection each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Use HTTP/2 with prior knowledge (h2c).
    #[arg(long)]
    http2: bool,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Requests per second over all connections (default: as fast as the server answers).
    #[arg(long)]
    rate: Option<f64>,
    /// Print only the summary line `{"total", "failed"}`, not a line per response.
    #[arg(long)]
    summary: bool,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Request method.
    #[arg(long, short = 'X', default_value = "GET")]
    method: Method,
    /// Request body.
    #[arg(long)]
    data: Option<String>,
}

#[derive(Debug, clap::Args)]
struct TcpArgs {
    /// Echo port address: host:port.
    addr: String,
    /// Text sent on each connection.
    #[arg(long, default_value = "ping")]
    send: String,
    /// Number of connections, made one after the other.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Per-connection timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

fn parse_header(raw: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| format!("header {raw:?} is not `Name: value`"))?;
    let name = HeaderName::try_from(name.trim()).map_err(|e| format!("header name: {e}"))?;
    let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("header value: {e}"))?;
    Ok((name, value))
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Client(_) | Command::Tcp(_) | Command::Grpc(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Client(args) => client(args).await,
            Command::Tcp(args) => tcp(args).await,
            Command::Grpc(args) => grpc(args).await,
        }
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = echo::ServeConfig::new(echo::PodIdentity::resolve(
        args.pod_name,
        args.pod_namespace,
    ));
    config.http = SocketAddr::new(args.bind, args.http_port);
    config.tcp = SocketAddr::new(args.bind, args.tcp_port);
    config.max_body_bytes = args.max_body_bytes;
    config.drain_timeout = Duration::from_millis(args.drain_timeout_ms);
    let identity = config.identity.clone();
    let server = echo::bind(config).await?;
    // Both handlers are installed before the startup line, so a signal sent as soon as it is
    // read is handled.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tracing::info!(
        pod = identity.pod,
        namespace = identity.namespace,
        http = %server.http_addr(),
        tcp = %server.tcp_addr(),
        "listening"
    );
    print_line(&format!(
        "listening http={} tcp={}",
        server.http_addr(),
        server.tcp_addr()
    ))?;
    server
        .run(async move {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM"),
                _ = interrupt.recv() => tracing::info!("SIGINT"),
            }
        })
        .await;
    Ok(ExitCode::SUCCESS)
}

async fn client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let mut config = echo::ClientConfig::new(args.url);
    config.method = args.method;
    config.headers = args.headers.into_iter().collect::<HeaderMap>();
    config.body = args.data.map(Bytes::from).unwrap_or_default();
    config.count = args.count;
    config.concurrency = usize::try_from(args.concurrency).unwrap_or(usize::MAX);
    config.http2 = args.http2;
    config.timeout = Duration::from_millis(args.timeout_ms);
    config.rate = args.rate;
    let mut written = Ok(());
    let mut errors: Vec<String> = Vec::new();
    let summary = echo::client(config, |exchange| {
        if args.summary {
            // The first few errors still show what failed.
            if exchange.outcome.is_err() && errors.len() < 5 {
                errors.push(exchange.to_json());
            }
        } else if written.is_ok() {
            written = print_line(&exchange.to_json());
        }
    })
    .await?;
    written?;
    if args.summary {
        let line =
            serde_json::json!({"total": summary.total, "failed": summary.failed, "errors": errors});
        print_line(&line.to_string())?;
    }
    Ok(exit_code(summary))
}

async fn tcp(args: TcpArgs) -> anyhow::Result<ExitCode> {
    let config = echo::TcpConfig {
        addr: args.addr,
        send: Bytes::from(args.send),
        count: args.count,
        timeout: Duration::from_millis(args.timeout_ms),
    };
    let mut written = Ok(());
    let summary = echo::tcp(config, |exchange| {
        if written.is_ok() {
            written = print_line(&exchange.to_json());
        }
    })
    .await;
    written?;
    Ok(exit_code(summary))
}

async fn grpc(args: GrpcArgs) -> anyhow::Result<ExitCode> {
    let mut config = echo::GrpcConfig::new(args.target, args.message);
    config.method = args.method;
    config.metadata = args.headers.into_iter().collect::<HeaderMap>();
    config.count = args.count;
    config.timeout = Duration::from_millis(args.timeout_ms);
    let mut written = Ok(());
    let summary = echo::grpc(config, |exchange| {
        if written.is_ok() {
            written = print_line(&exchange.to_json());
        }
    })
    .await?;
    written?;
    Ok(exit_code(summary))
}

fn exit_code(summary: echo::Summary) -> ExitCode {
    if summary.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes one line of output (the startup line or a JSON result) to stdout and flushes it, so a
/// reader sees each line as soon as it is produced.
fn print_line(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}
