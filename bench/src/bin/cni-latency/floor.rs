//! The kernel's floor for a veth-based CNI plugin: one netlink request that
//! creates a veth pair whose peer is created directly in the pod's
//! namespace (`IFLA_NET_NS_FD`), and one that deletes it. No IPAM, no
//! addresses or routes, no exec.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tabby_dataplane::{NetNs, Netlink};
use tabby_testkit::{Netns, NetnsSet};

/// Latency percentiles of the floor, in milliseconds.
#[derive(Debug, Clone)]
pub struct Floor {
    pub create_p50_ms: f64,
    pub create_p99_ms: f64,
    pub delete_p50_ms: f64,
    pub delete_p99_ms: f64,
}

/// Creates and deletes a bare veth pair for each of the first `count` pods of
/// `pods`, one after another, from a fresh host namespace `host_name`.
/// `create` includes the one RTM_GETLINK of the host end that
/// [`Netlink::create_veth`] makes after the RTM_NEWLINK; `delete` is one
/// RTM_DELLINK.
pub fn measure(host_name: &str, pods: &NetnsSet, count: usize) -> Result<Floor> {
    let host = Netns::named(host_name.to_string());
    let netlink =
        Netlink::in_netns(&host.open()).context("a netlink socket in the floor's host")?;
    let (mut create, mut delete) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for i in 0..count.min(pods.len()) {
        let pod = NetNs::open(pods.path(i)).with_context(|| format!("open pod netns {i}"))?;
        let name = format!("floor{i}");
        let mac = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
        let t = Instant::now();
        netlink
            .create_veth(&name, mac, "eth0", &pod, None)
            .with_context(|| format!("create the floor's veth {name}"))?;
        create.push(t.elapsed());
        let t = Instant::now();
        let deleted = netlink
            .delete_link(&name)
            .with_context(|| format!("delete the floor's veth {name}"))?;
        delete.push(t.elapsed());
        anyhow::ensure!(
            deleted,
            "the floor's veth {name} was gone before its delete"
        );
    }
    create.sort();
    delete.sort();
    Ok(Floor {
        create_p50_ms: ms(pct(&create, 50)),
        create_p99_ms: ms(pct(&create, 99)),
        delete_p50_ms: ms(pct(&delete, 50)),
        delete_p99_ms: ms(pct(&delete, 99)),
    })
}

/// The nearest-rank percentile of sorted durations (as `cnidriver bench`).
fn pct(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
