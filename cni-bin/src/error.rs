//! CNI error objects and the one place where failures become CNI codes.

use serde::Serialize;

use crate::version::CniVersion;

/// The error codes of the CNI specification (1.1.0 §"Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// 1: the config's cniVersion is not supported.
    IncompatibleVersion = 1,
    /// 2: a field of the network configuration is not supported.
    UnsupportedField = 2,
    /// 3: the container (netns) is unknown or gone.
    ContainerUnknown = 3,
    /// 4: a required CNI_* environment variable is missing or invalid.
    InvalidEnv = 4,
    /// 5: an I/O failure (netlink, datastore, exec).
    IoFailure = 5,
    /// 6: the config on stdin could not be decoded.
    DecodeFailure = 6,
    /// 7: the network config is invalid.
    InvalidConfig = 7,
    /// 11: transient; the runtime should retry (datastore conflicts).
    TryAgainLater = 11,
    /// 50: STATUS: the plugin cannot serve ADDs.
    NotAvailable = 50,
    /// 100: the IP pool has no free address (plugin-specific).
    PoolExhausted = 100,
}

/// A CNI error: what the plugin prints on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// The spec's code.
    pub code: Code,
    /// A short message an operator can act on.
    pub msg: String,
    /// The chain of causes.
    pub details: String,
}

impl CniError {
    /// An error with no further details.
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// An error whose details are the full source chain of `err`.
    pub fn with_source(
        code: Code,
        msg: impl Into<String>,
        err: &(dyn std::error::Error + 'static),
    ) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: chain(err),
        }
    }

    /// The JSON object of the spec, in the version the caller asked for.
    pub fn to_json(&self, version: CniVersion) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version: version.as_str(),
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&wire)
            .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"error\"}}", self.code as u32))
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.details.is_empty() {
            write!(f, "{} (code {})", self.msg, self.code as u32)
        } else {
            write!(
                f,
                "{}: {} (code {})",
                self.msg, self.details, self.code as u32
            )
        }
    }
}

impl std::error::Error for CniError {}

/// `err: cause: cause...`, each level once.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    tabby_errors::chain(err).to_string()
}

impl From<tabby_ipam::IpamError> for CniError {
    fn from(e: tabby_ipam::IpamError) -> Self {
        use tabby_ipam::{DatastoreError, IpamError};
        let code = match &e {
            IpamError::Exhausted { .. } => Code::PoolExhausted,
            IpamError::NoPool { .. }
            | IpamError::InvalidPool { .. }
            | IpamError::PoolExists { .. } => Code::InvalidConfig,
            IpamError::ConflictStorm { .. }
            | IpamError::Datastore(DatastoreError::Conflict { .. }) => Code::TryAgainLater,
            _ => Code::IoFailure,
        };
        CniError {
            code,
            msg: e.to_string(),
            details: e.source_chain_details(),
        }
    }
}

/// Details for errors whose Display already says what happened.
trait SourceDetails {
    fn source_chain_details(&self) -> String;
}

impl<E: std::error::Error + 'static> SourceDetails for E {
    fn source_chain_details(&self) -> String {
        self.source().map(chain).unwrap_or_default()
    }
}

impl From<tabby_dataplane::Error> for CniError {
    fn from(e: tabby_dataplane::Error) -> Self {
        let code = if matches!(e, tabby_dataplane::Error::NetnsNotFound { .. }) {
            Code::ContainerUnknown
        } else {
            Code::IoFailure
        };
        CniError {
            code,
            msg: e.to_string(),
            details: e.source_chain_details(),
        }
    }
}

/// Result alias of the CNI layer.
pub type Result<T, E = CniError> = std::result::Result<T, E>;

impl From<tabby_ipam::DatastoreError> for CniError {
    fn from(e: tabby_ipam::DatastoreError) -> Self {
        tabby_ipam::IpamError::from(e).into()
    }
}
