//! Errors of the service proxy's side effects (rule generation cannot fail).

use std::path::PathBuf;

/// A failure to program or inspect the kernel's tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A helper program could not be started.
    #[error("run {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// A helper program ran and failed.
    #[error("{program} exited with {status}: {stderr}")]
    Failed {
        /// The program.
        program: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// Writing the payload to a helper's stdin failed.
    #[error("write payload to {program}")]
    Stdin {
        /// The program.
        program: PathBuf,
        /// The write error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed (the nftables netlink socket).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A helper program printed something that could not be parsed.
    #[error("parse the output of {what}")]
    Parse {
        /// The command.
        what: String,
        /// Why it could not be parsed.
        #[source]
        source: serde_json::Error,
    },
}

/// An error and its sources, `: `-separated, for logs (`error = %chain(&e)`).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    tabby_errors::chain(e).to_string()
}

/// Result of the proxy's side effects.
pub type Result<T, E = Error> = std::result::Result<T, E>;
