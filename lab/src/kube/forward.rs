//! `tabby-lab forward`: the host's way to the apiserver. Listens on
//! 127.0.0.1 in the host's network namespace and connects each client to
//! the apiserver from inside the control-plane namespace (a socket made
//! there stays there), like kind's port mapping. The host's routing table
//! is never touched, so labs with the same underlay addresses live side by
//! side.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

/// Serves forever: every connection to `listen` is relayed to `to` as
/// reached from the network namespace at `netns`.
pub fn serve(listen: SocketAddr, netns: &Path, to: SocketAddr) -> anyhow::Result<()> {
    let ns = tabby_dataplane::NetNs::open(netns)
        .with_context(|| format!("opening namespace {}", netns.display()))?;
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    eprintln!("forwarding {listen} to {to} in {}", netns.display());
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let upstream = ns
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .context("entering the namespace")?;
        match upstream {
            Ok(upstream) => relay(client, upstream),
            Err(e) => eprintln!("connecting to {to}: {e}"),
        }
    }
    Ok(())
}

/// Copies both ways on two threads; each direction's end shuts the other
/// side's write half, so TLS close and half-closed streams work.
fn relay(client: TcpStream, upstream: TcpStream) {
    let pairs = [
        (client.try_clone(), upstream.try_clone()),
        (upstream.try_clone(), client.try_clone()),
    ];
    for pair in pairs {
        let (Ok(from), Ok(to)) = pair else {
            return;
        };
        std::thread::spawn(move || copy(from, to));
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// A free TCP port on 127.0.0.1 right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_both_ways_and_a_close_reaches_the_other_side() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&[&b"echo:"[..], &got].concat()).unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        std::thread::spawn(move || {
            let (client, _) = front.accept().unwrap();
            relay(client, TcpStream::connect(server_addr).unwrap());
        });
        let mut c = TcpStream::connect(front_addr).unwrap();
        c.write_all(b"hi").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "echo:hi");
    }
}
