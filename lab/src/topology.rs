//! The lab's wiring: the underlay namespace with one bridge per subnet,
//! routing between them; node namespaces, the external client and the
//! control plane, each joined to a bridge by a veth; the "internet" beyond
//! the underlay router.
//!
//! ```text
//!   tabby-internet (eth0 203.0.113.10/24, route 10.98.0.0/16 via .1, nothing else)
//!        │
//!   tabby-underlay: the router (ip_forward=1), 203.0.113.1/24 on `internet`,
//!        │          br0 10.98.0.254/24 [, br1 10.98.1.254/24 with --subnets 2]
//!        ├─────────────┬──────────────┬──────────────┐
//!     node-1        node-2         node-3        external
//!  eth0 10.98.0.1  10.98.0.2      10.98.0.3     10.98.0.200    (default via .254)
//!                  (10.98.1.2 on br1 with --subnets 2: even nodes)
//! ```
//!
//! The underlay also counts UDP 4789 (VXLAN) frames: bridged inside a
//! subnet (`bridge tabby-lab`) and routed between subnets (`ip tabby-lab`),
//! which `status` shows and the tests read.

use std::net::Ipv4Addr;

use anyhow::Context;

use crate::names::{self, Names, GATEWAY_HOST, UNDERLAY_PREFIX_LEN, UPLINK};
use crate::sh::{self, add_netns, in_netns, ip, netns_sysctl};
use crate::state::{LabState, NodeState, StateDir};

/// The nft tables of the underlay that count VXLAN frames: same-subnet
/// frames cross the bridge's forward hook, cross-subnet packets the ip one.
const UNDERLAY_COUNTERS: &str = "table bridge tabby-lab {
  chain encap {
    type filter hook forward priority 0;
    udp dport 4789 counter comment \"bridged\"
  }
}
table ip tabby-lab {
  chain encap {
    type filter hook forward priority 0;
    udp dport 4789 counter comment \"routed\"
  }
}
";

/// Creates the underlay namespace with one bridge and gateway address per
/// subnet, forwarding between them, and the VXLAN counters.
pub fn add_underlay(
    names: &Names,
    state: &mut LabState,
    dir: &StateDir,
    subnets: u8,
) -> anyhow::Result<()> {
    let ns = names.underlay_ns();
    state.record_ns(&ns);
    state.save(dir)?;
    add_netns(&ns)?;
    for subnet in 0..subnets {
        let bridge = names::bridge(subnet);
        ip(&["-n", &ns, "link", "add", &bridge, "type", "bridge"])?;
        let gateway = format!(
            "{}/{UNDERLAY_PREFIX_LEN}",
            names::subnet_host(subnet, GATEWAY_HOST)
        );
        ip(&["-n", &ns, "addr", "add", &gateway, "dev", &bridge])?;
        ip(&["-n", &ns, "link", "set", &bridge, "up"])?;
    }
    netns_sysctl(&ns, "net/ipv4/ip_forward", "1")?;
    nft_load(&ns, UNDERLAY_COUNTERS).context("loading the underlay's VXLAN counters")
}

/// The underlay's UDP 4789 counts so far: (bridged within a subnet, routed
/// between subnets), in packets.
pub fn vxlan_counts(names: &Names) -> anyhow::Result<(u64, u64)> {
    let ns = names.underlay_ns();
    let count = |family: &str| -> anyhow::Result<u64> {
        let mut cmd = in_netns(&ns, "nft");
        cmd.args(["-j", "list", "chain", family, "tabby-lab", "encap"]);
        let json: serde_json::Value = serde_json::from_str(&sh::run(cmd)?)
            .with_context(|| format!("parsing nft's {family} counter"))?;
        let packets = json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|item| {
                item["rule"]["expr"]
                    .as_array()?
                    .iter()
                    .find_map(|e| e["counter"]["packets"].as_u64())
            });
        packets.with_context(|| format!("no counter in the underlay's {family} tabby-lab chain"))
    };
    Ok((count("bridge")?, count("ip")?))
}

