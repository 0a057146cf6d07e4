//! Counters and histograms for `GET /metrics`, in the Prometheus text
//! exposition format (version 0.0.4). Lock-free: atomics only.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::pool::PoolStats;

/// How an invocation request ended, the `outcome` label of
/// `ember_invocations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and its process exited (whatever the exit code).
    Ok,
    /// It ran into its timeout.
    Timeout,
    /// The sandbox failed (restore or invocation): a 5xx.
    Error,
    /// Refused for load or shutdown (429, 503) before running.
    Rejected,
    /// Refused as malformed or over a limit (400, 413).
    Invalid,
    /// The client went away while it waited for a sandbox.
    Cancelled,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::Timeout,
        Outcome::Error,
        Outcome::Rejected,
        Outcome::Invalid,
        Outcome::Cancelled,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Rejected => "rejected",
            Outcome::Invalid => "invalid",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Upper bounds (ms) of the latency histograms' buckets.
const BUCKETS_MS: [f64; 16] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0,
];

/// A cumulative histogram of milliseconds.
#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative; +Inf is `count`).
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        if let Some(i) = BUCKETS_MS.iter().position(|b| ms <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS_MS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        // Read after the buckets: concurrent observations only make +Inf
        // larger, so the buckets stay monotonic.
        let count = self.count.load(Ordering::Relaxed).max(cumulative);
        let sum_ms = self.sum_us.load(Ordering::Relaxed) as f64 / 1e3;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum_ms}\n{name}_count {count}");
    }
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    invocations: [AtomicU64; Outcome::ALL.len()],
    restore: Histogram,
    queue: Histogram,
    total: Histogram,
}

impl Metrics {
    /// Counts one request that ended with `outcome`.
    pub fn count(&self, outcome: Outcome) {
        self.invocations[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the timings of an invocation that got a sandbox.
    pub fn observe(&self, restore: Duration, queue: Duration, total: Duration) {
        self.restore.observe(restore);
        self.queue.observe(queue);
        self.total.observe(total);
    }

    /// The exposition text, with the pool's gauges and counters.
    pub fn render(&self, pool: &PoolStats) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP ember_invocations_total Invocation requests by outcome.\n\
             # TYPE ember_invocations_total counter\n",
        );
        for outcome in Outcome::ALL {
            let n = self.invocations[outcome as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "ember_invocations_total{{outcome=\"{}\"}} {n}",
                outcome.as_str()
            );
        }
        self.restore.render(
            &mut out,
            "ember_restore_duration_ms",
            "Host-side restore time of the sandbox each invocation used, in ms.",
        );
        self.queue.render(
            &mut out,
            "ember_queue_duration_ms",
            "Time invocations waited for a sandbox slot, in ms.",
        );
        self.total.render(
            &mut out,
            "ember_invocation_duration_ms",
            "End-to-end time of invocations as the server saw them, in ms.",
        );
        let gauges = [
            ("ember_pool_warm", "Warm sandboxes ready.", pool.warm),
            (
                "ember_pool_restoring",
                "Sandboxes being restored.",
                pool.restoring,
            ),
            (
                "ember_pool_in_use",
                "Sandboxes running an invocation.",
                pool.in_use,
            ),
            ("ember_pool_live", "Sandboxes alive.", pool.live),
            (
                "ember_pool_queue_length",
                "Requests waiting for a sandbox.",
                pool.queued,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let counters = [
            (
                "ember_restores_total",
                "Successful sandbox restores.",
                pool.restores,
            ),
            (
                "ember_restore_failures_total",
                "Failed sandbox restores (each try counts).",
                pool.restore_failures,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP ember_pool_acquired_total Sandboxes handed to invocations, by origin.\n\
             # TYPE ember_pool_acquired_total counter\n\
             ember_pool_acquired_total{{origin=\"warm\"}} {}\n\
             ember_pool_acquired_total{{origin=\"on_demand\"}} {}",
            pool.warm_hits, pool.on_demand
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.count(Outcome::Ok);
        m.observe(
            Duration::from_millis(3),
            Duration::ZERO,
            Duration::from_secs(1000),
        );
        let text = m.render(&PoolStats::default());
        assert!(text.contains("ember_invocations_total{outcome=\"ok\"} 1\n"));
        assert!(text.contains("ember_restore_duration_ms_bucket{le=\"2.5\"} 0\n"));
        assert!(text.contains("ember_restore_duration_ms_bucket{le=\"5\"} 1\n"));
        assert!(text.contains("ember_invocation_duration_ms_bucket{le=\"300000\"} 0\n"));
        assert!(text.contains("ember_invocation_duration_ms_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("ember_restore_duration_ms_sum 3\n"));
    }
}
