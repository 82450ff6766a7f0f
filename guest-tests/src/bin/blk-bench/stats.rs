//! Per-VMM series of guest results, medians and ratios.

use std::collections::BTreeMap;

use ferrio_guest_tests::Outcome;
use serde_json::{json, Value};

use ferrio_guest_tests::bench::median;

use crate::jobs;

/// The result names the guest reports: each job's value and its mean latency.
fn result_names() -> Vec<String> {
    jobs::JOBS
        .iter()
        .flat_map(|j| [j.name.to_owned(), format!("{}_clat_mean_us", j.name)])
        .collect()
}

/// One VMM's runs.
#[derive(Default)]
pub struct Series {
    pub values: BTreeMap<String, Vec<f64>>,
    boot_to_init: Vec<f64>,
    total: Vec<f64>,
    pub failures: Vec<String>,
}

impl Series {
    pub fn record(&mut self, o: &Outcome) {
        for name in result_names() {
            let ok = o.result(&name).is_some_and(|r| r.ok);
            if let Some(v) = o.value(&name).and_then(Value::as_f64).filter(|_| ok) {
                self.values.entry(name).or_default().push(v);
            }
        }
        if let Some(t) = o.boot_to_init {
            self.boot_to_init.push(t.as_secs_f64());
        }
        self.total.push(o.total.as_secs_f64());
        let problems = o.problems();
        if !problems.is_empty() || o.exit_code() != Some(0) {
            self.failures.push(format!(
                "exit {:?}; {}; log {}",
                o.exit_code(),
                problems.join("; "),
                o.log_path.display()
            ));
        }
    }

    pub fn median(&self, name: &str) -> Option<f64> {
        self.values.get(name).and_then(|v| median(v))
    }

    pub fn json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for name in result_names() {
            let values = self.values.get(&name).cloned().unwrap_or_default();
            m.insert(
                name.clone(),
                json!({"runs": values, "median": median(&values)}),
            );
        }
        m.insert("boot_to_init_s".into(), json!(self.boot_to_init));
        m.insert("total_s".into(), json!(self.total));
        m.insert("failures".into(), json!(self.failures));
        Value::Object(m)
    }
}

/// `v` rounded to 4 significant digits (ratios against the host are tiny here).
fn round_sig(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// `a / b` per job.
pub fn ratios(a: impl Fn(&str) -> Option<f64>, b: impl Fn(&str) -> Option<f64>) -> Value {
    let mut m = serde_json::Map::new();
    for job in &jobs::JOBS {
        let r = a(job.name).zip(b(job.name)).map(|(a, b)| round_sig(a / b));
        m.insert(job.name.into(), json!(r));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0]), Some(1.5));
        assert_eq!(median(&[]), None);
        let r = ratios(|_| Some(1.0), |n| (n != "seq_write_mbps").then_some(3.0));
        assert_eq!(r["seq_read_mbps"], json!(0.3333));
        assert_eq!(r["seq_write_mbps"], Value::Null);
        assert_eq!(round_sig(0.000_123_456), 0.000_123_5);
        assert_eq!(round_sig(1234.56), 1235.0);
        assert_eq!(result_names().len(), 2 * jobs::JOBS.len());
    }
}
