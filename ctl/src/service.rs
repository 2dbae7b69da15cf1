//! `tabbyctl service list`: the Services the agents' proxies program, read
//! from the same resources directory (YAML files of Services and
//! EndpointSlices), as `kubectl get svc -o wide` plus ready endpoints per node.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::table::{Align, Table};

/// Where the agents read Services and EndpointSlices by default.
pub const DEFAULT_RESOURCES: &str = "/var/lib/tabby/resources";

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Prints the services of `dir`.
pub fn list(dir: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        anyhow::bail!(
            "no resources directory at {}: pass --resources or TABBY_RESOURCES",
            dir.display()
        );
    }
    let (objects, warnings) = read_dir(dir)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", table(&objects));
    Ok(())
}

/// The Services and EndpointSlices of a directory.
#[derive(Debug, Default)]
pub struct Objects {
    /// Services by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// EndpointSlices.
    pub slices: Vec<EndpointSlice>,
}

/// Reads every `.yaml`/`.yml` file of `dir` (as the agents do); files that
/// do not parse are skipped with a warning, returned alongside.
pub fn read_dir(dir: &Path) -> anyhow::Result<(Objects, Vec<String>)> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                && p.is_file()
        })
        .collect();
    paths.sort();
    let mut objects = Objects::default();
    let mut warnings = Vec::new();
    for path in paths {
        let parsed = std::fs::read_to_string(&path)
            .map_err(anyhow::Error::from)
            .and_then(|text| parse(&text));
        match parsed {
            Ok(o) => {
                objects.services.extend(o.services);
                objects.slices.extend(o.slices);
            }
            Err(e) => warnings.push(format!("skipping {}: {e:#}", path.display())),
        }
    }
    Ok((objects, warnings))
}

/// The Services (v1) and EndpointSlices (discovery.k8s.io/v1) of a
/// multi-document YAML text, read as the agents read it; other kinds are ignored.
fn parse(text: &str) -> anyhow::Result<Objects> {
    let objects = tabby_proxy::yaml::objects(text)?;
    let mut out = Objects {
        slices: objects.slices,
        ..Objects::default()
    };
    for svc in objects.services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        out.services.insert((ns, name), svc);
    }
    Ok(out)
}

/// The table: one row per Service, sorted by namespace and name.
pub fn table(objects: &Objects) -> String {
    let mut t = Table::new(&[
        ("NAMESPACE", Align::Left),
        ("NAME", Align::Left),
        ("TYPE", Align::Left),
        ("CLUSTER-IP", Align::Left),
        ("EXTERNAL-IP", Align::Left),
        ("PORT(S)", Align::Left),
        ("ENDPOINTS", Align::Left),
    ]);
    for ((ns, name), svc) in &objects.services {
        let spec = svc.spec.clone().unwrap_or_default();
        let kind = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        let cluster_ip = match (kind.as_str(), spec.cluster_ip.as_deref()) {
            ("ExternalName", _) | (_, None | Some("")) => "<none>".to_string(),
            (_, Some(ip)) => ip.to_string(),
        };
        t.row(vec![
            ns.clone(),
            name.clone(),
            kind,
            cluster_ip,
            external_ips(svc),
            ports(svc),
            endpoints(ns, name, &objects.slices),
        ]);
    }
    t.plain()
}

/// Load balancer ingress (IP, else hostname) and `externalIPs`, as kubectl:
/// `<pending>` for a LoadBalancer without any, the name for ExternalName.
fn external_ips(svc: &Service) -> String {
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return spec.external_name.unwrap_or_else(|| "<none>".into());
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    let mut ips: Vec<String> = ingress
        .into_iter()
        .filter_map(|i| i.ip.or(i.hostname))
        .collect();
    ips.extend(spec.external_ips.unwrap_or_default());
    match (ips.is_empty(), spec.type_.as_deref()) {
        (false, _) => ips.join(","),
        (true, Some("LoadBalancer")) => "<pending>".into(),
        (true, _) => "<none>".into(),
    }
}

/// `80:30080/TCP` with a node port, `8080/TCP` without, comma separated.
fn ports(svc: &Service) -> String {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    if ports.is_empty() {
        return "<none>".into();
    }
    ports
        .iter()
        .map(|p| {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            match p.node_port.filter(|n| *n != 0) {
                Some(np) => format!("{}:{np}/{proto}", p.port),
                None => format!("{}/{proto}", p.port),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Ready endpoints per node (`node-1:2,node-2:1`), each address counted
/// once across the service's slices; `<none>` when there are none.
fn endpoints(ns: &str, name: &str, slices: &[EndpointSlice]) -> String {
    let mut per_node: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for slice in slices.iter().filter(|s| {
        s.metadata.namespace.as_deref().unwrap_or("default") == ns
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                == Some(name)
    }) {
        for ep in slice.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let Some(addr) = ep.addresses.first().filter(|_| ready) else {
                continue;
            };
            let node = ep.node_name.clone().unwrap_or_else(|| "<unknown>".into());
            per_node.entry(node).or_default().insert(addr.clone());
        }
    }
    if per_node.is_empty() {
        return "<none>".into();
    }
    per_node
        .iter()
        .map(|(node, addrs)| format!("{node}:{}", addrs.len()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  externalIPs: [192.168.1.200]
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.244.1.2], nodeName: node-1}
  - {addresses: [10.244.1.3], nodeName: node-1, conditions: {ready: true}}
  - {addresses: [10.244.2.2], nodeName: node-2}
  - {addresses: [10.244.2.3], nodeName: node-2, conditions: {ready: false}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    const OTHERS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: prod}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  ports: [{port: 443, nodePort: 31443}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
apiVersion: v1
kind: Service
metadata: {name: pending, namespace: prod}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.31
  ports: [{port: 443, nodePort: 31444}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  ports: [{port: 8080}]
"#;

    #[test]
    fn lists_services_like_kubectl_with_ready_endpoints_per_node() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), WEB).unwrap();
        std::fs::write(dir.path().join("others.yml"), OTHERS).unwrap();
        std::fs::write(
            dir.path().join("broken.yaml"),
            "kind: Service\nmetadata: [x\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("README.txt"), WEB).unwrap();
        let (objects, warnings) = read_dir(dir.path()).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("broken.yaml"), "{warnings:?}");
        assert_eq!(
            table(&objects),
            "\
NAMESPACE   NAME       TYPE           CLUSTER-IP   EXTERNAL-IP     PORT(S)                     ENDPOINTS
default     headless   ClusterIP      None         <none>          8080/TCP                    <none>
default     web        NodePort       10.96.0.20   192.168.1.200   80:30080/TCP,53:30053/UDP   node-1:2,node-2:1
prod        lb         LoadBalancer   10.96.0.30   203.0.113.10    443:31443/TCP               <none>
prod        pending    LoadBalancer   10.96.0.31   <pending>       443:31444/TCP               <none>
"
        );
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_flag() {
        let err = list(Path::new("/nonexistent/tabby-resources")).unwrap_err();
        assert!(format!("{err}").contains("--resources"), "{err}");
    }
}
