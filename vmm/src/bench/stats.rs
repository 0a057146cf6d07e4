//! The one statistics type every benchmark prints: nearest-rank
//! percentiles of a series, with its sample count. A p99 needs at least
//! 100 samples; below that the honest figure is the maximum, and the p99
//! is absent (`null` in JSON, "max (n=…)" in tables).

use std::time::Duration;

use serde::Serialize;

/// Fewest samples for which a 99th percentile is reported.
pub const MIN_SAMPLES_FOR_P99: usize = 100;

/// Figures of one series of samples (milliseconds, unless named otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank); `None` with fewer than
    /// [`MIN_SAMPLES_FOR_P99`] samples.
    pub p99: Option<f64>,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Stats {
    /// Figures of `values` (all zero when there are none).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Stats {
            n: v.len(),
            min: v[0],
            p50: rank(0.5),
            p99: (v.len() >= MIN_SAMPLES_FOR_P99).then(|| rank(0.99)),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }

    /// Figures of durations, in milliseconds.
    pub fn of_durations(values: impl IntoIterator<Item = Duration>) -> Self {
        Self::of(values.into_iter().map(ms))
    }

    /// `p99 X` when there are enough samples, else `max X (n=N)`: what a
    /// table prints for the tail.
    pub fn tail(&self) -> String {
        match self.p99 {
            Some(p99) => format!("p99 {p99:.3}"),
            None => format!("max {:.3} (n={}, too few for a p99)", self.max, self.n),
        }
    }

    /// One table row: `name  n  min  p50  p99|-  max`.
    pub fn row(&self, name: &str) -> String {
        let p99 = self
            .p99
            .map_or_else(|| "-".to_string(), |p| format!("{p:.3}"));
        format!(
            "{name:<44} {:>6} {:>9.3} {:>9.3} {:>9} {:>9.3}\n",
            self.n, self.min, self.p50, p99, self.max
        )
    }

    /// The header for [`Stats::row`].
    pub fn header(unit: &str) -> String {
        format!(
            "{:<44} {:>6} {:>9} {:>9} {:>9} {:>9}\n",
            format!("({unit})"),
            "n",
            "min",
            "p50",
            "p99",
            "max"
        )
    }
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_with_counts() {
        let s = Stats::of([3.0, 1.0, 2.0]);
        assert_eq!((s.n, s.min, s.p50, s.max), (3, 1.0, 2.0, 3.0));
        assert_eq!(s.p99, None, "3 samples make no p99");
        assert!(s.tail().contains("max 3.000 (n=3"));
        let s = Stats::of((1..=200).map(f64::from));
        assert_eq!(s.p50, 100.0);
        assert_eq!(s.p99, Some(198.0));
        assert_eq!(Stats::of([]), Stats::default());
    }
}
