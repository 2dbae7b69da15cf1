//! `/healthz`, `/readyz` and `/metrics` on the node's loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::agent::Shared;
use tabby_proxy::http::{self, Response};

/// Serves the endpoints from the agent's shared snapshot. The agent is
/// healthy while its loop keeps passing (within ten poll intervals).
pub async fn serve(listener: TcpListener, shared: Arc<Mutex<Shared>>, poll: Duration) {
    http::serve(listener, move |path| {
        let Ok(s) = shared.lock() else {
            return Response::text(503, "state poisoned\n");
        };
        match path {
            "/healthz" | "/livez" => match s.last_pass {
                Some(t) if t.elapsed() <= poll * 10 => Response::text(200, "ok\n"),
                Some(t) => Response::text(
                    503,
                    format!("the agent loop last ran {:?} ago\n", t.elapsed()),
                ),
                None => Response::text(503, "starting\n"),
            },
            "/readyz" => {
                if s.ready {
                    Response::text(200, "ready\n")
                } else {
                    Response::text(503, "not ready: first datastore pass pending\n")
                }
            }
            "/metrics" => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: metrics(&s) + &s.proxy_metrics,
            },
            _ => Response::text(404, "not found\n"),
        }
    })
    .await;
}

/// Prometheus text exposition of the agent's counters.
pub fn metrics(s: &Shared) -> String {
    let up = s.status.peers.iter().filter(|p| p.state == "up").count();
    let down = s.status.peers.len() - up;
    format!(
        "# HELP tabby_bgp_peers BGP peers by session state.\n# TYPE tabby_bgp_peers gauge\n\
         tabby_bgp_peers{{state=\"established\"}} {up}\ntabby_bgp_peers{{state=\"other\"}} {down}\n\
         # HELP tabby_bgp_routes_learned Prefixes learned from peers.\n# TYPE tabby_bgp_routes_learned gauge\n\
         tabby_bgp_routes_learned {}\n\
         # HELP tabby_bgp_prefixes_originated Prefixes this node advertises.\n# TYPE tabby_bgp_prefixes_originated gauge\n\
         tabby_bgp_prefixes_originated {}\n\
         # HELP tabby_routes_installed Kernel routes owned by tabby-node.\n# TYPE tabby_routes_installed gauge\n\
         tabby_routes_installed {}\n\
         # HELP tabby_route_errors_total Failed route changes.\n# TYPE tabby_route_errors_total counter\n\
         tabby_route_errors_total {}\n",
        s.learned, s.originated, s.routes.installed, s.routes.errors
    )
}
