//! The CNI specification versions Tabby speaks.

use crate::error::{CniError, Code};

/// A supported `cniVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    /// 0.3.0 (results as 0.3.1).
    V0_3_0,
    /// 0.3.1.
    V0_3_1,
    /// 0.4.0: adds CHECK.
    V0_4_0,
    /// 1.0.0: drops `ips[].version`.
    V1_0_0,
    /// 1.1.0: adds GC and STATUS.
    V1_1_0,
}

/// Every version, oldest first, as VERSION reports them.
pub const SUPPORTED: [CniVersion; 5] = [
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

impl CniVersion {
    /// The newest version, used for errors when the config could not be read.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// Parses a `cniVersion` string; an unknown one is CNI error 1.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "0.3.0" => Self::V0_3_0,
            "0.3.1" => Self::V0_3_1,
            "0.4.0" => Self::V0_4_0,
            "1.0.0" => Self::V1_0_0,
            "1.1.0" => Self::V1_1_0,
            other => {
                let list: Vec<&str> = SUPPORTED.iter().map(|v| v.as_str()).collect();
                return Err(CniError::new(
                    Code::IncompatibleVersion,
                    format!(
                        "unsupported cniVersion {other:?}: tabby supports {}",
                        list.join(", ")
                    ),
                ));
            }
        })
    }

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results carry `ips[].version` (the 0.x formats).
    pub fn has_ip_version_field(self) -> bool {
        self < Self::V1_0_0
    }

    /// Whether CHECK exists in this version.
    pub fn supports_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// Whether GC and STATUS exist in this version.
    pub fn supports_gc(self) -> bool {
        self >= Self::V1_1_0
    }
}

/// The VERSION answer.
pub fn version_info() -> String {
    let list: Vec<&str> = SUPPORTED.iter().map(|v| v.as_str()).collect();
    serde_json::json!({"cniVersion": CniVersion::LATEST.as_str(), "supportedVersions": list})
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_round_trips() {
        for v in SUPPORTED {
            assert_eq!(CniVersion::parse(v.as_str()).unwrap(), v);
        }
    }

    #[test]
    fn an_unknown_version_is_error_code_1_naming_the_supported_ones() {
        let e = CniVersion::parse("0.2.0").unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        assert!(
            e.msg.contains("1.1.0") && e.msg.contains("0.2.0"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn only_old_versions_carry_the_ip_version_field() {
        assert!(CniVersion::V0_4_0.has_ip_version_field());
        assert!(!CniVersion::V1_0_0.has_ip_version_field());
        assert!(!CniVersion::V0_3_1.supports_check());
        assert!(CniVersion::V1_1_0.supports_gc());
    }
}
