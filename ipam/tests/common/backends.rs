//! The backends every IPAM contract test runs on, and the macro that
//! instantiates a test body once per backend.
//!
//! The Kubernetes backend uses the test binary's shared control plane
//! (`tabby_testkit::kube::shared`). Its CRDs are cluster-scoped, so each
//! test store gets its own scope (`tabby.dev/scope` label and `<scope>.`
//! name prefix, see `tabby_ipam::kubernetes`): test bodies keep their fixed
//! pool names, CIDRs and node names, and never see each other's objects.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tabby_ipam::{Datastore, DatastoreConfig, Ipam, KubeDatastore, KubeOptions, MemDatastore};

/// A backend of the contract suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In memory (one process only).
    Mem,
    /// A temporary directory.
    File,
    /// The shared control plane, in a scope of its own.
    Kube,
}

/// One test's datastore; a Kubernetes scope is purged on drop.
pub struct TestStore {
    /// Which backend.
    pub backend: Backend,
    ds: Arc<dyn Datastore>,
    config: Option<DatastoreConfig>,
    dir: Option<tempfile::TempDir>,
    kube: Option<Arc<KubeDatastore>>,
}

impl TestStore {
    /// A fresh, empty store.
    pub fn new(backend: Backend) -> Self {
        match backend {
            Backend::Mem => Self {
                backend,
                ds: Arc::new(MemDatastore::new()),
                config: None,
                dir: None,
                kube: None,
            },
            Backend::File => {
                let dir = tempfile::tempdir().expect("tempdir");
                let config = DatastoreConfig::file(dir.path());
                Self {
                    backend,
                    ds: Arc::from(config.open().expect("open file datastore")),
                    config: Some(config),
                    dir: Some(dir),
                    kube: None,
                }
            }
            Backend::Kube => {
                let config = DatastoreConfig::Kubernetes(KubeOptions {
                    kubeconfig: Some(kubeconfig()),
                    scope: Some(tabby_testkit::unique("t")),
                });
                let DatastoreConfig::Kubernetes(options) = &config else {
                    unreachable!()
                };
                let kube =
                    Arc::new(KubeDatastore::open(options).expect("open kubernetes datastore"));
                Self {
                    backend,
                    ds: kube.clone(),
                    config: Some(config),
                    dir: None,
                    kube: Some(kube),
                }
            }
        }
    }

    /// The IPAM engine over this store.
    pub fn ipam(&self) -> Ipam<Arc<dyn Datastore>> {
        Ipam::new(self.ds.clone())
    }

    /// A store of `backend` holding one pool `p` of `cidr` in blocks of
    /// `block_size`, and the IPAM engine over it.
    pub fn with_pool(
        backend: Backend,
        cidr: &str,
        block_size: u8,
    ) -> (Self, Ipam<Arc<dyn Datastore>>) {
        let store = Self::new(backend);
        let ipam = store.ipam();
        ipam.create_pool(&super::pool("p", cidr, block_size))
            .expect("pool");
        (store, ipam)
    }

    /// The datastore.
    pub fn datastore(&self) -> Arc<dyn Datastore> {
        self.ds.clone()
    }

    /// Another handle on the same store, as another process opens it (the
    /// memory backend can only share its one instance).
    pub fn open_another(&self) -> Arc<dyn Datastore> {
        match &self.config {
            Some(config) => Arc::from(config.open().expect("open the datastore again")),
            None => self.ds.clone(),
        }
    }

    /// The config a child process opens the store with (not for `Mem`).
    pub fn config(&self) -> &DatastoreConfig {
        self.config
            .as_ref()
            .expect("the memory backend cannot be shared with another process")
    }

    /// Checks that every stored document is JSON; returns how many there are.
    pub fn assert_documents_valid(&self) -> usize {
        if let Some(dir) = &self.dir {
            return super::assert_all_json(dir.path());
        }
        let entries = self.ds.list("").expect("list everything");
        for e in &entries {
            serde_json::from_slice::<serde_json::Value>(&e.value)
                .unwrap_or_else(|err| panic!("{} is not JSON: {err}", e.key));
        }
        entries.len()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(kube) = &self.kube {
            if let Err(e) = kube.purge_scope() {
                eprintln!("could not purge {}: {e}", kube.describe());
            }
        }
    }
}

/// The shared control plane's kubeconfig, with Tabby's CRDs installed.
pub fn kubeconfig() -> PathBuf {
    static CRDS: OnceLock<PathBuf> = OnceLock::new();
    CRDS.get_or_init(|| {
        let cp = tabby_testkit::kube::shared();
        let path = cp.kubeconfig_path().to_path_buf();
        let admin = KubeDatastore::open(&KubeOptions {
            kubeconfig: Some(path.clone()),
            scope: None,
        })
        .expect("open the admin datastore");
        admin.install_crds().expect("install the CRDs");
        path
    })
    .clone()
}

/// Instantiates each named test body (`fn name(backend: Backend)`) once per
/// backend: `mem::name`, `file::name`, `kubernetes::name`. The first list
/// names the backends (`mem`, `file`, `kubernetes`).
macro_rules! backend_tests {
    ([$($backend:ident),+]; $($test:ident),+ $(,)?) => {
        $crate::common::backends::backend_tests!(@each [$($backend),+] [$($test),+]);
    };
    (@each [] $tests:tt) => {};
    (@each [$first:ident $(, $rest:ident)*] $tests:tt) => {
        $crate::common::backends::backend_tests!(@one $first $tests);
        $crate::common::backends::backend_tests!(@each [$($rest),*] $tests);
    };
    (@one mem [$($test:ident),+]) => {
        mod mem { $( #[test] fn $test() { super::$test($crate::common::backends::Backend::Mem) } )+ }
    };
    (@one file [$($test:ident),+]) => {
        mod file { $( #[test] fn $test() { super::$test($crate::common::backends::Backend::File) } )+ }
    };
    (@one kubernetes [$($test:ident),+]) => {
        mod kubernetes { $( #[test] fn $test() { super::$test($crate::common::backends::Backend::Kube) } )+ }
    };
}
pub(crate) use backend_tests;
