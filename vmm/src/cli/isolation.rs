//! The jail the commands run sandboxes in unless told `--in-process`.

use anyhow::{Context, Result};

use ember::worker::Isolation;

/// Isolation through this very binary's worker subcommand; the workers'
/// uid/gid range from `EMBER_WORKER_IDS` (`FIRST-LAST` or `FIRST+COUNT`),
/// if set.
pub(super) fn isolation() -> Result<Isolation> {
    let exe = std::env::current_exe().context("cannot find the ember binary")?;
    let mut isolation = Isolation::new(exe);
    if let Some(ids) = std::env::var_os(WORKER_IDS_ENV) {
        let ids = ids.to_string_lossy();
        isolation.ids = ids
            .parse()
            .map_err(|e| anyhow::anyhow!("{WORKER_IDS_ENV}: {e}"))?;
    }
    Ok(isolation)
}

/// The environment variable that sets the jailed workers' uid/gid range.
const WORKER_IDS_ENV: &str = "EMBER_WORKER_IDS";
