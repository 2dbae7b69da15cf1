//! kube-proxy's health-check node ports: for each Service with
//! `externalTrafficPolicy: Local` and a `healthCheckNodePort`, an HTTP
//! server on that port answers 200 while this node has a ready local
//! endpoint and 503 otherwise, so an external load balancer only sends
//! traffic to nodes that can serve it without a second hop.
//!
//! ```text
//!  Proxier ──health_checks()──▶ HealthCheckServer::update
//!                                  │ per port: Arc<Mutex<Entry>> (counts updated in place)
//!                                  └─▶ tokio task: http_server::serve(listener, axum Router)
//! ```
//!
//! As kube-proxy (pkg/proxy/healthcheck/service_health.go) does, only
//! *ready* local endpoints count, once per IP across the service's ports:
//! a node left with only terminating endpoints fails its check, so the
//! load balancer drains it while those endpoints finish their work.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::routing::get;
use axum::Router;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::model::{service_ports, NodeFacts, ServiceKey};
use super::proxier::Proxier;
use crate::http_server;

/// One health-check node port and what it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The Service.
    pub service: ServiceKey,
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// Ready endpoints of the service on this node (distinct IPs).
    pub local_endpoints: usize,
}

impl<B: crate::backend::Backend, C> Proxier<B, C> {
    /// The health checks this node should serve, from the proxier's current
    /// Services, EndpointSlices and node name, sorted by port.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        health_checks(self.services_with_slices(), self.node())
    }
}

/// The health checks of `services` (each with its slices) on `node`: one per
/// LoadBalancer Service with `externalTrafficPolicy: Local` and a
/// `healthCheckNodePort`, sorted by port.
pub fn health_checks<'a>(
    services: impl IntoIterator<Item = (&'a Service, Vec<&'a EndpointSlice>)>,
    node: &NodeFacts,
) -> Vec<HealthCheck> {
    let mut out = Vec::new();
    for (svc, slices) in services {
        let ports = service_ports(svc, &slices, node);
        let Some(port) = ports.iter().find_map(|p| p.health_check_node_port) else {
            continue;
        };
        let local: BTreeSet<Ipv4Addr> = ports
            .iter()
            .flat_map(|p| &p.endpoints)
            .filter(|e| e.is_local && e.ready)
            .map(|e| e.ip)
            .collect();
        out.push(HealthCheck {
            service: ports[0].service.clone(),
            port,
            local_endpoints: local.len(),
        });
    }
    out.sort_by_key(|h| h.port);
    out
}

/// kube-proxy's body (pkg/proxy/healthcheck/service_health.go), which Go
/// writes with `json.MarshalIndent(v, "", "\t")`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceRef<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// kube-proxy's answer for one service: 200 with ready local endpoints,
/// else 503; its JSON body; `X-Content-Type-Options: nosniff` and the
/// endpoint count as `X-Load-Balancing-Endpoint-Weight`.
pub fn response(service: &ServiceKey, local_endpoints: usize) -> Response<String> {
    // kube-proxy also reports its own health here; this proxy answers
    // while its process runs, so it is healthy by construction.
    let healthy = true;
    let body = Body {
        service: ServiceRef {
            namespace: &service.namespace,
            name: &service.name,
        },
        local_endpoints,
        service_proxy_healthy: healthy,
    };
    let status = if local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = Response::new(tab_indented_json(&body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-load-balancing-endpoint-weight", local_endpoints.into());
    response
}

/// `body` as Go's `json.MarshalIndent(body, "", "\t")` writes it.
fn tab_indented_json(body: &impl Serialize) -> String {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    // Serializing plain fields into a Vec cannot fail, and yields UTF-8.
    let _ = body.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out, formatter,
    ));
    String::from_utf8(out).unwrap_or_default()
}

/// The router of one port: every path answers with the port's entry.
fn router(entry: Arc<Mutex<Entry>>) -> Router {
    async fn answer(State(entry): State<Arc<Mutex<Entry>>>) -> Response<String> {
        let e = entry.lock().unwrap_or_else(PoisonError::into_inner);
        response(&e.service, e.local_endpoints)
    }
    Router::new().fallback(get(answer)).with_state(entry)
}

