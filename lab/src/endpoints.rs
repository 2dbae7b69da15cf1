//! EndpointSlices derived from the lab's pods, as Kubernetes' EndpointSlice
//! controller derives them from a Service's selector. Pure: objects in,
//! objects out.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::{json, Value};

/// The `managed-by` label value of the slices the lab derives.
pub const MANAGED_BY: &str = "tabby-lab";
/// The echo server's container port, with its name (like whoami's `http`).
const NAMED_PORTS: &[(&str, u16)] = &[("http", 8080)];

/// A pod as the EndpointSlice controller sees it.
#[derive(Debug, Clone)]
pub struct EndpointPod<'a> {
    /// Pod name.
    pub name: &'a str,
    /// Kubernetes namespace.
    pub namespace: &'a str,
    /// Node it runs on.
    pub node: &'a str,
    /// Its address; pods without one are skipped.
    pub ip: Option<Ipv4Addr>,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Whether it serves (only ready pods are endpoints).
    pub ready: bool,
}

/// The EndpointSlice for every Service in `objects` that has a selector:
/// the ready pods of the Service's namespace whose labels match, with the
/// Service's target ports. Other objects and selector-less Services (which
/// take the slices the user applies) yield nothing.
pub fn derive_endpoint_slices(objects: &[Value], pods: &[EndpointPod<'_>]) -> Vec<Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Service")
        .filter_map(|svc| slice_for(svc, pods))
        .collect()
}

/// The slice of one Service, or `None` when it has no selector.
fn slice_for(svc: &Value, pods: &[EndpointPod<'_>]) -> Option<Value> {
    let spec = &svc["spec"];
    if spec["type"] == "ExternalName" {
        return None;
    }
    let selector: BTreeMap<&str, &str> = spec["selector"]
        .as_object()?
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
        .collect();
    if selector.is_empty() {
        return None;
    }
    let name = svc["metadata"]["name"].as_str()?;
    let namespace = svc["metadata"]["namespace"].as_str().unwrap_or("default");
    let endpoints: Vec<Value> = pods
        .iter()
        .filter(|p| p.ready && p.namespace == namespace)
        .filter(|p| {
            selector
                .iter()
                .all(|(k, v)| p.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .filter_map(|p| {
            Some(json!({
                "addresses": [p.ip?.to_string()],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": p.node,
                "targetRef": { "kind": "Pod", "namespace": p.namespace, "name": p.name },
            }))
        })
        .collect();
    let ports: Vec<Value> = spec["ports"]
        .as_array()
        .map(|ports| ports.iter().filter_map(endpoint_port).collect())
        .unwrap_or_default();
    Some(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-{MANAGED_BY}"),
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
}

/// A Service port's endpoint port: its `targetPort` (a number, or a name
/// resolved against the echo server's named ports), else its `port`.
fn endpoint_port(port: &Value) -> Option<Value> {
    let number = match &port["targetPort"] {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        Value::String(s) => match s.parse::<u16>() {
            Ok(n) => n,
            Err(_) => NAMED_PORTS.iter().find(|(name, _)| name == s)?.1,
        },
        _ => u16::try_from(port["port"].as_u64()?).ok()?,
    };
    let mut out = json!({
        "port": number,
        "protocol": port["protocol"].as_str().unwrap_or("TCP"),
    });
    if let Some(name) = port["name"].as_str() {
        out["name"] = json!(name);
    }
    Some(out)
}

/// Whether `object` is a slice this module derived.
pub fn is_derived(object: &Value) -> bool {
    object["kind"] == "EndpointSlice"
        && object["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == MANAGED_BY
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn service(selector: Value, ports: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": selector, "ports": ports},
        })
    }

    #[test]
    fn ready_matching_pods_become_endpoints_with_the_target_port() {
        let echo = labels(&[("app", "echo"), ("tabby.dev/node", "node-1")]);
        let other = labels(&[("app", "db")]);
        let pods = [
            EndpointPod {
                name: "p1",
                namespace: "default",
                node: "node-1",
                ip: Some([10, 244, 0, 1].into()),
                labels: &echo,
                ready: true,
            },
            EndpointPod {
                name: "p2",
                namespace: "default",
                node: "node-2",
                ip: Some([10, 244, 0, 2].into()),
                labels: &echo,
                ready: false,
            },
            EndpointPod {
                name: "p3",
                namespace: "default",
                node: "node-2",
                ip: Some([10, 244, 0, 3].into()),
                labels: &other,
                ready: true,
            },
            EndpointPod {
                name: "p4",
                namespace: "other",
                node: "node-2",
                ip: Some([10, 244, 0, 4].into()),
                labels: &echo,
                ready: true,
            },
        ];
        let svc = service(
            json!({"app": "echo"}),
            json!([{"name": "http", "port": 80, "targetPort": 8080}]),
        );
        let slices = derive_endpoint_slices(&[svc], &pods);
        assert_eq!(slices.len(), 1);
        let s = &slices[0];
        assert_eq!(s["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(s["endpoints"].as_array().unwrap().len(), 1);
        assert_eq!(s["endpoints"][0]["addresses"][0], "10.244.0.1");
        assert_eq!(s["endpoints"][0]["nodeName"], "node-1");
        assert_eq!(
            s["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        assert!(is_derived(s));
    }

    #[test]
    fn target_ports_default_to_the_port_and_names_resolve_to_the_echo_port() {
        let svc = service(
            json!({"app": "echo"}),
            json!([{"port": 80}, {"port": 81, "targetPort": "http", "protocol": "UDP"}, {"port": 82, "targetPort": "nope"}]),
        );
        let slices = derive_endpoint_slices(&[svc], &[]);
        assert_eq!(
            slices[0]["ports"],
            json!([{"port": 80, "protocol": "TCP"}, {"port": 8080, "protocol": "UDP"}])
        );
        assert_eq!(slices[0]["endpoints"], json!([]));
    }

    #[test]
    fn services_without_selector_and_other_kinds_get_no_derived_slice() {
        let no_selector = json!({"kind": "Service", "metadata": {"name": "manual"}, "spec": {"ports": [{"port": 80}]}});
        let external = json!({"kind": "Service", "metadata": {"name": "x"}, "spec": {"type": "ExternalName", "selector": {"a": "b"}}});
        let slice = json!({"kind": "EndpointSlice", "metadata": {"name": "manual-1"}});
        assert!(derive_endpoint_slices(&[no_selector, external, slice], &[]).is_empty());
    }
}
