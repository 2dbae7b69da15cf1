//! The agent's IPIP dataplane on a kernel that has `ipip`: two qemu guests
//! (testkit::guest, Debian's stock kernel under software emulation) joined
//! by one wire, each running the static `tabby-node` and one pod made by
//! the real `tabby` plugin. Pod A pings pod B and fetches its echo server;
//! the route to the peer's block, tunl0's address and MTU, and tunl0's
//! packet counters show the traffic went through the tunnel.
//!
//! The guests share no filesystem: both start from the same seeded file
//! datastore (one pool, both nodes registered, each node's block claimed
//! already), so each allocates from its own block and learns the other's
//! over BGP (full mesh, the default). Everything in the guests waits with
//! deadlines (`wait_for`); the guest side is `ipip_guests/guest.sh`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use tabby_ipam::types::EncapMode;
use tabby_ipam::{store, AssignArgs, FileDatastore, IpPool, Ipam, Node};
use tabby_testkit::bins::musl_bin;
use tabby_testkit::guest::{self, Guest, GuestRun, GuestSpec, Initramfs, Kernel};

/// The guest side.
const SCRIPT: &str = include_str!("ipip_guests/guest.sh");
/// The pool both nodes allocate from.
const POOL: &str = "10.244.0.0/24";
/// The nodes: name and underlay address.
const NODES: [(&str, &str); 2] = [("a", "10.98.0.1"), ("b", "10.98.0.2")];
/// Pings each pod sends once the path works.
const PINGS: u64 = 10;
/// The modules the guests load: the NIC, the pods' veths, the tunnel.
const MODULES: [&str; 4] = ["virtio_pci", "virtio_net", "veth", "ipip"];
/// How long both guests may take, boot to power-off.
const DEADLINE: Duration = Duration::from_secs(240);

/// One pool in `mode`, both nodes registered, and a block claimed for each
/// (an assignment released again: empty affine blocks stay affine), so
/// that each guest allocates from its own block only.
fn seed(dir: &Path, mode: EncapMode) {
    let ds = FileDatastore::open(dir).expect("open the seed datastore");
    let ipam = Ipam::new(ds);
    ipam.create_pool(&IpPool {
        name: "guests".into(),
        cidr: POOL.parse().unwrap(),
        block_size: 26,
        ipip_mode: mode,
        vxlan_mode: EncapMode::Never,
        nat_outgoing: false,
        disabled: false,
        node_selector: "all()".into(),
    })
    .expect("create the pool");
    for (name, addr) in NODES {
        let node: Node = serde_json::from_value(serde_json::json!({
            "name": name,
            "address": addr,
        }))
        .expect("a node document");
        store::create(ipam.datastore(), &store::node_key(name), &node).expect("register the node");
        let handle = format!("seed.{name}");
        ipam.assign(&AssignArgs {
            handle: handle.clone(),
            node: name.into(),
            attrs: Default::default(),
            num_v4: 1,
            num_v6: 0,
            pools: vec![],
        })
        .expect("claim a block for the node");
        ipam.release_by_handle(&handle).expect("release the seed");
    }
}

/// The files both guests share: busybox, iproute2, the modules, the static
/// binaries, the plugin's config, the seeded datastore and the script.
fn shared_initramfs(kernel: &Kernel, datastore: &Path) -> Initramfs {
    let mut fs = Initramfs::base(kernel, &MODULES);
    fs.host_program("ip");
    for bin in ["tabby-node", "tabby-echo"] {
        fs.copy(&format!("usr/local/bin/{bin}"), &musl_bin(bin), 0o755);
    }
    for bin in ["tabby", "tabby-ipam"] {
        fs.copy(&format!("opt/cni/bin/{bin}"), &musl_bin(bin), 0o755);
    }
    fs.tree("var/lib/tabby/datastore", datastore);
    fs.script(SCRIPT);
    fs
}

/// The plugin's config on node `name` (MTU left to the plugin).
fn net_conf(name: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "type": "tabby",
        "nodename": name,
        "log_file": "/var/log/tabby-cni.log",
        "ipam": {
            "type": "tabby-ipam",
            "datastore": { "type": "file", "path": "/var/lib/tabby/datastore" },
        },
    })
    .to_string()
}

