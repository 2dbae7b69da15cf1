//! The pods' HTTP echo server, answering like traefik/whoami, and a tiny
//! HTTP client (`tabby-lab http-get`, `tabby-echo get`) so that tests need no curl.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;

/// The largest request head the server reads.
const MAX_HEAD: usize = 16 * 1024;

/// Serves forever on 0.0.0.0:`port`, one thread per connection.
pub fn serve(name: &str, port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding TCP port {port}"))?;
    eprintln!("echo server {name} listening on {}", listener.local_addr()?);
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let name = name.to_string();
        std::thread::spawn(move || {
            if let Err(e) = answer(&name, stream) {
                eprintln!("echo server {name}: {e:#}");
            }
        });
    }
    Ok(())
}

/// Reads one request and answers it, then closes the connection.
fn answer(name: &str, stream: TcpStream) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        head.push(line.trim_end().to_string());
        if head.iter().map(String::len).sum::<usize>() > MAX_HEAD {
            anyhow::bail!("request head larger than {MAX_HEAD} bytes");
        }
    }
    let body = whoami_body(name, &local_ipv4s(), peer, &head);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = stream;
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    Ok(())
}

/// The IPv4 addresses of this namespace's interfaces, loopback first.
fn local_ipv4s() -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                .collect()
        })
        .unwrap_or_default();
    ips.sort_by_key(|ip| !ip.is_loopback());
    ips.dedup();
    ips
}

/// The body traefik/whoami answers: hostname, addresses, the client's
/// address, then the request line and headers as received.
pub fn whoami_body(name: &str, ips: &[Ipv4Addr], peer: SocketAddr, head: &[String]) -> String {
    let mut body = format!("Hostname: {name}\n");
    for ip in ips {
        body.push_str(&format!("IP: {ip}\n"));
    }
    body.push_str(&format!("RemoteAddr: {peer}\n"));
    for line in head {
        body.push_str(line);
        body.push('\n');
    }
    body
}

/// A parsed `http://host[:port][/path]` URL.
#[derive(Debug, PartialEq, Eq)]
pub struct Url {
    /// Host name or address, as written.
    pub host: String,
    /// Port (80 when absent).
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Parses a plain-HTTP URL.
pub fn parse_url(url: &str) -> anyhow::Result<Url> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.contains("://") {
        anyhow::bail!("only http:// URLs are supported: {url}");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.to_string(),
            p.parse().with_context(|| format!("bad port in {url}"))?,
        ),
        _ => (authority.to_string(), 80),
    };
    if host.is_empty() {
        anyhow::bail!("no host in {url}");
    }
    Ok(Url {
        host: host.trim_matches(['[', ']']).to_string(),
        port,
        path,
    })
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    /// e.g. 200.
    pub status: u16,
    /// The decoded body.
    pub body: Vec<u8>,
}

/// `GET url` with an overall deadline for connecting and for each read.
pub fn get(url: &str, timeout: Duration) -> anyhow::Result<Response> {
    let url = parse_url(url)?;
    let addr = match url.host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, url.port),
        Err(_) => (url.host.as_str(), url.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", url.host))?
            .next()
            .with_context(|| format!("{} has no address", url.host))?,
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let host = if url.port == 80 {
        url.host.clone()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tabby-lab/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.path,
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer of {addr}"))?;
    parse_response(&raw)
}

/// Parses a whole HTTP/1.x response (read until the server closed).
pub fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers in the response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let header = |name: &str| {
        head.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut body = raw[split + 4..].to_vec();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(len);
    }
    Ok(Response { status, body })
}

/// Decodes a chunked body.
fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(data.len() >= size, "truncated chunk");
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_reads_like_traefik_whoami() {
        let ips = ["127.0.0.1".parse().unwrap(), "10.244.1.2".parse().unwrap()];
        let head = vec![
            "GET / HTTP/1.1".to_string(),
            "Host: 10.244.1.2:8080".to_string(),
        ];
        let body = whoami_body(
            "node-1-pod1",
            &ips,
            "10.244.1.3:40000".parse().unwrap(),
            &head,
        );
        assert_eq!(
            body,
            "Hostname: node-1-pod1\nIP: 127.0.0.1\nIP: 10.244.1.2\nRemoteAddr: 10.244.1.3:40000\nGET / HTTP/1.1\nHost: 10.244.1.2:8080\n"
        );
    }

    #[test]
    fn urls_parse_with_and_without_port_and_path() {
        assert_eq!(
            parse_url("http://10.0.0.1:8080/x?y=1").unwrap(),
            Url {
                host: "10.0.0.1".into(),
                port: 8080,
                path: "/x?y=1".into()
            }
        );
        assert_eq!(
            parse_url("10.0.0.1").unwrap(),
            Url {
                host: "10.0.0.1".into(),
                port: 80,
                path: "/".into()
            }
        );
        assert!(parse_url("https://x").is_err());
    }

    #[test]
    fn responses_parse_with_length_or_chunks() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hi"[..]));
        let r = parse_response(
            b"HTTP/1.1 404 NF\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcd"[..]));
    }

    #[test]
    fn the_server_answers_the_client_with_its_address() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            answer("me", s).unwrap();
        });
        let r = get(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(5)).unwrap();
        let body = String::from_utf8(r.body).unwrap();
        assert_eq!(r.status, 200);
        assert!(body.starts_with("Hostname: me\nIP: 127.0.0.1\n"), "{body}");
        assert!(body.contains("RemoteAddr: 127.0.0.1:"), "{body}");
        assert!(
            body.contains(&format!("GET / HTTP/1.1\nHost: 127.0.0.1:{port}\n")),
            "{body}"
        );
    }
}
