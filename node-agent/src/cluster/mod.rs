//! Where the agent's [`ClusterView`] comes from (`cluster` in the config):
//!
//! - `files`: the agent reads the datastore every `poll_interval_ms`
//!   ([`crate::register::load_view`], any backend);
//! - `kubernetes`: [`kubernetes::ClusterWatch`] reflects Nodes and the
//!   Tabby CRDs from the API and publishes a new view on every change, so
//!   the agent recomputes at once; between changes its poll tick re-plans
//!   the latest view without reading anything.
//!
//! Both give the same [`ClusterView`]: the watch decodes its objects with
//! the datastore's own read path ([`objects`]), so nothing downstream
//! (BGP peers, routes, status, the proxy's node facts) knows the source.

pub mod kubernetes;
pub mod objects;

use std::sync::Arc;

use tokio::sync::watch;

use crate::desired::ClusterView;

/// What a watch has published.
#[derive(Debug, Clone)]
pub enum Watched {
    /// Not every kind was listed yet: these are still pending.
    Pending(Vec<String>),
    /// The view of the stores after the latest change.
    Synced(Arc<ClusterView>),
}

/// The receiving end of a watch: the latest [`Watched`].
pub type ViewRx = watch::Receiver<Watched>;

/// Waits for the next view from `rx`; never resolves without a watch.
/// `false`: the watch ended.
pub async fn changed(rx: &mut Option<ViewRx>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}
