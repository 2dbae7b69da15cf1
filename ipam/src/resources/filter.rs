//! `BGPFilter`: accept/reject rules for the routes a node imports from and
//! exports to the BGP peers whose `filters` name it (Calico's resource).
//!
//! ```yaml
//! name: allow-default
//! importV4:
//!   - action: Accept
//!     matchOperator: Equal
//!     cidr: 0.0.0.0/0
//! exportV4:
//!   - action: Reject
//!     matchOperator: In
//!     cidr: 10.244.0.0/16
//!     prefixLength: { min: 32 }
//! ```
//!
//! Rules are tried in order, first the filters' in the order the peer names
//! them; the first matching rule decides. A route no rule matches gets
//! Tabby's default: exported; imported from other Tabby nodes when inside a
//! pool, from external peers when outside every pool and not the default
//! route (where Calico's default is Accept).

use ipnetwork::Ipv4Network;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FilterAction {
    /// Let the route through.
    Accept,
    /// Drop it.
    Reject,
}

/// How `cidr` is compared with a route's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum MatchOperator {
    /// The prefix is `cidr`.
    Equal,
    /// The prefix is inside `cidr` (or is it), its length in `prefixLength`.
    In,
    /// Not `In`.
    NotIn,
}

/// Bounds on the prefix length for `In` and `NotIn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
pub struct PrefixLength {
    /// Shortest length (default: the CIDR's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u8>,
    /// Longest length (default: 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u8>,
}

/// One rule; without `cidr` it matches every route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpFilterRule {
    /// Accept or Reject.
    pub action: FilterAction,
    /// The CIDR to compare with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub cidr: Option<Ipv4Network>,
    /// How to compare; required with `cidr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_operator: Option<MatchOperator>,
    /// Prefix length bounds, with `In` or `NotIn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_length: Option<PrefixLength>,
}

impl BgpFilterRule {
    /// Checks the rule; the reason when it cannot work as written.
    pub fn validate(&self) -> Result<(), String> {
        let (cidr, op) = match (self.cidr, self.match_operator) {
            (None, None) if self.prefix_length.is_some() => {
                return Err("prefixLength needs a cidr and matchOperator In or NotIn".into())
            }
            (None, None) => return Ok(()),
            (Some(c), Some(op)) => (c, op),
            (Some(_), None) => return Err("a cidr needs a matchOperator".into()),
            (None, Some(_)) => return Err("a matchOperator needs a cidr".into()),
        };
        if cidr.ip() != cidr.network() {
            return Err(format!(
                "cidr {cidr} has host bits set (did you mean {}/{}?)",
                cidr.network(),
                cidr.prefix()
            ));
        }
        let Some(len) = self.prefix_length else {
            return Ok(());
        };
        if op == MatchOperator::Equal {
            return Err("prefixLength does not apply to matchOperator Equal".into());
        }
        let (min, max) = (len.min.unwrap_or(cidr.prefix()), len.max.unwrap_or(32));
        if !(cidr.prefix() <= min && min <= max && max <= 32) {
            return Err(format!(
                "prefixLength {min}..{max} must lie within {}..32",
                cidr.prefix()
            ));
        }
        Ok(())
    }
}

/// A named set of import and export rules for IPv4.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpFilter {
    /// Unique name, referenced by BGPPeer `filters`.
    pub name: String,
    /// Rules for the routes this node announces.
    #[serde(default, rename = "exportV4")]
    pub export_v4: Vec<BgpFilterRule>,
    /// Rules for the routes this node installs.
    #[serde(default, rename = "importV4")]
    pub import_v4: Vec<BgpFilterRule>,
}

impl BgpFilter {
    /// Checks the name and every rule.
    pub fn validate(&self) -> Result<(), String> {
        super::check_name(&self.name)?;
        for (list, rules) in [("exportV4", &self.export_v4), ("importV4", &self.import_v4)] {
            for (i, rule) in rules.iter().enumerate() {
                rule.validate()
                    .map_err(|e| format!("{list} rule {}: {e}", i + 1))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> BgpFilterRule {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_filter_reads_calicos_field_names() {
        let f: BgpFilter = serde_json::from_str(
            r#"{"name":"f","importV4":[{"action":"Accept","matchOperator":"In","cidr":"55.0.0.0/16","prefixLength":{"min":30}}],
                "exportV4":[{"action":"Reject"}]}"#,
        )
        .unwrap();
        assert_eq!(
            f.import_v4[0].prefix_length,
            Some(PrefixLength {
                min: Some(30),
                max: None
            })
        );
        assert_eq!(f.export_v4[0].action, FilterAction::Reject);
        assert_eq!(f.validate(), Ok(()));
        let back: BgpFilter = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn rules_that_cannot_work_are_refused_with_a_reason() {
        for (json, reason) in [
            (
                r#"{"action":"Accept","cidr":"10.0.0.0/8"}"#,
                "needs a matchOperator",
            ),
            (
                r#"{"action":"Accept","matchOperator":"In"}"#,
                "needs a cidr",
            ),
            (
                r#"{"action":"Accept","matchOperator":"In","cidr":"10.1.0.0/8"}"#,
                "did you mean 10.0.0.0/8",
            ),
            (
                r#"{"action":"Accept","matchOperator":"Equal","cidr":"10.0.0.0/8","prefixLength":{"min":9}}"#,
                "Equal",
            ),
            (
                r#"{"action":"Accept","matchOperator":"In","cidr":"10.0.0.0/8","prefixLength":{"min":7}}"#,
                "within 8..32",
            ),
            (
                r#"{"action":"Accept","matchOperator":"In","cidr":"10.0.0.0/8","prefixLength":{"min":26,"max":24}}"#,
                "within",
            ),
            (
                r#"{"action":"Accept","prefixLength":{"max":24}}"#,
                "needs a cidr",
            ),
        ] {
            let err = rule(json).validate().unwrap_err();
            assert!(err.contains(reason), "{json}: {err}");
        }
        assert!(serde_json::from_str::<BgpFilterRule>(r#"{"action":"Allow"}"#).is_err());
        let bad = BgpFilter {
            name: "a/b".into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
