//! A minimal HTTP/1.1 responder for the agent's fixed GET endpoints
//! (health, readiness, metrics, and the service proxy's health-check node
//! ports). Written by hand because these few read-only endpoints need no
//! routing, bodies or keep-alive, and an HTTP framework would add dozens of
//! crates to a daemon that must stay small.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tracing::debug;

/// A response: status code, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Content-Type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    /// A text/plain response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// An application/json response.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Extra response headers, `(name, value)`.
pub type Headers = Vec<(&'static str, String)>;

/// The most a request head may hold; the endpoints take no body.
const REQUEST_LIMIT: u64 = 8 * 1024;
/// How long a client may take to send its request head.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The pause after a failed `accept` (e.g. EMFILE).
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves `handler(path)` on `listener` until the returned future is dropped.
pub fn serve<H>(listener: TcpListener, handler: H) -> impl Future<Output = ()>
where
    H: Fn(&str) -> Response + Send + Sync + 'static,
{
    serve_with_headers(listener, move |path| (handler(path), Headers::new()))
}

/// [`serve`] for handlers that also set extra headers (the health-check
/// node ports send `X-Content-Type-Options` and a load-balancing weight).
pub fn serve_with_headers<H>(listener: TcpListener, handler: H) -> impl Future<Output = ()>
where
    H: Fn(&str) -> (Response, Headers) + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    debug!(error = %e, "accept");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                // A client gets REQUEST_LIMIT bytes and REQUEST_TIMEOUT to send its head.
                let mut lines = BufReader::new(read.take(REQUEST_LIMIT)).lines();
                let head = async {
                    let request = lines.next_line().await.ok().flatten()?;
                    // Drain the headers up to the blank line.
                    while let Ok(Some(l)) = lines.next_line().await {
                        if l.is_empty() {
                            break;
                        }
                    }
                    Some(request)
                };
                let Ok(Some(request)) = tokio::time::timeout(REQUEST_TIMEOUT, head).await else {
                    return;
                };
                let mut parts = request.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
                let (resp, headers) = if method == "GET" {
                    handler(path)
                } else {
                    (Response::text(405, "only GET\n"), Headers::new())
                };
                debug!(%peer, path, status = resp.status, "http");
                let extra: String = headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}\r\n"))
                    .collect();
                let head = format!(
                    "HTTP/1.1 {} {}\r\nContent-Type: {}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    resp.status,
                    reason(resp.status),
                    resp.content_type,
                    resp.body.len()
                );
                let _ = write.write_all(head.as_bytes()).await;
                let _ = write.write_all(resp.body.as_bytes()).await;
                let _ = write.shutdown().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn answers_get_with_the_handlers_response_and_refuses_other_methods() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve(l, |p| {
            if p == "/healthz" {
                Response::text(200, "ok\n")
            } else {
                Response::text(404, "no\n")
            }
        }));
        let get = |req: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("ok\n"),
            "{ok}"
        );
        assert!(get("GET /nope HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get("POST /healthz HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        server.abort();
    }

    #[tokio::test]
    async fn extra_headers_come_before_the_body() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve_with_headers(l, |_| {
            (Response::json(503, "{}"), vec![("X-Test", "1".to_string())])
        }));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{out}"
        );
        assert!(
            out.contains("\r\nX-Test: 1\r\n") && out.ends_with("\r\n\r\n{}"),
            "{out}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_client_that_never_ends_its_request_line_is_cut_off_at_the_limit() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve(l, |_| Response::text(200, "ok\n")));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Far more than the limit, no newline: the server stops reading and closes.
        let junk = vec![b'a'; 64 * 1024];
        let _ = s.write_all(&junk).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
        server.abort();
    }
}
