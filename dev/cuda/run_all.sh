#!/usr/bin/env bash
# Build every kernel file of the lab, run each one (a file validates every version against the CPU
# reference, then benchmarks it), and print one table from their RESULT lines.
#   ./run_all.sh                 every *.cu here
#   ./run_all.sh permute swiglu  only these
# Needs a GPU. Exit status: 0 when every file ran and every version of every case validated.
# Logs and the table go to $LOG_DIR (default: a fresh directory under /tmp, printed at the end).
# LAB_BIN=dir: run the binaries prebuilt there (make bin BIN_DIR=dir) instead of building them here.
# LAB_TIMEOUT=s: stop a file that runs longer than s seconds (it then counts as failed).
# LAB_BUDGET=s: all the files together in s seconds: each gets at most what is left, and the files left
# with under 2 s are not run ("not run K: out of time", counted as failed), so the table still comes out.
set -u
if [ -n "${LAB_BIN:-}" ]; then LAB_BIN=$(cd "$LAB_BIN" && pwd) || exit 1; fi
cd "$(dirname "$0")"

if [ $# -gt 0 ]; then kernels=("$@"); else kernels=($(ls *.cu | sed 's/\.cu$//' | sort)); fi
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/kernel_lab.XXXXXX")}
mkdir -p "$LOG_DIR"

bin=.
if [ -n "${LAB_BIN:-}" ]; then
    bin=$LAB_BIN
    for k in "${kernels[@]}"; do
        if [ ! -x "$bin/$k" ]; then echo "no prebuilt $bin/$k (make bin BIN_DIR=$bin)"; exit 1; fi
    done
    echo "prebuilt in $bin: ${kernels[*]}"
else
    echo "building: ${kernels[*]}"
    if ! make -j"$(nproc 2>/dev/null || echo 4)" "${kernels[@]}" > "$LOG_DIR/build.log" 2>&1; then
        cat "$LOG_DIR/build.log"
        echo "build FAILED"
        exit 1
    fi
fi
deadline=0
if [ -n "${LAB_BUDGET:-}" ]; then deadline=$(( $(date +%s) + LAB_BUDGET )); fi

fail=0
: > "$LOG_DIR/results.txt"
for k in "${kernels[@]}"; do
    start=$(date +%s)
    secs=${LAB_TIMEOUT:-}
    if [ $deadline -gt 0 ]; then
        left=$(( deadline - start ))
        if [ $left -lt 2 ]; then echo "not run $k: out of time (LAB_BUDGET=$LAB_BUDGET s)"; fail=1; continue; fi
        if [ -z "$secs" ] || [ "$left" -lt "$secs" ]; then secs=$left; fi
    fi
    limit=()
    if [ -n "$secs" ]; then limit=(timeout --kill-after=5 "$secs"); fi
    ${limit[@]+"${limit[@]}"} "$bin/$k" > "$LOG_DIR/$k.log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "  $k stopped after ${secs}s (LAB_TIMEOUT / LAB_BUDGET)" >> "$LOG_DIR/$k.log"; fi
    n=$(grep -c '^RESULT' "$LOG_DIR/$k.log")
    echo "ran $k: exit $rc, $n results, $(( $(date +%s) - start )) s"
    if [ $rc -ne 0 ]; then fail=1; echo "  $k FAILED (exit $rc); last lines of $LOG_DIR/$k.log:"; tail -n 15 "$LOG_DIR/$k.log" | sed 's/^/    /'; fi
    if [ "$n" -eq 0 ]; then fail=1; fi
    grep '^RESULT' "$LOG_DIR/$k.log" >> "$LOG_DIR/results.txt"
done

# the table; '*' marks the fastest validated version of each (kernel, case)
awk '
{
    delete f
    for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    n++
    K[n] = f["kernel"]; V[n] = f["version"]; C[n] = f["case"]; OK[n] = f["ok"]
    MS[n] = f["ms"]; GB[n] = f["gbps"]; TF[n] = f["tflops"]; PCT[n] = f["pct_peak"]; PK[n] = f["peak"]
    key = K[n] SUBSEP C[n]
    if (OK[n] == 1 && MS[n] != "-" && (!(key in best) || MS[n] + 0 < best[key] + 0)) best[key] = MS[n]
    if (OK[n] != 1) bad++
}
END {
    printf "%-14s %3s  %-34s %-4s %10s %9s %9s %7s  %s\n", "kernel", "v", "case", "ok", "ms", "GB/s", "TFLOP/s", "%peak", "peak"
    for (i = 1; i <= n; i++) {
        mark = (OK[i] == 1 && MS[i] == best[K[i] SUBSEP C[i]]) ? "*" : ""
        printf "%-14s %3s  %-34s %-4s %10s %9s %9s %7s  %s%s\n", K[i], V[i], C[i], OK[i] == 1 ? "ok" : "FAIL", MS[i], GB[i], TF[i], PCT[i], PK[i], mark
    }
    printf "\n%d results, %d failed validation. peaks (H100 SXM): hbm 3350 GB/s, bf16 989, tf32 495, fp32 67 TFLOP/s\n", n, bad + 0
    if (bad > 0) exit 1
}' "$LOG_DIR/results.txt" | tee "$LOG_DIR/table.txt"
[ "${PIPESTATUS[0]}" -ne 0 ] && fail=1

echo "logs: $LOG_DIR"
if [ $fail -ne 0 ]; then echo "run_all: FAILURES (see above)"; exit 1; fi
echo "run_all: every version validated"
