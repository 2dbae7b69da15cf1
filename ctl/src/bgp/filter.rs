//! `tabbyctl bgp filter create|list|delete`: Calico's BGPFilter.
//!
//! Rules are given inline, one per flag, as `ACTION [OPERATOR CIDR]
//! [min=N] [max=N]` (`--import-v4 "Accept Equal 0.0.0.0/0"`, `--export-v4
//! "Reject In 10.244.0.0/16 min=32"`, `--import-v4 Reject`), or as a YAML
//! (or JSON) file holding a Calico BGPFilter (`kind: BGPFilter`, `metadata`,
//! `spec`) or just its spec with a name.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tabby_ipam::resources::{
    self, BgpFilter, BgpFilterRule, FilterAction, MatchOperator, PrefixLength, ResourceError,
};
use tabby_ipam::DatastoreError;

use crate::table::{Align, Table};

#[derive(Debug, Subcommand)]
pub enum FilterCommand {
    /// Create a filter from inline rules or a file.
    Create(FilterArgs),
    /// List filters and their rules.
    List,
    /// Delete a filter (refused while a peer names it).
    Delete {
        /// The filter's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Unique name (else the file's metadata.name or name).
    #[arg(long)]
    name: Option<String>,
    /// A rule for the routes this node installs, in order.
    #[arg(long = "import-v4", value_name = "RULE", value_parser = parse_rule)]
    import_v4: Vec<BgpFilterRule>,
    /// A rule for the routes this node announces, in order.
    #[arg(long = "export-v4", value_name = "RULE", value_parser = parse_rule)]
    export_v4: Vec<BgpFilterRule>,
    /// A BGPFilter as YAML or JSON; inline rules are appended to its own.
    #[arg(long)]
    file: Option<PathBuf>,
}

/// Parses `ACTION [OPERATOR CIDR] [min=N] [max=N]`.
pub fn parse_rule(text: &str) -> Result<BgpFilterRule, String> {
    let mut words = text.split_whitespace();
    let action = match words.next().map(str::to_ascii_lowercase).as_deref() {
        Some("accept") => FilterAction::Accept,
        Some("reject") => FilterAction::Reject,
        _ => return Err(format!("{text:?}: a rule starts with Accept or Reject")),
    };
    let mut rule = BgpFilterRule {
        action,
        cidr: None,
        match_operator: None,
        prefix_length: None,
    };
    let mut words = words.peekable();
    if let Some(op) = words.next_if(|w| !w.contains('=')) {
        rule.match_operator = Some(match op.to_ascii_lowercase().as_str() {
            "equal" => MatchOperator::Equal,
            "in" => MatchOperator::In,
            "notin" => MatchOperator::NotIn,
            _ => return Err(format!("{text:?}: {op} is not Equal, In or NotIn")),
        });
        let cidr = words.next().ok_or(format!("{text:?}: {op} needs a CIDR"))?;
        rule.cidr = Some(
            cidr.parse()
                .map_err(|e| format!("{text:?}: CIDR {cidr}: {e}"))?,
        );
    }
    for w in words {
        let len = rule.prefix_length.get_or_insert_with(PrefixLength::default);
        let (key, value) = w
            .split_once('=')
            .ok_or(format!("{text:?}: unexpected {w}"))?;
        let value: u8 = value
            .parse()
            .map_err(|_| format!("{text:?}: {w} is no length"))?;
        match key {
            "min" => len.min = Some(value),
            "max" => len.max = Some(value),
            _ => return Err(format!("{text:?}: {key} is not min or max")),
        }
    }
    rule.validate().map_err(|e| format!("{text:?}: {e}"))?;
    Ok(rule)
}

/// The inline form of a rule, as [`parse_rule`] reads it.
pub fn show_rule(r: &BgpFilterRule) -> String {
    let mut out = format!("{:?}", r.action);
    if let (Some(op), Some(cidr)) = (r.match_operator, r.cidr) {
        out += &format!(" {op:?} {cidr}");
    }
    if let Some(len) = r.prefix_length {
        for (k, v) in [("min", len.min), ("max", len.max)] {
            if let Some(v) = v {
                out += &format!(" {k}={v}");
            }
        }
    }
    out
}

/// Reads a BGPFilter file: a Calico object or a bare spec with a name.
fn read_file(path: &PathBuf) -> anyhow::Result<BgpFilter> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut value: serde_norway::Value =
        serde_norway::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    if let Some(spec) = value.get("spec").cloned() {
        if value.get("kind").and_then(|k| k.as_str()) != Some("BGPFilter") {
            bail!("{}: kind must be BGPFilter", path.display());
        }
        let name = value.get("metadata").and_then(|m| m.get("name")).cloned();
        value = spec;
        if let (Some(name), Some(map)) = (name, value.as_mapping_mut()) {
            map.insert("name".into(), name);
        }
    }
    if let Some(map) = value.as_mapping_mut() {
        map.entry("name".into()).or_insert_with(|| "".into());
    }
    serde_norway::from_value(value)
        .with_context(|| format!("read BGPFilter from {}", path.display()))
}

