//! The proxier's sync state machine over a fake dataplane (no root).

mod proxy_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy_support::{load, node, parse_objects, upserts};
use tabby_proxy::conntrack::NoConntrack;
use tabby_proxy::error::{Error, Result};
use tabby_proxy::iptables::Dataplane;
use tabby_proxy::model::ServiceKey;
use tabby_proxy::proxier::{Proxier, ProxyEvent, SyncConfig};
use tabby_proxy::ProxyOptions;

/// Records payloads; fails the next restore on demand.
#[derive(Default)]
struct FakeDataplane {
    saved: String,
    payloads: Vec<String>,
    fail_next: bool,
    saves: usize,
}

impl Dataplane for FakeDataplane {
    fn save(&mut self) -> Result<String> {
        self.saves += 1;
        Ok(self.saved.clone())
    }
    fn restore(&mut self, payload: &str) -> Result<()> {
        if std::mem::take(&mut self.fail_next) {
            return Err(Error::Stdin {
                program: "fake".into(),
                source: std::io::ErrorKind::BrokenPipe.into(),
            });
        }
        self.payloads.push(payload.to_string());
        Ok(())
    }
}

/// Records each restored payload with the (tokio) time it was applied.
#[derive(Default)]
struct Recording {
    syncs: Arc<Mutex<Vec<(tokio::time::Instant, String)>>>,
}

impl Dataplane for Recording {
    fn save(&mut self) -> Result<String> {
        Ok(String::new())
    }
    fn restore(&mut self, payload: &str) -> Result<()> {
        let now = tokio::time::Instant::now();
        self.syncs.lock().unwrap().push((now, payload.to_string()));
        Ok(())
    }
}

type P = Proxier<FakeDataplane, NoConntrack>;

fn proxier() -> P {
    Proxier::new(
        node(),
        ProxyOptions::default(),
        SyncConfig::default(),
        FakeDataplane::default(),
        NoConntrack::default(),
    )
}

fn feed(p: &mut P, yaml: &str) {
    upserts(parse_objects(yaml)).for_each(|e| p.apply_event(e));
}

fn feed_scenario(p: &mut P, name: &str) {
    upserts(load(name)).for_each(|e| p.apply_event(e));
}

const DNS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, protocol: UDP, port: 53}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, protocol: UDP, port: 53}]
endpoints:
- {addresses: [10.244.1.53], nodeName: worker-node1}
- {addresses: [10.244.2.53], nodeName: worker-node2}
"#;

const DNS_ONE_LEFT: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, protocol: UDP, port: 53}]
endpoints:
- {addresses: [10.244.1.53], nodeName: worker-node1}
"#;

/// Named `proxy` so that `cargo test -p tabby-node proxy` selects these tests.
mod proxy {
    use super::*;

    #[test]
    fn first_sync_is_full_and_inserts_the_jump_rules() {
        let mut p = proxier();
        feed_scenario(&mut p, "hello-service");
        let r = p.sync(Instant::now()).unwrap();
        assert!(r.full);
        let text = &p.dataplane_mut().payloads[0];
        assert!(text.contains("-I PREROUTING -m comment --comment \"kubernetes service portals\" -j TABBY-SERVICES"), "{text}");
        assert!(text.contains(":TABBY-SVC-WR2LASOULGGSX3JN - [0:0]"));
        assert_eq!(p.metrics().full_syncs(), 1);
    }

    #[test]
    fn full_sync_deletes_stale_tabby_chains_found_in_the_kernel_but_not_foreign_ones() {
        let mut p = proxier();
        p.dataplane_mut().saved =
            "*nat\n:TABBY-SEP-OLDOLDOLDOLDOLD1 - [0:0]\n:KUBE-SEP-XYZ - [0:0]\nCOMMIT\n".into();
        feed_scenario(&mut p, "hello-service");
        p.sync(Instant::now()).unwrap();
        let text = &p.dataplane_mut().payloads[0];
        assert!(text.contains("-X TABBY-SEP-OLDOLDOLDOLDOLD1\n"));
        assert!(!text.contains("KUBE-SEP-XYZ"));
    }

    #[test]
    fn later_syncs_are_partial_and_write_only_changed_service_chains() {
        let mut p = proxier();
        feed_scenario(&mut p, "hello-service");
        feed(&mut p, DNS);
        let t0 = Instant::now();
        p.sync(t0).unwrap();
        feed(&mut p, DNS_ONE_LEFT);
        let r = p.sync(t0 + Duration::from_secs(2)).unwrap();
        assert!(!r.full);
        let text = p.dataplane_mut().payloads[1].clone();
        // The DNS chains are rewritten; hello-service's are not, but it stays dispatched.
        assert!(text.contains(":TABBY-SVC-"), "{text}");
        assert!(!text.contains(":TABBY-SVC-WR2LASOULGGSX3JN"), "{text}");
        assert!(text.contains("-j TABBY-SVC-WR2LASOULGGSX3JN"), "{text}");
        // The removed endpoint's chain is flushed and deleted.
        let gone = tabby_proxy::names::sep_chain("kube-system/dns:dns", "udp", "10.244.2.53:53");
        assert!(
            text.contains(&format!(":{gone} - [0:0]")) && text.contains(&format!("-X {gone}\n")),
            "{text}"
        );
        assert!(
            !text.contains("-I "),
            "partial syncs do not touch built-in chains"
        );
        assert_eq!(
            p.dataplane_mut().saves,
            1,
            "only full syncs read the tables"
        );
    }

