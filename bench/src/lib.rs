//! What the whole-process benchmarks (`src/bin/*`) share: their command
//! line flags, their exit code, the release binaries they drive and the lab
//! they measure ([`lab::Lab`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};

pub mod lab;

/// The release binaries a benchmark on a lab drives.
pub const LAB_BINS: [&str; 4] = ["tabby-lab", "tabby-node", "tabby", "tabbyctl"];
/// The packages that build [`LAB_BINS`].
pub const LAB_BUILD: &str = "-p tabby-node -p tabby-lab -p tabby-cni -p tabby-ctl";

/// The value after `name` in `args` (`--name VALUE`), `default` when
/// `name` is absent; an error names the flag.
pub fn flag<T>(args: &[String], name: &str, default: T) -> Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("bad {name}")),
        None => Ok(default),
    }
}

/// The exit code of benchmark `name` for its result; an error goes to
/// stderr with its whole chain.
pub fn exit_code(name: &str, result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `target/release`, once root and the release binaries `bins` are
/// checked; a missing one's error says to run `cargo build --release
/// <build>`.
pub fn release_dir(bins: &[&str], build: &str) -> Result<PathBuf> {
    if !tabby_testkit::is_root() {
        bail!("needs root (network namespaces)");
    }
    let release = tabby_testkit::bins::target_dir().join("release");
    for bin in bins {
        let path = release.join(bin);
        ensure!(
            path.is_file(),
            "{} is missing: cargo build --release {build}",
            path.display()
        );
    }
    Ok(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flag_reads_the_value_after_its_name_or_the_default() {
        let a = args(&["--runs", "3", "--nodes", "x"]);
        assert_eq!(flag(&a, "--runs", 1usize).unwrap(), 3);
        assert_eq!(flag(&a, "--seconds", 5u64).unwrap(), 5);
        let bad = flag(&a, "--nodes", 10usize).unwrap_err();
        assert_eq!(bad.to_string(), "bad --nodes");
        let missing = flag(&args(&["--runs"]), "--runs", 1usize).unwrap_err();
        assert_eq!(missing.to_string(), "--runs needs a value");
    }
}