pub fn run(ds: &crate::Store, cmd: FilterCommand) -> anyhow::Result<()> {
    match cmd {
        FilterCommand::Create(a) => {
            let mut filter = match &a.file {
                Some(path) => read_file(path)?,
                None => BgpFilter::default(),
            };
            if let Some(name) = a.name {
                filter.name = name;
            }
            if filter.name.is_empty() {
                bail!("a filter needs a name: --name, or metadata.name in the file");
            }
            filter.import_v4.extend(a.import_v4);
            filter.export_v4.extend(a.export_v4);
            match resources::create_bgp_filter(ds, &filter) {
                Err(ResourceError::Datastore(DatastoreError::Conflict { .. })) => {
                    bail!("BGP filter {} already exists", filter.name)
                }
                r => r.context("create BGP filter")?,
            }
            println!("Successfully created BGP filter {}", filter.name);
        }
        FilterCommand::List => {
            let mut t = Table::new(&[
                ("NAME", Align::Left),
                ("LIST", Align::Left),
                ("RULE", Align::Left),
            ]);
            for f in resources::bgp_filters(ds)? {
                let rules = f.import_v4.iter().map(|r| ("importV4", r));
                let rules = rules.chain(f.export_v4.iter().map(|r| ("exportV4", r)));
                let mut any = false;
                for (list, r) in rules {
                    t.row(vec![f.name.clone(), list.into(), show_rule(r)]);
                    any = true;
                }
                if !any {
                    t.row(vec![f.name.clone(), "-".into(), "(no rules)".into()]);
                }
            }
            print!("{}", t.plain());
        }
        FilterCommand::Delete { name } => {
            if !resources::delete_bgp_filter(ds, &name)? {
                bail!("BGP filter {name} does not exist");
            }
            println!("Successfully deleted BGP filter {name}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_rules_read_and_print_the_same() {
        for text in [
            "Accept Equal 0.0.0.0/0",
            "Reject In 10.244.0.0/16 min=26 max=32",
            "Accept NotIn 10.0.0.0/8 max=24",
            "Reject",
        ] {
            assert_eq!(show_rule(&parse_rule(text).unwrap()), text);
        }
        assert_eq!(
            parse_rule("accept in 10.0.0.0/8").unwrap().match_operator,
            Some(MatchOperator::In)
        );
    }

    #[test]
    fn bad_inline_rules_say_what_is_wrong() {
        for (text, why) in [
            ("Allow", "Accept or Reject"),
            ("Accept Near 10.0.0.0/8", "not Equal, In or NotIn"),
            ("Accept In", "needs a CIDR"),
            ("Accept In 10.0.0.0/33", "CIDR"),
            ("Accept In 10.0.0.0/8 len=3", "not min or max"),
            ("Accept Equal 10.0.0.0/8 min=9", "Equal"),
        ] {
            let err = parse_rule(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
