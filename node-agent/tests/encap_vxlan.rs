//! Two `tabby-node` agents in two node namespaces joined by a veth, a
//! VXLAN Always pool in a shared file datastore, and a pod-like namespace
//! behind each node: cross-node pod traffic goes through `vxlan.tabby`
//! (its counters move), a restart keeps the VTEP MAC and tunnel address,
//! and switching the pool VXLAN → Never → VXLAN moves the routes (root only).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use tabby_ipam::store::{self, node_key};
use tabby_ipam::{AssignArgs, EncapMode, FileDatastore, IpPool, Ipam, Node};
use tabby_testkit::netns::{veth_pair, Netns};
use tabby_testkit::{eventually, require_root};

/// An agent process, killed on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Node1 {
    ns: Netns,
    pod: Netns,
    name: String,
    addr: String,
    pod_ip: String,
}

fn pool(mode: EncapMode) -> IpPool {
    IpPool {
        name: "p".into(),
        cidr: "10.244.0.0/16".parse().unwrap(),
        block_size: 26,
        ipip_mode: EncapMode::Never,
        vxlan_mode: mode,
        nat_outgoing: false,
        disabled: false,
        node_selector: "all()".into(),
    }
}

/// A pod-like namespace behind `node`: an address from IPAM, a veth with
/// proxy ARP on the host side and the 169.254.1.1 gateway, as the plugin does.
fn pod(ipam: &Ipam<FileDatastore>, node: &Netns, name: &str) -> (Netns, String) {
    let pod = Netns::new("tpod");
    let ip = ipam
        .assign(&AssignArgs {
            handle: format!("net.{name}"),
            node: name.into(),
            attrs: Default::default(),
            num_v4: 1,
            num_v6: 0,
            pools: vec![],
        })
        .unwrap()[0]
        .ip()
        .to_string();
    veth_pair(
        node,
        "tabbyp",
        "169.254.9.9/32",
        &pod,
        "eth0",
        &format!("{ip}/32"),
    );
    node.ip(&["addr", "flush", "dev", "tabbyp"]);
    node.exec_ok("sysctl", &["-qw", "net.ipv4.conf.tabbyp.proxy_arp=1"]);
    node.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    node.ip(&[
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        "tabbyp",
        "scope",
        "link",
    ]);
    pod.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    // Proxy ARP answers only for targets the node routes elsewhere; these
    // nodes have no default route, so the gateway's MAC is set statically.
    let mac = node.netlink().link("tabbyp").unwrap().unwrap().mac.unwrap();
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    let neigh = ["neigh", "add", "169.254.1.1", "lladdr", &mac, "dev", "eth0"];
    pod.ip(&[&neigh[..], &["nud", "permanent"]].concat());
    (pod, ip)
}

