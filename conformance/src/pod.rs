//! Assertions on a pod that `tabby` wired (or unwired) and the CNI_ARGS a
//! kubelet passes, shared by the conformance tests.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use tabby_testkit::Netns;

use crate::files_mentioning;

/// Asserts the Tabby data path for a pod with address `ip`; returns the name
/// of the host-side veth.
pub fn assert_tabby_pod(host: &Netns, pod: &Netns, ip: Ipv4Addr) -> String {
    let addrs = pod.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains(&format!("inet {ip}/32 ")),
        "pod eth0 lacks {ip}/32: {addrs}"
    );
    let routes = pod.ip(&["-4", "route", "show"]);
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("default via 169.254.1.1 dev eth0")),
        "no default route via 169.254.1.1 in the pod: {routes}"
    );
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("169.254.1.1 dev eth0") && l.contains("scope link")),
        "no scope-link route to 169.254.1.1 in the pod: {routes}"
    );

    let host_routes = host.ip(&["-4", "route", "show"]);
    let route = host_routes
        .lines()
        .find(|l| l.starts_with(&format!("{ip} dev tabby")))
        .unwrap_or_else(|| panic!("no host route {ip}/32 dev tabby*: {host_routes}"));
    assert!(
        route.contains("scope link"),
        "host route is not scope link: {route}"
    );
    let veth = route
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string();
    assert!(
        veth.len() == 15 && veth[5..].chars().all(|c| c.is_ascii_hexdigit()),
        "host veth {veth} is not tabby + 10 hex chars"
    );
    let link = host.ip(&["-o", "link", "show", "dev", &veth]);
    assert!(
        link.contains("link/ether ee:ee:ee:ee:ee:ee"),
        "host veth MAC is not ee:ee:ee:ee:ee:ee: {link}"
    );
    veth
}

/// Asserts nothing of the attachment is left: no veth in either namespace,
/// no host route to `ip`, and no file of `store` mentions container `id`.
pub fn assert_gone(host: &Netns, pod: &Netns, ip: Ipv4Addr, store: &Path, id: &str) {
    let host_links = host.links();
    assert!(
        host_links.iter().all(|l| l == "lo"),
        "host namespace still has links: {host_links:?}"
    );
    let pod_links = pod.links();
    assert!(
        !pod_links.iter().any(|l| l == "eth0"),
        "pod still has eth0: {pod_links:?}"
    );
    let host_routes = host.ip(&["-4", "route", "show"]);
    assert!(
        !host_routes.contains(&ip.to_string()),
        "host still routes {ip}: {host_routes}"
    );
    let left = files_mentioning(store, id);
    assert!(
        left.is_empty(),
        "allocation for {id} still recorded in {left:?}"
    );
}

/// A "host" namespace for a container runtime, set up like a node: the
/// address `10.<octet>.255.1`/32 on lo (the returned address, for the
/// containers to reach) and an uplink with a default route.
pub fn runtime_host(prefix: &str, octet: u8) -> (Netns, Ipv4Addr) {
    let host = Netns::new(prefix);
    let host_ip = Ipv4Addr::new(10, octet, 255, 1);
    host.ip(&["addr", "add", &format!("{host_ip}/32"), "dev", "lo"]);
    host.add_uplink();
    (host, host_ip)
}

/// Asserts that containers `a` and `b` (name, address) on a Tabby network
/// have distinct addresses and reach each other, that `a` reaches the host
/// at `host_ip` and that the host reaches `a`. `pings(container, to)` runs
/// one ping inside a container through its runtime.
pub fn assert_containers_reach_each_other_and_the_host(
    host: &Netns,
    host_ip: Ipv4Addr,
    a: (&str, Ipv4Addr),
    b: (&str, Ipv4Addr),
    pings: impl Fn(&str, Ipv4Addr) -> bool,
) {
    assert_ne!(a.1, b.1, "containers {} and {} share an address", a.0, b.0);
    for ((from, _), (to, ip)) in [(a, b), (b, a), (a, ("the host", host_ip))] {
        assert!(pings(from, ip), "container {from} cannot ping {to} at {ip}");
    }
    assert!(
        host.ping(&a.1.to_string()),
        "the host cannot ping container {} at {}",
        a.0,
        a.1
    );
}

/// Asserts that a runtime released container `id`'s attachment: no file of
/// `store` mentions `id` and the host has no route to its address `ip` any
/// more; `after` names what released it, for the message.
pub fn assert_released(host: &Netns, store: &Path, id: &str, ip: Ipv4Addr, after: &str) {
    let left = files_mentioning(store, id);
    assert!(
        left.is_empty(),
        "after {after}, {id}'s allocation is still in {left:?}"
    );
    let routes = host.ip(&["-4", "route", "show"]);
    assert!(
        !routes.lines().any(|l| l.starts_with(&format!("{ip} "))),
        "after {after}, the host still routes {ip} ({id}): {routes}"
    );
}

/// The pod identity passed as CNI_ARGS, as kubelet does.
pub fn k8s_args(pod: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=conformance;K8S_POD_NAME={pod}")
}

/// Listens on `port` in `server`, connects from `client` to `to` (which may
/// be a DNAT'd host port) and checks that a line is echoed back; the error
/// says which step failed. Connect and read give up after 5 s.
pub fn tcp_echo(server: &Netns, port: u16, client: &Netns, to: SocketAddr) -> Result<(), String> {
    let listener = server
        .open()
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        .map_err(|e| format!("enter {}: {e}", server.name()))?
        .map_err(|e| format!("listen on :{port} in {}: {e}", server.name()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("set the listener non-blocking: {e}"))?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)
    });
    let result = client
        .open()
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .map_err(|e| format!("enter {}: {e}", client.name()))?
        .map_err(|e| format!("connect from {} to {to}: {e}", client.name()))
        .and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .and_then(|()| c.write_all(b"hello"))
                .and_then(|()| {
                    let mut back = [0u8; 5];
                    c.read_exact(&mut back).map(|()| back)
                })
                .map_err(|e| format!("echo through {to}: {e}"))
                .and_then(|back| match &back {
                    b"hello" => Ok(()),
                    other => Err(format!("{to} echoed {other:?}")),
                })
        });
    let _ = echo.join();
    result
}
