//! Bidirectional copy for proxied connections that holds **no buffer while a side is idle**.
//!
//! A mesh proxy keeps many mostly idle connections open (pooled clients, long-polls, database
//! connections). A copy loop with a fixed buffer per direction (tokio's `copy_bidirectional`)
//! pins that buffer for the connection's whole life: with 2 × 256 KiB per connection, 10,000 idle
//! connections cost gigabytes of address space and, once touched, resident memory. Here each
//! direction first waits until its reader is readable ([`ReadReady`], no buffer), then borrows a
//! buffer for the burst, and drops it as soon as the reader has nothing more and everything read
//! was written. A burst that fills the small buffer switches that direction to the large one,
//! so bulk transfers keep large reads and writes.
//!
//! EOF on one side is propagated as a half-close (`shutdown`) of the other; the copy ends when
//! both directions have seen EOF, or at the first error.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// First buffer of a burst, in bytes: one read of a typical request or response.
pub const SMALL_BUFFER_BYTES: usize = 16 * 1024;

/// Buffer once a burst has filled the small one, in bytes (bulk transfers).
pub const LARGE_BUFFER_BYTES: usize = 256 * 1024;

/// Copy buffers allocated right now, process-wide.
static BUFFERS_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// How many copy buffers are allocated right now in this process (connections in the middle
/// of a burst, not idle ones).
pub fn buffers_in_use() -> usize {
    BUFFERS_IN_USE.load(Ordering::Relaxed)
}

/// A copy buffer, counted in [`buffers_in_use`].
#[derive(Debug)]
struct Buffer(Box<[u8]>);

impl Buffer {
    fn new(size: usize) -> Self {
        BUFFERS_IN_USE.fetch_add(1, Ordering::Relaxed);
        Buffer(vec![0u8; size].into_boxed_slice())
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        BUFFERS_IN_USE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waiting for readability without a buffer.
///
/// `poll_read_ready` resolves when a `poll_read` would make progress (data, EOF or an error),
/// registering the waker otherwise. The default resolves at once ("unknown"): the copy then
/// keeps a buffer while waiting, as a plain copy loop would.
///
/// It also lets a side that moves [`Bytes`] anyway (an HBONE stream: h2 hands out and takes
/// `Bytes`) exchange them without a copy: [`reads_owned`](Self::reads_owned) /
/// [`poll_read_owned`](Self::poll_read_owned) on the reading side, and
/// [`writes_owned`](Self::writes_owned) / [`poll_write_owned`](Self::poll_write_owned) on the
/// writing side. The defaults say "not supported"; wrappers need not forward them.
pub trait ReadReady {
    /// Polls for read readiness.
    ///
    /// # Errors
    /// An error the next read would return anyway.
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Whether [`poll_read_owned`](Self::poll_read_owned) is supported.
    fn reads_owned(&self) -> bool {
        false
    }

    /// Takes the next received chunk without copying it; an empty chunk is EOF. Only called
    /// when [`reads_owned`](Self::reads_owned) is true.
    ///
    /// # Errors
    /// The error `poll_read` would return.
    fn poll_read_owned(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }

    /// Whether [`poll_write_owned`](Self::poll_write_owned) is supported.
    fn writes_owned(&self) -> bool {
        false
    }

    /// Writes a prefix of `data` without copying it, advancing `data` past what was taken;
    /// `Ready(Ok(n))` with `n > 0` like `poll_write`. Only called when
    /// [`writes_owned`](Self::writes_owned) is true.
    ///
    /// # Errors
    /// The error `poll_write` would return.
    fn poll_write_owned(
        &mut self,
        _cx: &mut Context<'_>,
        _data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl ReadReady for tokio::io::DuplexStream {}

impl<T: ReadReady + ?Sized> ReadReady for &mut T {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }

    fn reads_owned(&self) -> bool {
        (**self).reads_owned()
    }

    fn poll_read_owned(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        (**self).poll_read_owned(cx)
    }

    fn writes_owned(&self) -> bool {
        (**self).writes_owned()
    }

    fn poll_write_owned(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_owned(cx, data)
    }
}

impl<T: ReadReady + ?Sized> ReadReady for Box<T> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }

    fn reads_owned(&self) -> bool {
        (**self).reads_owned()
    }

    fn poll_read_owned(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        (**self).poll_read_owned(cx)
    }

    fn writes_owned(&self) -> bool {
        (**self).writes_owned()
    }

    fn poll_write_owned(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_owned(cx, data)
    }
}

/// A buffer filled by reads and handed on as [`Bytes`] to a writer that takes ownership
/// ([`ReadReady::writes_owned`]); counted in [`buffers_in_use`] while the copy holds it.
#[derive(Debug)]
struct OwnedBuffer(BytesMut);

impl OwnedBuffer {
    fn new(size: usize) -> Self {
        BUFFERS_IN_USE.fetch_add(1, Ordering::Relaxed);
        OwnedBuffer(BytesMut::with_capacity(size))
    }
}

impl Drop for OwnedBuffer {
    fn drop(&mut self) {
        BUFFERS_IN_USE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A direction's state in the owned modes.
#[derive(Debug, Default)]
struct Owned {
    /// Owned-write mode: room for the next read (the rest of the last allocation).
    spare: Option<OwnedBuffer>,
    /// Read and not yet written.
    chunk: Bytes,
}

/// One direction's state.
#[derive(Debug)]
struct Direction {
    /// Borrowed mode: `buf[pos..cap]` is read and not yet written.
    buf: Option<Buffer>,
    /// Owned modes (boxed, and only during a burst, to keep idle connections small).
    owned: Option<Box<Owned>>,
    size: usize,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    amount: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: None,
            owned: None,
            size: SMALL_BUFFER_BYTES,
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            done: false,
            amount: 0,
        }
    }

