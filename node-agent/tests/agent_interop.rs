//! The whole agent (`tabby-node` binary) against BIRD 2 and GoBGP: its
//! block reaches the peer's table and kernel, the peer's prefixes reach
//! Tabby's kernel with Tabby's protocol, withdraws and a silent peer remove
//! them, and `node status` reports the session (root only).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tabby_ipam::resources::{
    bgp_peers, create_bgp_filter, create_bgp_peer, delete_bgp_peer, BgpFilter, BgpFilterRule,
    BgpPeer, FilterAction, MatchOperator,
};
use tabby_ipam::{AssignArgs, FileDatastore, IpPool, Ipam};
use tabby_testkit::bgp::*;

/// The agent process, killed on drop.
struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A datastore where node `tnode` owns TABBY_PREFIX and the peer is a global BGPPeer.
fn datastore(lab: &Lab, peer_asn: u32) -> std::path::PathBuf {
    datastore_with(lab, peer_asn, |_| {})
}

/// [`datastore`] with the BGPPeer changed by `change`.
fn datastore_with(
    lab: &Lab,
    peer_asn: u32,
    change: impl FnOnce(&mut BgpPeer),
) -> std::path::PathBuf {
    let dir = lab.dir.join("datastore");
    let ipam = Ipam::new(FileDatastore::open(&dir).unwrap());
    ipam.create_pool(&IpPool::new("p", "10.244.1.0/24".parse().unwrap()))
        .unwrap();
    let got = ipam
        .assign(&AssignArgs {
            handle: "net.c1".into(),
            node: "tnode".into(),
            attrs: Default::default(),
            num_v4: 1,
            num_v6: 0,
            pools: vec![],
        })
        .unwrap();
    assert!(got[0].ip().to_string().starts_with("10.244.1."), "{got:?}");
    let peer = BgpPeer {
        name: "router".into(),
        peer_ip: PEER_ADDR.into(),
        as_number: peer_asn,
        node: None,
        password: None,
        filters: vec![],
        max_prefix: None,
    };
    let mut peer = peer;
    change(&mut peer);
    create_bgp_peer(ipam.datastore(), &peer).unwrap();
    dir
}

