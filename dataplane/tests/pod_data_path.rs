//! The pod data path of DESIGN.md built with Netlink between two scratch
//! namespaces, one playing the host and one the pod (root only).

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{veth_name, HOST_MAC};
use ipnetwork::IpNetwork;
use tabby_dataplane::{sysctl, Family, NetNs, Netlink, Route, Scope};
use tabby_testkit::{current_test, eventually, require_root, Netns};

const POD_IP: &str = "10.65.0.5";
const GATEWAY: &str = "169.254.1.1";
const GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The IPv4 ones among `addrs` (the kernel adds an IPv6 link-local address).
fn ipv4(addrs: Vec<IpNetwork>) -> Vec<IpNetwork> {
    addrs.into_iter().filter(IpNetwork::is_ipv4).collect()
}

/// A host and a pod namespace joined by a veth pair, wired like a CNI ADD.
struct Pod {
    host: Netns,
    pod: Netns,
    host_ns: NetNs,
    pod_ns: NetNs,
    host_nl: Netlink,
    pod_nl: Netlink,
    veth: String,
    veth_index: u32,
    eth0_index: u32,
}

impl Pod {
    /// Creates the pair with MTU 1400; nothing else is configured. `None`
    /// when the test is skipped (not root, `TABBY_ALLOW_SKIP=1`).
    fn create() -> Option<Pod> {
        if !require_root(&current_test()) {
            return None;
        }
        let (host, pod) = (Netns::new("tdp"), Netns::new("tdp"));
        let (host_ns, pod_ns) = (host.open(), pod.open());
        let host_nl = host.netlink();
        let pod_nl = pod.netlink();
        let veth = veth_name();
        let veth_index = host_nl
            .create_veth(&veth, HOST_MAC, "eth0", &pod_ns, Some(1400))
            .unwrap();
        let eth0_index = pod_nl.link("eth0").unwrap().expect("eth0 in the pod").index;
        Some(Pod {
            host,
            pod,
            host_ns,
            pod_ns,
            host_nl,
            pod_nl,
            veth,
            veth_index,
            eth0_index,
        })
    }

    fn pod_routes(&self) -> [Route; 2] {
        [
            Route::new(net("169.254.1.1/32"))
                .dev(self.eth0_index)
                .with_scope(Scope::Link),
            Route::new(net("0.0.0.0/0"))
                .via(ip(GATEWAY))
                .dev(self.eth0_index),
        ]
    }

    fn host_route(&self) -> Route {
        Route::new(net(&format!("{POD_IP}/32")))
            .dev(self.veth_index)
            .with_scope(Scope::Link)
    }

    /// Addresses, routes and sysctls of steps 3 and 4 of a CNI ADD.
    fn wire(&self) {
        let pod = &self.pod_nl;
        pod.set_up(self.eth0_index).unwrap();
        pod.add_address(self.eth0_index, net(&format!("{POD_IP}/32")))
            .unwrap();
        for route in self.pod_routes() {
            pod.add_route(&route).unwrap();
        }

        self.host_nl.set_up(self.veth_index).unwrap();
        let veth = &self.veth;
        self.host_ns
            .run(|| {
                sysctl::set(&format!("net/ipv4/conf/{veth}/proxy_arp"), "1")?;
                sysctl::set(&format!("net/ipv4/neigh/{veth}/proxy_delay"), "0")?;
                sysctl::set(&format!("net/ipv4/conf/{veth}/forwarding"), "1")
            })
            .unwrap()
            .unwrap();
        self.host_nl.add_route(&self.host_route()).unwrap();
    }

    /// Links, addresses, routes, neighbours and sysctls of both sides, for
    /// failure messages.
    fn dump(&self) -> String {
        let sysctls = "grep . /proc/sys/net/ipv4/conf/*/proxy_arp \
            /proc/sys/net/ipv4/conf/*/forwarding /proc/sys/net/ipv4/neigh/*/proxy_delay";
        let commands: [&[&str]; 5] = [
            &["ip", "-d", "link"],
            &["ip", "addr"],
            &["ip", "route"],
            &["ip", "neigh"],
            &["sh", "-c", sysctls],
        ];
        let mut out = String::new();
        for ns in [&self.host, &self.pod] {
            for command in commands {
                let output = ns.exec(command[0], &command[1..]);
                out += &format!("--- {} {command:?}\n", ns.name());
                out += &String::from_utf8_lossy(&output.stdout);
            }
        }
        out
    }
}

