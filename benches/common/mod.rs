//! Small helpers every benchmark uses: its knobs from the environment, the machine's load, a
//! median. Included by each bench with `#[path = "common/mod.rs"] mod common;` (a file in a
//! subdirectory is not a bench target of its own).
// Each bench uses only part of it.
#![allow(dead_code)]

/// The environment variable `name` as a count in 1..=`max`, or `default` when unset; panics
/// with the variable's name on anything else (a benchmark must not run with a typo's value).
pub fn env_count(name: &str, default: usize, max: usize) -> usize {
    let Ok(text) = std::env::var(name) else {
        return default;
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => n,
        _ => panic!("{name}={text:?}: expected a whole number from 1 to {max}"),
    }
}

/// The one-minute load average, as `/proc/loadavg` prints it ("unknown" if unreadable).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The median of `values` (the mean of the middle two for an even count; NaN for none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
