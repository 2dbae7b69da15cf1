//! Tests of the file backend: the scanner step by step, then the task.

use super::*;

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80, targetPort: 8080}]
"#;

const WEB_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - addresses: [10.244.1.2]
    nodeName: node-1
"#;

const DNS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, protocol: UDP, port: 53}]
"#;

/// Writes atomically, as the lab does (temp file, then rename).
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A compact description of events, for comparing.
fn describe(events: &[ProxyEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            ProxyEvent::ServiceUpsert(s) => format!("+svc {}", ServiceKey::of(&s.metadata)),
            ProxyEvent::ServiceDelete(k) => format!("-svc {k}"),
            ProxyEvent::SliceUpsert(s) => format!(
                "+slice {}/{}",
                s.metadata.namespace.as_deref().unwrap_or("?"),
                s.metadata.name.as_deref().unwrap_or("?")
            ),
            ProxyEvent::SliceDelete(ns, n) => format!("-slice {ns}/{n}"),
            other => format!("{other:?}"),
        })
        .collect()
}

fn scanner() -> (tempfile::TempDir, Scanner) {
    let dir = tempfile::tempdir().unwrap();
    let s = Scanner::new(dir.path().to_path_buf());
    (dir, s)
}

#[test]
fn a_new_file_sends_its_objects_once() {
    let (dir, mut s) = scanner();
    write(dir.path(), "web.yaml", &format!("{WEB}---{WEB_SLICE}"));
    assert_eq!(
        describe(&s.scan()),
        ["+svc default/web", "+slice default/web-abc"]
    );
    assert!(s.scan().is_empty(), "an unchanged directory sends nothing");
}

#[test]
fn a_multi_document_file_with_other_kinds_and_empty_documents() {
    let (dir, mut s) = scanner();
    let text = format!(
        "---\n{WEB}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\n{DNS}---\n{WEB_SLICE}---\n"
    );
    write(dir.path(), "all.yml", &text);
    assert_eq!(
        describe(&s.scan()),
        [
            "+svc default/web",
            "+svc kube-system/dns",
            "+slice default/web-abc"
        ]
    );
}

#[test]
fn a_changed_file_sends_only_what_changed_and_deletes_what_left() {
    let (dir, mut s) = scanner();
    write(
        dir.path(),
        "a.yaml",
        &format!("{WEB}---{DNS}---{WEB_SLICE}"),
    );
    s.scan();
    let changed = WEB_SLICE.replace("10.244.1.2", "10.244.1.3");
    write(dir.path(), "a.yaml", &format!("{WEB}---{changed}"));
    assert_eq!(
        describe(&s.scan()),
        ["-svc kube-system/dns", "+slice default/web-abc"]
    );
    let ev = s.scan();
    assert!(ev.is_empty());
}

#[test]
fn a_deleted_file_deletes_its_objects() {
    let (dir, mut s) = scanner();
    write(dir.path(), "web.yaml", &format!("{WEB}---{WEB_SLICE}"));
    write(dir.path(), "dns.yaml", DNS);
    s.scan();
    std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
    assert_eq!(
        describe(&s.scan()),
        ["-svc default/web", "-slice default/web-abc"]
    );
}

#[test]
fn a_broken_file_keeps_its_previous_objects_until_fixed() {
    let (dir, mut s) = scanner();
    write(dir.path(), "web.yaml", WEB);
    s.scan();
    write(
        dir.path(),
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [oops\n",
    );
    assert!(s.scan().is_empty(), "nothing lost on a broken file");
    assert!(s.scan().is_empty(), "not re-read until it changes");
    // A schema error counts as broken too.
    write(
        dir.path(),
        "web.yaml",
        &WEB.replace("port: 80", "port: eighty"),
    );
    assert!(s.scan().is_empty());
    write(
        dir.path(),
        "web.yaml",
        &WEB.replace("10.96.0.20", "10.96.0.21"),
    );
    assert_eq!(describe(&s.scan()), ["+svc default/web"]);
}

#[test]
fn a_broken_new_file_adds_nothing_and_is_read_when_fixed() {
    let (dir, mut s) = scanner();
    write(dir.path(), "web.yaml", "kind: Service\n  bad: indent\n: :");
    assert!(s.scan().is_empty());
    write(dir.path(), "web.yaml", WEB);
    assert_eq!(describe(&s.scan()), ["+svc default/web"]);
}

#[test]
fn a_missing_directory_holds_nothing_until_it_appears() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("resources");
    let mut s = Scanner::new(dir.clone());
    assert!(s.scan().is_empty());
    assert!(!dir.exists(), "the scanner creates nothing");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "web.yaml", WEB);
    assert_eq!(describe(&s.scan()), ["+svc default/web"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(describe(&s.scan()), ["-svc default/web"]);
}

#[test]
fn other_files_and_api_versions_are_ignored() {
    let (dir, mut s) = scanner();
    write(dir.path(), "web.json", WEB);
    write(dir.path(), "notes.txt", WEB);
    write(
        dir.path(),
        "old.yaml",
        &WEB_SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"),
    );
    assert!(s.scan().is_empty());
}

#[test]
fn an_object_moved_between_files_is_not_deleted() {
    let (dir, mut s) = scanner();
    write(dir.path(), "a.yaml", WEB);
    s.scan();
    write(dir.path(), "b.yaml", WEB);
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    assert!(s.scan().is_empty());
}

#[test]
fn list_items_and_missing_names() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n  - {}",
        serde_json::to_string(&serde_norway::from_str::<serde_json::Value>(DNS).unwrap()).unwrap()
    );
    let objects = parse(&list).unwrap();
    assert_eq!(objects.len(), 1);
    let nameless = "apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n";
    assert!(matches!(parse(nameless), Err(yaml::Error::NoName { .. })));
}

async fn next(rx: &mut mpsc::Receiver<ProxyEvent>) -> ProxyEvent {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an event within 5 s")
        .expect("the source is running")
}

#[tokio::test]
async fn the_task_sends_everything_then_changes_and_stops_when_the_receiver_closes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &format!("{WEB}---{WEB_SLICE}"));
    let (tx, mut rx) = mpsc::channel(16);
    let source = FileClusterState {
        dir: dir.path().to_path_buf(),
        interval: Duration::from_millis(10),
    };
    let task = tokio::spawn(source.run(tx));
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(next(&mut rx).await);
    }
    assert_eq!(
        describe(&first),
        [
            "+svc default/web",
            "+slice default/web-abc",
            "SourceSynced(Services)",
            "SourceSynced(EndpointSlices)"
        ],
        "the first complete read, then the sync marks, once"
    );
    write(dir.path(), "dns.yaml", DNS);
    assert_eq!(describe(&[next(&mut rx).await]), ["+svc kube-system/dns"]);
    std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
    let gone = vec![next(&mut rx).await, next(&mut rx).await];
    assert_eq!(
        describe(&gone),
        ["-svc default/web", "-slice default/web-abc"]
    );
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the source stops when the receiver is gone")
        .unwrap();
}
