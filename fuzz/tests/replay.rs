//! The regression guard of the fuzz targets, on stable and without libFuzzer
//! (`cargo test --no-default-features` in `fuzz/`, or `./run.sh test`): every seed the
//! generators make and every committed input (`corpus/`, `regressions/`) runs through
//! its harness without a panic, the committed seeds match the generators, and the
//! main workspace stays free of libFuzzer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs `data` through `target`; the failure names the input.
fn replay(target: &ferrio_fuzz::Target, what: &str, data: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| (target.run)(data)))
        .map_err(|_| format!("{} panicked on {what}", target.name))
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    for t in ferrio_fuzz::TARGETS {
        let file = root().join("fuzz_targets").join(format!("{}.rs", t.name));
        let text = std::fs::read_to_string(&file).expect("fuzz target file");
        assert!(
            text.contains(&format!("ferrio_fuzz::{}(data)", t.name)),
            "{}",
            file.display()
        );
    }
    let count = files(&root().join("fuzz_targets")).len();
    assert_eq!(
        count,
        ferrio_fuzz::TARGETS.len(),
        "a fuzz target without a harness"
    );
}

#[test]
fn generated_seeds_run_clean_and_are_committed() {
    let mut failures = Vec::new();
    for t in ferrio_fuzz::TARGETS {
        let seeds = (t.seeds)();
        assert!(seeds.len() >= 3, "{}: {} seeds", t.name, seeds.len());
        for (name, bytes) in &seeds {
            if let Err(e) = replay(t, &format!("seed {name}"), bytes) {
                failures.push(e);
            }
            let file = root().join("corpus").join(t.name).join(name);
            match std::fs::read(&file) {
                Ok(committed) if committed == *bytes => {}
                _ => failures.push(format!(
                    "{} differs from its generator: run \
                     `cargo run --no-default-features --example replay -- --write-seeds`",
                    file.display()
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn committed_corpus_and_regressions_replay() {
    let mut failures = Vec::new();
    let mut count = 0;
    for t in ferrio_fuzz::TARGETS {
        for dir in ["corpus", "regressions"] {
            for file in files(&root().join(dir).join(t.name)) {
                let data = std::fs::read(&file).expect("input");
                count += 1;
                if let Err(e) = replay(t, &file.display().to_string(), &data) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(count > 0, "no committed input");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn main_workspace_does_not_depend_on_libfuzzer() {
    let main = root().parent().expect("the repository");
    let lock = std::fs::read_to_string(main.join("Cargo.lock")).expect("main Cargo.lock");
    assert!(
        !lock.contains("libfuzzer"),
        "the main workspace pulls in libFuzzer"
    );
    let manifest = std::fs::read_to_string(main.join("Cargo.toml")).expect("main Cargo.toml");
    assert!(
        !manifest.contains("\"fuzz\""),
        "fuzz/ is a member of the main workspace"
    );
}
