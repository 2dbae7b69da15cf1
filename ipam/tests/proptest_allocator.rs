//! Property: across random assign / release sequences of several nodes on
//! a small pool (so that claiming, borrowing and exhaustion all happen), no
//! address is ever handed out twice and no block is confirmed for two nodes.
//!
//! The same property on every backend, with fewer cases where each case
//! costs more: memory 1000 cases, file 50 (a write is an fsync), Kubernetes 12 (every step is
//! API round trips; each case has a fresh scope).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use common::backends::{Backend, TestStore};
use common::{assert_affinities_consistent, pool, v4};
use proptest::prelude::*;
use tabby_ipam::{Datastore, IpamError};

#[derive(Debug, Clone)]
enum Op {
    /// Node `node` assigns `n` addresses to a new handle.
    Assign { node: usize, n: u32 },
    /// Release the `pick`-th live handle (modulo their number).
    ReleaseHandle { pick: usize },
    /// Release one address of the `pick`-th live handle.
    ReleaseIp { pick: usize },
    /// GC keeping every other live handle.
    Gc,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 1..4u32).prop_map(|(node, n)| Op::Assign { node, n }),
        3 => any::<usize>().prop_map(|pick| Op::ReleaseHandle { pick }),
        2 => any::<usize>().prop_map(|pick| Op::ReleaseIp { pick }),
        1 => Just(Op::Gc),
    ]
}

/// Runs `ops` against the allocator and a model of who holds what.
fn run(ops: &[Op], block_size: u8, backend: Backend) -> Result<(), TestCaseError> {
    let store = TestStore::new(backend);
    let ipam = store.ipam();
    ipam.create_pool(&pool("small", "10.9.0.0/26", block_size))
        .expect("pool");
    // Model: handle -> addresses it holds.
    let mut held: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let live = |held: &BTreeMap<String, Vec<IpAddr>>| {
        held.values().flatten().copied().collect::<HashSet<_>>()
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Assign { node, n } => {
                let handle = format!("net.h{step}");
                let mut args = v4(&handle, &format!("node-{node}"));
                args.num_v4 = n;
                match ipam.assign(&args) {
                    Ok(nets) => {
                        prop_assert_eq!(nets.len(), n as usize);
                        let taken = live(&held);
                        for net in &nets {
                            prop_assert!(
                                !taken.contains(&net.ip()),
                                "{} handed out twice",
                                net.ip()
                            );
                            prop_assert_eq!(net.prefix(), block_size);
                        }
                        let ips: Vec<IpAddr> = nets.iter().map(|n| n.ip()).collect();
                        prop_assert_eq!(ips.iter().collect::<HashSet<_>>().len(), ips.len());
                        held.insert(handle, ips);
                    }
                    Err(IpamError::Exhausted { .. }) => {
                        prop_assert!(
                            live(&held).len() + n as usize > 64,
                            "exhausted with room left"
                        );
                        let key = format!("handles/{handle}");
                        prop_assert!(ipam.datastore().get(&key).expect("get").is_none());
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("assign: {e}"))),
                }
            }
            Op::ReleaseHandle { pick } if !held.is_empty() => {
                let handle = held.keys().nth(pick % held.len()).cloned().expect("handle");
                let mut released: Vec<IpAddr> = ipam
                    .release_by_handle(&handle)
                    .expect("release")
                    .into_iter()
                    .map(|r| r.ip)
                    .collect();
                let mut expected = held.remove(&handle).expect("held");
                released.sort();
                expected.sort();
                prop_assert_eq!(released, expected);
            }
            Op::ReleaseIp { pick } if !held.is_empty() => {
                let handle = held.keys().nth(pick % held.len()).cloned().expect("handle");
                let ips = held.get_mut(&handle).expect("held");
                let ip = ips.remove(pick % ips.len());
                if ips.is_empty() {
                    held.remove(&handle);
                }
                let released = ipam
                    .release_ip(ip)
                    .expect("release")
                    .expect("was allocated");
                prop_assert_eq!(released.handle, handle);
            }
            Op::Gc => {
                let valid: HashSet<String> = held.keys().step_by(2).cloned().collect();
                let released = ipam.gc("net.", &valid).expect("gc");
                let expected: usize = held
                    .iter()
                    .filter(|(h, _)| !valid.contains(*h))
                    .map(|(_, v)| v.len())
                    .sum();
                prop_assert_eq!(released.len(), expected);
                held.retain(|h, _| valid.contains(h));
            }
            _ => {}
        }
    }
    assert_affinities_consistent(ipam.datastore());
    Ok(())
}

/// The two properties on one backend with `cases` cases.
macro_rules! properties {
    ($module:ident, $backend:expr, $cases:expr) => {
        mod $module {
            use super::*;

            proptest! {
                #![proptest_config(ProptestConfig { cases: $cases, ..ProptestConfig::default() })]

                #[test]
                fn no_address_is_handed_out_twice_with_blocks_of_8(ops in prop::collection::vec(op(), 1..80)) {
                    run(&ops, 29, $backend)?;
                }

                #[test]
                fn no_address_is_handed_out_twice_with_blocks_of_16(ops in prop::collection::vec(op(), 1..80)) {
                    run(&ops, 28, $backend)?;
                }
            }
        }
    };
}

properties!(mem, Backend::Mem, 1000);
properties!(file, Backend::File, 50);
properties!(kubernetes, Backend::Kube, 12);
