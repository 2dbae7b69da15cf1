//! Rendering a plan as `nft -f` input: one file, one transaction.
//!
//! A full payload creates what is missing and rewrites the rest without
//! deleting the table (that would drop the affinity sets' clients): `add`
//! for every chain, set and map, `flush chain` for every chain (planned or
//! stale), `flush` for the fixed sets and maps, then rules and elements, and
//! last `delete` for stale chains and affinity sets, which nothing
//! references any more at that point of the transaction.
//!
//! A partial payload touches only the services that changed: new chains,
//! `flush chain` + rules for changed ones, `flush chain` for removed ones
//! (the next full sync deletes them; `delete chain` makes nft 1.0.6 list the
//! whole table first), and element deletions and additions. An endpoint
//! replaced in a service whose endpoint count stays is element operations
//! only (its endpoint map slots and its `hairpin` pair), which the kernel
//! commits without revalidating the table's chains. (`delete element`
//! makes nft 1.0.6 list every chain first, about 35 ms of its time at 10k
//! services: the one cost left in such a change.)
//!
//! Only commands that spare nft its full cache are used where the choice
//! exists: rules go in as `add chain T C { r ; r ; }` (not `add rule`, which
//! makes nft list every chain), elements as `add map T M { type … ;
//! elements = { … } ; }` (not `add element`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use super::ir::{AffinitySet, Chain, Key, Stmt, Value};
use super::netlink::{NftBatch, SetOp};
use super::plan::{NftPlan, NftPort, FAMILY, HAIRPIN, SETS, TABLE};
use super::rewrite::{Builder, NftRewrite};
use super::slots::shard_sets;
use crate::model::ServiceKey;
use crate::payload::Payload;

/// What a full sync found in the kernel's `ip tabby-proxy` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftKernel {
    /// Every chain of the table.
    pub chains: BTreeSet<String>,
    /// Every set of the table that is not a fixed one, with its timeout.
    pub affinity: BTreeMap<String, Option<u32>>,
}

struct Out {
    text: String,
    p: Payload,
}

impl Out {
    fn new(capacity: usize) -> Self {
        Self {
            text: String::with_capacity(capacity),
            p: Payload::default(),
        }
    }

    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        let _ = self.text.write_fmt(args);
        self.text.push('\n');
    }

    fn declare(&mut self, c: &Chain) {
        match &c.hook {
            Some(h) => self.line(format_args!(
                "add chain {FAMILY} {TABLE} {} {{ {h} }}",
                c.name
            )),
            None => self.line(format_args!("add chain {FAMILY} {TABLE} {}", c.name)),
        }
    }

    fn flush(&mut self, chain: &str) {
        self.line(format_args!("flush chain {FAMILY} {TABLE} {chain}"));
    }

    fn rules(&mut self, c: &Chain) {
        if c.rules.is_empty() {
            return;
        }
        let _ = write!(self.text, "add chain {FAMILY} {TABLE} {} {{ ", c.name);
        for r in &c.rules {
            let _ = write!(self.text, "{r} ; ");
        }
        self.text.push_str("}\n");
        self.p.nat_rules += c.rules.len();
    }

    fn affinity(&mut self, s: &AffinitySet) {
        self.line(format_args!(
            "add set {FAMILY} {TABLE} {} {}",
            s.name,
            s.spec()
        ));
    }

    /// `add map T M { type … ; elements = { … } ; }` for each set with elements.
    fn add_elements<'a>(
        &mut self,
        elems: impl IntoIterator<Item = (&'static str, &'a Key, Option<&'a Value>)>,
    ) {
        let mut by_set: HashMap<&str, Vec<(&Key, Option<&Value>)>> = HashMap::new();
        for (set, key, value) in elems {
            by_set.entry(set).or_default().push((key, value));
        }
        for (set, ty) in fixed_sets() {
            let Some(elems) = by_set.get(set) else {
                continue;
            };
            self.p.elements += elems.len();
            let kind = set_kind(ty);
            let _ = write!(
                self.text,
                "add {kind} {FAMILY} {TABLE} {set} {{ {ty} ; elements = {{ "
            );
            for (i, (key, value)) in elems.iter().enumerate() {
                if i > 0 {
                    self.text.push_str(", ");
                }
                let _ = match value {
                    Some(v) => write!(self.text, "{key} : {v}"),
                    None => write!(self.text, "{key}"),
                };
            }
            self.text.push_str(" } ; }\n");
        }
    }

    fn delete_elements<'a>(&mut self, keys: impl IntoIterator<Item = (&'static str, &'a Key)>) {
        let mut by_set: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (set, key) in keys {
            by_set.entry(set).or_default().push(key.to_string());
        }
        for (set, keys) in by_set {
            self.p.elements += keys.len();
            self.line(format_args!(
                "delete element {FAMILY} {TABLE} {set} {{ {} }}",
                keys.join(", ")
            ));
        }
    }

    /// `add map` for the endpoint maps `chains` use: nft resolves a map a
    /// rule names from the file (it reads no cache for these commands).
    fn declare_maps<'a>(&mut self, chains: impl Iterator<Item = &'a Chain>) {
        let used: BTreeSet<&str> = chains
            .flat_map(|c| &c.rules)
            .flat_map(|r| &r.stmts)
            .filter_map(|s| match s {
                Stmt::DnatMap { map, .. } => Some(*map),
                _ => None,
            })
            .collect();
        for (set, ty) in fixed_sets().filter(|(s, _)| used.contains(s)) {
            self.line(format_args!("add map {FAMILY} {TABLE} {set} {{ {ty} ; }}"));
        }
    }

    fn finish(mut self) -> Payload {
        self.p.text = self.text;
        self.p
    }
}

