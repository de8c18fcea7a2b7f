//! The TCP socket under an HBONE connection's TLS, with large reads.
//!
//! rustls reads the socket into its record buffer at most 4 KiB past what it already holds
//! (`read_tls`), and shrinks that buffer back to 4 KiB whenever it is empty: a 16 KiB record
//! costs several `recv` calls. [`ReadBuffered`] reads up to [`READ_BUFFER_BYTES`] per `recv`
//! and serves rustls's small reads from that; the buffer is freed whenever the socket has
//! nothing more (an idle connection holds none). Writes pass through unchanged (vectored).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read from the socket, in bytes.
pub(super) const READ_BUFFER_BYTES: usize = 64 * 1024;

/// rustls's limit on encrypted bytes queued per write, in bytes (its default is 64 KiB): one
/// h2 write of a large DATA frame becomes one `writev` of up to this many bytes.
pub(super) const TLS_BUFFER_LIMIT_BYTES: usize = 256 * 1024;

/// A reader with a read-ahead buffer held only while data is flowing.
#[derive(Debug)]
pub(super) struct ReadBuffered<T> {
    inner: T,
    /// Read but not yet consumed.
    buf: BytesMut,
}

impl<T> ReadBuffered<T> {
    pub(super) fn new(inner: T) -> Self {
        ReadBuffered {
            inner,
            buf: BytesMut::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= READ_BUFFER_BYTES || crate::copy::ab_disabled(1) {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve(READ_BUFFER_BYTES);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing more now: hold no buffer while waiting.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(0)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn small_and_large_reads_see_every_byte_in_order() {
        let (mut a, b) = tokio::io::duplex(1024 * 1024);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(7_001) {
                a.write_all(chunk).await.unwrap();
            }
        });
        let mut reader = ReadBuffered::new(b);
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        let mut large = vec![0u8; 2 * READ_BUFFER_BYTES];
        let mut toggle = false;
        while got.len() < data.len() {
            toggle = !toggle;
            let n = if toggle {
                reader.read(&mut small).await.unwrap()
            } else {
                reader.read(&mut large).await.unwrap()
            };
            got.extend_from_slice(if toggle { &small[..n] } else { &large[..n] });
        }
        writer.await.unwrap();
        assert_eq!(got, data);
    }
}
