//! The agent's configuration: a TOML file, with flags that override it.
//!
//! ```toml
//! node_name = "node-1"
//! bgp_address = "10.98.0.1"
//! datastore = "/var/lib/tabby/datastore"   # the file backend; or the table below
//! # [datastore]
//! # type = "kubernetes"
//! # kubeconfig = "/etc/tabby/kubeconfig"    # else $KUBECONFIG, ~/.kube/config or in-cluster
//! cluster = "files"                    # where the cluster view comes from (below)
//! uplink = "eth0"                      # else: the interface holding bgp_address
//! as_number = 64512                    # else: the cluster's BGPConfiguration
//! bgp_port = 179
//! hold_time = 90                       # seconds; keepalive defaults to hold_time / 3
//! graceful_restart_time = 120          # seconds peers keep our routes while we restart (0: off)
//! status_socket = "/run/tabby/node.sock"
//! health_listen = "127.0.0.1:9099"
//! mtu_file = "/var/lib/tabby/mtu"      # the pods' MTU, for the CNI plugin
//! ```
//!
//! `cluster` picks the source of the agent's cluster view (nodes, pools,
//! blocks, affinities, BGP configuration, peers and filters):
//! - `"files"`: read the datastore every `poll_interval_ms` (any backend);
//! - `"kubernetes"`: watch Nodes and the Tabby CRDs on the API
//!   ([`crate::cluster::kubernetes`]) with the `[datastore]` kubeconfig;
//!   every change reaches the agent at once, and it is ready only once
//!   every kind was listed. Needs `[datastore] type = "kubernetes"`.
//!
//! The default is `"kubernetes"` with a Kubernetes datastore, else `"files"`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tabby_ipam::DatastoreConfig;

use crate::error::{AgentError, Result};

/// The agent's settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name in the datastore.
    pub node_name: String,
    /// The address BGP binds to and advertises as next hop.
    pub bgp_address: IpAddr,
    /// The datastore: a directory (the file backend), or a table
    /// `{type = "file" | "kubernetes", ...}` as in the conflist.
    #[serde(default, deserialize_with = "datastore_or_path")]
    pub datastore: DatastoreConfig,
    /// Where the cluster view comes from; `None`: [`AgentConfig::cluster`] decides.
    #[serde(default)]
    pub cluster: Option<ClusterSource>,
    /// The underlay interface learned routes go out of.
    #[serde(default)]
    pub uplink: Option<String>,
    /// This node's AS; the cluster's when absent.
    #[serde(default)]
    pub as_number: Option<u32>,
    /// The TCP port of BGP (179; tests use others).
    #[serde(default = "default_bgp_port")]
    pub bgp_port: u16,
    /// BGP hold time in seconds (0, or 3 and more).
    #[serde(default = "default_hold")]
    pub hold_time: u16,
    /// BGP keepalive interval in seconds; hold_time / 3 when absent.
    #[serde(default)]
    pub keepalive: Option<u16>,
    /// BGP connect-retry base interval in seconds.
    #[serde(default = "default_connect_retry")]
    pub connect_retry: u16,
    /// BGP graceful restart time in seconds (0: off): how long peers keep
    /// this node's routes when its agent crashes, and it keeps theirs.
    #[serde(default = "default_restart_time")]
    pub graceful_restart_time: u16,
    /// Where `tabbyctl node status` asks.
    #[serde(default = "default_status_socket")]
    pub status_socket: PathBuf,
    /// Health, readiness and metrics HTTP endpoint (loopback by default).
    #[serde(default = "default_health")]
    pub health_listen: SocketAddr,
    /// How often the datastore is read, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Where the pods' MTU is written (uplink MTU minus the largest
    /// enabled encapsulation's overhead), for the CNI plugin's `mtuFile`.
    #[serde(default = "default_mtu_file")]
    pub mtu_file: PathBuf,
    /// The service proxy (`[proxy]` table).
    #[serde(default)]
    pub proxy: ProxyConfig,
}

/// The source of the agent's cluster view.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClusterSource {
    /// Read the datastore every `poll_interval_ms`.
    Files,
    /// Watch Nodes and the Tabby CRDs on the Kubernetes API.
    Kubernetes,
}

