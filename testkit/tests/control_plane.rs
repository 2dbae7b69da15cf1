//! The control-plane harness against the real etcd and kube-apiserver:
//! ready, RBAC on, admin and token clients, kubectl, apiserver restart, a
//! persistent directory reused (cold and warm start), and cleanup.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use tabby_testkit::kube::{shared, ControlPlane};

#[test]
fn the_shared_control_plane_serves_the_admin_and_kubectl() {
    let cp = shared();
    let out = cp.kubectl(&["get", "--raw", "/readyz"]).expect("kubectl");
    assert_eq!(out.trim(), "ok");
    let version = cp
        .kubectl(&["version", "-o", "json"])
        .expect("kubectl version");
    assert!(version.contains("v1.36"), "{version}");
    let modes = cp
        .kubectl(&["auth", "can-i", "create", "nodes"])
        .expect("can-i");
    assert_eq!(modes.trim(), "yes", "the admin is in system:masters");
}

#[test]
fn service_account_tokens_authenticate_and_rbac_denies_what_is_not_granted() {
    let cp = shared();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let admin = cp.client();
        let ns = tabby_testkit::unique("cp");
        let namespaces: Api<Namespace> = Api::all(admin.clone());
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.clone());
        namespaces
            .create(&PostParams::default(), &n)
            .await
            .expect("namespace");
        let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
        let mut sa = ServiceAccount::default();
        sa.metadata.name = Some("probe".into());
        sas.create(&PostParams::default(), &sa)
            .await
            .expect("service account");
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![tabby_testkit::kube::SERVICE_ACCOUNT_ISSUER.into()]),
                expiration_seconds: Some(600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = sas
            .create_token_request("probe", &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .expect("token")
            .token
            .expect("token");
        let as_sa: Api<Namespace> = Api::all(cp.client_as(&token));
        let err = as_sa
            .list(&Default::default())
            .await
            .expect_err("RBAC denies");
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 403),
            "{err}"
        );
        namespaces
            .delete(&ns, &Default::default())
            .await
            .expect("delete namespace");
    });
}

#[test]
fn a_persistent_control_plane_restarts_warm_and_keeps_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cold = ControlPlane::builder()
        .dir(&state)
        .start()
        .expect("cold start");
    let cold_ready = cold.ready_in();
    cold.kubectl(&["create", "namespace", "kept"])
        .expect("create");
    let restarted = cold.restart_apiserver().expect("restart the apiserver");
    assert!(cold.kubectl(&["get", "namespace", "kept"]).is_ok());
    drop(cold);
    assert!(
        state.join("pki/ca.crt").exists(),
        "a persistent dir survives the drop"
    );
    let warm = ControlPlane::builder()
        .dir(&state)
        .start()
        .expect("warm start");
    assert!(
        warm.kubectl(&["get", "namespace", "kept"]).is_ok(),
        "etcd kept the state"
    );
    eprintln!(
        "control plane ready: cold {cold_ready:?}, apiserver restart {restarted:?}, warm {:?}",
        warm.ready_in()
    );
    println!(
        "READY cold={:.2}s restart={:.2}s warm={:.2}s",
        cold_ready.as_secs_f64(),
        restarted.as_secs_f64(),
        warm.ready_in().as_secs_f64()
    );
    let temp = ControlPlane::start().expect("temporary");
    let temp_dir = temp.dir().to_path_buf();
    drop(temp);
    assert!(
        !temp_dir.exists(),
        "a temporary control plane removes its dir"
    );
    let _ = Duration::ZERO;
}
