//! Socket-level settings of an HBONE connection's TLS.

/// rustls's limit on encrypted bytes queued per write, in bytes (its default is 64 KiB): one
/// h2 write of a large DATA frame becomes one `writev` of up to this many bytes. In the
/// loopback L4 benchmark (`core/benches/l4_path.rs`) the 64 KiB default cost 1.86-2.0
/// CPU-seconds per GB against 1.68-1.81 with 256 KiB.
pub(super) const TLS_BUFFER_LIMIT_BYTES: usize = 256 * 1024;
