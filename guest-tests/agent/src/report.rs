//! The agent's output protocol: one `FERRIO-RESULT {json}` line per check and a final
//! `FERRIO-DONE {json}` line, written to the console. JSON is produced by hand (no serde
//! in the guest): values are strings, integers, floats or booleans.

use std::fmt::Write as _;
use std::io::Write;

/// Marker printed once, first thing after the mounts.
pub const START_LINE: &str = "FERRIO-AGENT start";
/// Prefix of a per-check result line.
pub const RESULT_PREFIX: &str = "FERRIO-RESULT ";
/// Prefix of the final summary line.
pub const DONE_PREFIX: &str = "FERRIO-DONE ";

/// A JSON value a check can report.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::UInt(v)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::UInt(v.into())
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::UInt(v as u64)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl Value {
    /// Appends the JSON encoding of `self` to `out`.
    pub fn write_json(&self, out: &mut String) {
        match self {
            Value::Str(s) => escape_json_into(s, out),
            Value::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Value::UInt(v) => {
                let _ = write!(out, "{v}");
            }
            // JSON has no NaN/inf: report those as strings.
            Value::Float(v) if v.is_finite() => {
                let _ = write!(out, "{v}");
            }
            Value::Float(v) => escape_json_into(&v.to_string(), out),
            Value::Bool(v) => out.push_str(if *v { "true" } else { "false" }),
        }
    }
}

/// Appends `s` as a quoted JSON string literal to `out`.
pub fn escape_json_into(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Returns `s` as a quoted JSON string literal.
pub fn escape_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    escape_json_into(s, &mut out);
    out
}

/// Formats one result line (without the trailing newline).
pub fn result_line(scenario: &str, check: &str, ok: bool, value: &Value) -> String {
    let mut line = String::from(RESULT_PREFIX);
    line.push_str("{\"scenario\":");
    escape_json_into(scenario, &mut line);
    line.push_str(",\"check\":");
    escape_json_into(check, &mut line);
    line.push_str(if ok { ",\"ok\":true" } else { ",\"ok\":false" });
    line.push_str(",\"value\":");
    value.write_json(&mut line);
    line.push('}');
    line
}

/// Formats the summary line (without the trailing newline).
pub fn done_line(scenario: &str, passed: u32, failed: u32) -> String {
    format!(
        "{DONE_PREFIX}{{\"scenario\":{},\"passed\":{passed},\"failed\":{failed}}}",
        escape_json(scenario)
    )
}

/// Collects and prints the results of one scenario.
pub struct Reporter {
    scenario: String,
    passed: u32,
    failed: u32,
    out: Box<dyn Write>,
}

impl Reporter {
    /// A reporter writing to `out` (the console in the guest).
    pub fn new(scenario: &str, out: Box<dyn Write>) -> Self {
        Reporter {
            scenario: scenario.to_owned(),
            passed: 0,
            failed: 0,
            out,
        }
    }

    pub fn scenario(&self) -> &str {
        &self.scenario
    }

    pub fn failed(&self) -> u32 {
        self.failed
    }

    /// Records and prints one check with the value the guest saw.
    pub fn check(&mut self, name: &str, ok: bool, value: impl Into<Value>) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        let line = result_line(&self.scenario, name, ok, &value.into());
        self.emit(&line);
    }

    /// `Ok(v)`: a passing check with value `v`; `Err(e)`: a failing one with value `e`.
    pub fn check_result<T: Into<Value>>(&mut self, name: &str, result: Result<T, String>) {
        match result {
            Ok(v) => self.check(name, true, v),
            Err(e) => self.check(name, false, e),
        }
    }

    /// Prints a free-form informational line (not a check).
    pub fn note(&mut self, text: &str) {
        self.emit(&format!("FERRIO-NOTE {text}"));
    }

    /// Prints the summary line.
    pub fn finish(&mut self) {
        let line = done_line(&self.scenario, self.passed, self.failed);
        self.emit(&line);
    }

    fn emit(&mut self, line: &str) {
        // One write per line so kernel messages cannot land in the middle of it.
        let mut buf = String::with_capacity(line.len() + 1);
        buf.push_str(line);
        buf.push('\n');
        let _ = self.out.write_all(buf.as_bytes());
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn escapes_quotes_backslashes_and_controls() {
        assert_eq!(escape_json("plain"), "\"plain\"");
        assert_eq!(escape_json("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(escape_json("l1\nl2\r\t"), "\"l1\\nl2\\r\\t\"");
        assert_eq!(
            escape_json("\u{1}\u{1f}\u{7f}"),
            "\"\\u0001\\u001f\\u007f\""
        );
        assert_eq!(escape_json("µs ✓"), "\"µs ✓\"");
        assert_eq!(escape_json(""), "\"\"");
    }

    #[test]
    fn formats_values() {
        let enc = |v: Value| {
            let mut s = String::new();
            v.write_json(&mut s);
            s
        };
        assert_eq!(enc(Value::UInt(524288)), "524288");
        assert_eq!(enc(Value::Int(-3)), "-3");
        assert_eq!(enc(Value::Float(1.5)), "1.5");
        assert_eq!(enc(Value::Float(f64::NAN)), "\"NaN\"");
        assert_eq!(enc(Value::Bool(true)), "true");
    }

    #[test]
    fn result_and_done_lines() {
        assert_eq!(
            result_line("boot", "online_cpus", true, &Value::UInt(2)),
            "FERRIO-RESULT {\"scenario\":\"boot\",\"check\":\"online_cpus\",\"ok\":true,\"value\":2}"
        );
        assert_eq!(
            done_line("boot", 4, 1),
            "FERRIO-DONE {\"scenario\":\"boot\",\"passed\":4,\"failed\":1}"
        );
    }

    /// A `Write` that appends into a shared buffer, to inspect what the reporter printed.
    struct Shared(Rc<RefCell<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reporter_counts_and_prints() {
        let buf = Rc::new(RefCell::new(Vec::new()));
        let mut r = Reporter::new("boot", Box::new(Shared(buf.clone())));
        r.check("a", true, "x\"y");
        r.check_result::<u64>("b", Err("no such file".into()));
        r.check_result("c", Ok(7u64));
        r.finish();
        assert_eq!(r.failed(), 1);
        let text = String::from_utf8(buf.borrow().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].ends_with("\"check\":\"a\",\"ok\":true,\"value\":\"x\\\"y\"}"));
        assert!(lines[1].contains("\"ok\":false,\"value\":\"no such file\""));
        assert_eq!(
            lines[3],
            "FERRIO-DONE {\"scenario\":\"boot\",\"passed\":2,\"failed\":1}"
        );
    }
}
