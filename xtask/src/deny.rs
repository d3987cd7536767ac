//! cargo-deny, the dependency policy check of `test-all`: `cargo deny check bans licenses
//! sources` against `deny.toml` (licences on the allow-list, crates from crates.io only,
//! duplicate versions reported). Advisories are not checked: the RustSec database cannot be
//! fetched from the machines CI runs on; the README's security section keeps the list of
//! advisories that apply by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tansu::cache_dir;
use crate::{Result, cargo, describe};

/// The cargo-deny version xtask installs (MIT OR Apache-2.0, from crates.io).
pub(crate) const VERSION: &str = "0.20.2";

/// The checks `test-all` runs: every one but `advisories`.
pub(crate) const CHECKS: &[&str] = &["bans", "licenses", "sources"];

/// The installed cargo-deny of [`VERSION`], under `~/.cache/orchestrator/tools`, installed
/// there first (built in `~/.cache/orchestrator/tools-target`, outside any checkout) when
/// missing or of another version.
pub(crate) fn binary() -> Result<PathBuf> {
    let cache = cache_dir()?;
    let root = cache.join("tools");
    let binary = root.join("bin/cargo-deny");
    if installed_version(&binary).as_deref() == Some(VERSION) {
        return Ok(binary);
    }
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.args([
        "install",
        "--locked",
        "cargo-deny",
        "--version",
        VERSION,
        "--root",
    ])
    .arg(&root)
    .arg("--target-dir")
    .arg(cache.join("tools-target"))
    // Not the workspace's target folder, whatever CARGO_TARGET_DIR says.
    .env_remove("CARGO_TARGET_DIR");
    eprintln!(
        "cargo-deny: installing {VERSION} (a few minutes, once): {}",
        describe(&cmd)
    );
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    if !status.success() {
        return Err(format!("`{}` failed ({status})", describe(&cmd)));
    }
    match installed_version(&binary) {
        Some(version) if version == VERSION => Ok(binary),
        other => Err(format!(
            "`{}` left {} at version {other:?}, not {VERSION}",
            describe(&cmd),
            binary.display()
        )),
    }
}

/// The version `binary --version` reports (`cargo-deny 0.20.2`), if it runs.
fn installed_version(binary: &Path) -> Option<String> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// `cargo-deny 0.20.2` → `0.20.2`.
fn parse_version(text: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    (words.next()? == "cargo-deny").then_some(())?;
    words.next().map(str::to_owned)
}

/// `cargo deny --workspace --all-features check bans licenses sources` in `root`, run
/// through cargo so that cargo-deny finds the same toolchain. `--workspace`: the root
/// manifest is a package too, and without it cargo-deny checks only that package's graph
/// (not orchestrator-server's, orchestrator-faults' or xtask's).
pub(crate) fn check_command(root: &Path, binary: &Path) -> Command {
    let mut cmd = cargo(root);
    let bin_dir = binary.parent().map(Path::to_path_buf).unwrap_or_default();
    // `cargo deny` finds `cargo-deny` on PATH: put the pinned one first.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin_dir];
    dirs.extend(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(dirs) {
        cmd.env("PATH", joined);
    }
    cmd.args(["deny", "--workspace", "--all-features", "check"])
        .args(CHECKS);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version() {
        assert_eq!(
            parse_version("cargo-deny 0.20.2\n").as_deref(),
            Some("0.20.2")
        );
        assert_eq!(parse_version("cargo 1.95.0"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn never_checks_advisories() {
        let cmd = check_command(Path::new("."), Path::new("/x/bin/cargo-deny"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "deny",
                "--workspace",
                "--all-features",
                "check",
                "bans",
                "licenses",
                "sources"
            ]
        );
    }
}