/// The sets and maps every sync declares, with their types: the fixed ones, then the endpoint maps.
pub fn fixed_sets() -> impl Iterator<Item = (&'static str, &'static str)> {
    SETS.into_iter().chain(shard_sets())
}

fn set_kind(ty: &str) -> &'static str {
    if ty.contains(':') {
        "map"
    } else {
        "set"
    }
}

/// Every element of a plan, by set and key (the first claim of a key winning).
type Elements<'a> = BTreeMap<(&'static str, &'a Key), Option<&'a Value>>;

/// The payload of a full sync over what `kernel` holds.
pub fn render_full(plan: &NftPlan, kernel: &NftKernel) -> Payload {
    full_text(plan, kernel, &plan.elements())
}

/// The payload of a full sync with its netlink batch ([`render_full`] and
/// [`render_rewrite`] over one list of elements).
pub fn render_full_sync(plan: &NftPlan, kernel: &NftKernel) -> Payload {
    let elements = plan.elements();
    let mut payload = full_text(plan, kernel, &elements);
    payload.rewrite = rewrite(plan, kernel, &elements);
    payload
}

fn full_text(plan: &NftPlan, kernel: &NftKernel, elements: &Elements<'_>) -> Payload {
    let mut out = Out::new(estimate(plan));
    out.line(format_args!("add table {FAMILY} {TABLE}"));
    let planned: BTreeSet<&str> = plan.chains().map(|c| c.name.as_str()).collect();
    for c in plan.chains() {
        out.declare(c);
        out.p.nat_chains += 1;
    }
    let every: BTreeSet<&str> = planned
        .iter()
        .copied()
        .chain(kernel.chains.iter().map(String::as_str))
        .collect();
    for name in every {
        out.flush(name);
    }
    for (set, ty) in fixed_sets() {
        let kind = set_kind(ty);
        out.line(format_args!(
            "add {kind} {FAMILY} {TABLE} {set} {{ {ty} ; }}"
        ));
        out.line(format_args!("flush {kind} {FAMILY} {TABLE} {set}"));
    }
    for (s, retimed) in affinity_sets(plan, kernel) {
        if retimed {
            out.line(format_args!("delete set {FAMILY} {TABLE} {}", s.name));
        }
        out.affinity(s);
    }
    for c in plan.chains() {
        out.rules(c);
    }
    out.add_elements(elements.iter().map(|((s, k), v)| (*s, *k, *v)));
    let stale = Stale::of(plan, &planned, kernel);
    for chain in stale.chains {
        out.line(format_args!("delete chain {FAMILY} {TABLE} {chain}"));
        out.p.deleted_chains += 1;
    }
    for set in stale.sets {
        out.line(format_args!("delete set {FAMILY} {TABLE} {set}"));
    }
    out.finish()
}

