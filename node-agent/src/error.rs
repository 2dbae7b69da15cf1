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
    /// The datastore failed.
    #[error("datastore")]
    Datastore(#[from] tabby_ipam::DatastoreError),
    /// A kernel call failed.
    #[error("kernel")]
    Dataplane(#[from] tabby_dataplane::Error),
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
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}