/// Boots both guests with the pool in `mode` (pod traffic to the peer must
/// leave by `dev`) and returns what each reported.
fn run_guests(kernel: &Kernel, mode: EncapMode, dev: &str) -> [GuestRun; 2] {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("datastore");
    seed(&store_dir, mode);
    let shared = dir.path().join("shared.cpio");
    shared_initramfs(kernel, &store_dir).pack(&shared);
    let nics = guest::link();
    let started = Instant::now();
    let guests: Vec<Guest> = NODES
        .iter()
        .zip(nics)
        .enumerate()
        .map(|(i, ((name, addr), nic))| {
            let (_, peer) = NODES[1 - i];
            let env = format!("NODE={name}\nADDR={addr}\nPEER={peer}\nDEV={dev}\nPINGS={PINGS}\n");
            let mut own = Initramfs::empty();
            own.bytes("etc/tabby-guest/env", env.as_bytes(), 0o644)
                .bytes("etc/tabby-guest/hostname", name.as_bytes(), 0o644)
                .bytes(
                    "etc/cni/net.d/10-tabby.conf",
                    net_conf(name).as_bytes(),
                    0o644,
                );
            let own_path = dir.path().join(format!("{name}.cpio"));
            own.pack(&own_path);
            Guest::boot(
                kernel,
                &GuestSpec {
                    name: (*name).into(),
                    initrd: vec![shared.clone(), own_path],
                    memory_mb: 384,
                    nics: vec![nic],
                },
            )
        })
        .collect();
    let deadline = started + DEADLINE;
    let runs: Vec<GuestRun> = guests.into_iter().map(|g| g.wait(deadline)).collect();
    for run in &runs {
        eprintln!(
            "guest {}: script started at {:?} s uptime, agent ready at {} s, pod reachable at {} s, done at {} s; {:.1} s wall",
            run.name,
            run.booted_at,
            run.get("agent_ready_at"),
            run.get("reachable_at"),
            run.get("done_at"),
            run.wall.as_secs_f64()
        );
    }
    eprintln!("both guests: {:.1} s", started.elapsed().as_secs_f64());
    runs.try_into().expect("two runs")
}

/// What both modes check: the pods reached each other, without NAT.
fn assert_pods_reached_each_other(runs: &[GuestRun; 2]) {
    let pool: Ipv4Network = POOL.parse().unwrap();
    for (i, run) in runs.iter().enumerate() {
        run.assert_ok();
        let peer = &runs[1 - i];
        let pod: Ipv4Addr = run.get("pod_ip").parse().unwrap();
        assert!(pool.contains(pod), "{}: pod {pod} outside {pool}", run.name);
        assert_eq!(run.get("peer_pod"), peer.get("pod_ip"));
        assert!(
            run.get("ping").contains(&format!(
                "{PINGS} packets transmitted, {PINGS} packets received"
            )),
            "{}: {}",
            run.name,
            run.get("ping")
        );
        assert_eq!(run.get("echo_hostname"), format!("pod-{}", peer.name));
        let remote = run.get("echo_remote");
        assert!(
            remote.starts_with(&format!("{pod}:")),
            "{}: the peer's pod saw {remote}, not {pod}",
            run.name
        );
    }
}

/// How much counter `name` (`tunl0_tx_packets`) grew during the pings.
fn grew(run: &GuestRun, name: &str) -> u64 {
    run.number(&format!("{name}_after"))
        .saturating_sub(run.number(&format!("{name}_before")))
}

#[test]
fn pods_on_two_guests_reach_each_other_natively_over_bgp_not_through_tunl0() {
    let test = "pods_on_two_guests_reach_each_other_natively_over_bgp_not_through_tunl0";
    let Some(kernel) = guest::require_guests(test) else {
        return;
    };
    let runs = run_guests(&kernel, EncapMode::Never, "eth0");
    assert_pods_reached_each_other(&runs);
    for (i, run) in runs.iter().enumerate() {
        let peer = NODES[1 - i].1;
        let route = run.get("route_get");
        assert!(
            route.contains(&format!("via {peer} dev eth0")),
            "{}: {route}",
            run.name
        );
        for c in ["tx_packets", "rx_packets"] {
            assert!(
                grew(run, &format!("eth0_{c}")) >= PINGS,
                "{}: eth0 {c}",
                run.name
            );
            assert_eq!(
                grew(run, &format!("tunl0_{c}")),
                0,
                "{}: tunl0 {c}",
                run.name
            );
        }
    }
}

#[test]
fn pods_on_two_guests_reach_each_other_through_tunl0_with_ipip_always() {
    let test = "pods_on_two_guests_reach_each_other_through_tunl0_with_ipip_always";
    let Some(kernel) = guest::require_guests(test) else {
        return;
    };
    let runs = run_guests(&kernel, EncapMode::Always, "tunl0");
    assert_pods_reached_each_other(&runs);
    let pool: Ipv4Network = POOL.parse().unwrap();
    for (i, run) in runs.iter().enumerate() {
        let peer = NODES[1 - i].1;
        let route = run.get("route_get");
        assert!(
            route.contains(&format!("via {peer} dev tunl0")),
            "{}: {route}",
            run.name
        );
        let uplink = run.number("uplink_mtu");
        assert_eq!(
            run.number("tunl0_mtu"),
            uplink - 20,
            "{}: tunl0 MTU",
            run.name
        );
        assert_eq!(run.number("pod_mtu"), uplink - 20, "{}: pod MTU", run.name);
        let addr = run.get("tunl0_addr");
        let (ip, len) = addr.split_once('/').expect("tunl0 has an address");
        assert_eq!(len, "32", "{}: tunl0 {addr}", run.name);
        assert!(
            pool.contains(ip.parse().unwrap()),
            "{}: tunl0 {addr} outside {pool}",
            run.name
        );
        assert!(
            run.get("tunl0_flags").contains(",UP"),
            "{}: {}",
            run.name,
            run.get("tunl0_flags")
        );
        for c in ["tx_packets", "rx_packets"] {
            assert!(
                grew(run, &format!("tunl0_{c}")) >= PINGS,
                "{}: tunl0 {c} grew by {} only",
                run.name,
                grew(run, &format!("tunl0_{c}"))
            );
        }
    }
}