/// The embedded service proxy's settings.
///
/// ```toml
/// [proxy]
/// enabled = true
/// mode = "iptables"                             # iptables or nftables (one `ip tabby-proxy` table)
/// source = "files"                             # or "kubernetes": watch the API
/// resources_dir = "/var/lib/tabby/resources"   # files: Services and EndpointSlices as YAML
/// backend = "auto"                              # iptables mode: auto, legacy or nft
/// min_sync_period_ms = 1000                     # kube-proxy --iptables-min-sync-period
/// max_sync_period_ms = 30000                    # kube-proxy --iptables-sync-period
/// cluster_cidr = "10.244.0.0/16"                # else: the first enabled IPv4 pool
/// masquerade_mark = 16384                       # 0x4000
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Run the proxy at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `iptables` (the default) or `nftables`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Where Services and EndpointSlices come from.
    #[serde(default)]
    pub source: ProxySource,
    /// The directory of Service and EndpointSlice YAML the file backend watches.
    #[serde(default = "default_resources")]
    pub resources_dir: PathBuf,
    /// How often that directory is read, in milliseconds.
    #[serde(default = "default_resources_poll_ms")]
    pub resources_poll_ms: u64,
    /// `auto` (whichever holds more rules already), `legacy` or `nft`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Least time between two syncs.
    #[serde(default = "default_min_sync_ms")]
    pub min_sync_period_ms: u64,
    /// Most time between two syncs.
    #[serde(default = "default_max_sync_ms")]
    pub max_sync_period_ms: u64,
    /// The cluster's pod CIDR; traffic from elsewhere to a service is masqueraded.
    #[serde(default)]
    pub cluster_cidr: Option<ipnetwork::Ipv4Network>,
    /// The mark bit asking for masquerade.
    #[serde(default = "default_mark")]
    pub masquerade_mark: u32,
}

/// The proxy's source of Services and EndpointSlices.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxySource {
    /// YAML files in `resources_dir` (what the lab writes).
    #[default]
    Files,
    /// The Kubernetes API, with the `[datastore]` table's kubeconfig when
    /// it is `type = "kubernetes"`, else `$KUBECONFIG`, `~/.kube/config` or
    /// the in-cluster ServiceAccount.
    Kubernetes,
}

fn yes() -> bool {
    true
}
fn default_resources() -> PathBuf {
    "/var/lib/tabby/resources".into()
}
fn default_resources_poll_ms() -> u64 {
    200
}
fn default_mode() -> String {
    "iptables".into()
}
fn default_backend() -> String {
    "auto".into()
}
fn default_min_sync_ms() -> u64 {
    1000
}
fn default_max_sync_ms() -> u64 {
    30_000
}
fn default_mark() -> u32 {
    0x4000
}

impl Default for ProxyConfig {
    fn default() -> Self {
        toml::from_str("").expect("every proxy key has a default")
    }
}

/// `datastore = "/dir"` (the file backend) or `[datastore]` with a type.
fn datastore_or_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DatastoreConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Path(PathBuf),
        Table(DatastoreConfig),
    }
    Ok(match Form::deserialize(d)? {
        Form::Path(path) => DatastoreConfig::file(path),
        Form::Table(config) => config,
    })
}
fn default_bgp_port() -> u16 {
    179
}
fn default_hold() -> u16 {
    90
}
fn default_connect_retry() -> u16 {
    2
}
fn default_restart_time() -> u16 {
    120
}
fn default_status_socket() -> PathBuf {
    "/run/tabby/node.sock".into()
}
fn default_mtu_file() -> PathBuf {
    "/var/lib/tabby/mtu".into()
}
fn default_health() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9099))
}
fn default_poll_ms() -> u64 {
    500
}

