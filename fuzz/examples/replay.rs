//! Replays inputs through a harness without libFuzzer (plain panics and backtraces):
//!
//! ```text
//! cargo run --no-default-features --example replay -- [-v] TARGET FILE|DIR...
//! cargo run --no-default-features --example replay -- --write-seeds
//! ```
//!
//! `-v` prints what the harness saw at each step. `--write-seeds` regenerates `corpus/<target>/` from the seed generators (stale
//! generated files are replaced; other files are left alone).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn files(path: &Path) -> Vec<PathBuf> {
    if path.is_dir() {
        let mut out: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        out.sort();
        out
    } else {
        vec![path.to_path_buf()]
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("-v") {
        ferrio_fuzz::set_verbose(true);
        args.remove(0);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if args.first().map(String::as_str) == Some("--write-seeds") {
        for t in ferrio_fuzz::TARGETS {
            let dir = root.join("corpus").join(t.name);
            std::fs::create_dir_all(&dir).expect("corpus directory");
            let seeds = (t.seeds)();
            for (name, bytes) in &seeds {
                std::fs::write(dir.join(name), bytes).expect("seed file");
            }
            println!("{}: {} seeds", t.name, seeds.len());
        }
        return ExitCode::SUCCESS;
    }
    let Some((name, paths)) = args.split_first() else {
        eprintln!("usage: replay TARGET FILE|DIR... | replay --write-seeds");
        return ExitCode::from(2);
    };
    let Some(target) = ferrio_fuzz::target(name) else {
        let names: Vec<_> = ferrio_fuzz::TARGETS.iter().map(|t| t.name).collect();
        eprintln!("unknown target {name}; targets: {}", names.join(" "));
        return ExitCode::from(2);
    };
    for path in paths.iter().flat_map(|p| files(Path::new(p))) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        println!("{} {} ({} bytes)", target.name, path.display(), data.len());
        (target.run)(&data);
    }
    println!("ok");
    ExitCode::SUCCESS
}
