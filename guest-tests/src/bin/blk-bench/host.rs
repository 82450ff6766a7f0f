//! The host side of blk-bench: the image file, the host's own fio run, tool versions.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use ferrio_guest_tests::boot_lock;
use serde_json::Value;

use crate::jobs;

/// Writes a `size`-byte image of pseudo-random data (xorshift64), so that reads move
/// real data: a sparse or fallocated file would be served from holes.
pub fn write_image(path: &Path, size: u64) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut file = std::fs::File::create(path).map_err(err)?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&chunk).map_err(err)?;
    }
    file.sync_all().map_err(err)
}

/// `cmd` as a shell command line (arguments with special characters single-quoted).
pub fn shell_line(cmd: &Command) -> String {
    let quote = |s: String| {
        if !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:".contains(&b))
        {
            s
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        }
    };
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| quote(a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.lines().next().unwrap_or("").to_owned())
}

/// The jobs on the host, on the image file, holding the boot lock so no guest runs
/// meanwhile. Returns each job's value and mean latency (as the guest reports them).
pub fn host_fio(image: &Path, runtime: u32, ramp: u32) -> Result<BTreeMap<String, f64>, String> {
    let _lock = boot_lock().map_err(|e| e.to_string())?;
    let mut results = BTreeMap::new();
    for job in &jobs::JOBS {
        eprintln!("[blk-bench] host fio: {}", job.name);
        let args = job.args(&image.to_string_lossy(), runtime, ramp);
        let out = Command::new("fio")
            .args(&args)
            .output()
            .map_err(|e| format!("fio: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "host fio {} failed ({}): {}",
                job.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let start = text.find('{').unwrap_or(0);
        let report: Value = serde_json::from_str(&text[start..])
            .map_err(|e| format!("host fio {}: bad JSON report: {e}", job.name))?;
        let stats = &report["jobs"][0][job.dir.key()];
        let num = |v: &Value| v.as_f64().ok_or(format!("host fio {}: no {v}", job.name));
        let (bw, iops) = (num(&stats["bw_bytes"])?, num(&stats["iops"])?);
        let clat = num(&stats["clat_ns"]["mean"])? / 1000.0;
        let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
        results.insert(job.name.to_owned(), round3(job.value(bw, iops)));
        results.insert(format!("{}_clat_mean_us", job.name), round3(clat));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_lines_quote_what_needs_it() {
        let mut cmd = Command::new("qemu");
        cmd.args(["-append", "a b", "-drive", "file=/x,if=none", "it's"]);
        assert_eq!(
            shell_line(&cmd),
            "qemu -append 'a b' -drive file=/x,if=none 'it'\\''s'"
        );
    }
}