/// The plan's affinity sets, each once, with whether the kernel holds the
/// set with another timeout (which an `add` cannot change: the set is
/// replaced).
fn affinity_sets<'a>(
    plan: &'a NftPlan,
    kernel: &'a NftKernel,
) -> impl Iterator<Item = (&'a AffinitySet, bool)> + 'a {
    let mut seen = BTreeSet::new();
    plan.affinity_sets()
        .filter(move |s| seen.insert(s.name.as_str()))
        .map(|s| {
            let retimed = kernel
                .affinity
                .get(&s.name)
                .is_some_and(|t| *t != Some(s.timeout));
            (s, retimed)
        })
}

/// What the kernel holds that the plan no longer has, deleted last in a
/// full sync.
struct Stale<'a> {
    chains: Vec<&'a str>,
    sets: Vec<&'a str>,
}

impl<'a> Stale<'a> {
    /// `planned`: the names of the plan's chains.
    fn of(plan: &NftPlan, planned: &BTreeSet<&str>, kernel: &'a NftKernel) -> Self {
        let sets: BTreeSet<&str> = plan.affinity_sets().map(|s| s.name.as_str()).collect();
        Stale {
            chains: (kernel.chains.iter().map(String::as_str))
                .filter(|c| !planned.contains(c))
                .collect(),
            sets: (kernel.affinity.keys().map(String::as_str))
                .filter(|s| !sets.contains(s))
                .collect(),
        }
    }
}

/// The full sync of [`render_full`] as one netlink batch, with the short
/// `nft -f` input that declares the table's sets and maps first. `None`
/// when an affinity set's timeout changed (the file replaces that set) or
/// an element cannot be encoded: the text applies then.
pub fn render_rewrite(plan: &NftPlan, kernel: &NftKernel) -> Option<NftRewrite> {
    rewrite(plan, kernel, &plan.elements())
}

fn rewrite(plan: &NftPlan, kernel: &NftKernel, elements: &Elements<'_>) -> Option<NftRewrite> {
    let mut skeleton = String::with_capacity(64 * 1024);
    let _ = writeln!(skeleton, "add table {FAMILY} {TABLE}");
    for (set, ty) in fixed_sets() {
        let kind = set_kind(ty);
        let _ = writeln!(skeleton, "add {kind} {FAMILY} {TABLE} {set} {{ {ty} ; }}");
    }
    for (s, retimed) in affinity_sets(plan, kernel) {
        if retimed {
            return None;
        }
        let _ = writeln!(skeleton, "add set {FAMILY} {TABLE} {} {}", s.name, s.spec());
    }
    let mut b = Builder::default();
    for c in plan.chains() {
        b.chain(c);
    }
    b.flush_rules();
    for (set, _) in fixed_sets() {
        b.flush_set(set);
    }
    for c in plan.chains() {
        b.rules(c);
    }
    let mut by_set: HashMap<&str, Vec<(&Key, Option<&Value>)>> = HashMap::new();
    for ((set, key), value) in elements {
        by_set.entry(set).or_default().push((key, *value));
    }
    for (set, _) in fixed_sets() {
        if let Some(elems) = by_set.get(set) {
            b.elements(set, elems);
        }
    }
    let planned: BTreeSet<&str> = plan.chains().map(|c| c.name.as_str()).collect();
    let stale = Stale::of(plan, &planned, kernel);
    for chain in stale.chains {
        b.delete_chain(chain);
    }
    for set in stale.sets {
        b.delete_set(set);
    }
    b.finish(skeleton)
}

fn estimate(plan: &NftPlan) -> usize {
    4096 + plan
        .ports
        .values()
        .map(|p| {
            p.chains
                .iter()
                .map(|c| 120 + c.rules.len() * 100)
                .sum::<usize>()
                + 200
        })
        .sum::<usize>()
}