/// `nft -f -` in namespace `ns` with `rules` on stdin.
fn nft_load(ns: &str, rules: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = in_netns(ns, "nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running nft in {ns}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())
        .with_context(|| format!("writing nft rules in {ns}"))?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft -f in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Creates namespace `ns` attached to the bridge of `address`'s subnet as
/// `eth0` with `address`/24 and a default route via that subnet's gateway.
/// The bridge port in the underlay is called `port`.
fn attach(names: &Names, ns: &str, port: &str, address: Ipv4Addr) -> anyhow::Result<()> {
    let underlay = names.underlay_ns();
    let subnet = names::subnet_of(address);
    add_netns(ns)?;
    // Created with the peer already in its namespace: no move afterwards.
    ip(&[
        "-n", &underlay, "link", "add", port, "type", "veth", "peer", "name", UPLINK, "netns", ns,
    ])?;
    let bridge = names::bridge(subnet);
    ip(&[
        "-n", &underlay, "link", "set", port, "master", &bridge, "up",
    ])?;
    let cidr = format!("{address}/{UNDERLAY_PREFIX_LEN}");
    ip(&["-n", ns, "addr", "add", &cidr, "dev", UPLINK])?;
    ip(&["-n", ns, "link", "set", UPLINK, "up"])?;
    let gateway = names::subnet_host(subnet, GATEWAY_HOST).to_string();
    ip(&["-n", ns, "route", "add", "default", "via", &gateway])
}

/// Creates node `index` (1-based): its namespace on its subnet of the
/// underlay with forwarding on. Recorded in the state before anything is made.
pub fn add_node(
    names: &Names,
    state: &mut LabState,
    dir: &StateDir,
    index: usize,
) -> anyhow::Result<()> {
    let name = names::node_name(index);
    let ns = names.node_ns(&name);
    state.record_ns(&ns);
    state.nodes.push(NodeState {
        name: name.clone(),
        netns: ns.clone(),
        address: names::node_address_in(index, state.subnets),
        agent: None,
    });
    state.save(dir)?;
    let address = state.nodes.last().expect("just pushed").address;
    attach(names, &ns, &name, address)?;
    netns_sysctl(&ns, "net/ipv4/ip_forward", "1")
}

/// Creates the external client namespace on the underlay (10.98.0.200).
pub fn add_external(names: &Names, state: &mut LabState, dir: &StateDir) -> anyhow::Result<()> {
    let ns = names.external_ns();
    state.record_ns(&ns);
    state.save(dir)?;
    attach(names, &ns, "external", names::host(names::EXTERNAL_HOST))
}

/// Creates the control plane's namespace on the underlay (10.98.0.250,
/// `--kubernetes`): the apiserver listens there, reachable from every node.
pub fn add_control_plane(
    names: &Names,
    state: &mut LabState,
    dir: &StateDir,
) -> anyhow::Result<()> {
    let ns = names.control_plane_ns();
    state.record_ns(&ns);
    state.save(dir)?;
    attach(
        names,
        &ns,
        "control-plane",
        names::host(names::CONTROL_PLANE_HOST),
    )
}

/// Creates the "internet" namespace beyond the underlay router: 203.0.113.10
/// with a route to the underlay (10.98.0.0/16: the nodes' addresses play
/// public ones) and none to the pods, like the real internet; and an nft set
/// of the source address of every TCP SYN it receives (`syn_sources`), which
/// shows who connected even when the answer cannot go back.
pub fn add_internet(names: &Names, state: &mut LabState, dir: &StateDir) -> anyhow::Result<()> {
    let ns = names.internet_ns();
    let underlay = names.underlay_ns();
    state.record_ns(&ns);
    state.save(dir)?;
    add_netns(&ns)?;
    let port = names::INTERNET_PORT;
    ip(&[
        "-n", &underlay, "link", "add", port, "type", "veth", "peer", "name", UPLINK, "netns", &ns,
    ])?;
    let router = names::internet_host(names::INTERNET_ROUTER_HOST);
    let server = names::internet_host(names::INTERNET_SERVER_HOST);
    ip(&[
        "-n",
        &underlay,
        "addr",
        "add",
        &format!("{router}/24"),
        "dev",
        port,
    ])?;
    ip(&["-n", &underlay, "link", "set", port, "up"])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{server}/24"),
        "dev",
        UPLINK,
    ])?;
    ip(&["-n", &ns, "link", "set", UPLINK, "up"])?;
    let underlay_net = format!("{}/16", names::subnet_host(0, 0));
    ip(&[
        "-n",
        &ns,
        "route",
        "add",
        &underlay_net,
        "via",
        &router.to_string(),
    ])?;
    nft_load(&ns, INTERNET_SYN_SET).context("loading the internet's SYN log")
}

/// The internet namespace's record of who sent it a TCP SYN.
const INTERNET_SYN_SET: &str = "table ip tabby-lab {
  set syn_sources {
    type ipv4_addr
    flags dynamic
  }
  chain input {
    type filter hook input priority 0;
    tcp flags & (syn | ack) == syn add @syn_sources { ip saddr }
  }
}
";

/// The source addresses of every TCP SYN the internet namespace received.
pub fn internet_syn_sources(names: &Names) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut cmd = in_netns(&names.internet_ns(), "nft");
    cmd.args(["-j", "list", "set", "ip", "tabby-lab", "syn_sources"]);
    let json: serde_json::Value =
        serde_json::from_str(&sh::run(cmd)?).context("parsing nft's syn_sources set")?;
    let elems = json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["set"]["elem"].as_array())
        .flatten();
    Ok(elems
        .filter_map(|e| e.as_str().and_then(|a| a.parse().ok()))
        .collect())
}
