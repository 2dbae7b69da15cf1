//! The mirror step by step: what a watcher's events become.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn svc(name: &str, version: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some(name.into()),
            resource_version: Some(version.into()),
            ..ObjectMeta::default()
        },
        ..Service::default()
    }
}

fn describe(events: &[ProxyEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            ProxyEvent::ServiceUpsert(s) => format!(
                "+svc {} @{}",
                ServiceKey::of(&s.metadata),
                s.metadata.resource_version.as_deref().unwrap_or("?")
            ),
            ProxyEvent::ServiceDelete(k) => format!("-svc {k}"),
            other => format!("{other:?}"),
        })
        .collect()
}

fn step(m: &mut Mirror<Service>, event: watcher::Event<Service>) -> Vec<String> {
    describe(&m.on(event))
}

#[test]
fn the_first_list_sends_its_objects_then_synced_once() {
    let mut m = Mirror::default();
    assert!(step(&mut m, watcher::Event::Init).is_empty());
    assert_eq!(
        step(&mut m, watcher::Event::InitApply(svc("a", "1"))),
        ["+svc ns/a @1"]
    );
    assert_eq!(
        step(&mut m, watcher::Event::InitDone),
        ["SourceSynced(Services)"]
    );
    assert_eq!(
        step(&mut m, watcher::Event::Apply(svc("a", "2"))),
        ["+svc ns/a @2"]
    );
    assert_eq!(
        step(&mut m, watcher::Event::Delete(svc("a", "3"))),
        ["-svc ns/a"]
    );
    assert!(
        step(&mut m, watcher::Event::Delete(svc("a", "3"))).is_empty(),
        "a delete of what is not known sends nothing"
    );
}

#[test]
fn a_relist_deletes_what_it_lost_and_does_not_resend_what_did_not_change() {
    let mut m = Mirror::default();
    step(&mut m, watcher::Event::Init);
    step(&mut m, watcher::Event::InitApply(svc("kept", "1")));
    step(&mut m, watcher::Event::InitApply(svc("changed", "2")));
    step(&mut m, watcher::Event::InitApply(svc("gone", "3")));
    step(&mut m, watcher::Event::InitDone);
    // The watch broke; the watcher lists again.
    assert!(step(&mut m, watcher::Event::Init).is_empty());
    assert!(step(&mut m, watcher::Event::InitApply(svc("kept", "1"))).is_empty());
    assert_eq!(
        step(&mut m, watcher::Event::InitApply(svc("changed", "7"))),
        ["+svc ns/changed @7"]
    );
    assert_eq!(
        step(&mut m, watcher::Event::InitApply(svc("new", "8"))),
        ["+svc ns/new @8"]
    );
    assert_eq!(
        step(&mut m, watcher::Event::InitDone),
        ["-svc ns/gone"],
        "the re-list lost `gone`; synced is not sent again"
    );
    // A third list that lost everything deletes everything.
    step(&mut m, watcher::Event::Init);
    let mut all = step(&mut m, watcher::Event::InitDone);
    all.sort();
    assert_eq!(all, ["-svc ns/changed", "-svc ns/kept", "-svc ns/new"]);
}

#[test]
fn a_list_broken_halfway_restarts_its_key_set() {
    let mut m = Mirror::default();
    step(&mut m, watcher::Event::Init);
    step(&mut m, watcher::Event::InitApply(svc("a", "1")));
    step(&mut m, watcher::Event::InitApply(svc("b", "2")));
    step(&mut m, watcher::Event::InitDone);
    step(&mut m, watcher::Event::Init);
    step(&mut m, watcher::Event::InitApply(svc("a", "1")));
    // The list failed on its second page; the watcher starts over.
    step(&mut m, watcher::Event::Init);
    step(&mut m, watcher::Event::InitApply(svc("b", "2")));
    assert_eq!(step(&mut m, watcher::Event::InitDone), ["-svc ns/a"]);
}
