//! Request bodies buffered for retries and mirroring (up to [`REPLAY_LIMIT_BYTES`]; larger ones
//! stream once), and the boxed body type used on both sides.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

/// The error type of boxed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type the proxy sends and answers with.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Bodies up to this size are buffered so that a request can be retried or mirrored (64 KiB).
pub const REPLAY_LIMIT_BYTES: usize = 64 * 1024;

/// An empty body.
pub fn empty() -> BoxBody {
    http_body_util::Empty::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A body of `text`.
pub fn full(text: impl Into<Bytes>) -> BoxBody {
    http_body_util::Full::new(text.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A downstream request body, read up to [`REPLAY_LIMIT_BYTES`].
pub enum RequestBody {
    /// Read completely: can be sent any number of times.
    Buffered {
        /// The data.
        data: Bytes,
        /// Trailers, if any.
        trailers: Option<HeaderMap>,
    },
    /// Larger: streams once (`None` once taken).
    Streaming(Option<BoxBody>),
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestBody::Buffered { data, .. } => write!(f, "Buffered({} bytes)", data.len()),
            RequestBody::Streaming(_) => f.write_str("Streaming"),
        }
    }
}

impl RequestBody {
    /// Reads `body` until its end or until more than `limit` bytes arrived; `counted` adds up
    /// every byte read from downstream (also later, while streaming).
    ///
    /// # Errors
    /// The downstream body's error.
    pub async fn read<B>(body: B, limit: usize, counted: Arc<AtomicU64>) -> Result<Self, BoxError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let mut body = Counted {
            inner: body,
            counted,
        };
        if body.is_end_stream() {
            return Ok(RequestBody::Buffered {
                data: Bytes::new(),
                trailers: None,
            });
        }
        let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
        let mut size = 0usize;
        while size <= limit {
            match body.frame().await {
                None => {
                    let mut data = bytes::BytesMut::with_capacity(size);
                    let mut trailers = None;
                    for frame in frames {
                        match frame.into_data() {
                            Ok(chunk) => data.extend_from_slice(&chunk),
                            Err(frame) => trailers = frame.into_trailers().ok(),
                        }
                    }
                    return Ok(RequestBody::Buffered {
                        data: data.freeze(),
                        trailers,
                    });
                }
                Some(frame) => {
                    let frame = frame?;
                    if let Some(data) = frame.data_ref() {
                        size += data.len();
                    }
                    frames.push_back(frame);
                }
            }
        }
        Ok(RequestBody::Streaming(Some(
            Prefixed {
                frames,
                inner: body,
            }
            .boxed_unsync(),
        )))
    }

    /// Whether the body can be sent more than once.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered { .. })
    }

    /// The buffered bytes, if buffered.
    pub fn buffered(&self) -> Option<(&Bytes, Option<&HeaderMap>)> {
        match self {
            RequestBody::Buffered { data, trailers } => Some((data, trailers.as_ref())),
            RequestBody::Streaming(_) => None,
        }
    }

    /// A body for the next attempt: a copy when buffered, the stream the first time otherwise.
    pub fn attempt(&mut self) -> Option<BoxBody> {
        match self {
            RequestBody::Buffered { data, trailers } => {
                Some(replay(data.clone(), trailers.clone()))
            }
            RequestBody::Streaming(stream) => stream.take(),
        }
    }
}

/// A body replaying `data` then `trailers`.
pub fn replay(data: Bytes, trailers: Option<HeaderMap>) -> BoxBody {
    let mut frames = VecDeque::new();
    if !data.is_empty() {
        frames.push_back(Frame::data(data));
    }
    if let Some(t) = trailers {
        frames.push_back(Frame::trailers(t));
    }
    Prefixed {
        frames,
        inner: http_body_util::Empty::<Bytes>::new().map_err(|e| match e {}),
    }
    .boxed_unsync()
}

/// Counts the data bytes read through it.
struct Counted<B> {
    inner: B,
    counted: Arc<AtomicU64>,
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Frames already read, then the rest of `inner`.
struct Prefixed<B> {
    frames: VecDeque<Frame<Bytes>>,
    inner: B,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_bodies_buffer_large_ones_stream() {
        let counted = Arc::new(AtomicU64::new(0));
        let small = http_body_util::Full::new(Bytes::from_static(b"hello"));
        let mut body = RequestBody::read(small, 16, counted.clone()).await.unwrap();
        assert!(body.replayable());
        for _ in 0..2 {
            let bytes = body.attempt().unwrap().collect().await.unwrap().to_bytes();
            assert_eq!(&bytes[..], b"hello");
        }
        let big = http_body_util::Full::new(Bytes::from(vec![7u8; 40]));
        let mut body = RequestBody::read(big, 16, counted.clone()).await.unwrap();
        assert!(!body.replayable());
        let bytes = body.attempt().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 40);
        assert!(body.attempt().is_none(), "a stream is sent once");
        assert_eq!(counted.load(Ordering::Relaxed), 45);
    }
}
