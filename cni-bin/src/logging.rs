//! File logging for the plugins: stdout carries the CNI result, so logs
//! never go there.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::EnvFilter;

/// Default log file, as in the conflist contract.
pub const DEFAULT_LOG_FILE: &str = "/var/log/tabby/cni.log";

/// Sends tracing to `file` (created with its directory) at `level`. Each
/// span logs its duration when it closes (`time.busy`, `time.idle`): the
/// whole invocation at `info`, the steps of a DEL at `debug`.
/// When the file cannot be opened the plugin logs nowhere rather than fail the pod.
pub fn init(file: Option<&Path>, level: Option<&str>) {
    let path = file.unwrap_or(Path::new(DEFAULT_LOG_FILE));
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let Ok(f) = OpenOptions::new().create(true).append(true).open(path) else {
        return;
    };
    let filter =
        EnvFilter::try_new(level.unwrap_or("info")).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_writer(Mutex::new(f))
        .with_ansi(false)
        .with_span_events(FmtSpan::CLOSE)
        .with_env_filter(filter)
        .try_init();
}
