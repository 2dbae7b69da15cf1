//! Serving an axum [`Router`] with hyper's HTTP/1 server, set up for the
//! agent's small read-only endpoints (health, readiness, metrics, and the
//! health-check node ports), which face load balancers and scrapers:
//!
//! - the request head (request line and headers) must arrive within
//!   [`HEADER_READ_TIMEOUT`] and fit in [`MAX_HEADER_SIZE`] bytes
//!   (hyper answers 431 beyond it and closes);
//! - one request per connection (no keep-alive), so an idle client holds
//!   no task once it has its answer;
//! - header names in title case (`Content-Type`, `X-Content-Type-Options`),
//!   as Go's net/http writes them for kube-proxy.
//!
//! `axum::serve` takes no hyper settings, hence this accept loop.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::debug;

/// How long a client may take to send its request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a request head may hold; the endpoints take no body.
pub const MAX_HEADER_SIZE: usize = 8 * 1024;
/// The most header lines a request may carry.
const MAX_HEADERS: usize = 64;
/// The pause after a failed `accept` (e.g. EMFILE).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until the returned future is dropped; each
/// connection runs in its own task.
pub async fn serve(listener: TcpListener, router: Router) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_SIZE)
        .max_headers(MAX_HEADERS)
        .keep_alive(false)
        .title_case_headers(true);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                debug!(%error, "accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%peer, %error, "http connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "no\n") });
        tokio::spawn(serve(l, router));
        addr
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn answers_one_request_per_connection_and_refuses_other_methods() {
        let addr = start().await;
        let ok = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nok\n"),
            "{ok}"
        );
        assert!(ok.contains("\r\nConnection: close\r\n"), "{ok}");
        let nf = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404 Not Found\r\n"), "{nf}");
        let post = exchange(addr, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    }

    #[tokio::test]
    async fn a_request_head_over_the_limit_is_refused_with_431() {
        let addr = start().await;
        let mut req = b"GET /healthz HTTP/1.1\r\nX-Junk: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 2 * MAX_HEADER_SIZE));
        req.extend(b"\r\n\r\n");
        let out = exchange(addr, &req).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_ends_its_head_is_cut_off_after_the_timeout() {
        let addr = start().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        // The paused clock jumps to the server's deadline once every task idles.
        let read = tokio::time::timeout(HEADER_READ_TIMEOUT * 2, s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection is still open");
        assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    }
}
