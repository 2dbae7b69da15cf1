//! `/healthz` (`/livez`), `/readyz` and `/metrics` on the node's loopback,
//! as an axum router served by hyper (`tabby_proxy::http_server`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::agent::Shared;

/// The content type of prometheus-client's text encoding.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the handlers read.
#[derive(Clone)]
struct Endpoints {
    shared: Arc<Mutex<Shared>>,
    registry: Arc<Registry>,
    poll: Duration,
}

/// Serves the endpoints: health and readiness from the agent's shared
/// snapshot (healthy while its loop keeps passing, within ten poll
/// intervals), metrics from `registry`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Mutex<Shared>>,
    registry: Arc<Registry>,
    poll: Duration,
) {
    tabby_proxy::http_server::serve(listener, router(shared, registry, poll)).await;
}

/// The routes; any other path is 404, any method but GET (and HEAD) 405.
pub fn router(shared: Arc<Mutex<Shared>>, registry: Arc<Registry>, poll: Duration) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(Endpoints {
            shared,
            registry,
            poll,
        })
}

const POISONED: (StatusCode, &str) = (StatusCode::SERVICE_UNAVAILABLE, "state poisoned\n");

async fn healthz(State(e): State<Endpoints>) -> Response {
    let Ok(s) = e.shared.lock() else {
        return POISONED.into_response();
    };
    match s.last_pass {
        Some(t) if t.elapsed() <= e.poll * 10 => (StatusCode::OK, "ok\n".to_string()),
        Some(t) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent loop last ran {:?} ago\n", t.elapsed()),
        ),
        None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string()),
    }
    .into_response()
}

async fn readyz(State(e): State<Endpoints>) -> Response {
    let Ok(s) = e.shared.lock() else {
        return POISONED.into_response();
    };
    if s.ready && !s.encap_errors.is_empty() {
        let body = format!("not ready: {}\n", s.encap_errors.join("; "));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else if s.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else if !s.waiting_for.is_empty() {
        let kinds = s.waiting_for.join(", ");
        let body = format!("not ready: waiting for the first list of {kinds}\n");
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: first datastore pass pending\n",
        )
            .into_response()
    }
}

async fn metrics(State(e): State<Endpoints>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &e.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests;