fn start_agent(lab: &Lab, store: &std::path::Path) -> AgentProc {
    let conf = lab.dir.join("node.toml");
    std::fs::write(
        &conf,
        format!(
            "node_name = \"tnode\"\nbgp_address = \"{TABBY_ADDR}\"\ndatastore = {:?}\nuplink = \"veth-t\"\n\
             hold_time = 9\nconnect_retry = 1\npoll_interval_ms = 200\nstatus_socket = {:?}\nmtu_file = {:?}\n",
            store.display().to_string(),
            lab.dir.join("node.sock").display().to_string(),
            lab.dir.join("node.mtu").display().to_string()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(lab.dir.join("agent.log")).unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.tabby_ns,
            env!("CARGO_BIN_EXE_tabby-node"),
            "--config",
        ])
        .arg(&conf)
        .env("TABBY_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    AgentProc(child)
}

fn tabby_kernel_route(lab: &Lab) -> String {
    run(&["ip", "-n", &lab.tabby_ns, "route", "show", PEER_PREFIX])
}

fn node_status(lab: &Lab) -> String {
    let Ok(mut s) = UnixStream::connect(lab.dir.join("node.sock")) else {
        return String::new();
    };
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn wait(what: &str, deadline: Duration, lab: &Lab, check: impl FnMut() -> bool) {
    if !tabby_testkit::eventually(deadline, check) {
        let log = std::fs::read_to_string(lab.dir.join("agent.log")).unwrap_or_default();
        panic!("timed out after {deadline:?} waiting for {what}; agent log:\n{log}");
    }
}

fn agent_with(daemon: fn(&mut Lab, u32, Option<&str>) -> Peer, peer_asn: u32) {
    let Some(mut lab) = Lab::new() else { return };
    let store = datastore(&lab, peer_asn);
    let peer = daemon(&mut lab, peer_asn, None);
    let _agent = start_agent(&lab, &store);

    wait(
        "the session in node status",
        Duration::from_secs(30),
        &lab,
        || node_status(&lab).contains("Established"),
    );
    let status = node_status(&lab);
    assert!(
        status.contains("\"peerType\":\"global\"") && status.contains(&PEER_ADDR.to_string()),
        "{status}"
    );
    wait(
        "Tabby's block at the peer",
        Duration::from_secs(30),
        &lab,
        || peer.has_tabby_route(&lab),
    );
    peer.announce(&lab);
    wait(
        "the peer's prefix in Tabby's kernel",
        Duration::from_secs(30),
        &lab,
        || {
            let r = tabby_kernel_route(&lab);
            r.contains(&format!("via {PEER_ADDR}")) && r.contains("proto 201")
        },
    );
    let blackhole = run(&["ip", "-n", &lab.tabby_ns, "route", "show", TABBY_PREFIX]);
    assert!(
        blackhole.contains("blackhole") && blackhole.contains("proto 201"),
        "{blackhole}"
    );

    peer.withdraw(&lab);
    wait(
        "the withdraw in Tabby's kernel",
        Duration::from_secs(30),
        &lab,
        || tabby_kernel_route(&lab).is_empty(),
    );
    peer.announce_again(&lab);
    wait("the prefix again", Duration::from_secs(30), &lab, || {
        !tabby_kernel_route(&lab).is_empty()
    });

    // A peer that goes silent loses its routes when the hold time (9 s) runs out.
    let frozen = Instant::now();
    lab.signal_daemon("STOP");
    wait(
        "the routes of a silent peer to go",
        Duration::from_secs(20),
        &lab,
        || tabby_kernel_route(&lab).is_empty(),
    );
    let after = frozen.elapsed();
    assert!(
        after >= Duration::from_secs(5),
        "routes dropped after {after:?}, before the hold time"
    );
    lab.signal_daemon("CONT");
}

#[test]
fn the_agent_exchanges_routes_with_bird_over_ibgp_and_installs_them() {
    agent_with(Lab::bird, TABBY_ASN);
}

#[test]
fn the_agent_exchanges_routes_with_bird_over_ebgp_and_installs_them() {
    agent_with(Lab::bird, 65001);
}

#[test]
fn the_agent_exchanges_routes_with_gobgp_and_installs_them() {
    agent_with(Lab::gobgp, TABBY_ASN);
}

/// Runs `gobgp` against the peer's GoBGP.
fn gobgp(lab: &Lab, args: &[&str]) -> String {
    let mut cmd = vec!["gobgp", "-u", "127.0.0.1", "-p", "50051"];
    cmd.extend_from_slice(args);
    lab.peer_cmd(&cmd)
}

fn tabby_route(lab: &Lab, prefix: &str) -> String {
    run(&["ip", "-n", &lab.tabby_ns, "route", "show", prefix])
}

fn established(lab: &Lab) {
    wait(
        "the session in node status",
        Duration::from_secs(30),
        lab,
        || node_status(lab).contains("Established"),
    );
}

/// An external peer announcing the default route, another node's block (in
/// the pool), the underlay and a prefix of its own.
const DEFAULT: &str = "0.0.0.0/0";
const POOL_BLOCK: &str = "10.244.1.64/26";
const UNDERLAY: &str = "10.99.0.0/25";
const EXTERNAL: &str = "192.0.2.0/24";

#[test]
fn an_ebgp_peer_installs_neither_a_default_route_nor_pool_blocks_nor_the_underlay_until_a_filter_allows(
) {
    let Some(mut lab) = Lab::new() else { return };
    let store = datastore(&lab, 65001);
    let _peer = Lab::gobgp(&mut lab, 65001, None);
    let _agent = start_agent(&lab, &store);
    established(&lab);
    for prefix in [DEFAULT, POOL_BLOCK, UNDERLAY, EXTERNAL] {
        gobgp(&lab, &["global", "rib", "add", prefix, "-a", "ipv4"]);
    }
    wait(
        "the external prefix in Tabby's kernel",
        Duration::from_secs(30),
        &lab,
        || tabby_route(&lab, EXTERNAL).contains(&format!("via {PEER_ADDR}")),
    );
    let learned = gobgp(&lab, &["global", "rib", "-a", "ipv4"]);
    assert!(
        learned.contains(UNDERLAY) && learned.contains(DEFAULT),
        "{learned}"
    );
    // The external prefix went out last: the ones before it were decided
    // in the same route pass or an earlier one.
    for prefix in [DEFAULT, POOL_BLOCK, UNDERLAY] {
        let route = tabby_route(&lab, prefix);
        assert!(
            !route.contains("proto 201"),
            "{prefix} was installed: {route}"
        );
    }

    // An operator allows the default route from this peer.
    let ds = FileDatastore::open(&store).unwrap();
    let allow = BgpFilter {
        name: "allow-default".into(),
        import_v4: vec![BgpFilterRule {
            action: FilterAction::Accept,
            cidr: Some(DEFAULT.parse().unwrap()),
            match_operator: Some(MatchOperator::Equal),
            prefix_length: None,
        }],
        export_v4: vec![],
    };
    create_bgp_filter(&ds, &allow).unwrap();
    let mut peer = bgp_peers(&ds).unwrap().remove(0);
    peer.filters = vec!["allow-default".into()];
    delete_bgp_peer(&ds, &peer.name).unwrap();
    create_bgp_peer(&ds, &peer).unwrap();
    wait(
        "the default route in Tabby's kernel",
        Duration::from_secs(30),
        &lab,
        || {
            let r = tabby_route(&lab, "default");
            r.contains(&format!("via {PEER_ADDR}")) && r.contains("proto 201")
        },
    );
    for prefix in [POOL_BLOCK, UNDERLAY] {
        let route = tabby_route(&lab, prefix);
        assert!(
            !route.contains("proto 201"),
            "{prefix} was installed: {route}"
        );
    }
}

#[test]
fn an_ebgp_peer_announcing_more_than_max_prefix_gets_cease_6_1() {
    let Some(mut lab) = Lab::new() else { return };
    let store = datastore_with(&lab, 65001, |p| p.max_prefix = Some(2));
    let _peer = Lab::gobgp(&mut lab, 65001, None);
    let _agent = start_agent(&lab, &store);
    established(&lab);
    for prefix in ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"] {
        gobgp(&lab, &["global", "rib", "add", prefix, "-a", "ipv4"]);
    }
    // GoBGP logs the NOTIFICATION it received ("Peer Down", with the reason).
    wait(
        "GoBGP to receive Cease 6/1",
        Duration::from_secs(30),
        &lab,
        || {
            std::fs::read_to_string(lab.dir.join("daemon.log"))
            .unwrap_or_default()
            .contains("notification-received code 6(cease) subcode 1(maximum number of prefixes reached)")
        },
    );
    // The session comes back and is reset again: node status says why in between.
    wait(
        "node status to say why",
        Duration::from_secs(30),
        &lab,
        || node_status(&lab).contains("sent 6/1 (maximum number of prefixes reached)"),
    );
    assert!(!tabby_route(&lab, "203.0.113.0/24").contains("proto 201"));
}
