//! Parsing of the agent's console protocol (see `agent/src/report.rs`):
//! `FERRIO-AGENT start`, `FERRIO-RESULT {json}`, `FERRIO-DONE {json}`.

use serde::Deserialize;

/// Printed by the agent as soon as it runs as /init.
pub const START_MARKER: &str = "FERRIO-AGENT start";
const RESULT_MARKER: &str = "FERRIO-RESULT ";
const DONE_MARKER: &str = "FERRIO-DONE ";

/// One check as reported by the agent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CheckResult {
    pub scenario: String,
    pub check: String,
    pub ok: bool,
    /// What the guest saw (a string or number), or the error when `ok` is false.
    pub value: serde_json::Value,
}

/// The agent's summary line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Done {
    pub scenario: String,
    pub passed: u32,
    pub failed: u32,
}

/// What a console line means to the harness.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    AgentStart,
    Result(CheckResult),
    Done(Done),
    /// Kernel messages and anything else.
    Other,
}

/// Classifies one console line. Markers are searched anywhere in the line, since a
/// kernel message may have been printed just before them on the same line.
/// A marker followed by malformed JSON is an error (with the offending text).
pub fn parse_line(line: &str) -> Result<Event, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(i) = line.find(RESULT_MARKER) {
        let json = line[i + RESULT_MARKER.len()..].trim();
        return serde_json::from_str(json)
            .map(Event::Result)
            .map_err(|e| format!("bad result line ({e}): {line}"));
    }
    if let Some(i) = line.find(DONE_MARKER) {
        let json = line[i + DONE_MARKER.len()..].trim();
        return serde_json::from_str(json)
            .map(Event::Done)
            .map_err(|e| format!("bad done line ({e}): {line}"));
    }
    if line.contains(START_MARKER) {
        return Ok(Event::AgentStart);
    }
    Ok(Event::Other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_agent_lines() {
        assert_eq!(parse_line("FERRIO-AGENT start\r\n"), Ok(Event::AgentStart));
        assert_eq!(
            parse_line("[    1.0] random: crng init done"),
            Ok(Event::Other)
        );
        let r = parse_line(
            r#"FERRIO-RESULT {"scenario":"boot","check":"online_cpus","ok":true,"value":2}"#,
        );
        assert_eq!(
            r,
            Ok(Event::Result(CheckResult {
                scenario: "boot".into(),
                check: "online_cpus".into(),
                ok: true,
                value: json!(2),
            }))
        );
        let d = parse_line("x FERRIO-DONE {\"scenario\":\"boot\",\"passed\":4,\"failed\":1}\r");
        assert_eq!(
            d,
            Ok(Event::Done(Done {
                scenario: "boot".into(),
                passed: 4,
                failed: 1
            }))
        );
    }

    #[test]
    fn rejects_truncated_json() {
        let err = parse_line(r#"FERRIO-RESULT {"scenario":"boot","check":"a","ok":tr"#);
        assert!(err.unwrap_err().contains("bad result line"));
        assert!(parse_line("FERRIO-DONE {}").is_err());
    }
}
