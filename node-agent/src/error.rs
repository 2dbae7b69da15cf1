//! Errors of the agent's own layers (the BGP and proxy modules have theirs).

/// Errors that stop the agent from starting or from serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration file or flags are wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Reading the configuration file failed.
    #[error("read configuration {path}")]
    ReadConfig {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Registering this node in the datastore failed.
    #[error("register node {node} in the datastore")]
    Register {
        /// The node's name.
        node: String,
        /// Why.
        #[source]
        source: tabby_ipam::DatastoreError,
    },
    /// Reading what the agent acts on (pools, blocks, nodes, BGP settings) failed.
    #[error("read the cluster view from the datastore")]
    ReadView(#[source] tabby_ipam::DatastoreError),
    /// The cluster watch could not connect to the Kubernetes API.
    #[error("connect the cluster watch to the Kubernetes API")]
    KubeWatch(#[source] tabby_proxy::cluster_state::kubernetes::ConnectError),
    /// The watched Nodes and CRDs do not make a cluster view.
    #[error("build the cluster view from the watched objects")]
    WatchedView(#[source] tabby_ipam::DatastoreError),
    /// Finding the uplink interface over netlink failed.
    #[error("find the uplink interface")]
    Uplink(#[source] tabby_dataplane::Error),
    /// Opening the route thread's netlink sockets failed.
    #[error("open the netlink sockets of the route thread")]
    RouteSockets(#[source] tabby_dataplane::Error),
    /// The service proxy could not connect to the Kubernetes API.
    #[error("connect the service proxy to the Kubernetes API")]
    KubeSource(#[source] tabby_proxy::cluster_state::kubernetes::ConnectError),
    /// A socket or thread could not be set up.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of the agent.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// `err: cause: cause...` for logs, each level once.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    tabby_errors::chain(err).to_string()
}
