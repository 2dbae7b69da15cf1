//! The lab's wiring: the underlay bridge namespace, node namespaces and the
//! external client, each joined to the bridge by a veth.
//!
//! ```text
//!            tabby-underlay (br0 10.98.0.254/24, ip_forward=1)
//!        ┌──────────┬──────┴────┬─────────────┐
//!     node-1     node-2      node-N        external
//!  eth0 .1/24  eth0 .2/24  eth0 .N/24   eth0 .200/24   (default via .254)
//! ```

use crate::names::{self, Names, BRIDGE, GATEWAY_HOST, UNDERLAY_PREFIX_LEN, UPLINK};
use crate::sh::{add_netns, ip, netns_sysctl};
use crate::state::{LabState, NodeState, StateDir};

/// Creates the underlay namespace with its bridge and gateway address.
pub fn add_underlay(names: &Names, state: &mut LabState, dir: &StateDir) -> anyhow::Result<()> {
    let ns = names.underlay_ns();
    state.record_ns(&ns);
    state.save(dir)?;
    add_netns(&ns)?;
    ip(&["-n", &ns, "link", "add", BRIDGE, "type", "bridge"])?;
    let gateway = format!("{}/{UNDERLAY_PREFIX_LEN}", names::host(GATEWAY_HOST));
    ip(&["-n", &ns, "addr", "add", &gateway, "dev", BRIDGE])?;
    ip(&["-n", &ns, "link", "set", BRIDGE, "up"])?;
    netns_sysctl(&ns, "net/ipv4/ip_forward", "1")
}

/// Creates namespace `ns` attached to the underlay bridge as `eth0` with
/// address 10.98.0.`host`/24 and a default route via the gateway. The
/// bridge port in the underlay is called `port`.
fn attach(names: &Names, ns: &str, port: &str, host: u8) -> anyhow::Result<()> {
    let underlay = names.underlay_ns();
    add_netns(ns)?;
    // Created with the peer already in its namespace: no move afterwards.
    ip(&[
        "-n", &underlay, "link", "add", port, "type", "veth", "peer", "name", UPLINK, "netns", ns,
    ])?;
    ip(&["-n", &underlay, "link", "set", port, "master", BRIDGE, "up"])?;
    let address = format!("{}/{UNDERLAY_PREFIX_LEN}", names::host(host));
    ip(&["-n", ns, "addr", "add", &address, "dev", UPLINK])?;
    ip(&["-n", ns, "link", "set", UPLINK, "up"])?;
    let gateway = names::host(GATEWAY_HOST).to_string();
    ip(&["-n", ns, "route", "add", "default", "via", &gateway])
}

/// Creates node `index` (1-based): its namespace on the underlay with
/// forwarding on. Recorded in the state before anything is made.
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
        address: names::node_address(index),
        agent: None,
    });
    state.save(dir)?;
    attach(names, &ns, &name, index as u8)?;
    netns_sysctl(&ns, "net/ipv4/ip_forward", "1")
}

/// Creates the external client namespace on the underlay (10.98.0.200).
pub fn add_external(names: &Names, state: &mut LabState, dir: &StateDir) -> anyhow::Result<()> {
    let ns = names.external_ns();
    state.record_ns(&ns);
    state.save(dir)?;
    attach(names, &ns, "external", names::EXTERNAL_HOST)
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
    attach(names, &ns, "control-plane", names::CONTROL_PLANE_HOST)
}