    #[test]
    fn removing_a_udp_endpoint_flushes_its_conntrack_entries() {
        let mut p = proxier();
        feed(&mut p, DNS);
        let t0 = Instant::now();
        p.sync(t0).unwrap();
        feed(&mut p, DNS_ONE_LEFT);
        p.sync(t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(
            p.metrics().conntrack_deletes(),
            2,
            "one for new service at first sync, one for the removed endpoint"
        );
    }

    #[test]
    fn a_deleted_service_loses_all_its_chains() {
        let mut p = proxier();
        feed_scenario(&mut p, "session-affinity");
        let t0 = Instant::now();
        p.sync(t0).unwrap();
        p.apply_event(ProxyEvent::ServiceDelete(ServiceKey {
            namespace: "default".into(),
            name: "svc-clusterip".into(),
        }));
        p.sync(t0 + Duration::from_secs(2)).unwrap();
        let text = p.dataplane_mut().payloads[1].clone();
        for c in [
            "TABBY-SVC-KBDEBIL6IU6WL7RF",
            "TABBY-SEP-TBW2IYJKUCAC7GB3",
            "TABBY-SEP-DOIEFYKPESCDTYCH",
            "TABBY-SEP-K7ALM6KJRBAYOHKX",
        ] {
            assert!(
                text.contains(&format!("-X {c}\n")),
                "{c} not deleted:\n{text}"
            );
        }
        assert!(!text.contains("-A TABBY-SERVICES -d 10.200.1.201"));
    }

    #[test]
    fn a_failed_restore_makes_the_next_sync_full() {
        let mut p = proxier();
        feed(&mut p, DNS);
        let t0 = Instant::now();
        p.sync(t0).unwrap();
        feed(&mut p, DNS_ONE_LEFT);
        p.dataplane_mut().fail_next = true;
        assert!(p.sync(t0 + Duration::from_secs(2)).is_err());
        assert_eq!(p.metrics().partial_restore_failures(), 1);
        let r = p.sync(t0 + Duration::from_secs(4)).unwrap();
        assert!(r.full);
    }

    #[test]
    fn syncs_are_rate_limited_and_periodic() {
        let cfg = SyncConfig {
            min_sync_period: Duration::from_secs(1),
            max_sync_period: Duration::from_secs(30),
            full_resync_period: Duration::from_secs(300),
        };
        let mut p = Proxier::new(
            node(),
            ProxyOptions::default(),
            cfg,
            FakeDataplane::default(),
            NoConntrack::default(),
        );
        let t0 = Instant::now();
        assert_eq!(p.next_deadline(t0), Some(t0), "the first sync is immediate");
        p.sync(t0).unwrap();
        assert_eq!(
            p.next_deadline(t0),
            Some(t0 + Duration::from_secs(30)),
            "idle: periodic"
        );
        feed(&mut p, DNS);
        assert_eq!(
            p.next_deadline(t0),
            Some(t0 + Duration::from_secs(1)),
            "a change waits for the minimum period"
        );
        assert!(p.sync_if_due(t0 + Duration::from_millis(500)).is_none());
        assert!(
            !p.sync_if_due(t0 + Duration::from_secs(1))
                .unwrap()
                .unwrap()
                .full
        );
        // After full_resync_period, a sync is full again.
        assert!(p.sync(t0 + Duration::from_secs(301)).unwrap().full);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_the_minimum_period_coalesce_into_one_sync_and_a_later_change_syncs_at_once(
    ) {
        let cfg = SyncConfig {
            min_sync_period: Duration::from_secs(1),
            max_sync_period: Duration::from_secs(30),
            full_resync_period: Duration::from_secs(300),
        };
        let dataplane = Recording::default();
        let syncs = Arc::clone(&dataplane.syncs);
        let p = Proxier::new(
            node(),
            ProxyOptions::default(),
            cfg,
            dataplane,
            NoConntrack::default(),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let t0 = tokio::time::Instant::now();
        let task = tokio::spawn(p.run(rx));
        let (services, slices) = parse_objects(DNS);
        let (_, one_left) = parse_objects(DNS_ONE_LEFT);
        let at = |ms: u64| t0 + Duration::from_millis(ms);

        // Two changes 100 ms and 300 ms after the first sync (at t0)...
        tokio::time::sleep_until(at(100)).await;
        tx.send(ProxyEvent::ServiceUpsert(Box::new(services[0].clone())))
            .await
            .unwrap();
        tokio::time::sleep_until(at(300)).await;
        tx.send(ProxyEvent::SliceUpsert(Box::new(slices[0].clone())))
            .await
            .unwrap();
        // ... and one 1.5 s after the second sync, when the period has run out.
        tokio::time::sleep_until(at(2500)).await;
        tx.send(ProxyEvent::SliceUpsert(Box::new(one_left[0].clone())))
            .await
            .unwrap();
        tokio::time::sleep_until(at(3000)).await;
        drop(tx);
        let p = task.await.unwrap();

        // The clock is paused: the loop wakes exactly at its deadlines.
        let syncs = syncs.lock().unwrap().clone();
        let times: Vec<Duration> = syncs.iter().map(|(t, _)| *t - t0).collect();
        assert_eq!(
            times,
            [0, 1000, 2500].map(Duration::from_millis),
            "syncs at the start, one min_sync_period after it (both changes), and at once for the late change"
        );
        let second = &syncs[1].1;
        let gone = tabby_proxy::names::sep_chain("kube-system/dns:dns", "udp", "10.244.2.53:53");
        assert!(second.contains("10.96.0.10/32"), "{second}");
        assert!(second.contains(&format!(":{gone} - [0:0]")), "{second}");
        let third = &syncs[2].1;
        assert!(third.contains(&format!("-X {gone}\n")), "{third}");
        assert_eq!(p.applied().unwrap().ports.len(), 1);
        assert!(
            p.metrics().conntrack_deletes() >= 1,
            "new UDP service flushes its cluster IP entries"
        );
    }
}