/// What one port's handler reads; updated in place by [`HealthCheckServer::update`].
#[derive(Debug)]
struct Entry {
    service: ServiceKey,
    local_endpoints: usize,
}

/// One listening port: its shared entry and its server task.
struct Listener {
    entry: Arc<Mutex<Entry>>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The health-check HTTP servers, one tokio task per port; dropping the
/// server (or removing a port) stops its listener.
pub struct HealthCheckServer {
    bind_ip: IpAddr,
    listeners: BTreeMap<u16, Listener>,
}

impl HealthCheckServer {
    /// A server with no ports yet, binding on `bind_ip` (the agent passes
    /// 0.0.0.0, as kube-proxy does; tests use loopback).
    pub fn new(bind_ip: IpAddr) -> Self {
        Self {
            bind_ip,
            listeners: BTreeMap::new(),
        }
    }

    /// The ports currently listening.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Serve exactly `checks`: start listeners for new ports, stop removed
    /// ones, and update the others in place without rebinding. A port that
    /// cannot be bound (already in use) is logged and retried on the next
    /// update. Must be called inside a tokio runtime.
    pub fn update(&mut self, checks: Vec<HealthCheck>) {
        let wanted: BTreeMap<u16, HealthCheck> = checks.into_iter().map(|c| (c.port, c)).collect();
        self.listeners.retain(|port, _| {
            let keep = wanted.contains_key(port);
            if !keep {
                info!(port, "health check node port closed");
            }
            keep
        });
        for (port, check) in wanted {
            if let Some(l) = self.listeners.get(&port) {
                let mut e = l.entry.lock().unwrap_or_else(PoisonError::into_inner);
                e.service = check.service;
                e.local_endpoints = check.local_endpoints;
                continue;
            }
            match self.listen(port) {
                Ok(listener) => {
                    info!(port, service = %check.service, "health check node port open");
                    let entry = Arc::new(Mutex::new(Entry {
                        service: check.service,
                        local_endpoints: check.local_endpoints,
                    }));
                    let task =
                        tokio::spawn(http_server::serve(listener, router(Arc::clone(&entry))));
                    self.listeners.insert(port, Listener { entry, task });
                }
                Err(error) => {
                    warn!(port, service = %check.service, %error, "health check node port unavailable; retrying on the next sync");
                }
            }
        }
    }

