#!/usr/bin/env bash
# The fuzz targets of ferrio (cargo-fuzz, libFuzzer, nightly toolchain).
#
#   fuzz/run.sh SECONDS [TARGET...]   build, then fuzz every target (or those named) for
#                                     SECONDS each; prints executions and coverage per
#                                     target; exits 1 if any target crashed
#   fuzz/run.sh replay TARGET FILE... replay inputs (crash files, directories) through
#                                     the harness on stable, without libFuzzer
#   fuzz/run.sh test                  the regression guard: seeds, corpus/ and
#                                     regressions/ replayed by `cargo test` on stable
#
# Seeds are in corpus/TARGET/ and are only read: what libFuzzer adds goes to
# work/TARGET/ (kept between runs, not committed). Crash inputs land in
# artifacts/TARGET/; fix the bug, then copy the input to regressions/TARGET/.
# Environment: FUZZ_TOOLCHAIN (default nightly), FUZZ_ARGS (extra libFuzzer flags).
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

[ $# -ge 1 ] || usage

case "$1" in
test)
    exec cargo test --no-default-features --locked
    ;;
replay)
    shift
    [ $# -ge 2 ] || usage
    exec cargo run --no-default-features --locked --release --example replay -- "$@"
    ;;
''|*[!0-9]*)
    usage
    ;;
esac

seconds="$1"
shift
all=$(ls fuzz_targets | sed 's/\.rs$//')
targets="${*:-$all}"

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "run.sh: the $toolchain toolchain is missing (rustup toolchain install $toolchain)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

start=$(date +%s)
cargo "+$toolchain" fuzz build >&2
built=$(date +%s)

mkdir -p work/logs
declare -A result
status=0
for t in $targets; do
    mkdir -p "work/$t" "corpus/$t"
    log="work/logs/$t.log"
    echo "run.sh: fuzzing $t for ${seconds}s" >&2
    # Per-input timeout 10 s: a hang is a bug too. Inputs libFuzzer finds go to work/.
    if cargo "+$toolchain" fuzz run "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
        -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1; then
        outcome=ok
    else
        outcome=CRASH
        status=1
        grep -E "^(==[0-9]+==|thread '|SUMMARY|Test unit written|panicked)" "$log" | head -8 >&2 || true
    fi
    # The last status line: "#N DONE cov: X ft: Y corp: ... exec/s: E ..." (or the last
    # pulse when it stopped early).
    line=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$line")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$line")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$line")
    rate=$(sed -nE 's/.* exec\/s: ([0-9]+).*/\1/p' <<<"$line")
    corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$line")
    result[$t]="$(printf '%-16s %-6s %12s %7s %7s %9s %6s' "$t" "$outcome" \
        "${execs:--}" "${cov:--}" "${ft:--}" "${rate:--}" "${corp:--}")"
done
end=$(date +%s)

printf '\n%-16s %-6s %12s %7s %7s %9s %6s\n' target result execs cov ft exec/s corpus
for t in $targets; do
    echo "${result[$t]}"
done
echo "build $((built - start)) s, fuzzing $((end - built)) s (${seconds} s per target); logs in fuzz/work/logs/"
exit $status