/// The ports of one service in a plan.
fn service_ports<'a>(plan: &'a NftPlan, key: &ServiceKey) -> Vec<&'a NftPort> {
    let start = (key.clone(), String::new(), crate::model::Protocol::Tcp);
    plan.ports
        .range(start..)
        .take_while(|(k, _)| &k.0 == key)
        .map(|(_, p)| p.as_ref())
        .collect()
}

/// The services whose ports differ between the plans (unchanged ports share their `Arc`).
fn changed_services(previous: &NftPlan, plan: &NftPlan) -> BTreeSet<ServiceKey> {
    let mut out = BTreeSet::new();
    for (key, cur) in &plan.ports {
        match previous.ports.get(key) {
            Some(prev) if Arc::ptr_eq(prev, cur) || prev == cur => {}
            _ => {
                out.insert(key.0.clone());
            }
        }
    }
    for key in previous.ports.keys() {
        if !plan.ports.contains_key(key) {
            out.insert(key.0.clone());
        }
    }
    out
}

/// How many service ports claim each `hairpin` pair (an endpoint address
/// can serve several): a pair is deleted when its last claim goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims(HashMap<Key, u32>);

impl Claims {
    /// The claims of every port of `plan`.
    pub fn of(plan: &NftPlan) -> Self {
        let mut c = Self::default();
        c.add(plan.ports.values().map(AsRef::as_ref));
        c
    }

    fn pairs<'a>(ports: impl IntoIterator<Item = &'a NftPort>) -> impl Iterator<Item = &'a Key> {
        ports
            .into_iter()
            .flat_map(|p| &p.elements)
            .filter(|e| e.set == HAIRPIN)
            .map(|e| &e.key)
    }

    fn add<'a>(&mut self, ports: impl IntoIterator<Item = &'a NftPort>) {
        for k in Self::pairs(ports) {
            *self.0.entry(k.clone()).or_default() += 1;
        }
    }

    fn remove<'a>(&mut self, ports: impl IntoIterator<Item = &'a NftPort>) {
        for k in Self::pairs(ports) {
            if let Some(n) = self.0.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.0.remove(k);
                }
            }
        }
    }

    fn claimed(&self, k: &Key) -> bool {
        self.0.contains_key(k)
    }
}

/// The payload moving the kernel from `previous` to `plan` (both whole plans).
pub fn render_partial(previous: &NftPlan, plan: &NftPlan) -> Payload {
    let mut claims = Claims::of(previous);
    render_changes(
        previous,
        plan,
        &changed_services(previous, plan),
        &mut claims,
    )
}

