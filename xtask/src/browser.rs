//! The browser the dashboard's test drives (`orchestrator-server/tests/browser/`):
//! Debian's `chromium` and `chromium-driver`, installed with apt when missing.
//!
//! Not a row of [`SERVICES`](crate::services::SERVICES): nothing runs in the background.
//! The test starts its own chromedriver, which starts its own headless Chromium.

use std::path::Path;
use std::process::Command;

use crate::{Result, describe};

/// The name `services up|status` know it by.
pub(crate) const NAME: &str = "chromium";

/// Where Debian's `chromium` package puts the browser; the test looks there too.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Where Debian's `chromium-driver` package puts chromedriver.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The packages, installed together (the driver must match the browser's version).
const PACKAGES: &[&str] = &["chromium", "chromium-driver"];

/// `Ok(both versions)` when the browser and its driver are installed and run, else
/// `Err(what is missing)`.
pub(crate) fn status() -> Result<String> {
    let browser = version(CHROMIUM)?;
    let driver = version(CHROMEDRIVER)?;
    Ok(format!("{browser}; {driver}"))
}

/// What `program --version` prints, or why it cannot run.
fn version(program: &str) -> Result<String> {
    if !Path::new(program).is_file() {
        return Err(format!("{program} is not installed"));
    }
    let mut cmd = Command::new(program);
    cmd.arg("--version");
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", describe(&cmd)))?;
    if !output.status.success() {
        return Err(format!("`{}` failed ({})", describe(&cmd), output.status));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Makes sure the browser and its driver are installed: when either is missing,
/// `apt-get update` then `apt-get install -y --no-install-recommends chromium
/// chromium-driver`, as root or through `sudo`.
pub(crate) fn up() -> Result<()> {
    let missing = match status() {
        Ok(versions) => {
            eprintln!("Chromium: installed ({versions})");
            return Ok(());
        }
        Err(why) => why,
    };
    eprintln!(
        "Chromium: {missing}; installing the Debian packages {}",
        PACKAGES.join(" ")
    );
    let root = is_root();
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend_from_slice(PACKAGES);
    for mut cmd in [apt(&["update"]), apt(&install)] {
        let command = describe(&cmd);
        eprintln!("    $ {command}");
        let status = cmd.status().map_err(|e| {
            format!(
                "cannot run `{command}`: {e}; install the packages by hand \
                 (`sudo apt-get install {}`)",
                PACKAGES.join(" ")
            )
        })?;
        if !status.success() {
            return Err(format!(
                "`{command}` failed ({status}); the dashboard's browser test needs {}",
                PACKAGES.join(" ")
            ));
        }
    }
    let versions = status().map_err(|why| format!("Chromium: installed, but {why}"))?;
    eprintln!("Chromium: installed by xtask ({versions})");
    Ok(())
}

/// Whether we run as root, so apt needs no `sudo` (`id -u`: std has no getuid).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}