impl AgentConfig {
    /// Parses TOML text and validates it.
    pub fn parse(text: &str) -> Result<Self> {
        let c: AgentConfig = toml::from_str(text).map_err(|e| AgentError::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(Some(path), &[])
    }

    /// Reads the file (if any), then lets `overrides` (`key`, value) from
    /// flags win, then validates.
    pub fn load_with(path: Option<&Path>, overrides: &[(&str, toml::Value)]) -> Result<Self> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| AgentError::ReadConfig {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| AgentError::Config(e.to_string()))?;
        for (key, value) in overrides {
            table.insert((*key).to_string(), value.clone());
        }
        let c: AgentConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| AgentError::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the values a peer would reject later.
    pub fn validate(&self) -> Result<()> {
        if tabby_proxy::Mode::from_name(&self.proxy.mode).is_none() {
            return Err(AgentError::Config(format!(
                "proxy.mode {:?} is not iptables or nftables",
                self.proxy.mode
            )));
        }
        if !matches!(self.proxy.backend.as_str(), "auto" | "legacy" | "nft") {
            return Err(AgentError::Config(format!(
                "proxy.backend {:?} is not auto, legacy or nft",
                self.proxy.backend
            )));
        }
        if self.proxy.masquerade_mark.count_ones() != 1 {
            return Err(AgentError::Config(format!(
                "proxy.masquerade_mark {:#x} must be a single bit",
                self.proxy.masquerade_mark
            )));
        }
        if self.cluster == Some(ClusterSource::Kubernetes)
            && !matches!(self.datastore, DatastoreConfig::Kubernetes(_))
        {
            return Err(AgentError::Config(
                "cluster = \"kubernetes\" needs [datastore] type = \"kubernetes\" \
                 (the cluster view holds the datastore's blocks)"
                    .into(),
            ));
        }
        if self.node_name.is_empty() {
            return Err(AgentError::Config("node_name is empty".into()));
        }
        if self.hold_time != 0 && self.hold_time < 3 {
            return Err(AgentError::Config(format!(
                "hold_time {} must be 0 or at least 3 seconds (RFC 4271)",
                self.hold_time
            )));
        }
        if self.graceful_restart_time > 4095 {
            return Err(AgentError::Config(format!(
                "graceful_restart_time {} exceeds 4095 seconds (RFC 4724)",
                self.graceful_restart_time
            )));
        }
        if let Some(k) = self.keepalive {
            if self.hold_time != 0 && k >= self.hold_time {
                return Err(AgentError::Config(format!(
                    "keepalive {k} must be below hold_time {}",
                    self.hold_time
                )));
            }
        }
        Ok(())
    }

    /// The keepalive interval.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(u64::from(self.keepalive.unwrap_or(self.hold_time / 3)))
    }

