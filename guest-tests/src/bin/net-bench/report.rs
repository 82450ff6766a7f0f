//! Per-VMM series of net-bench runs (throughput measured by the host peer), medians,
//! ratios and the one-line summaries.

use ferrio_guest_tests::net_wire::Direction;
use ferrio_guest_tests::{direction_mbps, FlowReport, Outcome};
use serde_json::{json, Value};

use ferrio_guest_tests::bench::median;

/// One VMM's runs.
#[derive(Default)]
pub struct Series {
    /// MB/s per run, by direction (upload, download), when the run moved data.
    mbps: [Vec<f64>; 2],
    /// What the guest measured itself (connect to the receiver's answer).
    guest_mbps: [Vec<f64>; 2],
    boot_to_init: Vec<f64>,
    total: Vec<f64>,
    pub failures: Vec<String>,
}

fn index(d: Direction) -> usize {
    match d {
        Direction::Upload => 0,
        Direction::Download => 1,
    }
}

impl Series {
    /// Records a finished guest and the flows the peer saw during it.
    pub fn record(&mut self, o: &Outcome, flows: &[FlowReport], peer_errors: &[String]) {
        for d in Direction::BOTH {
            let i = index(d);
            if let Some(v) = direction_mbps(flows, d) {
                self.mbps[i].push(round3(v));
            }
            let guest = o
                .result(&format!("{}_guest_mbps", d.tag()))
                .filter(|r| r.ok)
                .and_then(|r| r.value.as_f64());
            if let Some(v) = guest {
                self.guest_mbps[i].push(v);
            }
        }
        if let Some(t) = o.boot_to_init {
            self.boot_to_init.push(round1(t.as_secs_f64()));
        }
        self.total.push(round1(o.total.as_secs_f64()));
        let mut problems = o.problems();
        problems.extend(peer_errors.iter().map(|e| format!("peer: {e}")));
        if !problems.is_empty() || o.exit_code() != Some(0) {
            self.failures.push(format!(
                "exit {:?}; {}; log {}",
                o.exit_code(),
                problems.join("; "),
                o.log_path.display()
            ));
        }
    }

    pub fn fail(&mut self, why: String) {
        self.failures.push(why);
    }

    pub fn median(&self, d: Direction) -> Option<f64> {
        median(&self.mbps[index(d)])
    }

    pub fn has_results(&self) -> bool {
        self.mbps.iter().any(|v| !v.is_empty())
    }

    pub fn json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for d in Direction::BOTH {
            let i = index(d);
            m.insert(
                format!("{}_mbps", d.tag()),
                json!({"runs": self.mbps[i], "median": median(&self.mbps[i])}),
            );
            m.insert(
                format!("{}_guest_mbps", d.tag()),
                json!({"runs": self.guest_mbps[i], "median": median(&self.guest_mbps[i])}),
            );
        }
        m.insert("boot_to_init_s".into(), json!(self.boot_to_init));
        m.insert("total_s".into(), json!(self.total));
        m.insert("failures".into(), json!(self.failures));
        Value::Object(m)
    }

    /// `g2h 1.52 MB/s, h2g 0.21 MB/s (boot to /init 90.80 s)`.
    pub fn summary(&self) -> String {
        let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        format!(
            "g2h {} MB/s, h2g {} MB/s (boot to /init {} s){}",
            show(self.median(Direction::Upload)),
            show(self.median(Direction::Download)),
            show(median(&self.boot_to_init)),
            if self.failures.is_empty() {
                String::new()
            } else {
                format!(", {} failed run(s)", self.failures.len())
            }
        )
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Three decimals: PVM hosts move well under 1 MB/s host to guest.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// ferrio / QEMU per direction, 3 decimals.
pub fn ratios(ferrio: &Series, qemu: &Series) -> Value {
    let mut m = serde_json::Map::new();
    for d in Direction::BOTH {
        let r = match (ferrio.median(d), qemu.median(d)) {
            (Some(f), Some(q)) if q > 0.0 => Some((f / q * 1000.0).round() / 1000.0),
            _ => None,
        };
        m.insert(format!("{}_mbps", d.tag()), json!(r));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let mut f = Series::default();
        let mut q = Series::default();
        f.mbps = [vec![50.0], vec![]];
        q.mbps = [vec![100.0], vec![10.0]];
        let r = ratios(&f, &q);
        assert_eq!(r["g2h_mbps"], json!(0.5));
        assert_eq!(r["h2g_mbps"], Value::Null);
        assert!(f.summary().starts_with("g2h 50.00 MB/s, h2g - MB/s"));
        assert!(f.has_results() && !Series::default().has_results());
    }
}