fn start(n: &Node1, dir: &Path, store: &Path) -> Agent {
    let conf = dir.join(format!("{}.toml", n.name));
    std::fs::write(
        &conf,
        format!(
            "node_name = {:?}\nbgp_address = {:?}\ndatastore = {:?}\nuplink = \"up0\"\n\
             hold_time = 9\nconnect_retry = 1\npoll_interval_ms = 200\nstatus_socket = {:?}\n\
             mtu_file = {:?}\n[proxy]\nenabled = false\n",
            n.name,
            n.addr,
            store.display().to_string(),
            dir.join(format!("{}.sock", n.name)).display().to_string(),
            dir.join(format!("{}.mtu", n.name)).display().to_string(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{}.log", n.name))).unwrap();
    let child =
        n.ns.command(env!("CARGO_BIN_EXE_tabby-node"))
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
    Agent(child)
}

fn wait(what: &str, dir: &Path, check: impl FnMut() -> bool) {
    if !eventually(Duration::from_secs(20), check) {
        let logs: String = ["n1", "n2"]
            .iter()
            .map(|n| std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default())
            .collect();
        panic!("timed out waiting for {what}; logs:\n{logs}");
    }
}

fn tx_packets(ns: &Netns) -> u64 {
    let out = ns.exec("ip", &["-j", "-s", "link", "show", "dev", "vxlan.tabby"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0)
}

fn route_to(ns: &Netns, prefix: &str) -> String {
    ns.ip(&["route", "show", prefix])
}

fn node_doc(store: &Path, name: &str) -> Node {
    let ds = FileDatastore::open(store).unwrap();
    store::get::<Node>(&ds, &node_key(name))
        .unwrap()
        .unwrap()
        .value
}

fn set_mode(store: &Path, mode: EncapMode) {
    let ds = FileDatastore::open(store).unwrap();
    let doc = store::get::<IpPool>(&ds, &store::pool_key("p"))
        .unwrap()
        .unwrap();
    store::update(&ds, &store::pool_key("p"), &pool(mode), &doc.revision).unwrap();
}

fn block_of(ip: &str) -> String {
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    let (head, _) = ip.rsplit_once('.').unwrap();
    format!("{head}.{}/26", last & 0xc0)
}

#[test]
fn cross_node_pod_traffic_goes_through_vxlan_and_follows_the_pool_mode() {
    if !require_root("cross_node_pod_traffic_goes_through_vxlan_and_follows_the_pool_mode") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store: PathBuf = dir.path().join("datastore");
    let ipam = Ipam::new(FileDatastore::open(&store).unwrap());
    ipam.create_pool(&pool(EncapMode::Always)).unwrap();
    let (ns1, ns2) = (Netns::new("tvx1"), Netns::new("tvx2"));
    veth_pair(&ns1, "up0", "10.98.0.1/24", &ns2, "up0", "10.98.0.2/24");
    let (pod1, ip1) = pod(&ipam, &ns1, "n1");
    let (pod2, ip2) = pod(&ipam, &ns2, "n2");
    let n1 = Node1 {
        ns: ns1,
        pod: pod1,
        name: "n1".into(),
        addr: "10.98.0.1".into(),
        pod_ip: ip1,
    };
    let n2 = Node1 {
        ns: ns2,
        pod: pod2,
        name: "n2".into(),
        addr: "10.98.0.2".into(),
        pod_ip: ip2,
    };
    let mut a1 = start(&n1, dir.path(), &store);
    let _a2 = start(&n2, dir.path(), &store);
    let block2 = block_of(&n2.pod_ip);

    wait("a VXLAN route to node 2's block", dir.path(), || {
        route_to(&n1.ns, &block2).contains("dev vxlan.tabby")
    });
    assert!(route_to(&n1.ns, &block2).contains("onlink"));
    if !eventually(Duration::from_secs(10), || n1.pod.ping(&n2.pod_ip)) {
        let diag: String = [&n1.ns, &n2.ns]
            .iter()
            .map(|ns| {
                let fdb = ns.exec("bridge", &["fdb", "show", "dev", "vxlan.tabby"]);
                let r = ns.ip(&["route"]);
                let n = ns.ip(&["neigh"]);
                let a = ns.ip(&["-d", "addr"]);
                format!("{r}\n{n}\n{}\n{a}\n", String::from_utf8_lossy(&fdb.stdout))
            })
            .collect();
        panic!("no ping: {diag}\npod1 {}", n1.pod.ip(&["route"]));
    }
    let before = tx_packets(&n1.ns);
    assert!(n1.pod.ping(&n2.pod_ip) && n2.pod.ping(&n1.pod_ip));
    assert!(
        tx_packets(&n1.ns) > before,
        "the ping went through vxlan.tabby"
    );
    let mtu = std::fs::read_to_string(dir.path().join("n1.mtu")).unwrap();
    assert_eq!(mtu.trim(), "1450", "uplink 1500 minus VXLAN's 50");

    // A restart keeps the VTEP MAC and the tunnel address.
    let node = node_doc(&store, "n1");
    let (mac, tunnel) = (
        node.vxlan_tunnel_mac_addr.clone(),
        node.ipv4_vxlan_tunnel_addr,
    );
    assert!(mac.is_some() && tunnel.is_some(), "{node:?}");
    drop(a1);
    a1 = start(&n1, dir.path(), &store);
    wait("the restarted agent's route", dir.path(), || {
        dir.path().join("n1.sock").exists() && route_to(&n1.ns, &block2).contains("vxlan.tabby")
    });
    let again = node_doc(&store, "n1");
    assert_eq!(
        (again.vxlan_tunnel_mac_addr, again.ipv4_vxlan_tunnel_addr),
        (mac.clone(), tunnel)
    );
    let link = n1.ns.ip(&["link", "show", "vxlan.tabby"]);
    assert!(link.contains(mac.as_deref().unwrap()), "{link}");

    // VXLAN -> Never: native routes (BGP), no device; -> VXLAN again.
    set_mode(&store, EncapMode::Never);
    wait("the native route", dir.path(), || {
        let r = route_to(&n1.ns, &block2);
        r.contains("via 10.98.0.2 dev up0") && !n1.ns.links().iter().any(|l| l == "vxlan.tabby")
    });
    let block1 = block_of(&n1.pod_ip);
    wait("node 2's native route back", dir.path(), || {
        route_to(&n2.ns, &block1).contains("via 10.98.0.1 dev up0")
    });
    wait("pod 1 reaching pod 2 natively", dir.path(), || {
        n1.pod.ping(&n2.pod_ip)
    });
    assert_eq!(
        node_doc(&store, "n1").ipv4_vxlan_tunnel_addr,
        None,
        "released"
    );
    set_mode(&store, EncapMode::Always);
    wait("the VXLAN route again", dir.path(), || {
        route_to(&n1.ns, &block2).contains("dev vxlan.tabby")
    });
    wait(
        "pod 1 reaching pod 2 through VXLAN again",
        dir.path(),
        || n1.pod.ping(&n2.pod_ip),
    );
    drop(a1);
}
