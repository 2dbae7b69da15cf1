//! `deploy/crds.yaml` is generated from the Rust types; this test fails
//! when the checked-in file drifts. Regenerate with
//! `TABBY_UPDATE_GOLDEN=1 cargo test --release -p tabby-ipam --test crds`
//! (or `tabbyctl crds > deploy/crds.yaml`).

use std::path::Path;

#[test]
fn the_checked_in_crds_match_the_rust_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds.yaml");
    let generated = tabby_ipam::kubernetes::crd::crds_yaml();
    if std::env::var_os("TABBY_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with TABBY_UPDATE_GOLDEN=1)",
            path.display()
        )
    });
    assert!(
        checked_in == generated,
        "{} drifted from the Rust types: regenerate it with TABBY_UPDATE_GOLDEN=1 cargo test -p tabby-ipam --test crds",
        path.display()
    );
}

/// The line in `deploy/tabby.yaml` after which the CRDs follow verbatim.
const MARKER: &str = "# ---- The CRDs below are generated (deploy/crds.yaml); do not edit. ----\n";

#[test]
fn the_manifest_carries_the_same_crds() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tabby.yaml");
    let generated = tabby_ipam::kubernetes::crd::crds_yaml();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let Some((head, crds)) = text.split_once(MARKER) else {
        panic!("{} has no line {MARKER:?}", path.display());
    };
    if std::env::var_os("TABBY_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, format!("{head}{MARKER}{generated}")).unwrap();
        return;
    }
    assert!(
        crds == generated,
        "the CRDs in {} drifted from the Rust types: regenerate with TABBY_UPDATE_GOLDEN=1 cargo test -p tabby-ipam --test crds",
        path.display()
    );
}
