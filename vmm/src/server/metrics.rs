//! Counters and histograms for `GET /metrics`, in the Prometheus text
//! exposition format (version 0.0.4). Lock-free: atomics only.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::function::{HandlerResult, InvocationPath};
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
const BUCKETS_MS: [f64; 19] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    10000.0, 30000.0, 60000.0, 300000.0,
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
        self.render_series(out, name, "");
    }

    /// The samples of one series; `labels` is empty or `k="v",` (ahead
    /// of `le`).
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, n) in BUCKETS_MS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
        }
        // Read after the buckets: concurrent observations only make +Inf
        // larger, so the buckets stay monotonic.
        let count = self.count.load(Ordering::Relaxed).max(cumulative);
        let sum_ms = self.sum_us.load(Ordering::Relaxed) as f64 / 1e3;
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let labels = labels.trim_end_matches(',');
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braced} {sum_ms}\n{name}_count{braced} {count}"
        );
    }
}

/// How a function invocation request ended, the `outcome` label of
/// `ember_function_invocations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionOutcomeKind {
    /// The handler returned a JSON value.
    Json,
    /// The handler returned bytes.
    Bytes,
    /// The handler raised.
    Error,
    /// The handler ran into the timeout.
    TimedOut,
    /// The runtime process ended without answering.
    RuntimeExited,
    /// The clone failed (a 500).
    Failed,
    /// Refused for load or shutdown (429, 503) before running.
    Rejected,
    /// Refused as malformed or over a limit (400, 413).
    Invalid,
    /// The client went away while it ran: its clone was killed.
    Cancelled,
}

impl FunctionOutcomeKind {
    const ALL: [FunctionOutcomeKind; 9] = [
        FunctionOutcomeKind::Json,
        FunctionOutcomeKind::Bytes,
        FunctionOutcomeKind::Error,
        FunctionOutcomeKind::TimedOut,
        FunctionOutcomeKind::RuntimeExited,
        FunctionOutcomeKind::Failed,
        FunctionOutcomeKind::Rejected,
        FunctionOutcomeKind::Invalid,
        FunctionOutcomeKind::Cancelled,
    ];

    /// The kind of a handler's result.
    pub fn of(result: &HandlerResult) -> Self {
        match result {
            HandlerResult::Json { .. } => FunctionOutcomeKind::Json,
            HandlerResult::Bytes { .. } => FunctionOutcomeKind::Bytes,
            HandlerResult::Error { .. } => FunctionOutcomeKind::Error,
            HandlerResult::TimedOut => FunctionOutcomeKind::TimedOut,
            HandlerResult::RuntimeExited { .. } => FunctionOutcomeKind::RuntimeExited,
        }
    }

    /// The label value (for the kinds of a result, the `kind` it
    /// serializes with).
    pub fn as_str(self) -> &'static str {
        match self {
            FunctionOutcomeKind::Json => "json",
            FunctionOutcomeKind::Bytes => "bytes",
            FunctionOutcomeKind::Error => "error",
            FunctionOutcomeKind::TimedOut => "timed_out",
            FunctionOutcomeKind::RuntimeExited => "runtime_exited",
            FunctionOutcomeKind::Failed => "failed",
            FunctionOutcomeKind::Rejected => "rejected",
            FunctionOutcomeKind::Invalid => "invalid",
            FunctionOutcomeKind::Cancelled => "cancelled",
        }
    }

    /// The handler ran and answered (or timed out): the outcome has a path.
    fn ran(self) -> bool {
        (self as usize) < FunctionOutcomeKind::Failed as usize
    }
}

/// The `path` label values: the three invocation paths, then `none` for
/// requests that never reached a clone's answer.
const PATHS: [&str; 4] = ["hot", "hot_with_vsock_result", "vsock", "none"];

fn path_index(path: Option<InvocationPath>) -> usize {
    match path {
        Some(InvocationPath::Hot) => 0,
        Some(InvocationPath::HotWithVsockResult) => 1,
        Some(InvocationPath::Vsock) => 2,
        None => 3,
    }
}

/// Function clones in use and requests waiting, for the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunctionLoad {
    /// Invocations running (their clones restoring, running or being
    /// reset or destroyed).
    pub live: usize,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Recycled clones waiting between invocations.
    pub idle: usize,
}

/// One function's counters and histograms (kept with the function,
/// rendered by name).
#[derive(Debug, Default)]
pub struct FunctionCounters {
    counts: [[AtomicU64; PATHS.len()]; FunctionOutcomeKind::ALL.len()],
    /// Waiting for a slot.
    queue: Histogram,
    /// Making a clone for an invocation that found no idle one (restore,
    /// and the worker's start when jailed).
    make: Histogram,
    /// The invocation in its clone: event in, result out.
    run: Histogram,
    /// Putting a recycled clone back to its template after an invocation.
    reset: Histogram,
    /// Invocations served by an idle clone.
    reused: AtomicU64,
    /// Clones destroyed after their invocation instead of kept (a
    /// timeout, a failure, the vsock path, a failed reset): the next
    /// invocation gets another.
    replaced: AtomicU64,
}

