//! `tabby-echo`: the lab's echo server image (answers like traefik/whoami:
//! `Hostname:`, `IP:` and `RemoteAddr:` lines, then the request), and
//! `tabby-echo get URL`, a client for tests run with `kubectl exec`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// An HTTP echo server that answers like traefik/whoami.
#[derive(Debug, Parser)]
#[command(name = "tabby-echo", version)]
struct Cli {
    /// The name reported as `Hostname:` [default: the host name, which is
    /// the pod's name in Kubernetes].
    #[arg(long)]
    name: Option<String>,
    /// TCP port.
    #[arg(long, default_value_t = 8080, env = "PORT")]
    port: u16,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// GET a URL and print the body (exit 22 on non-2xx answers).
    Get {
        /// `http://host[:port][/path]`.
        url: String,
        /// Deadline for connecting and for each read.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Make this many requests, each on a new connection, printing every body.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Get {
            url,
            timeout_ms,
            count,
        }) => tabby_lab_pods::http_get(&url, Duration::from_millis(timeout_ms), count),
        None => serve(cli.name, cli.port).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tabby-echo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(name: Option<String>, port: u16) -> anyhow::Result<()> {
    tabby_lab_pods::exit_on_term()?;
    let name = match name {
        Some(name) => name,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    tabby_lab_pods::echo::serve(&name, port)
}
