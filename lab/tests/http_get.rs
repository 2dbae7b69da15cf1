//! `tabby-lab http-get` as tests and scripts run it: the binary against
//! listeners on the IPv6 loopback (no root needed).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};

/// Answers `n` connections on `[::1]` with `answer`, one request each.
fn serve_v6(n: usize, answer: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("[::1]:0").expect("an IPv6 loopback");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(n) {
            let mut s = conn.unwrap();
            let mut head = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            loop {
                line.clear();
                if head.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
            }
            s.write_all(answer.as_bytes()).unwrap();
        }
    });
    addr
}

fn http_get(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tabby-lab"))
        .arg("http-get")
        .args(args)
        .output()
        .unwrap()
}

const WHOAMI: &str = "HTTP/1.1 200 OK\r\nContent-Length: 31\r\nConnection: close\r\n\r\nHostname: v6\nRemoteAddr: [::1]\n";

#[test]
fn count_requests_to_an_ipv6_literal_print_every_body() {
    let addr = serve_v6(3, WHOAMI);
    let url = format!("http://[::1]:{}/", addr.port());
    let out = http_get(&["--count", "3", "--timeout-ms", "5000", &url]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("Hostname: v6\n").count(), 3, "{stdout}");
    assert!(!stdout.contains("error:"), "{stdout}");
}

#[test]
fn a_non_2xx_answer_prints_its_body_and_exits_22() {
    let addr = serve_v6(
        1,
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnone\n",
    );
    let out = http_get(&[&format!("http://[::1]:{}/healthz", addr.port())]);
    assert_eq!(out.status.code(), Some(22));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "none\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("answered 503"), "{stderr}");
}
