//! Prefix filters: ordered rules that accept or reject IPv4 prefixes, the
//! engine behind Calico-style BGP filters.
//!
//! A rule matches a prefix by CIDR (`Equal`: the same prefix; `In`: inside
//! the CIDR, with an optional prefix-length range; `NotIn`: not so) or
//! matches every prefix when it names no CIDR. Rules are tried in order and
//! the first match decides ([`decide`]); when none matches the caller's
//! default applies. Pure: the speaker runs export rules per peer, the agent
//! runs import rules with its own defaults.

use ipnetwork::Ipv4Network;

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the prefix through.
    Accept,
    /// Drop the prefix.
    Reject,
}

/// How a rule's CIDR is compared with a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchOperator {
    /// The prefix is the CIDR.
    Equal,
    /// The prefix lies inside the CIDR (or is it), with its length in range.
    In,
    /// Not `In`.
    NotIn,
}

/// A CIDR condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixMatch {
    /// The CIDR.
    pub cidr: Ipv4Network,
    /// How it is compared.
    pub operator: MatchOperator,
    /// Shortest prefix length `In` accepts (default: the CIDR's).
    pub min_len: Option<u8>,
    /// Longest prefix length `In` accepts (default: 32).
    pub max_len: Option<u8>,
}

impl PrefixMatch {
    fn inside(&self, prefix: &Ipv4Network) -> bool {
        let min = self
            .min_len
            .unwrap_or(self.cidr.prefix())
            .max(self.cidr.prefix());
        let max = self.max_len.unwrap_or(32);
        (min..=max).contains(&prefix.prefix()) && self.cidr.contains(prefix.network())
    }

    /// Whether `prefix` satisfies the condition.
    pub fn matches(&self, prefix: &Ipv4Network) -> bool {
        match self.operator {
            MatchOperator::Equal => {
                prefix.prefix() == self.cidr.prefix() && prefix.network() == self.cidr.network()
            }
            MatchOperator::In => self.inside(prefix),
            MatchOperator::NotIn => !self.inside(prefix),
        }
    }
}

/// One rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// What to do with a matching prefix.
    pub action: Action,
    /// The condition; `None` matches every prefix.
    pub prefix: Option<PrefixMatch>,
}

impl Rule {
    /// Whether the rule applies to `prefix`.
    pub fn matches(&self, prefix: &Ipv4Network) -> bool {
        self.prefix.as_ref().is_none_or(|m| m.matches(prefix))
    }
}

/// The action of the first rule matching `prefix`; `None` if none does.
pub fn decide<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    prefix: &Ipv4Network,
) -> Option<Action> {
    rules
        .into_iter()
        .find(|r| r.matches(prefix))
        .map(|r| r.action)
}

/// Whether `prefix` passes `rules` when an unmatched prefix is accepted.
pub fn accepts(rules: &[Rule], prefix: &Ipv4Network) -> bool {
    decide(rules, prefix) != Some(Action::Reject)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn rule(action: Action, cidr: &str, operator: MatchOperator) -> Rule {
        Rule {
            action,
            prefix: Some(PrefixMatch {
                cidr: net(cidr),
                operator,
                min_len: None,
                max_len: None,
            }),
        }
    }

    #[test]
    fn equal_matches_only_the_same_prefix() {
        let r = rule(Action::Accept, "0.0.0.0/0", MatchOperator::Equal);
        assert!(r.matches(&net("0.0.0.0/0")));
        assert!(!r.matches(&net("0.0.0.0/1")));
        assert!(!r.matches(&net("10.0.0.0/8")));
    }

    #[test]
    fn in_matches_the_cidr_and_everything_inside_it() {
        let r = rule(Action::Accept, "10.244.0.0/16", MatchOperator::In);
        assert!(r.matches(&net("10.244.0.0/16")));
        assert!(r.matches(&net("10.244.3.0/26")));
        assert!(r.matches(&net("10.244.255.7/32")));
        assert!(
            !r.matches(&net("10.0.0.0/8")),
            "a larger prefix is not inside"
        );
        assert!(!r.matches(&net("10.245.0.0/26")));
    }

    #[test]
    fn prefix_length_bounds_narrow_in_and_not_in() {
        let mut r = rule(Action::Accept, "10.244.0.0/16", MatchOperator::In);
        r.prefix.as_mut().unwrap().min_len = Some(26);
        r.prefix.as_mut().unwrap().max_len = Some(28);
        assert!(!r.matches(&net("10.244.0.0/24")));
        assert!(r.matches(&net("10.244.0.0/26")));
        assert!(r.matches(&net("10.244.0.16/28")));
        assert!(!r.matches(&net("10.244.0.1/32")));
        r.prefix.as_mut().unwrap().operator = MatchOperator::NotIn;
        assert!(r.matches(&net("10.244.0.0/24")), "too short to be In");
        assert!(r.matches(&net("192.168.0.0/26")));
        assert!(!r.matches(&net("10.244.0.0/26")));
    }

    #[test]
    fn the_first_matching_rule_decides_and_none_leaves_the_default() {
        let rules = [
            rule(Action::Reject, "10.244.9.0/24", MatchOperator::In),
            rule(Action::Accept, "10.244.0.0/16", MatchOperator::In),
            Rule {
                action: Action::Reject,
                prefix: None,
            },
        ];
        assert_eq!(decide(&rules, &net("10.244.9.64/26")), Some(Action::Reject));
        assert_eq!(decide(&rules, &net("10.244.1.0/26")), Some(Action::Accept));
        assert_eq!(decide(&rules, &net("8.8.8.0/24")), Some(Action::Reject));
        assert_eq!(decide(&rules[..2], &net("8.8.8.0/24")), None);
        assert!(accepts(&rules[..2], &net("8.8.8.0/24")));
        assert!(accepts(&[], &net("8.8.8.0/24")));
    }
}
