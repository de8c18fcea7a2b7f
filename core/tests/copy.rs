//! The proxy copy loop over real loopback TCP: data integrity both ways, half-close, byte
//! counts, and that idle connections hold no copy buffer.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_core::copy::{buffers_in_use, copy_bidirectional};

const T: Duration = Duration::from_secs(20);

/// client ⇄ (a ⇄ copy ⇄ b) ⇄ server; returns the client and server ends and the copy task.
async fn proxied() -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<std::io::Result<(u64, u64)>>,
) {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (mut a, _) = front.accept().await.unwrap();
    let mut b = TcpStream::connect(back.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = back.accept().await.unwrap();
    let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
    (client, server, copy)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn until(what: &str, f: impl Fn() -> bool) {
    tokio::time::timeout(T, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_with_half_close_and_counts() {
    let (mut client, mut server, copy) = proxied().await;
    let up = pattern(8 << 20, 1);
    let down = pattern(3 << 20, 7);
    let sender = {
        let up = up.clone();
        tokio::spawn(async move {
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap(); // half-close: the server sees EOF
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        })
    };
    let mut got_up = Vec::new();
    tokio::time::timeout(T, server.read_to_end(&mut got_up))
        .await
        .unwrap()
        .unwrap();
    assert!(got_up == up, "upstream bytes differ");
    // The client's half-close did not close the way back.
    server.write_all(&down).await.unwrap();
    server.shutdown().await.unwrap();
    let got_down = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert!(got_down == down, "downstream bytes differ");
    let (sent, received) = tokio::time::timeout(T, copy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((sent, received), (up.len() as u64, down.len() as u64));
    until("buffers released", || buffers_in_use() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_no_buffer() {
    let mut pairs = Vec::new();
    for i in 0..100u8 {
        let (mut client, mut server, copy) = proxied().await;
        client.write_all(&[i; 100]).await.unwrap();
        let mut buf = [0u8; 100];
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(&buf).await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, [i; 100]);
        pairs.push((client, server, copy));
    }
    // All 100 connections are open and idle: no copy buffer is held.
    until("idle connections release their buffers", || {
        buffers_in_use() == 0
    })
    .await;

    // A direction blocked on a slow writer keeps its buffer (the count is real)…
    let (client, server, _) = &mut pairs[0];
    let big = pattern(16 << 20, 3);
    let writer = {
        let mut client = client.try_clone_for_test();
        tokio::spawn(async move { client.write_all(&big).await.map(|()| big) })
    };
    until("a blocked burst holds a buffer", || buffers_in_use() >= 1).await;
    // …until the reader drains it; then the connection is idle again.
    let mut got = vec![0u8; 16 << 20];
    tokio::time::timeout(T, server.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    let big = writer.await.unwrap().unwrap();
    assert!(got == big, "bytes differ");
    until("released after the burst", || buffers_in_use() == 0).await;
}

/// A second handle on the same socket for a writer task (std `try_clone` round trip).
trait TryCloneForTest {
    fn try_clone_for_test(&self) -> TcpStream;
}

impl TryCloneForTest for TcpStream {
    fn try_clone_for_test(&self) -> TcpStream {
        use std::os::fd::{AsFd, OwnedFd};
        let fd: OwnedFd = self.as_fd().try_clone_to_owned().unwrap();
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true).unwrap();
        TcpStream::from_std(std).unwrap()
    }
}