impl FunctionCounters {
    /// Counts one request that ended with `kind`, on `path` (`None`: it
    /// got no answer from a clone).
    pub fn count(&self, kind: FunctionOutcomeKind, path: Option<InvocationPath>) {
        self.counts[kind as usize][path_index(path)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a request waited for its slot.
    pub fn observe_queue(&self, waited: Duration) {
        self.queue.observe(waited);
    }

    /// Records an invocation's run in its clone.
    pub fn observe_run(&self, run: Duration) {
        self.run.observe(run);
    }

    /// Records that an invocation needed a new clone, made in `took`.
    pub fn observe_make(&self, took: Duration) {
        self.make.observe(took);
    }

    /// Records what became of a recycled clone after its invocation: reset
    /// (in `reset`) and kept, or destroyed.
    pub fn observe_recycle(&self, served_by_idle: bool, reset: Option<Duration>) {
        if served_by_idle {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
        match reset {
            Some(took) => self.reset.observe(took),
            None => {
                self.replaced.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One function as `/metrics` shows it.
#[derive(Debug, Clone, Copy)]
pub struct FunctionSeries<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its counters.
    pub counters: &'a FunctionCounters,
    /// Its invocations running now.
    pub live: usize,
    /// Its recycled clones idle now.
    pub idle: usize,
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    invocations: [AtomicU64; Outcome::ALL.len()],
    restore: Histogram,
    queue: Histogram,
    total: Histogram,
    /// Restore to result, per invocation path (the first three `PATHS`).
    function_latency: [Histogram; 3],
}

impl Metrics {
    /// Records a function invocation's restore-to-result time.
    pub fn observe_function(&self, path: InvocationPath, latency: Duration) {
        if let Some(h) = self.function_latency.get(path_index(Some(path))) {
            h.observe(latency);
        }
    }

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

    /// The exposition text, with the pool's and the functions' gauges and
    /// counters (`per_function`: each function's, by name).
    pub fn render<'a>(
        &self,
        pool: &PoolStats,
        functions: &FunctionLoad,
        per_function: impl IntoIterator<Item = FunctionSeries<'a>>,
    ) -> String {
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
        self.render_functions(&mut out, functions, per_function);
        out
    }

    fn render_functions<'a>(
        &self,
        out: &mut String,
        load: &FunctionLoad,
        per_function: impl IntoIterator<Item = FunctionSeries<'a>>,
    ) {
        let functions: Vec<FunctionSeries<'a>> = per_function.into_iter().collect();
        out.push_str(
            "# HELP ember_function_invocations_total Function invocation requests by function, outcome and path.\n\
             # TYPE ember_function_invocations_total counter\n",
        );
        for &FunctionSeries {
            name, counters: f, ..
        } in &functions
        {
            for kind in FunctionOutcomeKind::ALL {
                let paths = if kind.ran() { 0..3 } else { 3..4 };
                for p in paths {
                    let n = f.counts[kind as usize][p].load(Ordering::Relaxed);
                    let _ = writeln!(
                        out,
                        "ember_function_invocations_total{{function=\"{}\",outcome=\"{}\",path=\"{}\"}} {n}",
                        name,
                        kind.as_str(),
                        PATHS[p]
                    );
                }
            }
        }
        let name = "ember_function_duration_ms";
        let _ = writeln!(
            out,
            "# HELP {name} Function invocations from the request to the handler's result (restore and run, not teardown), by path, in ms.\n\
             # TYPE {name} histogram"
        );
        for (h, path) in self.function_latency.iter().zip(PATHS) {
            h.render_series(out, name, &format!("path=\"{path}\","));
        }
        let gauges = [
            (
                "ember_function_live",
                "Function invocations running.",
                load.live,
            ),
            (
                "ember_function_idle_clones",
                "Recycled function clones waiting between invocations.",
                load.idle,
            ),
            (
                "ember_function_queue_length",
                "Function requests waiting for a slot.",
                load.queued,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        type Pick = fn(&FunctionCounters) -> &Histogram;
        let histograms: [(&str, &str, Pick); 4] = [
            (
                "ember_function_queue_ms",
                "Time a function request waited for its slot, by function, in ms.",
                |c| &c.queue,
            ),
            (
                "ember_function_clone_make_ms",
                "Time to make a clone for an invocation that found no idle one (restore, and the jailed worker's start), by function, in ms.",
                |c| &c.make,
            ),
            (
                "ember_function_run_ms",
                "Time an invocation ran in its clone (event in, result out), by function, in ms.",
                |c| &c.run,
            ),
            (
                "ember_function_reset_ms",
                "Time to put a recycled clone back to its template after an invocation, by function, in ms.",
                |c| &c.reset,
            ),
        ];
        // A family with no series would be a histogram without buckets.
        if functions.is_empty() {
            return;
        }
        for (metric, help, pick) in histograms {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} histogram");
            for f in &functions {
                pick(f.counters).render_series(out, metric, &format!("function=\"{}\",", f.name));
            }
        }
        type Count = fn(&FunctionSeries) -> u64;
        let per_function: [(&str, &str, &str, Count); 4] = [
            (
                "ember_function_clones_reused_total",
                "counter",
                "Invocations served by an idle recycled clone, by function.",
                |f| f.counters.reused.load(Ordering::Relaxed),
            ),
            (
                "ember_function_clones_replaced_total",
                "counter",
                "Clones destroyed after their invocation instead of kept (timeout, failure, vsock path, failed reset), by function.",
                |f| f.counters.replaced.load(Ordering::Relaxed),
            ),
            (
                "ember_function_live_by_function",
                "gauge",
                "Invocations running, by function.",
                |f| f.live as u64,
            ),
            (
                "ember_function_idle_clones_by_function",
                "gauge",
                "Recycled clones waiting between invocations, by function.",
                |f| f.idle as u64,
            ),
        ];
        for (metric, kind, help, value) in per_function {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
            for f in &functions {
                let _ = writeln!(out, "{metric}{{function=\"{}\"}} {}", f.name, value(f));
            }
        }
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
        let text = m.render(&PoolStats::default(), &FunctionLoad::default(), []);
        assert!(text.contains("ember_invocations_total{outcome=\"ok\"} 1\n"));
        assert!(text.contains("ember_restore_duration_ms_bucket{le=\"2.5\"} 0\n"));
        assert!(text.contains("ember_restore_duration_ms_bucket{le=\"5\"} 1\n"));
        assert!(text.contains("ember_invocation_duration_ms_bucket{le=\"300000\"} 0\n"));
        assert!(text.contains("ember_invocation_duration_ms_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("ember_restore_duration_ms_sum 3\n"));
    }

    #[test]
    fn function_counters_and_labelled_histograms() {
        let m = Metrics::default();
        let probe = FunctionCounters::default();
        probe.count(FunctionOutcomeKind::Json, Some(InvocationPath::Hot));
        probe.count(FunctionOutcomeKind::Invalid, None);
        m.observe_function(InvocationPath::Vsock, Duration::from_millis(30));
        let load = FunctionLoad {
            live: 2,
            queued: 1,
            idle: 3,
        };
        probe.observe_queue(Duration::from_micros(200));
        probe.observe_run(Duration::from_micros(700));
        probe.observe_make(Duration::from_millis(30));
        probe.observe_recycle(true, Some(Duration::from_micros(300)));
        probe.observe_recycle(false, None);
        let series = FunctionSeries {
            name: "probe",
            counters: &probe,
            live: 1,
            idle: 2,
        };
        let text = m.render(&PoolStats::default(), &load, [series]);
        for line in [
            "ember_function_invocations_total{function=\"probe\",outcome=\"json\",path=\"hot\"} 1\n",
            "ember_function_invocations_total{function=\"probe\",outcome=\"json\",path=\"vsock\"} 0\n",
            "ember_function_invocations_total{function=\"probe\",outcome=\"invalid\",path=\"none\"} 1\n",
            "ember_function_duration_ms_bucket{path=\"vsock\",le=\"50\"} 1\n",
            "ember_function_duration_ms_bucket{path=\"hot\",le=\"+Inf\"} 0\n",
            "ember_function_duration_ms_count{path=\"vsock\"} 1\n",
            "ember_function_live 2\n",
            "ember_function_queue_length 1\n",
            "ember_function_idle_clones 3\n",
            "ember_function_queue_ms_bucket{function=\"probe\",le=\"0.1\"} 0\n",
            "ember_function_queue_ms_bucket{function=\"probe\",le=\"0.25\"} 1\n",
            "ember_function_run_ms_bucket{function=\"probe\",le=\"1\"} 1\n",
            "ember_function_clone_make_ms_count{function=\"probe\"} 1\n",
            "ember_function_reset_ms_bucket{function=\"probe\",le=\"0.5\"} 1\n",
            "ember_function_reset_ms_count{function=\"probe\"} 1\n",
            "ember_function_clones_reused_total{function=\"probe\"} 1\n",
            "ember_function_clones_replaced_total{function=\"probe\"} 1\n",
            "ember_function_live_by_function{function=\"probe\"} 1\n",
            "ember_function_idle_clones_by_function{function=\"probe\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains("outcome=\"invalid\",path=\"hot\""));
        assert_eq!(
            text.matches("# TYPE ember_function_duration_ms ").count(),
            1
        );
    }
}