/// The payload moving the kernel from `previous` to `plan` where only the
/// services `changed` differ: `previous` needs to hold only their ports
/// (and the fixed chains), so the work grows with the change, not with the
/// table. `claims` (of `previous`) become those of `plan`.
pub fn render_changes(
    previous: &NftPlan,
    plan: &NftPlan,
    changed: &BTreeSet<ServiceKey>,
    claims: &mut Claims,
) -> Payload {
    let mut out = Out::new(4096);
    let fixed_changed = previous.fixed != plan.fixed;
    let mut new_chains: Vec<&Chain> = Vec::new();
    let mut rewrite: Vec<&Chain> = Vec::new();
    let mut removed: Vec<&str> = Vec::new();
    let mut new_sets: Vec<&AffinitySet> = Vec::new();
    let mut respec: Vec<&AffinitySet> = Vec::new();
    let mut del_elems: BTreeSet<(&'static str, &Key)> = BTreeSet::new();
    let mut add_elems: BTreeMap<(&'static str, &Key), Option<&Value>> = BTreeMap::new();
    if fixed_changed {
        rewrite.extend(plan.fixed.iter());
    }
    for svc in changed {
        let (before, after) = (service_ports(previous, svc), service_ports(plan, svc));
        claims.remove(before.iter().copied());
        claims.add(after.iter().copied());
        let old_sets: BTreeMap<&str, u32> = before
            .iter()
            .flat_map(|p| &p.affinity)
            .map(|s| (s.name.as_str(), s.timeout))
            .collect();
        let mut sets_changed = false;
        for s in after.iter().flat_map(|p| &p.affinity) {
            match old_sets.get(s.name.as_str()) {
                None => new_sets.push(s),
                Some(t) if *t != s.timeout => {
                    respec.push(s);
                    sets_changed = true;
                }
                Some(_) => {}
            }
        }
        let old: BTreeMap<&str, &Chain> = before
            .iter()
            .flat_map(|p| &p.chains)
            .map(|c| (c.name.as_str(), c))
            .collect();
        let cur: BTreeSet<&str> = after
            .iter()
            .flat_map(|p| &p.chains)
            .map(|c| c.name.as_str())
            .collect();
        for c in after.iter().flat_map(|p| &p.chains) {
            match old.get(c.name.as_str()) {
                None => new_chains.push(c),
                Some(o) if sets_changed || o.rules != c.rules => rewrite.push(c),
                Some(_) => {}
            }
        }
        removed.extend(old.keys().copied().filter(|c| !cur.contains(c)));
        diff_elements(&before, &after, &mut del_elems, &mut add_elems);
    }
    for c in &new_chains {
        out.declare(c);
        out.p.nat_chains += 1;
    }
    for s in &new_sets {
        out.affinity(s);
    }
    for c in rewrite
        .iter()
        .map(|c| c.name.as_str())
        .chain(removed.iter().copied())
    {
        out.flush(c);
    }
    for s in &respec {
        out.line(format_args!("delete set {FAMILY} {TABLE} {}", s.name));
        out.affinity(s);
    }
    del_elems.retain(|(set, k)| *set != HAIRPIN || !claims.claimed(k));
    let elements_only = new_chains.is_empty()
        && rewrite.is_empty()
        && removed.is_empty()
        && new_sets.is_empty()
        && respec.is_empty();
    if elements_only {
        out.p.batch = Some(batch(&del_elems, &add_elems));
    }
    out.delete_elements(del_elems);
    out.add_elements(add_elems.into_iter().map(|((s, k), v)| (s, k, v)));
    out.declare_maps(new_chains.iter().chain(&rewrite).copied());
    for c in new_chains.iter().chain(&rewrite) {
        out.rules(c);
    }
    out.p.nat_chains += rewrite.len();
    out.finish()
}

/// The element changes as one batch: deletions per set, then additions per set.
fn batch(
    del: &BTreeSet<(&'static str, &Key)>,
    add: &BTreeMap<(&'static str, &Key), Option<&Value>>,
) -> NftBatch {
    let mut ops: Vec<SetOp> = Vec::new();
    let mut push = |delete: bool, set: &'static str, key: &Key, value: Option<&Value>| {
        match ops.last_mut() {
            Some(op) if op.delete == delete && op.set == set => {}
            _ => ops.push(SetOp {
                delete,
                set,
                elements: Vec::new(),
            }),
        }
        if let Some(op) = ops.last_mut() {
            op.elements.push((key.clone(), value.cloned()));
        }
    };
    for (set, key) in del {
        push(true, set, key, None);
    }
    for ((set, key), value) in add {
        push(false, set, key, *value);
    }
    NftBatch { ops }
}

/// Element changes of one service: deletions (gone or changed) and additions (new or changed).
fn diff_elements<'a>(
    before: &[&'a NftPort],
    after: &[&'a NftPort],
    del: &mut BTreeSet<(&'static str, &'a Key)>,
    add: &mut BTreeMap<(&'static str, &'a Key), Option<&'a Value>>,
) {
    let collect = |ports: &[&'a NftPort]| {
        let mut m: BTreeMap<(&'static str, &'a Key), Option<&'a Value>> = BTreeMap::new();
        for e in ports.iter().flat_map(|p| &p.elements) {
            m.entry((e.set, &e.key)).or_insert(e.value.as_ref());
        }
        m
    };
    let (old, new) = (collect(before), collect(after));
    for (k, v) in &old {
        if new.get(k) != Some(v) {
            del.insert(*k);
        }
    }
    for (k, v) in new {
        if old.get(&k) != Some(&v) {
            add.insert(k, v);
        }
    }
}