#[test]
fn the_veth_peer_is_created_directly_in_the_pod_namespace() {
    let Some(p) = Pod::create() else { return };

    let host_end = p.host_nl.link(&p.veth).unwrap().unwrap();
    assert_eq!(host_end.index, p.veth_index);
    assert_eq!(host_end.mac, Some(HOST_MAC));
    assert_eq!(host_end.mtu, 1400);
    assert_eq!(host_end.kind.as_deref(), Some("veth"));
    assert!(!host_end.up);

    let eth0 = p.pod_nl.link("eth0").unwrap().unwrap();
    assert_eq!(eth0.mtu, 1400);
    assert_eq!(eth0.kind.as_deref(), Some("veth"));
    assert_ne!(eth0.mac, Some(HOST_MAC));

    // Each end lives in exactly one namespace.
    assert!(p.host_nl.link("eth0").unwrap().is_none());
    assert!(p.pod_nl.link(&p.veth).unwrap().is_none());
    let host_names: Vec<_> = p
        .host_nl
        .links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(host_names, ["lo".to_string(), p.veth.clone()]);
    assert_eq!(
        p.host_nl.link_by_index(p.veth_index).unwrap(),
        Some(host_end)
    );
}

#[test]
fn creating_a_veth_twice_is_exists() {
    let Some(p) = Pod::create() else { return };
    let err = p
        .host_nl
        .create_veth(&p.veth, HOST_MAC, "eth1", &p.pod_ns, None)
        .unwrap_err();
    assert!(err.is_exists(), "{err:?}");
    assert!(err.to_string().contains(&p.veth), "{err}");
    // The pod side name is taken too.
    let err = p
        .host_nl
        .create_veth(&veth_name(), HOST_MAC, "eth0", &p.pod_ns, None)
        .unwrap_err();
    assert!(err.is_exists(), "{err:?}");
}

#[test]
fn addresses_and_routes_read_back() {
    let Some(p) = Pod::create() else { return };
    p.wire();

    assert!(p.pod_nl.link("eth0").unwrap().unwrap().up);
    assert_eq!(
        ipv4(p.pod_nl.addresses(p.eth0_index).unwrap()),
        [net(&format!("{POD_IP}/32"))]
    );
    let pod_routes = p.pod_nl.routes(Family::V4).unwrap();
    for route in p.pod_routes() {
        assert!(
            pod_routes.contains(&route),
            "{route} missing from {pod_routes:?}"
        );
    }
    assert_eq!(p.host_nl.routes(Family::V4).unwrap(), [p.host_route()]);
    assert!(ipv4(p.host_nl.addresses(p.veth_index).unwrap()).is_empty());
}

#[test]
fn adding_an_existing_address_or_route_is_exists() {
    let Some(p) = Pod::create() else { return };
    p.wire();
    let err = p
        .pod_nl
        .add_address(p.eth0_index, net(&format!("{POD_IP}/32")))
        .unwrap_err();
    assert!(err.is_exists(), "{err:?}");
    let err = p.host_nl.add_route(&p.host_route()).unwrap_err();
    assert!(err.is_exists(), "{err:?}");
    assert!(err.to_string().contains("10.65.0.5 dev #"), "{err}");
    // Replacing is fine.
    p.host_nl.replace_route(&p.host_route()).unwrap();
    assert_eq!(p.host_nl.routes(Family::V4).unwrap(), [p.host_route()]);
}

