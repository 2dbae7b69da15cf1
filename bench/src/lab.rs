//! A `tabby-lab` of a benchmark's own: a unique prefix and a temporary
//! state dir, removed by `tabby-lab down` when the guard drops (also on
//! error, panic or Ctrl-C).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// A lab being built or up; `down` on drop, after stopping an `up` that
/// still runs.
pub struct Lab {
    lab_bin: PathBuf,
    /// The lab's `--prefix`.
    pub prefix: String,
    /// The lab's `--state-dir`.
    pub state: tempfile::TempDir,
    /// A `tabby-lab up` started in the background ([`Lab::command`]), if any.
    pub up: Option<Child>,
}

impl Lab {
    /// A lab of `lab_bin` (the `tabby-lab` binary) named `prefix`, with a
    /// fresh state dir; nothing runs yet.
    pub fn new(lab_bin: &Path, prefix: String) -> Result<Lab> {
        let state = tempfile::Builder::new()
            .prefix("tabby-lab-bench-")
            .tempdir()
            .context("temp state dir")?;
        Ok(Lab {
            lab_bin: lab_bin.to_path_buf(),
            prefix,
            state,
            up: None,
        })
    }

    /// `tabby-lab --prefix P --state-dir S ARGS`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.lab_bin);
        cmd.arg("--prefix")
            .arg(&self.prefix)
            .arg("--state-dir")
            .arg(self.state.path())
            .args(args);
        cmd
    }

    /// Runs `tabby-lab ARGS` to the end; its stdout, or an error with its
    /// output.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run tabby-lab {args:?}"))?;
        if !out.status.success() {
            bail!(
                "tabby-lab {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The lab's `lab.json`.
    pub fn state_file(&self) -> PathBuf {
        self.state.path().join("lab.json")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut up) = self.up.take() {
            if up.try_wait().ok().flatten().is_none() {
                let _ = up.kill();
            }
            let _ = up.wait();
        }
        let t = Instant::now();
        match self.command(&["down"]).output() {
            Ok(o) if o.status.success() => println!(
                "  down: {} removed in {:.1} s",
                self.prefix,
                t.elapsed().as_secs_f64()
            ),
            Ok(o) => eprintln!(
                "  WARNING: `tabby-lab --prefix {} down` failed: {}{}",
                self.prefix,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!(
                "  WARNING: could not run tabby-lab down for {}: {e}",
                self.prefix
            ),
        }
    }
}
