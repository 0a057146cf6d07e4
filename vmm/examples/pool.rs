//! The Rust API of a warm sandbox pool: open a snapshot, keep two clones
//! warm, run six invocations from four threads, print what each cost.
//!
//! ```sh
//! cargo run --release --example pool            # the cached default snapshot
//! cargo run --release --example pool -- DIR     # a snapshot directory
//! ```

use std::sync::Arc;

use ember::pool::{Pool, PoolConfig};
use ember::snapshot::{ensure_cached_snapshot, Snapshot};
use ember::{paths, Invocation, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => dir.into(),
        // Created on first use: one cold boot.
        None => ensure_cached_snapshot(
            &VmConfig::new(paths::default_kernel(), Some(paths::default_initrd())),
            |dir| eprintln!("creating a snapshot in {}", dir.display()),
        )?,
    };
    let snapshot = Arc::new(Snapshot::open(&dir)?);
    let pool = Pool::new(
        snapshot,
        PoolConfig {
            warm: 2,
            max_live: 4,
            max_queue: 8,
            ..PoolConfig::default()
        },
    )?;
    std::thread::scope(|scope| {
        for t in 0..4 {
            let pool = &pool;
            scope.spawn(move || {
                for i in (t..6).step_by(4) {
                    let mut invocation =
                        Invocation::new(["sh", "-c", "echo \"hello from $NAME\""]);
                    invocation.env = vec![("NAME".into(), format!("invocation {i}"))];
                    match pool.invoke(&invocation) {
                        Ok(result) => println!(
                            "{i}: {} (exit {}, {} sandbox, restore {:.0} ms, queued {:.0} ms, invoke {:.0} ms, guest cpu {} ms)",
                            String::from_utf8_lossy(&result.outcome.stdout).trim(),
                            result.outcome.shell_exit_code(),
                            if result.warm { "warm" } else { "on-demand" },
                            result.restore.as_secs_f64() * 1e3,
                            result.queue.as_secs_f64() * 1e3,
                            result.outcome.timings.invoke.as_secs_f64() * 1e3,
                            result.outcome.usage.cpu_user_ms + result.outcome.usage.cpu_sys_ms,
                        ),
                        Err(e) => eprintln!("{i}: {e}"),
                    }
                }
            });
        }
    });
    let stats = pool.stats();
    println!(
        "restores {}, failed restores {}, warm hits {}, on demand {}",
        stats.restores, stats.restore_failures, stats.warm_hits, stats.on_demand
    );
    // Waits for running invocations (none here) and destroys the warm
    // sandboxes; dropping the pool would do the same.
    pool.shutdown();
    Ok(())
}