#[test]
fn deletes_are_idempotent() {
    let Some(p) = Pod::create() else { return };
    p.wire();
    let route = p.host_route();
    assert!(p.host_nl.delete_route(&route).unwrap());
    assert!(!p.host_nl.delete_route(&route).unwrap());
    assert!(p.host_nl.routes(Family::V4).unwrap().is_empty());

    let addr = net(&format!("{POD_IP}/32"));
    assert!(p.pod_nl.delete_address(p.eth0_index, addr).unwrap());
    assert!(!p.pod_nl.delete_address(p.eth0_index, addr).unwrap());

    // Deleting the host end removes the pod end too.
    assert!(p.host_nl.delete_link(&p.veth).unwrap());
    assert!(!p.host_nl.delete_link(&p.veth).unwrap());
    assert!(p.pod_nl.link("eth0").unwrap().is_none());

    // Routes and addresses of a deleted link are gone too.
    assert!(!p.pod_nl.delete_route(&p.pod_routes()[1]).unwrap());
    assert!(!p.pod_nl.delete_address(p.eth0_index, addr).unwrap());
}

#[test]
fn ipv6_routes_via_the_link_local_gateway_read_back() {
    let Some(p) = Pod::create() else { return };
    p.pod_nl.set_up(p.eth0_index).unwrap();
    p.pod_nl
        .add_address(p.eth0_index, net("fd00:65::5/128"))
        .unwrap();
    let default = Route::new(net("::/0"))
        .via(ip(GATEWAY_V6))
        .dev(p.eth0_index);
    p.pod_nl.add_route(&default).unwrap();
    let routes = p.pod_nl.routes(Family::V6).unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r.dst == default.dst && r.gateway == default.gateway),
        "{default} missing from {routes:?}"
    );
    assert!(p
        .pod_nl
        .addresses(p.eth0_index)
        .unwrap()
        .contains(&net("fd00:65::5/128")));
    assert!(p.pod_nl.delete_route(&default).unwrap());
    assert!(!p.pod_nl.delete_route(&default).unwrap());
}

#[test]
fn sysctls_of_the_host_end_live_in_the_host_namespace() {
    let Some(p) = Pod::create() else { return };
    let key = format!("net/ipv4/conf/{}/proxy_arp", p.veth);
    assert_eq!(p.host_ns.run(|| sysctl::get(&key)).unwrap().unwrap(), "0");
    p.host_ns.run(|| sysctl::set(&key, "1")).unwrap().unwrap();
    assert_eq!(p.host_ns.run(|| sysctl::get(&key)).unwrap().unwrap(), "1");
    // The pod namespace has no such interface, and its eth0 is untouched.
    assert!(p
        .pod_ns
        .run(|| sysctl::get(&key))
        .unwrap()
        .unwrap_err()
        .is_not_found());
    let pod_key = "net/ipv4/conf/eth0/proxy_arp";
    assert_eq!(p.pod_ns.run(|| sysctl::get(pod_key)).unwrap().unwrap(), "0");
}

#[test]
fn the_pod_reaches_the_host_through_proxy_arp() {
    let Some(p) = Pod::create() else { return };
    p.wire();
    // The host needs an address to answer from and a route for 169.254.1.1
    // out of another device, as a real node has its uplink default route.
    // (A veth pair stands in for the uplink: the dummy driver may be missing.)
    p.host.ip(&[
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "uplink-peer",
    ]);
    p.host.ip(&["link", "set", "uplink", "up"]);
    p.host.ip(&["link", "set", "uplink-peer", "up"]);
    p.host.ip(&["addr", "add", "10.99.0.1/32", "dev", "uplink"]);
    p.host.ip(&["route", "add", "default", "dev", "uplink"]);

    let ping = |ns: &Netns, dst: &str| {
        eventually(Duration::from_secs(5), || {
            ns.exec("ping", &["-c1", "-W1", dst]).status.success()
        })
    };
    assert!(
        ping(&p.pod, "10.99.0.1"),
        "pod cannot ping the host\n{}",
        p.dump()
    );
    assert!(
        ping(&p.host, POD_IP),
        "host cannot ping the pod\n{}",
        p.dump()
    );

    // The pod resolved its gateway to the host end's MAC.
    let neigh = p.pod.exec("ip", &["neigh", "show", GATEWAY, "dev", "eth0"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(neigh.contains("ee:ee:ee:ee:ee:ee"), "{neigh}");
}
