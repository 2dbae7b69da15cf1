//! The error type of the dataplane crate.
//!
//! Every variant says which object the failed operation was about (the
//! namespace path, the link name, the route as `ip route` prints it) and keeps
//! the kernel's answer as its source, so a message reads like
//! `add route "10.0.0.5/32 dev #7 scope link": Network is unreachable (os error 101)`.

use std::io;
use std::path::PathBuf;

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed dataplane operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The network namespace path does not exist (ENOENT).
    #[error("network namespace {} not found", path.display())]
    NetnsNotFound {
        /// The path that was opened.
        path: PathBuf,
    },

    /// Opening or inspecting a network namespace path failed for a reason
    /// other than its absence.
    #[error("open network namespace {}", path.display())]
    NetnsOpen {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// The path exists but is not a network namespace (not on nsfs).
    #[error("{} is not a network namespace", path.display())]
    NotANetns {
        /// The path that was opened.
        path: PathBuf,
    },

    /// `setns(2)` into a network namespace failed.
    #[error("enter network namespace {}", path.display())]
    Setns {
        /// The namespace that could not be entered.
        path: PathBuf,
        /// The errno of `setns(2)`.
        #[source]
        source: nix::Error,
    },

    /// Opening the rtnetlink socket or starting its runtime failed.
    #[error("open netlink socket in {}", netns.display())]
    Socket {
        /// The namespace the socket was opened in.
        netns: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// The object to create already exists (EEXIST).
    #[error("{what}: already exists")]
    Exists {
        /// The operation and object, e.g. `add route "default via 169.254.1.1 dev #2"`.
        what: String,
    },

    /// A netlink request failed. `what` names the operation and the object,
    /// e.g. `create veth tabby1234 (peer eth0)` or
    /// `add route "169.254.1.1 dev #3 scope link"`.
    #[error("{what}")]
    Netlink {
        /// The operation and the object it was about.
        what: String,
        /// The kernel's errno as an I/O error (`raw_os_error()` holds it),
        /// or the rtnetlink error wrapped in an I/O error of kind `Other`.
        #[source]
        source: io::Error,
    },

    /// A route that cannot be expressed as a netlink message, e.g. an IPv6
    /// destination with an IPv4 gateway.
    #[error("invalid route {route:?}: {reason}")]
    InvalidRoute {
        /// The route as `ip route` would print it.
        route: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Reading or writing a sysctl under `/proc/sys` failed.
    #[error("{op} sysctl {key}")]
    Sysctl {
        /// `read` or `write`.
        op: &'static str,
        /// The key, e.g. `net/ipv4/conf/eth0/forwarding`.
        key: String,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// A sysctl key that is empty, absolute or contains `..`.
    #[error("invalid sysctl key {key:?}")]
    InvalidSysctlKey {
        /// The rejected key.
        key: String,
    },
}

impl Error {
    /// Builds the error of a failed netlink request: EEXIST becomes
    /// [`Error::Exists`], any other errno is kept as the source.
    pub(crate) fn netlink(what: impl Into<String>, err: rtnetlink::Error) -> Error {
        let what = what.into();
        let source = match err {
            rtnetlink::Error::NetlinkError(msg) => match msg.code {
                Some(code) => io::Error::from_raw_os_error(-code.get()),
                None => io::Error::other(rtnetlink::Error::NetlinkError(msg)),
            },
            other => io::Error::other(other),
        };
        if source.raw_os_error() == Some(libc::EEXIST) {
            Error::Exists { what }
        } else {
            Error::Netlink { what, source }
        }
    }

    /// The kernel's errno, when the error came from a system call or a
    /// netlink error message.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::NetnsNotFound { .. } => Some(libc::ENOENT),
            Error::Exists { .. } => Some(libc::EEXIST),
            Error::NetnsOpen { source, .. }
            | Error::Socket { source, .. }
            | Error::Netlink { source, .. }
            | Error::Sysctl { source, .. } => source.raw_os_error(),
            Error::Setns { source, .. } => Some(*source as i32),
            Error::NotANetns { .. }
            | Error::InvalidRoute { .. }
            | Error::InvalidSysctlKey { .. } => None,
        }
    }

    /// True when the object is already gone: a missing namespace, link
    /// (ENODEV), route (ESRCH), address (EADDRNOTAVAIL) or file (ENOENT).
    /// Teardown treats these as success.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL)
        )
    }

    /// True when the kernel lacks the feature (EOPNOTSUPP: "Unknown device
    /// type" for a link kind whose module it has not, or cannot load).
    pub fn is_unsupported(&self) -> bool {
        matches!(self.errno(), Some(libc::EOPNOTSUPP))
    }

    /// True when the object to create already exists (EEXIST).
    pub fn is_exists(&self) -> bool {
        matches!(self, Error::Exists { .. })
    }
}