    /// The datastore poll interval.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(50))
    }

    /// Where the cluster view comes from: `cluster`, else `kubernetes`
    /// with a Kubernetes datastore and `files` with a file one.
    pub fn cluster(&self) -> ClusterSource {
        match (self.cluster, &self.datastore) {
            (Some(source), _) => source,
            (None, DatastoreConfig::Kubernetes(_)) => ClusterSource::Kubernetes,
            (None, DatastoreConfig::File { .. }) => ClusterSource::Files,
        }
    }

    /// The test scope of a Kubernetes datastore (the watches see only it).
    pub fn kube_scope(&self) -> Option<&str> {
        match &self.datastore {
            DatastoreConfig::Kubernetes(o) => o.scope.as_deref(),
            DatastoreConfig::File { .. } => None,
        }
    }

    /// The kubeconfig of `[datastore]` when it is `type = "kubernetes"`
    /// (what `[proxy] source = "kubernetes"` connects with); `None`: infer.
    pub fn kubeconfig(&self) -> Option<&Path> {
        match &self.datastore {
            DatastoreConfig::Kubernetes(o) => o.kubeconfig.as_deref(),
            DatastoreConfig::File { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_gets_calico_like_defaults() {
        let c =
            AgentConfig::parse("node_name = \"node-1\"\nbgp_address = \"10.98.0.1\"\n").unwrap();
        assert_eq!(c.bgp_port, 179);
        assert_eq!(c.hold_time, 90);
        assert_eq!(c.keepalive(), Duration::from_secs(30));
        assert_eq!(c.health_listen.to_string(), "127.0.0.1:9099");
        assert!(c.proxy.enabled);
        assert_eq!(
            (
                c.proxy.backend.as_str(),
                c.proxy.masquerade_mark,
                c.proxy.min_sync_period_ms
            ),
            ("auto", 0x4000, 1000)
        );
        assert_eq!(c.proxy.mode, "iptables", "iptables mode stays the default");
    }

    #[test]
    fn the_proxy_source_is_files_or_kubernetes_with_the_datastore_kubeconfig() {
        let base = "node_name = \"n\"\nbgp_address = \"10.0.0.1\"\n";
        let c = AgentConfig::parse(base).unwrap();
        assert_eq!(c.proxy.source, ProxySource::Files, "files stay the default");
        assert_eq!(c.kubeconfig(), None);
        let kube = format!("{base}[proxy]\nsource = \"kubernetes\"\n");
        let c = AgentConfig::parse(&kube).unwrap();
        assert_eq!(c.proxy.source, ProxySource::Kubernetes);
        assert_eq!(c.kubeconfig(), None, "no kubeconfig: inferred (in-cluster)");
        let c = AgentConfig::parse(&format!(
            "{kube}[datastore]\ntype = \"kubernetes\"\nkubeconfig = \"/k\"\n"
        ))
        .unwrap();
        assert_eq!(c.kubeconfig(), Some(Path::new("/k")));
        let e = AgentConfig::parse(&format!("{base}[proxy]\nsource = \"etcd\"\n")).unwrap_err();
        assert!(e.to_string().contains("etcd"), "{e}");
    }

    #[test]
    fn the_cluster_view_is_watched_by_default_only_with_a_kubernetes_datastore() {
        let base = "node_name = \"n\"\nbgp_address = \"10.0.0.1\"\n";
        let kube = "[datastore]\ntype = \"kubernetes\"\nscope = \"t1\"\n";
        let c = AgentConfig::parse(base).unwrap();
        assert_eq!(c.cluster(), ClusterSource::Files);
        let c = AgentConfig::parse(&format!("{base}{kube}")).unwrap();
        assert_eq!(c.cluster(), ClusterSource::Kubernetes);
        assert_eq!(c.kube_scope(), Some("t1"));
        let c = AgentConfig::parse(&format!("{base}cluster = \"files\"\n{kube}")).unwrap();
        assert_eq!(
            c.cluster(),
            ClusterSource::Files,
            "polling the API stays possible"
        );
        let e = AgentConfig::parse(&format!("{base}cluster = \"kubernetes\"\n")).unwrap_err();
        assert!(e.to_string().contains("needs [datastore]"), "{e}");
        let e = AgentConfig::parse(&format!("{base}cluster = \"etcd\"\n")).unwrap_err();
        assert!(e.to_string().contains("etcd"), "{e}");
    }

    #[test]
    fn the_proxy_mode_is_iptables_or_nftables() {
        let base = "node_name = \"n\"\nbgp_address = \"10.0.0.1\"\n[proxy]\n";
        let c = AgentConfig::parse(&format!("{base}mode = \"nftables\"\n")).unwrap();
        assert_eq!(c.proxy.mode, "nftables");
        let e = AgentConfig::parse(&format!("{base}mode = \"ipvs\"\n")).unwrap_err();
        assert!(e.to_string().contains("proxy.mode"), "{e}");
    }

    #[test]
    fn flags_override_the_file_and_can_replace_it() {
        let s = |v: &str| toml::Value::String(v.into());
        let c = AgentConfig::load_with(
            None,
            &[
                ("node_name", s("1234")),
                ("bgp_address", s("10.0.0.9")),
                ("as_number", toml::Value::Integer(65001)),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.node_name.as_str(), c.as_number),
            ("1234", Some(65001)),
            "a numeric node name stays a name"
        );
        assert_eq!(c.bgp_address, "10.0.0.9".parse::<IpAddr>().unwrap());
        let e = AgentConfig::load_with(None, &[("node_name", s("n"))]).unwrap_err();
        assert!(e.to_string().contains("bgp_address"), "{e}");
    }

    #[test]
    fn the_datastore_is_a_directory_or_a_typed_table() {
        let base = "node_name = \"n\"\nbgp_address = \"10.0.0.1\"\n";
        let c = AgentConfig::parse(base).unwrap();
        assert_eq!(c.datastore, DatastoreConfig::default());
        let c = AgentConfig::parse(&format!("{base}datastore = \"/x\"\n")).unwrap();
        assert_eq!(c.datastore, DatastoreConfig::file("/x"));
        let c = AgentConfig::parse(&format!(
            "{base}[datastore]\ntype = \"kubernetes\"\nkubeconfig = \"/k\"\n"
        ))
        .unwrap();
        assert_eq!(c.datastore, DatastoreConfig::kubernetes(Some("/k".into())));
        let e = AgentConfig::parse(&format!("{base}[datastore]\ntype = \"etcd\"\n")).unwrap_err();
        assert!(e.to_string().contains("datastore"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let e =
            AgentConfig::parse("node_name = \"n\"\nbgp_address = \"10.0.0.1\"\nhold_time = 2\n")
                .unwrap_err();
        assert!(e.to_string().contains("hold_time"), "{e}");
        let e = AgentConfig::parse("node_name = \"n\"\nbgp_address = \"nope\"\n").unwrap_err();
        assert!(e.to_string().contains("bgp_address"), "{e}");
        let e = AgentConfig::parse("node_name = \"n\"\nbgp_address = \"10.0.0.1\"\ncolour = 1\n")
            .unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
