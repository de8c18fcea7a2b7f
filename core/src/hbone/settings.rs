use std::time::Duration;

/// HTTP/2 and keepalive settings for HBONE connections (istio-ztunnel reference §1.4).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Initial per-stream flow-control window in bytes; default 4 MiB; both sides.
    pub stream_window_bytes: u32,
    /// Initial connection flow-control window in bytes; default 16 MiB (4× the stream window, so
    /// one stalled stream cannot block the others); both sides.
    pub connection_window_bytes: u32,
    /// Largest HTTP/2 frame payload accepted, in bytes; default 1 MiB.
    pub max_frame_size_bytes: u32,
    /// Interval between keepalive PINGs; default 10 s; per connection.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed; default 20 s.
    pub keepalive_timeout: Duration,
    /// Time allowed for the TLS and HTTP/2 handshakes; default 10 s.
    pub handshake_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stream_window_bytes: 4 * 1024 * 1024,
            connection_window_bytes: 16 * 1024 * 1024,
            max_frame_size_bytes: 1024 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Client: largest header list accepted, bytes.
pub(super) const CLIENT_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Server: largest header list accepted, bytes.
pub(super) const SERVER_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Server: most bytes buffered for sending per stream.
pub(super) const SERVER_MAX_SEND_BUFFER_BYTES: usize = 400 * 1024;
/// Server: concurrent streams advertised to clients.
pub(super) const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;

/// Sends PINGs every `interval`; resolves (with the failure) when one is not answered within
/// `timeout` or the connection is gone. Must run alongside the polled connection.
pub(super) async fn keepalive(
    mut ping_pong: h2::PingPong,
    interval: Duration,
    timeout: Duration,
) -> &'static str {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "ping failed",
            Err(_) => return "ping timed out",
        }
    }
}