    fn listen(&self, port: u16) -> std::io::Result<tokio::net::TcpListener> {
        // std's bind sets SO_REUSEADDR on Unix, so a port closed a moment
        // ago (connections in TIME_WAIT) can be bound again.
        let l = std::net::TcpListener::bind(SocketAddr::new(self.bind_ip, port))?;
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SERVICE: &str = r#"{
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20",
                 "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                 "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                           {"name": "https", "port": 443, "nodePort": 30443}]}}"#;

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn node() -> NodeFacts {
        NodeFacts {
            name: "node-1".into(),
            ..NodeFacts::default()
        }
    }

    fn key() -> ServiceKey {
        ServiceKey {
            namespace: "default".into(),
            name: "web".into(),
        }
    }

    #[test]
    fn counts_ready_local_endpoints_once_per_ip_across_ports() {
        let svc: Service = serde_json::from_str(SERVICE).unwrap();
        let s = slice(serde_json::json!([
            {"addresses": ["10.244.1.2"], "nodeName": "node-1"},
            {"addresses": ["10.244.1.3"], "nodeName": "node-1", "conditions": {"ready": true}},
            {"addresses": ["10.244.1.4"], "nodeName": "node-1",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.2.2"], "nodeName": "node-2"},
        ]));
        let checks = health_checks([(&svc, vec![&s])], &node());
        assert_eq!(
            checks,
            vec![HealthCheck {
                service: key(),
                port: 32000,
                local_endpoints: 2
            }]
        );
    }

    #[test]
    fn terminating_only_local_endpoints_fail_the_check_as_in_kube_proxy() {
        let svc: Service = serde_json::from_str(SERVICE).unwrap();
        let s = slice(serde_json::json!([
            {"addresses": ["10.244.1.4"], "nodeName": "node-1",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
        ]));
        assert_eq!(
            health_checks([(&svc, vec![&s])], &node())[0].local_endpoints,
            0
        );
    }

    #[test]
    fn services_without_local_policy_or_health_port_have_no_check() {
        let mut svc: Service = serde_json::from_str(SERVICE).unwrap();
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Cluster".into());
        assert!(health_checks([(&svc, vec![])], &node()).is_empty());
        let mut svc: Service = serde_json::from_str(SERVICE).unwrap();
        svc.spec.as_mut().unwrap().health_check_node_port = None;
        assert!(health_checks([(&svc, vec![])], &node()).is_empty());
    }

    #[test]
    fn the_body_is_kube_proxys_json() {
        let r = response(&key(), 2);
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            r.body(),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(r.body()).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(h["X-Load-Balancing-Endpoint-Weight"], "2");
        assert_eq!(h["X-Content-Type-Options"], "nosniff");
        assert_eq!(
            response(&key(), 0).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    async fn get(port: u16) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// A port the kernel just found free (bound then released): another
    /// process may take it before the server binds it, so use it through
    /// [`serve_on_a_free_port`].
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    /// Makes `server` serve one check with `n` endpoints on a free port and
    /// returns the port; when another process took the port between the
    /// probe and the server's bind (the update leaves it unbound), tries
    /// another one.
    fn serve_on_a_free_port(server: &mut HealthCheckServer, n: usize) -> u16 {
        for _ in 0..20 {
            let port = free_port();
            server.update(vec![check(port, n)]);
            if server.ports() == [port] {
                return port;
            }
        }
        panic!("no free loopback port could be bound in 20 tries");
    }

    fn check(port: u16, n: usize) -> HealthCheck {
        HealthCheck {
            service: key(),
            port,
            local_endpoints: n,
        }
    }

    #[tokio::test]
    async fn ports_answer_200_or_503_and_counts_change_without_rebinding() {
        let mut server = HealthCheckServer::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let port = serve_on_a_free_port(&mut server, 0);
        let out = get(port).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        assert!(out.contains("\"localEndpoints\": 0"), "{out}");
        assert!(
            out.contains("X-Load-Balancing-Endpoint-Weight: 0\r\n"),
            "{out}"
        );

        // The same task keeps serving: the count changed in place.
        let task_before = server.listeners[&port].task.id();
        server.update(vec![check(port, 3)]);
        assert_eq!(server.listeners[&port].task.id(), task_before);
        let out = get(port).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("Content-Type: application/json\r\n"), "{out}");
        assert!(out.contains("X-Content-Type-Options: nosniff\r\n"), "{out}");
        assert!(
            out.contains("X-Load-Balancing-Endpoint-Weight: 3\r\n"),
            "{out}"
        );
        assert!(out.contains("\"localEndpoints\": 3"), "{out}");
    }

    #[tokio::test]
    async fn removing_a_port_closes_its_listener() {
        let mut server = HealthCheckServer::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let port = serve_on_a_free_port(&mut server, 1);
        assert!(get(port).await.unwrap().starts_with("HTTP/1.1 200"));
        server.update(vec![]);
        assert!(server.ports().is_empty());
        let mut refused = false;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused, "port {port} still accepts connections");
    }

    #[tokio::test]
    async fn a_busy_port_is_retried_on_the_next_update() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let mut server = HealthCheckServer::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        server.update(vec![check(port, 1)]);
        assert!(server.ports().is_empty());
        drop(busy);
        server.update(vec![check(port, 1)]);
        assert_eq!(server.ports(), vec![port]);
        assert!(get(port).await.unwrap().starts_with("HTTP/1.1 200"));
    }
}
