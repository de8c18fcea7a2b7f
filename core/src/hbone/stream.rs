use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::ReadReady;

/// Largest chunk handed to h2 per write, in bytes; bounds the copy of each write.
const MAX_WRITE_BYTES: usize = 256 * 1024;

/// One HBONE stream (an HTTP/2 `CONNECT` stream) as a byte pipe.
///
/// Reading: DATA frames in order; `END_STREAM` and `RST_STREAM(NO_ERROR | CANCEL)` read as EOF,
/// `RST_STREAM(STREAM_CLOSED)` as a broken pipe, other resets as errors (RFC 9113 §8.5).
/// Writing: DATA frames within the peer's flow-control window; `shutdown` sends an empty DATA
/// frame with `END_STREAM` (TCP half-close). Dropping it unfinished resets the stream (CANCEL).
pub struct Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    /// The receive side ended (EOF, or the error to report) while polled for readiness.
    ended: Option<io::Result<()>>,
    write_closed: bool,
    /// The `200`'s headers (client side); `None` when empty, to keep idle streams small.
    response_headers: Option<Box<HeaderMap>>,
    _guard: Option<Box<dyn Send + Sync>>,
}

// === impl Stream ===

impl Stream {
    pub(super) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        response_headers: HeaderMap,
        guard: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        Stream {
            send,
            recv,
            pending: Bytes::new(),
            ended: None,
            write_closed: false,
            response_headers: (!response_headers.is_empty()).then(|| Box::new(response_headers)),
            _guard: guard,
        }
    }

    /// Headers of the server's `200` response (e.g. the destination's `baggage`); empty on the
    /// server side.
    pub fn response_headers(&self) -> &HeaderMap {
        static EMPTY: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);
        self.response_headers.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("stream_id", &self.send.stream_id())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

pub(super) fn h2_to_io(err: h2::Error) -> io::Error {
    if err.reason() == Some(Reason::STREAM_CLOSED) {
        return io::Error::new(io::ErrorKind::BrokenPipe, err);
    }
    if err.is_io() {
        return err
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 io error"));
    }
    io::Error::other(err)
}

fn is_clean_reset(err: &h2::Error) -> bool {
    err.is_reset() && matches!(err.reason(), Some(Reason::NO_ERROR | Reason::CANCEL))
}

impl Stream {
    /// Makes received data available in `pending`, or records the end of the receive side in
    /// `ended`; `Ready` in both cases.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.pending.is_empty() && self.ended.is_none() {
            match ready!(self.recv.poll_data(cx)) {
                None => self.ended = Some(Ok(())),
                Some(Ok(data)) => self.pending = data,
                Some(Err(err)) if is_clean_reset(&err) => self.ended = Some(Ok(())),
                Some(Err(err)) => self.ended = Some(Err(h2_to_io(err))),
            }
        }
        Poll::Ready(())
    }
}

impl Stream {
    /// Waits for send capacity for up to `want` bytes; returns what was granted (> 0).
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => return Poll::Ready(Ok(granted)),
                Some(Err(err)) => return Poll::Ready(Err(h2_to_io(err))),
                None => {
                    // The stream can no longer send: report why if the peer reset it.
                    return match self.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            format!("stream reset by peer: {reason:?}"),
                        ))),
                        _ => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                    };
                }
            }
        }
    }
}

impl ReadReady for Stream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_fill(cx));
        Poll::Ready(Ok(()))
    }

    fn reads_owned(&self) -> bool {
        true
    }

    /// The next DATA chunk as h2 received it (no copy); its flow-control capacity is released
    /// now, so the peer may send about one more chunk while this one is being written out.
    fn poll_read_owned(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        ready!(self.poll_fill(cx));
        if self.pending.is_empty() {
            return Poll::Ready(match self.ended.as_mut() {
                Some(Err(_)) => self
                    .ended
                    .replace(Ok(()))
                    .unwrap_or(Ok(()))
                    .map(|()| Bytes::new()),
                _ => Ok(Bytes::new()),
            });
        }
        let data = std::mem::take(&mut self.pending);
        let _ = self.recv.flow_control().release_capacity(data.len());
        Poll::Ready(Ok(data))
    }

    fn writes_owned(&self) -> bool {
        true
    }

    /// Sends a prefix of `data` as a DATA frame without copying it.
    fn poll_write_owned(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = data.len().min(MAX_WRITE_BYTES);
        let granted = ready!(self.poll_send_capacity(cx, want))?;
        let n = granted.min(want);
        self.send
            .send_data(data.split_to(n), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_fill(cx));
        if self.pending.is_empty() {
            // Ended: EOF every time; an error once, then EOF.
            return Poll::Ready(match self.ended.as_mut() {
                Some(Err(_)) => self.ended.replace(Ok(())).unwrap_or(Ok(())),
                _ => Ok(()),
            });
        }
        let n = out.remaining().min(self.pending.len());
        out.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE_BYTES);
        let granted = ready!(self.poll_send_capacity(cx, want))?;
        let n = granted.min(want);
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
