//! The pods' HTTP echo server, answering like traefik/whoami, and the
//! HTTP client of `tabby-lab http-get` and `tabby-echo get` (ureq), so that
//! tests need no curl.
//!
//! The server stays hand-written on std: it must echo the request line and
//! headers exactly as they arrived (as whoami does), which an HTTP library
//! parses away, and it answers one request per connection.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
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

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    /// e.g. 200.
    pub status: u16,
    /// The decoded body.
    pub body: Vec<u8>,
}

/// A plain-HTTP client (ureq) for `http-get`: a new connection for every
/// request (a Service balances connections, and the echo server closes
/// each one anyway), no proxy from the environment, any status returned
/// as an answer rather than an error.
pub struct Client {
    agent: ureq::Agent,
}

impl Client {
    /// A client whose requests each get `timeout`, connecting included.
    pub fn new(timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .proxy(None)
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .user_agent(concat!("tabby-lab/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent: config.into(),
        }
    }

    /// `GET url`; `url` is `http://host[:port][/path]` (`http://` may be
    /// left out; IPv6 hosts in brackets, `http://[::1]:8080/`).
    pub fn get(&self, url: &str) -> anyhow::Result<Response> {
        let url = with_scheme(url)?;
        let response = self
            .agent
            .get(url.as_str())
            .call()
            .with_context(|| format!("GET {url}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .read_to_vec()
            .with_context(|| format!("reading the answer of {url}"))?;
        Ok(Response { status, body })
    }
}

/// `url` with `http://` added when it has no scheme; other schemes refused.
fn with_scheme(url: &str) -> anyhow::Result<String> {
    match url.split_once("://") {
        None => Ok(format!("http://{url}")),
        Some(("http", _)) => Ok(url.to_string()),
        Some(_) => anyhow::bail!("only http:// URLs are supported: {url}"),
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
    fn the_server_answers_the_client_with_its_address() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            answer("me", s).unwrap();
        });
        let client = Client::new(Duration::from_secs(5));
        let r = client.get(&format!("127.0.0.1:{port}/")).unwrap();
        let body = String::from_utf8(r.body).unwrap();
        assert_eq!(r.status, 200);
        assert!(body.starts_with("Hostname: me\nIP: 127.0.0.1\n"), "{body}");
        assert!(body.contains("RemoteAddr: 127.0.0.1:"), "{body}");
        let lines: Vec<String> = body.lines().map(str::to_ascii_lowercase).collect();
        assert!(lines.contains(&"get / http/1.1".to_string()), "{body}");
        assert!(lines.contains(&format!("host: 127.0.0.1:{port}")), "{body}");
    }

    /// A listener on `addr` answering `n` connections with `answer`.
    fn canned(addr: &str, n: usize, answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind(addr).unwrap();
        let local = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().take(n) {
                let mut s = conn.unwrap();
                let mut head = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while head.read_line(&mut line).unwrap() > 0 && !line.ends_with("\r\n\r\n") {}
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        local
    }

    #[test]
    fn ipv6_literal_urls_reach_a_listener_on_the_loopback() {
        let listener = TcpListener::bind("[::1]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            answer("v6", s).unwrap();
        });
        let r = Client::new(Duration::from_secs(5))
            .get(&format!("http://[::1]:{port}/"))
            .unwrap();
        let body = String::from_utf8(r.body).unwrap();
        assert_eq!(r.status, 200);
        assert!(body.starts_with("Hostname: v6\n"), "{body}");
        assert!(body.contains("RemoteAddr: [::1]:"), "{body}");
    }

    #[test]
    fn any_status_is_an_answer_and_chunked_bodies_are_decoded() {
        let addr = canned(
            "127.0.0.1:0",
            1,
            "HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        );
        let r = Client::new(Duration::from_secs(5))
            .get(&format!("http://{addr}/"))
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"abcd"[..]));
    }

    #[test]
    fn other_schemes_are_refused() {
        let err = Client::new(Duration::from_secs(5))
            .get("https://127.0.0.1/")
            .unwrap_err();
        assert!(format!("{err:#}").contains("only http://"), "{err:#}");
    }
}
