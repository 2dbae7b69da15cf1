//! Shared helpers of the proxy tests: scenario files and node facts.
#![allow(dead_code)]

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tabby_proxy::proxier::ProxyEvent;
use tabby_proxy::{NodeFacts, ProxyOptions, RuleSet};

/// `tests/golden/NAME`.
pub fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Services and EndpointSlices of a multi-document YAML text.
pub fn parse_objects(text: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let objects = tabby_proxy::yaml::objects(text).expect("valid Services and EndpointSlices");
    assert!(
        objects.skipped.is_empty(),
        "unexpected kinds: {:?}",
        objects.skipped
    );
    (objects.services, objects.slices)
}

/// Services and EndpointSlices of `tests/golden/NAME.yaml`.
pub fn load(name: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let path = golden_path(&format!("{name}.yaml"));
    parse_objects(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    )
}

/// The upsert events of `objects` ([`load`], [`parse_objects`]) as a
/// source sends them: the Services, then the EndpointSlices.
pub fn upserts(objects: (Vec<Service>, Vec<EndpointSlice>)) -> impl Iterator<Item = ProxyEvent> {
    let (services, slices) = objects;
    let services = services
        .into_iter()
        .map(|s| ProxyEvent::ServiceUpsert(Box::new(s)));
    services.chain(
        slices
            .into_iter()
            .map(|s| ProxyEvent::SliceUpsert(Box::new(s))),
    )
}

/// The node most scenarios run on: worker-node1, pods in 10.244.0.0/16.
pub fn node() -> NodeFacts {
    NodeFacts {
        name: "worker-node1".into(),
        node_ips: vec!["192.168.1.11".parse().unwrap()],
        cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
    }
}

/// Seed 004's client node: myk8s-control-plane, pods in 10.10.0.0/16.
pub fn seed004_node() -> NodeFacts {
    NodeFacts {
        name: "myk8s-control-plane".into(),
        node_ips: vec!["172.18.0.2".parse().unwrap()],
        cluster_cidr: Some("10.10.0.0/16".parse().unwrap()),
        pod_cidrs: vec!["10.10.0.0/24".parse().unwrap()],
    }
}

/// The facts a scenario is rendered with.
pub fn node_for(name: &str) -> NodeFacts {
    if name == "session-affinity" {
        seed004_node()
    } else {
        node()
    }
}

/// The rule set of a scenario with default options.
pub fn ruleset(name: &str) -> RuleSet {
    let (services, slices) = load(name);
    tabby_proxy::generate(
        &services,
        &slices,
        &node_for(name),
        &ProxyOptions::default(),
    )
}
