//! Golden files of the generated payloads for the seeds' scenarios, in both
//! modes: `NAME.rules` (`iptables-restore`) and `NAME.nft` (`nft -f`, a full
//! sync on a node without the table). Regenerate with
//! `TABBY_UPDATE_GOLDEN=1 cargo test -p tabby-proxy --test proxy_golden`.

mod proxy_support;

use proxy_support::{golden_path, load, node_for, ruleset};
use tabby_proxy::payload::{render_full, Extras};
use tabby_proxy::ProxyOptions;

fn check(name: &str) {
    let payload = render_full(&ruleset(name), [], &Extras::default());
    compare(name, "rules", &payload.text);
    let (services, slices) = load(name);
    let plan = tabby_proxy::nftables::generate(
        &services,
        &slices,
        &node_for(name),
        &ProxyOptions::default(),
    );
    let nft = tabby_proxy::nftables::render_full(&plan, &Default::default());
    compare(name, "nft", &nft.text);
}

fn compare(name: &str, ext: &str, text: &str) {
    let path = golden_path(&format!("{name}.{ext}"));
    if std::env::var_os("TABBY_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "read {} ({e}); run with TABBY_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    if want != text {
        let diff: Vec<String> = want
            .lines()
            .zip(text.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .map(|(i, (a, b))| format!("line {}:\n  want {a}\n  got  {b}", i + 1))
            .collect();
        panic!(
            "{name}: payload differs from {}:\n{}",
            path.display(),
            diff.join("\n")
        );
    }
}

/// Named `proxy` so that `cargo test -p tabby-node proxy` selects these tests.
mod proxy {
    use super::*;

    #[test]
    fn hello_service_with_three_endpoints_matches_golden() {
        check("hello-service");
    }

    #[test]
    fn nodeport_30080_matches_golden() {
        check("nodeport");
    }

    #[test]
    fn session_affinity_with_timeout_30_matches_golden() {
        check("session-affinity");
    }

    #[test]
    fn external_ips_match_golden() {
        check("external-ips");
    }

    #[test]
    fn service_without_endpoints_matches_golden() {
        check("no-endpoints");
    }

    #[test]
    fn traffic_policies_lb_multiport_terminating_headless_and_externalname_match_golden() {
        check("features");
    }
}