    /// Copies from `reader` to `writer` until EOF (then shuts `writer` down), returning the bytes
    /// copied; `Pending` while waiting on either side.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ReadReady + Unpin + ?Sized,
        W: AsyncWrite + ReadReady + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.amount));
        }
        let owned_read = reader.reads_owned();
        let owned_write = writer.writes_owned();
        loop {
            if self.pos == self.cap && !self.has_chunk() && !self.read_done {
                let more = if owned_read {
                    self.poll_read_owned(cx, reader)
                } else if owned_write {
                    self.poll_read_to_owned(cx, reader)
                } else {
                    self.poll_read_borrowed(cx, reader)
                };
                match more {
                    Poll::Pending => {
                        // Nothing read is pending (reads happen only then): hold nothing.
                        self.owned = None;
                        return self.idle(cx, Pin::new(&mut *writer));
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Ready(Ok(())) => {}
                }
            }
            while let Some(owned) = self.owned.as_mut().filter(|o| !o.chunk.is_empty()) {
                let chunk = &mut owned.chunk;
                let written = if owned_write {
                    ready!(writer.poll_write_owned(cx, chunk))?
                } else {
                    let n = ready!(Pin::new(&mut *writer).poll_write(cx, chunk))?;
                    chunk.advance(n.min(chunk.len()));
                    n
                };
                if written == 0 {
                    return Poll::Ready(Err(write_zero()));
                }
                self.amount += written as u64;
                self.need_flush = true;
            }
            while self.pos < self.cap {
                let Some(buf) = self.buf.as_ref() else {
                    break;
                };
                let written =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &buf.0[self.pos..self.cap]))?;
                if written == 0 {
                    return Poll::Ready(Err(write_zero()));
                }
                self.pos += written;
                self.amount += written as u64;
                self.need_flush = true;
            }
            if self.pos == self.cap && self.buf.as_ref().is_some_and(|b| b.0.len() < self.size) {
                // Written out after growing: take the large buffer for the next read.
                self.buf = None;
            }
            if self.read_done && self.pos == self.cap && !self.has_chunk() {
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.amount));
            }
        }
    }

    /// Whether read data waits in `owned.chunk`.
    fn has_chunk(&self) -> bool {
        self.owned.as_ref().is_some_and(|o| !o.chunk.is_empty())
    }

    /// Reads into the copy's own buffer (`buf[pos..cap]`), or sets `read_done`. `Pending`
    /// (holding no buffer) when the reader has nothing now.
    fn poll_read_borrowed<R>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ReadReady + Unpin + ?Sized,
    {
        if self.buf.is_none() {
            ready!(reader.poll_read_ready(cx))?;
        }
        let buf = self.buf.get_or_insert_with(|| Buffer::new(self.size));
        let mut read_buf = ReadBuf::new(&mut buf.0);
        match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
            Poll::Pending => {
                self.buf = None;
                Poll::Pending
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Ready(Ok(())) => {
                let n = read_buf.filled().len();
                if n == 0 {
                    self.read_done = true;
                    self.buf = None;
                } else {
                    self.pos = 0;
                    self.cap = n;
                    if n == self.size && self.size < LARGE_BUFFER_BYTES {
                        // A full read: more is coming; the next read gets the large
                        // buffer (this one is swapped once written out).
                        self.size = LARGE_BUFFER_BYTES;
                    }
                }
                Poll::Ready(Ok(()))
            }
        }
    }

    /// Reads into `spare` and moves what was read into `chunk` (no copy for the writer), or
    /// sets `read_done`. `Pending` (holding no buffer) when the reader has nothing now.
    fn poll_read_to_owned<R>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ReadReady + Unpin + ?Sized,
    {
        let size = self.size;
        let owned = self.owned.get_or_insert_with(Box::default);
        if owned.spare.is_none() {
            ready!(reader.poll_read_ready(cx))?;
        }
        let spare = owned.spare.get_or_insert_with(|| OwnedBuffer::new(size));
        let room = spare.0.capacity() - spare.0.len();
        let n = match tokio_util::io::poll_read_buf(Pin::new(&mut *reader), cx, &mut spare.0) {
            Poll::Pending => {
                owned.spare = None;
                return Poll::Pending;
            }
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Ready(Ok(n)) => n,
        };
        if n == 0 {
            self.read_done = true;
            owned.spare = None;
            return Poll::Ready(Ok(()));
        }
        owned.chunk = spare.0.split().freeze();
        if n == room && size < LARGE_BUFFER_BYTES {
            // A full read: more is coming; the next read gets a large buffer.
            self.size = LARGE_BUFFER_BYTES;
            owned.spare = None;
        } else if spare.0.capacity() < size / 4 {
            // Too little room left for a good read: the next one gets a fresh buffer
            // (this allocation is freed once the writer is done with `chunk`).
            owned.spare = None;
        }
        Poll::Ready(Ok(()))
    }

    /// Takes the reader's next chunk into `chunk`, or sets `read_done`.
    fn poll_read_owned<R>(&mut self, cx: &mut Context<'_>, reader: &mut R) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ReadReady + Unpin + ?Sized,
    {
        let data = ready!(reader.poll_read_owned(cx))?;
        if data.is_empty() {
            self.read_done = true;
        } else {
            self.owned.get_or_insert_with(Box::default).chunk = data;
        }
        Poll::Ready(Ok(()))
    }

    /// The reader has nothing now and everything read is written: flush and wait (no buffer).
    fn idle<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>> {
        if self.need_flush {
            ready!(writer.poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Pending
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "write zero bytes into the peer")
}

/// Copies both ways between `a` and `b` until both directions reach EOF, propagating each EOF
/// as a half-close (`shutdown`) of the other side. Returns the bytes copied `(a → b, b → a)`.
///
/// # Errors
/// The first I/O error in either direction.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + ReadReady + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + ReadReady + Unpin + ?Sized,
{
    let mut a_to_b = Direction::new();
    let mut b_to_a = Direction::new();
    poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, &mut *a, &mut *b)?;
        let backward = b_to_a.poll_copy(cx, &mut *b, &mut *a)?;
        match (forward, backward) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}
