//! EndpointSlices derived from the lab's pods, as Kubernetes' EndpointSlice
//! controller derives them from a Service's selector. Pure: objects in,
//! objects out.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{ObjectReference, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The `managed-by` label value of the slices the lab derives.
pub const MANAGED_BY: &str = "tabby-lab";
/// The label naming a slice's Service.
const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label naming a slice's controller.
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The echo server's container port, with its name (like whoami's `http`).
const NAMED_PORTS: &[(&str, i32)] = &[("http", 8080)];

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

/// The EndpointSlice for every Service in `services` that has a selector:
/// the ready pods of the Service's namespace whose labels match, with the
/// Service's target ports. Selector-less Services (which take the slices
/// the user applies) and ExternalName Services yield nothing.
pub fn derive_endpoint_slices(
    services: &[Service],
    pods: &[EndpointPod<'_>],
) -> Vec<EndpointSlice> {
    services
        .iter()
        .filter_map(|svc| slice_for(svc, pods))
        .collect()
}

/// The slice of one Service, or `None` when it has no selector.
fn slice_for(svc: &Service, pods: &[EndpointPod<'_>]) -> Option<EndpointSlice> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let name = svc.metadata.name.as_deref()?;
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let endpoints = pods
        .iter()
        .filter(|p| p.ready && p.namespace == namespace)
        .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .filter_map(|p| {
            Some(Endpoint {
                addresses: vec![p.ip?.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(p.node.to_string()),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: Some(p.namespace.to_string()),
                    name: Some(p.name.to_string()),
                    ..ObjectReference::default()
                }),
                ..Endpoint::default()
            })
        })
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(endpoint_port)
        .collect();
    let labels = [(SERVICE_NAME, name), (MANAGED_BY_LABEL, MANAGED_BY)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{MANAGED_BY}")),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ports: Some(ports),
    })
}

/// A Service port's endpoint port: its `targetPort` (a number, or a name
/// resolved against the echo server's named ports), else its `port`.
fn endpoint_port(port: &ServicePort) -> Option<EndpointPort> {
    let number = match &port.target_port {
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => match s.parse() {
            Ok(n) => n,
            Err(_) => NAMED_PORTS.iter().find(|(name, _)| name == s)?.1,
        },
        None => port.port,
    };
    Some(EndpointPort {
        name: port.name.clone(),
        port: Some(number),
        protocol: Some(port.protocol.clone().unwrap_or_else(|| "TCP".into())),
        ..EndpointPort::default()
    })
}

/// Whether `slice` is one this module derived.
pub fn is_derived(slice: &EndpointSlice) -> bool {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn service(selector: Value, ports: Value) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": selector, "ports": ports},
        }))
        .unwrap()
    }

    /// A slice as JSON, to compare with literals.
    fn value(slice: &EndpointSlice) -> Value {
        serde_json::to_value(slice).unwrap()
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
        assert!(is_derived(&slices[0]));
        let s = &value(&slices[0]);
        assert_eq!(s["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(s["endpoints"].as_array().unwrap().len(), 1);
        assert_eq!(s["endpoints"][0]["addresses"][0], "10.244.0.1");
        assert_eq!(s["endpoints"][0]["nodeName"], "node-1");
        assert_eq!(
            s["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
    }

    #[test]
    fn target_ports_default_to_the_port_and_names_resolve_to_the_echo_port() {
        let svc = service(
            json!({"app": "echo"}),
            json!([{"port": 80}, {"port": 81, "targetPort": "http", "protocol": "UDP"}, {"port": 82, "targetPort": "nope"}]),
        );
        let slices = derive_endpoint_slices(&[svc], &[]);
        let s = value(&slices[0]);
        assert_eq!(
            s["ports"],
            json!([{"port": 80, "protocol": "TCP"}, {"port": 8080, "protocol": "UDP"}])
        );
        assert_eq!(s["endpoints"], json!([]));
    }

    #[test]
    fn services_without_selector_and_external_names_get_no_derived_slice() {
        let no_selector = service(Value::Null, json!([{"port": 80}]));
        let mut external = service(json!({"a": "b"}), json!([]));
        external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        let empty = service(json!({}), json!([{"port": 80}]));
        assert!(derive_endpoint_slices(&[no_selector, external, empty], &[]).is_empty());
    }
}
