//! The `install-cni` subcommand's flags and its run, and the agent's
//! side of the plugin token ([`TokenArgs`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::token::{PluginKubeconfig, TokenSource};
use super::{install_files, render_conflist, uninstall, InstallError, Layout, DEFAULT_TEMPLATE};

/// Who the plugin is (its ServiceAccount) and how long its tokens live.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The namespace of Tabby's ServiceAccounts (the DaemonSet's).
    #[arg(long, env = "TABBY_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
    /// The plugin's ServiceAccount, whose token goes into the kubeconfig.
    #[arg(long, default_value = "tabby-plugin")]
    pub plugin_service_account: String,
    /// How long each plugin token lives (at least 600 s).
    #[arg(long, default_value_t = 86_400)]
    pub token_validity_seconds: u64,
    /// The agent's own kubeconfig for the TokenRequest (else
    /// `$KUBECONFIG`, `~/.kube/config` or in-cluster).
    #[arg(long = "api-kubeconfig")]
    pub kubeconfig: Option<PathBuf>,
}

impl TokenArgs {
    fn source(&self) -> TokenSource {
        TokenSource {
            namespace: self.namespace.clone(),
            service_account: self.plugin_service_account.clone(),
            validity: Duration::from_secs(self.token_validity_seconds),
        }
    }

    /// The client and the plugin kubeconfig at `path`.
    pub async fn plugin_kubeconfig(
        &self,
        path: PathBuf,
    ) -> Result<(kube::Client, PluginKubeconfig), InstallError> {
        let config = kube_config(self.kubeconfig.as_deref()).await?;
        let plugin = PluginKubeconfig::new(&config, path, self.source());
        let client = kube::Client::try_from(config).map_err(|e| InstallError::Kube {
            context: "build the API client".into(),
            source: e,
        })?;
        Ok((client, plugin))
    }
}

/// `tabby-node install-cni`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallCniArgs {
    /// The host's CNI bin dir, as this process sees it.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The host's CNI conf dir, as this process sees it.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The CNI conf dir as the host sees it (the path the conflist gives
    /// the plugin for its kubeconfig).
    #[arg(long, env = "CNI_HOST_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub host_conf_dir: PathBuf,
    /// Where `tabby` and `tabby-ipam` are (default: next to this binary).
    #[arg(long)]
    pub source_dir: Option<PathBuf>,
    /// The conflist template (the ConfigMap's); default: a built-in one
    /// with the Kubernetes datastore.
    #[arg(long, env = "CNI_CONFLIST_TEMPLATE")]
    pub template: Option<PathBuf>,
    /// This node's name, for the conflist's `nodename`.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Write no kubeconfig (a conflist with the file datastore).
    #[arg(long)]
    pub skip_kubeconfig: bool,
    /// Replace a 10-tabby.conflist that Tabby did not write.
    #[arg(long)]
    pub force: bool,
    /// Remove the files instead.
    #[arg(long)]
    pub uninstall: bool,
    /// The plugin's ServiceAccount.
    #[command(flatten)]
    pub token: TokenArgs,
}

impl InstallCniArgs {
    fn layout(&self) -> Layout {
        Layout {
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
            host_conf_dir: self.host_conf_dir.clone(),
        }
    }
}

/// Installs (or uninstalls) and prints one line per file to stdout.
pub async fn run(args: InstallCniArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let layout = args.layout();
    if args.uninstall {
        for path in uninstall(&layout)? {
            println!("removed {}", path.display());
        }
        return Ok(());
    }
    let node = args
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .context("install-cni needs the node name (--node-name or NODE_NAME)")?;
    let template = match &args.template {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("read the conflist template {}", path.display()))?,
        None => DEFAULT_TEMPLATE.to_string(),
    };
    let conflist = render_conflist(&template, &node, &layout)?;
    let source_dir = match &args.source_dir {
        Some(dir) => dir.clone(),
        None => own_dir()?,
    };
    super::check_not_foreign(&layout.conflist(), args.force)?;
    // The kubeconfig first: once the conflist is there the runtime may call the plugin.
    if !args.skip_kubeconfig {
        let (client, plugin) = args.token.plugin_kubeconfig(layout.kubeconfig()).await?;
        let lifetime = plugin.refresh(&client).await?;
        println!(
            "wrote {} (token valid for {}s)",
            layout.kubeconfig().display(),
            lifetime.as_secs()
        );
    }
    for change in install_files(&layout, &source_dir, &conflist, args.force)? {
        let what = match change.outcome {
            super::files::Outcome::Written => "wrote",
            super::files::Outcome::Unchanged => "unchanged",
        };
        println!("{what} {}", change.path.display());
    }
    Ok(())
}

fn own_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().unwrap_or(Path::new("/")).to_path_buf())
}

/// The client config from `kubeconfig`, else inferred.
pub async fn kube_config(kubeconfig: Option<&Path>) -> Result<kube::Config, InstallError> {
    let boxed = |e: Box<dyn std::error::Error + Send + Sync>| InstallError::Config(e);
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| boxed(e.into()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| boxed(e.into()))
        }
        None => kube::Config::infer().await.map_err(|e| boxed(e.into())),
    }
}
