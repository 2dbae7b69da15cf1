//! The harness of Tabby's root tests: uniquely named network namespaces
//! that disappear on drop (also on panic), temp datastores, and running the
//! real plugin binaries exactly as a runtime does (CNI_* environment,
//! config on stdin) from inside a "node" namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid>x<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and fails the test with its output if it fails.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop with everything in it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<prefix><pid>x<n>` with `lo` up.
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path under /run/netns.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("exec {cmd} in {}: {e}", self.name))
    }

    /// Whether one ping to `ip` from here is answered.
    pub fn ping(&self, ip: &str) -> bool {
        self.exec("ping", &["-c1", "-W2", ip]).status.success()
    }

    /// Names of links in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// `ip route show table all` lines, minus the kernel's own local/multicast entries.
    pub fn routes(&self) -> Vec<String> {
        let mut r: Vec<String> = self
            .ip(&["route", "show"])
            .lines()
            .map(str::to_string)
            .collect();
        r.extend(
            self.ip(&["-6", "route", "show"])
                .lines()
                .filter(|l| !l.starts_with("fe80") && !l.starts_with("multicast"))
                .map(str::to_string),
        );
        r
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Where the plugin binaries are: `TABBY_BIN_DIR`, else this build's profile dir.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TABBY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join(profile)
}

/// The CNI_PATH for tests: our binaries, then Debian's reference plugins.
pub fn cni_path() -> String {
    format!("{}:/usr/lib/cni", bin_dir().display())
}

/// The output of one plugin run.
#[derive(Debug)]
pub struct PluginRun {
    /// Exit status was zero.
    pub ok: bool,
    /// stdout, parsed as JSON when it is JSON.
    pub json: Value,
    /// stdout as text.
    pub stdout: String,
    /// stderr as text.
    pub stderr: String,
}

impl PluginRun {
    /// The CNI error code of a failed run.
    pub fn code(&self) -> Option<u64> {
        self.json.get("code").and_then(Value::as_u64)
    }

    /// The error message of a failed run.
    pub fn msg(&self) -> &str {
        self.json.get("msg").and_then(Value::as_str).unwrap_or("")
    }

    /// The first address of a successful ADD, without prefix.
    pub fn ip(&self) -> String {
        let a = self.json["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no ips in {}", self.stdout));
        a.split('/').next().unwrap_or(a).to_string()
    }
}

/// One invocation of a CNI plugin.
pub struct Call<'a> {
    /// The plugin binary name (in CNI_PATH).
    pub plugin: &'a str,
    /// CNI_COMMAND.
    pub command: &'a str,
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_NETNS (may be empty).
    pub netns: &'a str,
    /// CNI_IFNAME.
    pub ifname: &'a str,
    /// CNI_ARGS.
    pub args: &'a str,
}

impl<'a> Call<'a> {
    /// A `tabby` call with ifname eth0.
    pub fn tabby(command: &'a str, container_id: &'a str, netns: &'a str) -> Self {
        Self {
            plugin: "tabby",
            command,
            container_id,
            netns,
            ifname: "eth0",
            args: "",
        }
    }

    /// Runs the plugin inside `node` (as the kubelet's runtime would on that node) with `conf` on stdin.
    pub fn run(&self, node: &Netns, conf: &[u8]) -> PluginRun {
        let bin = bin_dir().join(self.plugin);
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", node.path().display()))
            .arg(&bin)
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", self.netns)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_ARGS", self.args)
            .env("CNI_PATH", cni_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        // A plugin that rejects its environment may exit before reading
        // stdin; its exit status and stdout, not the broken pipe, tell.
        let written = child.stdin.take().expect("piped stdin").write_all(conf);
        if let Err(e) = written {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
        let out = child.wait_with_output().expect("wait for plugin");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        PluginRun {
            ok: out.status.success(),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
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
        // Like a real node, it has an uplink with a default route: proxy ARP
        // answers for 169.254.1.1 only when the node has a route to it.
        ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
        ns.ip(&["link", "set", "up1", "up"]);
        ns.ip(&["link", "set", "up0", "up"]);
        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.0.2.254",
            "dev",
            "up0",
        ]);
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

/// Polls `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
