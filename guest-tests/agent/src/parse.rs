//! Pure parsers for the kernel's text interfaces (sysfs CPU lists, /proc/meminfo,
//! /proc/cmdline). Kept free of I/O so they are unit-tested on the host.

/// Parses a kernel CPU list such as `0`, `0-1`, `0-3,8,10-11` into the CPU numbers.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let text = text.trim();
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Ok(cpus);
    }
    for part in text.split(',') {
        let part = part.trim();
        let num = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("bad CPU number {s:?} in {text:?}"))
        };
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(format!("descending CPU range {part:?} in {text:?}"));
                }
                cpus.extend(lo..=hi);
            }
            None => cpus.push(num(part)?),
        }
    }
    Ok(cpus)
}

/// Number of CPUs in a kernel CPU list.
pub fn count_cpu_list(text: &str) -> Result<usize, String> {
    parse_cpu_list(text).map(|v| v.len())
}

/// The value in KiB of a /proc/meminfo field such as `MemTotal`.
pub fn meminfo_kib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != field {
            return None;
        }
        let mut words = rest.split_whitespace();
        let value = words.next()?.parse::<u64>().ok()?;
        match words.next() {
            None => Some(value / 1024), // a byte count (e.g. HugePages_ fields have no unit)
            Some("kB") => Some(value),
            Some(_) => None,
        }
    })
}

/// The value of `key=value` on a kernel command line; `None` when absent.
/// Handles double-quoted values (`key="a b"`) the way the kernel does.
pub fn cmdline_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = cmdline.trim();
    while !rest.is_empty() {
        // Split off one word, honouring double quotes.
        let mut in_quotes = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            if c == '"' {
                in_quotes = !in_quotes;
            } else if c.is_whitespace() && !in_quotes {
                end = i;
                break;
            }
        }
        let word = &rest[..end];
        rest = rest[end..].trim_start();
        if let Some((k, v)) = word.split_once('=') {
            if k == key {
                let v = v.strip_prefix('"').unwrap_or(v);
                return Some(v.strip_suffix('"').unwrap_or(v));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Ok(vec![0]));
        assert_eq!(parse_cpu_list("0-1"), Ok(vec![0, 1]));
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Ok(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(count_cpu_list("0-63\n"), Ok(64));
        assert_eq!(count_cpu_list(""), Ok(0));
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("0-x").is_err());
        assert!(parse_cpu_list("1,,2").is_err());
    }

    #[test]
    fn meminfo_fields() {
        let text = "MemTotal:         496628 kB\nMemFree:          470000 kB\n\
                    HugePages_Total:       0\nHugepagesize:       2048 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal"), Some(496628));
        assert_eq!(meminfo_kib(text, "MemFree"), Some(470000));
        assert_eq!(meminfo_kib(text, "Hugepagesize"), Some(2048));
        assert_eq!(meminfo_kib(text, "MemAvailable"), None);
        assert_eq!(meminfo_kib("MemTotal: lots kB", "MemTotal"), None);
        // A field name that is a prefix of another must not match it.
        assert_eq!(meminfo_kib("MemTotalX: 5 kB\n", "MemTotal"), None);
    }

    #[test]
    fn cmdline_params() {
        let c = "console=ttyS0 panic=-1 ferrio.scenario=boot quiet x=\"a b\"\n";
        assert_eq!(cmdline_param(c, "ferrio.scenario"), Some("boot"));
        assert_eq!(cmdline_param(c, "panic"), Some("-1"));
        assert_eq!(cmdline_param(c, "x"), Some("a b"));
        assert_eq!(cmdline_param(c, "quiet"), None);
        assert_eq!(cmdline_param(c, "scenario"), None);
        assert_eq!(cmdline_param("", "ferrio.scenario"), None);
        // The last occurrence does not matter: the first one wins, like our agent expects.
        assert_eq!(
            cmdline_param("ferrio.scenario=a ferrio.scenario=b", "ferrio.scenario"),
            Some("a")
        );
    }
}
