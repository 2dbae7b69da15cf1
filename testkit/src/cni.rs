//! Running a CNI plugin exactly as a runtime does: the CNI_* environment,
//! the network config on stdin, stdout parsed as the result, from inside a
//! "node" namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::Netns;

/// The output of one plugin run.
#[derive(Debug, Clone)]
pub struct PluginRun {
    /// Exit status was zero.
    pub ok: bool,
    /// stdout, parsed as JSON when it is JSON (else `Null`).
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

    /// The first address of a successful ADD, without its prefix length.
    pub fn ip(&self) -> String {
        let a = self.json["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no ips in {}", self.stdout));
        a.split('/').next().unwrap_or(a).to_string()
    }
}

/// One invocation of a CNI plugin.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// The plugin binary.
    pub plugin: PathBuf,
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
    /// CNI_PATH.
    pub cni_path: String,
}

impl<'a> Call<'a> {
    /// A call of the plugin at `plugin` with ifname eth0 and CNI_PATH its
    /// own directory, then Debian's reference plugins.
    pub fn new(
        plugin: impl AsRef<Path>,
        command: &'a str,
        container_id: &'a str,
        netns: &'a str,
    ) -> Self {
        let plugin = plugin.as_ref().to_path_buf();
        let dir = plugin.parent().map(Path::to_path_buf).unwrap_or_default();
        Self {
            plugin,
            command,
            container_id,
            netns,
            ifname: "eth0",
            args: "",
            cni_path: format!("{}:/usr/lib/cni", dir.display()),
        }
    }

    /// A call of the release `tabby` plugin.
    pub fn tabby(command: &'a str, container_id: &'a str, netns: &'a str) -> Self {
        Self::new(
            crate::bins::release_bin("tabby"),
            command,
            container_id,
            netns,
        )
    }

    /// Runs the plugin inside `node` (as the runtime on that node would)
    /// with `conf` on stdin.
    pub fn run(&self, node: &Netns, conf: &[u8]) -> PluginRun {
        self.run_in(&node.path(), conf)
    }

    /// Runs the plugin inside the namespace at `node` with `conf` on stdin.
    pub fn run_in(&self, node: &Path, conf: &[u8]) -> PluginRun {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.display()))
            .arg(&self.plugin);
        self.exec(cmd, conf)
    }

    /// Runs the plugin in the caller's own namespace.
    pub fn run_here(&self, conf: &[u8]) -> PluginRun {
        self.exec(Command::new(&self.plugin), conf)
    }

    fn exec(&self, mut cmd: Command, conf: &[u8]) -> PluginRun {
        let mut child = cmd
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", self.netns)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_ARGS", self.args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.plugin.display()));
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
