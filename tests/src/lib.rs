//! The harness of Tabby's root tests, on top of `tabby-testkit`: a test
//! node (a namespace with an uplink, a temp datastore and a conflist for
//! it), pods made by the real plugin, and readers of the datastore. The
//! namespace guard, plugin exec and polling are testkit's, re-exported here
//! under the names the tests use.

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use tabby_testkit::cni::{Call, PluginRun};
pub use tabby_testkit::{
    eventually, require_programs, require_root, sh, skip_or_fail, unique, wait_until, Netns,
};

/// Where the plugin binaries are: `TABBY_BIN_DIR`, else `target/release`
/// (built when missing).
pub fn bin_dir() -> PathBuf {
    tabby_testkit::bins::release_dir()
}

/// The CNI_PATH for tests: our binaries, then Debian's reference plugins.
pub fn cni_path() -> String {
    format!("{}:/usr/lib/cni", bin_dir().display())
}

/// A test node: its namespace, a temp datastore and log file, and a conflist entry pointing at them.
pub struct Node {
    /// The node's namespace (the plugin's "host").
    pub ns: Netns,
    /// Holds the datastore and the log.
    pub dir: tempfile::TempDir,
    /// The node name in the datastore.
    pub name: String,
    /// The node's links before any pod (lo and its uplink).
    pub base_links: Vec<String>,
    /// The node's routes before any pod.
    pub base_routes: Vec<String>,
}

impl Node {
    /// A fresh node with its own datastore.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::with_datastore(dir)
    }

    /// A fresh node sharing an existing datastore directory (several "nodes" of one cluster).
    pub fn with_datastore(dir: tempfile::TempDir) -> Self {
        let ns = Netns::new("tbn");
        ns.add_uplink();
        let name = ns.name().to_string();
        let (base_links, base_routes) = (ns.links(), ns.routes());
        Self {
            ns,
            dir,
            name,
            base_links,
            base_routes,
        }
    }

    /// The datastore directory.
    pub fn datastore(&self) -> PathBuf {
        self.dir.path().join("datastore")
    }

    /// A `tabby` + `tabby-ipam` config with `pool` as the default pool.
    pub fn conf(&self, version: &str, pool: &str, block_size: u8) -> Value {
        serde_json::json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "tabby",
            "nodename": self.name,
            "mtu": 1450,
            "log_file": self.dir.path().join("cni.log"),
            "log_level": "debug",
            "ipam": {
                "type": "tabby-ipam",
                "datastore": {"type": "file", "path": self.datastore()},
                "pool": {"cidr": pool, "blockSize": block_size}
            }
        })
    }

    /// ADD of a fresh pod namespace; panics if the plugin fails.
    pub fn add_pod(&self, conf: &Value) -> Pod {
        let ns = Netns::new("tbp");
        let id = ns.name().to_string();
        let run = Call::tabby("ADD", &id, &ns.path().display().to_string())
            .run(&self.ns, conf.to_string().as_bytes());
        assert!(run.ok, "ADD failed: {}", run.stdout);
        Pod {
            ip: run.ip(),
            result: run.json,
            ns,
            id,
        }
    }

    /// Panics unless the node has exactly the links and routes it started with.
    pub fn assert_no_leftovers(&self) {
        assert_eq!(
            self.ns.links(),
            self.base_links,
            "links were left on the node"
        );
        assert_eq!(
            self.ns.routes(),
            self.base_routes,
            "routes were left on the node"
        );
    }

    /// Every allocated address in the datastore, by handle.
    pub fn allocations(&self) -> Vec<(String, String)> {
        allocations(&self.datastore())
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

/// A pod made by ADD.
pub struct Pod {
    /// Its namespace.
    pub ns: Netns,
    /// Its container ID.
    pub id: String,
    /// Its address.
    pub ip: String,
    /// The ADD result.
    pub result: Value,
}

/// (handle, address) for every allocation in the datastore at `dir`.
pub fn allocations(dir: &Path) -> Vec<(String, String)> {
    let ds = tabby_ipam::FileDatastore::open(dir).expect("open datastore");
    let snap = tabby_ipam::report::Snapshot::load(&ds).expect("read datastore");
    snap.blocks
        .iter()
        .flat_map(|b| {
            b.allocated()
                .map(|(ip, a)| (a.handle_id.clone(), ip.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every file under `dir` parses as JSON (lock and temp files aside).
pub fn all_json(dir: &Path) -> Result<usize, String> {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let p = e.map_err(|e| e.to_string())?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                serde_json::from_slice::<Value>(&bytes)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                n += 1;
            }
        }
    }
    Ok(n)
}
