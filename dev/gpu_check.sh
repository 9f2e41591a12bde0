#!/usr/bin/env bash
# The GPU check: one command, on a machine with an NVIDIA GPU, that says whether the CUDA side of this
# repository works there, within 6 minutes on one H100 (preflight included), and brings everything
# back in two files: summary.txt (the table: part | ok / FAIL / n/a / not run | seconds | key figure)
# and gpu_check.tgz (every log; no checkpoints). Nothing is compiled on the GPU machine: the binaries
# are built where the sources are and travel as one archive.
#
#   where the sources are (nvcc, no GPU needed):
#     make gpu-check-build            every binary for sm_90 into out/gpu_bin, packed as out/gpu_bin.tar.xz
#                                     with a MANIFEST (file, bytes, sha256, build info); prints the size
#                                     that travels (the tree git sees + the archive) and fails above 56 MiB
#   on the GPU machine (the tree and out/gpu_bin.tar.xz copied there):
#     make gpu-check                  unpack, rebuild data/arith and dev/ref, preflight, parts 1-9
#     make gpu-check PARTS=fp32,bf16  only these parts (names or numbers: PARTS=1,2); the preflight always
#     make -f dev/cuda_build.mk gpu-bench   the benchmark against PyTorch, a second command (~2.5 min)
#   anywhere:
#     GPU_CHECK_DRY=1 make gpu-check  the dry run: every step that needs no GPU (unpack, data, reference
#                                     states, the preflight, CPU stand-ins, the commands, the table); also
#                                     what happens when nvidia-smi finds no GPU
#
# What comes back: $OUT/summary.txt and $OUT/gpu_check.tgz (OUT unset: out/gpu_check/), rewritten after
# every part and on exit, so that a timeout, a crash or a kill of this script still leaves the table
# and the logs of every part that ended. The logs themselves are in GPU_CHECK_LOG (default
# out/gpu_check/log-<UTC time>/, made absolute: the kernel lab's logs go there too).
#
# Preflight (before any part): the archive unpacked and checked against its MANIFEST (and the sources
# against SOURCES.sha256: binaries built from other sources fail the row, and run all the same);
# data/arith rebuilt (python3 data/build_arith.py, standard library, ~2 s); dev/ref rebuilt with the
# first python that imports torch (.venv/bin/python, /opt/torch/.venv/bin/python, python3; ~5 s), in
# the background while the rest runs; ldd on every binary: a library "not found" is looked for in the
# torch environment's nvidia/*/lib folders (cuDNN and NCCL come from its nvidia-* wheels there), whose
# folder then joins LD_LIBRARY_PATH; what is still missing is named in the "libraries" row; the driver,
# cuBLAS, cuDNN and NCCL versions (the libraries as the binaries resolve them, asked through ctypes).
#
# The parts, most informative first, each under its own timeout (its budget, or what is left of
# GPU_CHECK_BUDGET if less; a part left under 5 s is not run). A failed run is named, matched without
# regard to case: "timed out after N s", "cannot start: libX not found", "crashed: signal N (SIGSEGV)",
# "exit N: <first error line>".
#   #  PARTS name    budget  what
#   1  fp32            40 s  test_moe_cu_fp32 dev/ref: every reference configuration at the CPU test's
#                            tolerances (1e-4), checkpoints both ways, determinism, resume, task eval, the
#                            GRPO updates, the trainer binaries (~11 processes of a tiny model)
#   2  bf16            40 s  test_moe_cu: the same at the bf16 tolerances
#   3  cudnn           25 s  test_moe_cu_cudnn -q (the quick subset, one process); FAIL unless its
#                            "cudnn: N graph executions" line says N > 0
#   4  determinism     25 s  train_moe_cu and train_moe_cu_cudnn twice each, all four at once: 10 steps of
#                            a small model, no val loss, no samples; equal final checkpoints (cmp), and
#                            cuDNN executed in the cuDNN runs
#   5  d1024           50 s  train_moe_cu_cudnn at d1024-E8-k2 (L=16 C=1024 E=8 K=2 F=2048 V=32768, 0.94e9
#                            parameters), B=2 T=4096, 8 steps: MFU and tok/s (medians of steps 3-8), peak
#                            memory, the seconds before the first step (the initial weights and set-up)
#   6  grpo            25 s  test_moe_cu -g (the GRPO subset: the one-update check against the CPU on the
#                            fixed rollouts of dev/ref) where the binary has it, else the same cases'
#                            lines from parts 1-2; and one GRPO step from the same checkpoint and seed by
#                            train_moe (CPU) and train_moe_cu_fp32: equal rollouts, reward, loss, clip
#   7  memcheck        40 s  compute-sanitizer --tool memcheck on test_moe_cu -q; "n/a: not available here"
#                            where the tool is missing or refuses the device ("Device not supported")
#   8  lab             45 s  dev/cuda/run_all.sh on the prebuilt kernel lab: every version of every file
#                            validated against the CPU, then timed (12 s at most per file; files past the
#                            part's budget are listed as not run)
#   9  dp              20 s  train_moe_cu_mpi (NCCL) under the carried MPICH's mpiexec, where it was built:
#                            R=1 equal to train_moe_cu, -b 9 over 2 ranks one error; R=2 where 2+ GPUs
#                          ----
#                     310 s  of parts + the preflight (~15-25 s: unpack ~1, data ~2, dev/ref ~5-10 in the
#                            background, ldd and versions ~2, nvidia-smi ~1) within GPU_CHECK_BUDGET = 360 s
# The GPU budgets are estimates from the sizes (no GPU has run them yet); the CPU-side steps were timed
# here by the dry run (dev/cuda/README.md, "Running the GPU check", has the figures).
#
# Environment: GPU_BIN (out/gpu_bin), GPU_BIN_ARCHIVE (GPU_BIN.tar.xz), PARTS (all), OUT (out/gpu_check),
# GPU_CHECK_LOG, GPU_CHECK_BUDGET (360), GPU_CHECK_DRY (1: no GPU parts), GPU_CHECK_REF (dev/ref),
# GPU_CHECK_REBUILD (1; 0: keep data/arith and the reference states as they are), GPU_CHECK_TORCH_ENV
# (/opt/torch/.venv: where nvidia/*/lib and a torch python are looked for), GPU_CHECK_SANITIZER (the
# compute-sanitizer binary), GPU_CHECK_PART_MAX (cap every part's seconds; tests), GPU_CHECK_KILL_AFTER
# (5: seconds between timeout's TERM and KILL), GPU_CHECK_MAX_MIB (56: the travel-size limit),
# GPU_BENCH_BUDGET (150). Needs bash >= 4, coreutils (timeout), tar and xz, ldd, python3 (stdlib).
#
# Other modes (what the Makefile's targets call):
#   dev/gpu_check.sh pack DIR ARCHIVE      write DIR/MANIFEST, pack DIR into ARCHIVE (.tar.xz)
#   dev/gpu_check.sh travel-size [PATH..]  the size that travels: the files git sees (tracked, and
#                                          untracked ones it does not ignore) + the carried PATHs;
#                                          exit 1 above GPU_CHECK_MAX_MIB
#   dev/gpu_check.sh bench                 the benchmark part alone (gpu-bench)
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
MODE=${1:-run}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $(( t / 1000 )); }
secs_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

# ----------------------------------------------------------------------------------------------------
# pack DIR ARCHIVE: DIR/MANIFEST (its first line DIR/BUILD_INFO, then "bytes sha256 file" for every
# other file), DIR packed into ARCHIVE (xz), the manifest also beside it (ARCHIVE without .tar.xz +
# .manifest.txt)
pack() {
    local dir=$1 archive=$2 t0 n bytes
    [ -d "$dir" ] || { echo "pack: no folder $dir"; return 1; }
    t0=$(now_ms)
    {
        echo "# $(cat "$dir/BUILD_INFO" 2> /dev/null || echo 'no BUILD_INFO')"
        echo "# bytes sha256 file: every file of the archive but this one"
        (cd "$dir" && find . -type f ! -name 'MANIFEST*' | sed 's|^\./||' | LC_ALL=C sort | while IFS= read -r f; do
            printf '%s %s %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)" "$f"; done)
    } > "$dir/MANIFEST.tmp" && mv "$dir/MANIFEST.tmp" "$dir/MANIFEST" || return 1
    mkdir -p "$(dirname "$archive")"
    tar -C "$dir" -cf - . | xz -T0 -6 > "$archive.tmp" && mv "$archive.tmp" "$archive" || { rm -f "$archive.tmp"; return 1; }
    cp "$dir/MANIFEST" "${archive%.tar.xz}.manifest.txt"
    touch -r "$archive" "$dir/MANIFEST" # DIR is what the archive holds: the check does not unpack it again
    n=$(grep -vc '^#' "$dir/MANIFEST"); bytes=$(awk '!/^#/ { s += $1 } END { print s + 0 }' "$dir/MANIFEST")
    echo "pack: $n files, $(mib "$bytes") MiB -> $archive $(mib "$(stat -c %s "$archive")") MiB in $(secs_since "$t0") s (manifest: ${archive%.tar.xz}.manifest.txt)"
}

# travel_size [PATH...]: what a copy of this checkout to the GPU machine carries, against the limit
travel_size() {
    local limit=${GPU_CHECK_MAX_MIB:-56} tree files extra=0 p b parts="" total
    if ! git rev-parse --is-inside-work-tree > /dev/null 2>&1; then echo "travel-size: not a git checkout: the size is unknown"; return 2; fi
    read -r tree files < <(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2> /dev/null |
                           awk '{ s += $1; n++ } END { print s + 0, n + 0 }')
    if [ -d shared ] && git check-ignore -q shared; then set -- "$@" shared; fi
    for p in "$@"; do
        if [ ! -e "$p" ]; then echo "travel-size: FAILED: $p (to carry) does not exist"; return 1; fi
        b=$(du -sb "$p" | cut -f1); extra=$(( extra + b )); parts="$parts + $p $(mib "$b") MiB"
    done
    total=$(( tree + extra ))
    local msg="the tree git sees $(mib "$tree") MiB ($files files: tracked, and untracked ones it does not ignore)$parts = $(mib "$total") MiB"
    if [ "$total" -gt $(( limit * 1048576 )) ]; then
        echo "travel-size: FAILED: $msg, over the $limit MiB allowed (the GPU machine takes 64 MiB in all)"; return 1
    fi
    echo "travel-size: $msg: under the $limit MiB allowed (the GPU machine takes 64 MiB in all)"
}

case $MODE in
    pack) [ $# -eq 3 ] || { echo "usage: $0 pack DIR ARCHIVE"; exit 2; }; pack "$2" "$3"; exit ;;
    travel-size) shift; travel_size "$@"; exit ;;
    run|bench) ;;
    *) echo "usage: $0 [run | bench | pack DIR ARCHIVE | travel-size [PATH...]]"; exit 2 ;;
esac

# ----------------------------------------------------------------------------------------------------
# the check (run) and the benchmark (bench): settings, the table, the archive of the logs

ALL_PARTS=(fp32 bf16 cudnn determinism d1024 grpo memcheck lab dp)
PARTS=${PARTS:-all}
if [ "$PARTS" != all ]; then
    for p in ${PARTS//,/ }; do
        ok=0; for i in "${!ALL_PARTS[@]}"; do [ "$p" = "${ALL_PARTS[$i]}" ] || [ "$p" = $(( i + 1 )) ] && ok=1; done
        [ $ok = 1 ] || { echo "PARTS: no part '$p' (the parts: ${ALL_PARTS[*]}, or 1-9)"; exit 2; }
    done
fi
selected() { [ "$PARTS" = all ] || [[ ",$PARTS," == *",$1,"* ]] || [[ ",$PARTS," == *",$2,"* ]]; }

BIN=${GPU_BIN:-out/gpu_bin}
ARCHIVE=${GPU_BIN_ARCHIVE:-${BIN%/}.tar.xz}
BUDGET=${GPU_CHECK_BUDGET:-360}
[ "$MODE" = bench ] && BUDGET=${GPU_BENCH_BUDGET:-150}
PART_MAX=${GPU_CHECK_PART_MAX:-0}
KILL_AFTER=${GPU_CHECK_KILL_AFTER:-5}
REF=${GPU_CHECK_REF:-dev/ref}
REBUILD=${GPU_CHECK_REBUILD:-1}
ARITH=${GPU_CHECK_ARITH:-data/arith}
TORCH_ENV=${GPU_CHECK_TORCH_ENV:-/opt/torch/.venv}
NAME=gpu_check; [ "$MODE" = bench ] && NAME=gpu_bench
OUT_DIR=${OUT:-out/gpu_check}
LOG=${GPU_CHECK_LOG:-out/gpu_check/$NAME-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$LOG" "$OUT_DIR" "$BIN" || exit 2
LOG=$(cd "$LOG" && pwd); OUT_DIR=$(cd "$OUT_DIR" && pwd); BIN=$(cd "$BIN" && pwd)
case $ARCHIVE in /*) ;; *) ARCHIVE=$ROOT/$ARCHIVE ;; esac
case $REF in /*) ;; *) REF=$ROOT/$REF ;; esac
T_START=$(date +%s)
state=running; gpu="?"; versions="?"

names=(); states=(); times=(); figures=(); failed=0
# record PART STATUS FIGURE [SECONDS]: one row of the table (STATUS: ok, FAIL, n/a, not run)
record() {
    names+=("$1"); states+=("$2"); figures+=("$3"); times+=("${4:-}")
    [ "$2" = FAIL ] && failed=1
    printf '  -> %s: %s%s  %s\n' "$1" "$2" "${4:+ (${4} s)}" "$3"
}
elapsed() { echo $(( $(date +%s) - T_START )); }
write_summary() {
    {
        echo "$NAME: $gpu | $versions"
        echo "parts: $PARTS | $(elapsed) s of $BUDGET s | $state | binaries $BIN | logs $LOG"
        printf '%-28s %-8s %7s  %s\n' "part" "status" "seconds" "key figure"
        printf '%-28s %-8s %7s  %s\n' "----------------------------" "--------" "-------" "----------"
        local i
        for i in "${!names[@]}"; do printf '%-28s %-8s %7s  %s\n' "${names[$i]}" "${states[$i]}" "${times[$i]}" "${figures[$i]}"; done
        if [ "$state" != finished ]; then echo "$NAME: $state: the rows above are the parts that ended"
        elif [ $failed = 0 ]; then echo "$NAME: nothing failed$([ "${DRY:-0}" = 1 ] && echo ' (dry run: the GPU parts were not run)')"
        else echo "$NAME: FAILED (the logs: $NAME.tgz)"; fi
    } > "$LOG/summary.txt.tmp" && mv -f "$LOG/summary.txt.tmp" "$LOG/summary.txt"
    local s=summary.txt; [ "$MODE" = bench ] && s=gpu_bench_summary.txt
    cp -f "$LOG/summary.txt" "$OUT_DIR/$s.tmp" && mv -f "$OUT_DIR/$s.tmp" "$OUT_DIR/$s"
}
# the logs into OUT/NAME.tgz: no checkpoints or other .bin files, no unpacked MPI runtime, and a log
# over 2 MiB cut to its first and last MiB (a file back from the GPU machine is at most 16 MiB)
pack_logs() {
    local f
    while IFS= read -r f; do
        { head -c 1048576 "$f"; printf '\n[... cut by gpu_check.sh: %s bytes in all ...]\n' "$(stat -c %s "$f")"; tail -c 1048576 "$f"; } > "$f.cut" &&
            mv -f "$f.cut" "$f"
    done < <(find "$LOG" -type f -size +2M ! -name '*.bin' 2> /dev/null)
    tar -czf "$OUT_DIR/.$NAME.tgz.tmp" --exclude='*.bin' --exclude=mpi_runtime --exclude="$NAME.tgz*" --exclude=".$NAME.tgz*" --exclude=.pids \
        -C "$(dirname "$LOG")" "$(basename "$LOG")" 2> /dev/null
    mv -f "$OUT_DIR/.$NAME.tgz.tmp" "$OUT_DIR/$NAME.tgz"
}
checkpoint() { write_summary; pack_logs; }
finish() {
    local rc=$?
    trap - EXIT INT TERM
    [ "$state" = running ] && state="stopped early (exit $rc)"
    [ -n "${ref_pid:-}" ] && kill "$ref_pid" 2> /dev/null
    [ -n "${MPI_DIR:-}" ] && rm -rf "$MPI_DIR"
    write_summary; pack_logs
    echo; cat "$LOG/summary.txt"
    echo "back: $OUT_DIR/$NAME.tgz ($(du -h "$OUT_DIR/$NAME.tgz" | cut -f1)), $OUT_DIR/$( [ "$MODE" = bench ] && echo gpu_bench_summary.txt || echo summary.txt)"
}
PIDS=$LOG/.pids
mkdir -p "$PIDS"
stop_runs() { local f; for f in "$PIDS"/*; do [ -e "$f" ] && kill -TERM "${f##*/}" 2> /dev/null; done; }
trap 'state="interrupted by a signal"; stop_runs; exit 130' INT TERM
trap finish EXIT
exec > >(tee -a "$LOG/console.txt") 2>&1

# the seconds a part of budget $1 may take now: its budget, or what is left of BUDGET if less
allowance() {
    local a=$1 left=$(( BUDGET - $(elapsed) ))
    [ "$left" -lt "$a" ] && a=$left
    echo "$a"
}
# timed LOGFILE SECONDS CMD...: CMD under timeout (stdin /dev/null), appended to LOGFILE; sets rc and secs.
# timeout runs in the background and is waited for, so that a signal to this script is handled at once
# (stop_runs: each running timeout, known by its pid file in $PIDS, passes it on to its command)
timed() {
    local logfile=$1 limit=$2 t0 tp
    shift 2
    t0=$(date +%s)
    printf '$ %s\n' "$*" >> "$logfile"
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" >> "$logfile" 2>&1 < /dev/null &
    tp=$!
    : > "$PIDS/$tp"
    wait "$tp"
    rc=$?
    rm -f "$PIDS/$tp"
    secs=$(( $(date +%s) - t0 ))
    if timed_out "$rc" "$secs" "$limit"; then echo "(stopped by timeout after $limit s)" >> "$logfile"; fi
}
timed_out() { [ "$1" -eq 124 ] || { [ "$1" -eq 137 ] && [ "$2" -ge "$3" ]; }; }
# why_failed LOGFILE RC SECS LIMIT: one line naming how a run failed
why_failed() {
    local log=$1 rc=$2 s=$3 limit=$4 m sig
    if timed_out "$rc" "$s" "$limit"; then echo "timed out after $limit s"; return; fi
    m=$(grep -v '^\$ ' "$log" 2> /dev/null | grep -i -m 1 -o 'error while loading shared libraries: [^:]*')
    if [ -n "$m" ]; then echo "cannot start: ${m##*: } not found (exit $rc)"; return; fi
    m=$(grep -v '^\$ ' "$log" 2> /dev/null | grep -i -m 1 -E 'fail:|failed:|error|abort|illegal|out of memory|not supported|segmentation|core dumped|terminate|denied|no such file' | cut -c1-110)
    if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then
        sig=$(kill -l $(( rc - 128 )) 2> /dev/null)
        echo "crashed: signal $(( rc - 128 ))${sig:+ (SIG$sig)}${m:+; $m}"; return
    fi
    echo "exit $rc${m:+: $m}"
}
# the largest N of the lines "cudnn: N graph executions" in a log (empty: no such line)
cudnn_execs() { grep -i -o -E 'cudnn: *[0-9]+ graph execution' "$1" 2> /dev/null | grep -o -E '[0-9]+' | sort -n | tail -n 1; }
have() { [ -x "$BIN/$1" ]; }
# needs_or_skip ROW THING...: records "not run" (and returns 0) when a binary or input is missing, it is
# a dry run, or the part's allowance is under 5 s; else sets limit to that allowance
needs_or_skip() {
    local row=$1 budget=$2 why="" need
    shift 2
    for need in "$@"; do
        case $need in
            ref) [ "$ref_ok" = 1 ] || why="no reference states ($REF)" ;;
            data) [ "$data_ok" = 1 ] || why="no data" ;;
            arith) [ -f "$ARITH/arith_rl.bin" ] || why="no $ARITH/arith_rl.bin" ;;
            *) have "$need" || why="no $need in $BIN" ;;
        esac
        [ -n "$why" ] && break
    done
    if [ -z "$why" ] && [ "$DRY" = 1 ]; then why="dry run"; fi
    limit=$(allowance "$budget")
    if [ -z "$why" ] && [ "$limit" -lt 5 ]; then why="out of time (GPU_CHECK_BUDGET=$BUDGET s)"; fi
    if [ -n "$why" ]; then record "$row" "not run" "$why"; return 0; fi
    if [ "$PART_MAX" -gt 0 ] && [ "$PART_MAX" -lt "$limit" ]; then limit=$PART_MAX; fi
    return 1
}

# ----------------------------------------------------------------------------------------------------
# preflight: the GPU, the binaries, the inputs, the libraries

echo "== $NAME, logs in $LOG; back: $OUT_DIR"
DRY=${GPU_CHECK_DRY:-}
if [ -z "$DRY" ]; then
    if nvidia-smi -L > /dev/null 2>&1; then DRY=0; else DRY=1; echo "no GPU answers nvidia-smi: a dry run"; fi
fi
if [ "$DRY" = 0 ]; then
    gpu=$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2> /dev/null | head -n 1)
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null | head -n 1)
    nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1
else
    gpu="no GPU (dry run)"; driver="none (dry run)"
fi
echo "GPU: $gpu"

# the binaries: the archive unpacked (when GPU_BIN has no MANIFEST or the archive is newer), checked
t0=$(now_ms); unpacked=""
if [ -f "$ARCHIVE" ] && { [ ! -f "$BIN/MANIFEST" ] || [ "$ARCHIVE" -nt "$BIN/MANIFEST" ]; }; then
    # a folder that held an archive before, or an empty one, is replaced; another is unpacked over
    if [ "$BIN" != "$ROOT" ] && { [ -f "$BIN/MANIFEST" ] || [ -z "$(ls -A "$BIN")" ]; }; then rm -rf "$BIN" && mkdir -p "$BIN"; fi
    if tar -C "$BIN" -xJf "$ARCHIVE" > "$LOG/unpack.log" 2>&1; then
        unpacked="unpacked from $(basename "$ARCHIVE") ($(mib "$(stat -c %s "$ARCHIVE")") MiB) in $(secs_since "$t0") s; "
    else unpacked="FAILED: cannot unpack $ARCHIVE: $(head -c 100 "$LOG/unpack.log")"; fi
fi
if [ "${unpacked#FAILED}" != "$unpacked" ]; then
    record "binaries" FAIL "${unpacked#FAILED: }"
elif [ ! -f "$BIN/MANIFEST" ]; then
    record "binaries" FAIL "no $ARCHIVE and no $BIN/MANIFEST: make gpu-check-build where the sources are, and carry the archive"
else
    nfiles=$(grep -vc '^#' "$BIN/MANIFEST")
    bad=$(awk '!/^#/ && NF == 3 { print $2 "  " $3 }' "$BIN/MANIFEST" | (cd "$BIN" && sha256sum -c 2>&1) | grep -v ': OK$' | cut -d: -f1 | paste -sd ' ' -)
    info=$(head -n 1 "$BIN/MANIFEST" | sed 's/^# //')
    srcs=""
    if [ -f "$BIN/SOURCES.sha256" ]; then
        srcs=$(sha256sum -c "$BIN/SOURCES.sha256" 2>&1 | grep -v ': OK$' | cut -d: -f1 | paste -sd ' ' -)
    fi
    if [ -n "$bad" ]; then record "binaries" FAIL "${unpacked}differ from MANIFEST: $bad"
    elif [ -n "$srcs" ]; then record "binaries" FAIL "${unpacked}built from other sources than these ($srcs differ; the parts run them all the same): $info"
    else record "binaries" ok "${unpacked}$nfiles files as in MANIFEST; $info"; fi
fi
have_cudnn=0; have train_moe_cu_cudnn && have test_moe_cu_cudnn && have_cudnn=1

# the torch python (dev/ref, the bench): the first that imports torch
TORCH_PY=""
for p in "${PYTHON:-}" .venv/bin/python "$TORCH_ENV/bin/python" python3; do
    [ -n "$p" ] || continue
    if "$p" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" > /dev/null 2>&1; then TORCH_PY=$p; break; fi
done
# the reference states: rebuilt (when missing, or older than dev/moe_ref.py) in the background
ref_pid=""; ref_t0=$(now_ms)
if [ "$REBUILD" = 1 ] && [ -n "$TORCH_PY" ] && { [ ! -f "$REF/manifest.txt" ] || [ dev/moe_ref.py -nt "$REF/manifest.txt" ]; }; then
    echo "reference states: $TORCH_PY dev/moe_ref.py --outdir $REF (in the background)"
    "$TORCH_PY" dev/moe_ref.py --outdir "$REF" > "$LOG/ref.log" 2>&1 < /dev/null &
    ref_pid=$!
fi

# data: the bundled token shards at both shapes; data/arith (the GRPO part's) rebuilt when missing
t0=$(now_ms); arith=""
if [ "$REBUILD" = 1 ] && [ ! -f "$ARITH/arith_rl.bin" ]; then
    if python3 data/build_arith.py --out "$ARITH" > "$LOG/arith.log" 2>&1; then arith="; $ARITH rebuilt in $(secs_since "$t0") s"
    else arith="; $ARITH FAILED: $(tail -n 1 "$LOG/arith.log" | cut -c1-80)"; fi
fi
TRAIN_GLOB='data/default/train_*.bin'
VAL_GLOB='data/default/val_*.bin'
# the shapes: d1024-E8-k2 (the paper's; scripts/bench_gpu.py's) and the small model of the determinism runs
BIG=(-nl 16 -nc 1024 -nh 8 -nkv 8 -ne 8 -nk 2 -nf 2048 -nv 32768 -b 2 -t 4096)
SMALL=(-nl 2 -nc 256 -nh 4 -ne 8 -nk 2 -b 8 -t 256)
data_msg=$(python3 - "$TRAIN_GLOB" "$VAL_GLOB" <<'EOF'
import glob, struct, sys
# token shards (llm.c's format): enough windows of T+1 tokens for a batch of B, at both shapes
worst = []
for pattern in sys.argv[1:]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        sys.exit(f"no shard matches {pattern}")
    ntoks = []
    for p in paths:
        magic, version, n = struct.unpack("<3i", open(p, "rb").read(12))
        if (magic, version) not in ((20240520, 1), (20240801, 7)):
            sys.exit(f"{p} is not a token shard")
        ntoks.append(n)
    for B, T in ((2, 4096), (8, 256)):
        windows = sum((n - 1) // T for n in ntoks)
        if windows < B:
            sys.exit(f"{pattern}: {windows} windows of {T + 1} tokens, a batch needs {B}")
        worst.append(windows // B)
    print(f"{len(paths)} shards, {sum(ntoks)} tokens", end="; ")
print(f"at least {min(worst)} batches at every shape")
EOF
)
data_rc=$?
data_ok=0
if [ $data_rc -eq 0 ] && [ "${arith#*FAILED}" = "$arith" ]; then data_ok=1; record "data" ok "$data_msg$arith"
else record "data" FAIL "$data_msg$arith"; fi
[ $data_rc -eq 0 ] && data_ok=1

# the libraries: ldd on every binary; "not found" ones looked for in the torch environment's nvidia/*/lib
t0=$(now_ms)
elfs=()
while IFS= read -r f; do
    [ "$(head -c 4 "$f" 2> /dev/null | od -An -c | tr -d ' ')" = '177ELF' ] && elfs+=("$f")
done < <(find "$BIN" -type f -perm -u+x 2> /dev/null | LC_ALL=C sort)
# the MPI runtime that came with train_moe_cu_mpi (MPICH is not on the GPU machine): unpacked once, its
# lib/ searched for that binary's libraries (and by part 9's mpiexec)
MPI_DIR=""
if [ -f "$BIN/mpi_runtime.tar.xz" ]; then
    MPI_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_mpi.XXXXXX") && tar -C "$MPI_DIR" -xJf "$BIN/mpi_runtime.tar.xz" > "$LOG/mpi_unpack.log" 2>&1
fi
# lddx BINARY: ldd, with the MPI runtime's libraries for the MPI build
lddx() {
    if [ "${1##*/}" = train_moe_cu_mpi ] && [ -d "$MPI_DIR/mpi_runtime/lib" ]; then
        LD_LIBRARY_PATH="$MPI_DIR/mpi_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$1" 2>&1
    else ldd "$1" 2>&1; fi
}
# missing_libs: "lib binary" for every library ldd does not find
missing_libs() { local f; for f in "${elfs[@]}"; do lddx "$f" | awk -v b="${f#$BIN/}" '/=> not found/ { print $1, b }'; done; }
missing=$(missing_libs)
added=()
if [ -n "$missing" ]; then
    libdirs=()
    for d in "$TORCH_ENV"/lib/python3*/site-packages/nvidia/*/lib "$TORCH_ENV"/lib/python3*/site-packages/nvidia/*/lib64; do
        [ -d "$d" ] && libdirs+=("$d")
    done
    for lib in $(echo "$missing" | awk '{ print $1 }' | sort -u); do
        for d in "${libdirs[@]}"; do
            if [ -e "$d/$lib" ]; then
                [[ " ${added[*]} " == *" $d "* ]] || added+=("$d")
                break
            fi
        done
    done
    if [ ${#added[@]} -gt 0 ]; then
        LD_LIBRARY_PATH=$(IFS=:; echo "${added[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        export LD_LIBRARY_PATH
        echo "LD_LIBRARY_PATH += ${added[*]}"
    fi
    missing=$(missing_libs)
fi
for f in "${elfs[@]}"; do echo "== ${f#$BIN/}"; lddx "$f"; done > "$LOG/ldd.txt"
# resolved_lib PATTERN: where the binaries load a library from (ldd), for its version
resolved_lib() { awk -v p="$1" '$1 ~ p && $2 == "=>" && $3 ~ /^\// { print $3; exit }' "$LOG/ldd.txt"; }
libversions=$(python3 - "$(resolved_lib '^libcublas\.so')" "$(resolved_lib '^libcudnn\.so')" "$(resolved_lib '^libnccl\.so')" <<'EOF' 2> /dev/null
import ctypes, sys
def load(p):
    try:
        return ctypes.CDLL(p) if p else None
    except OSError:
        return None
out = []
lib = load(sys.argv[1])
v = [ctypes.c_int() for _ in range(3)]
if lib and all(lib.cublasGetProperty(i, ctypes.byref(v[i])) == 0 for i in range(3)):
    out.append("cuBLAS %d.%d.%d" % tuple(x.value for x in v))
else:
    out.append("cuBLAS ?" if sys.argv[1] else "cuBLAS -")
lib = load(sys.argv[2])
if lib:
    lib.cudnnGetVersion.restype = ctypes.c_size_t
    n = lib.cudnnGetVersion()
    out.append("cuDNN %d.%d.%d" % (n // 10000, n // 100 % 100, n % 100) if n >= 90000 else "cuDNN %d.%d.%d" % (n // 1000, n // 100 % 10, n % 100))
else:
    out.append("cuDNN ?" if sys.argv[2] else "cuDNN -")
lib = load(sys.argv[3])
n = ctypes.c_int()
if lib and lib.ncclGetVersion(ctypes.byref(n)) == 0:
    out.append("NCCL %d.%d.%d" % (n.value // 10000, n.value // 100 % 100, n.value % 100))
else:
    out.append("NCCL ?" if sys.argv[3] else "NCCL -")
print(" | ".join(out))
EOF
)
versions="driver $driver | ${libversions:-cuBLAS ? | cuDNN ? | NCCL ?}"
echo "$versions"
lib_from=""; [ ${#added[@]} -gt 0 ] && lib_from="; LD_LIBRARY_PATH += ${added[*]}"
if [ ${#elfs[@]} -eq 0 ]; then record "libraries" "not run" "no binaries in $BIN"
elif [ -n "$missing" ]; then
    record "libraries" FAIL "missing: $(echo "$missing" | awk '{ by[$1] = by[$1] (by[$1] ? ", " : "") $2 } END { for (l in by) printf "%s (%s); ", l, by[l] }' | sed 's/; $//')$lib_from"
else record "libraries" ok "${#elfs[@]} binaries resolve every library; $versions$lib_from" "$(secs_since "$t0")"; fi

# the reference states: joined here
ref_ok=0
if [ -n "$ref_pid" ]; then
    wait "$ref_pid"; rrc=$?; ref_pid=""
    if [ $rrc -eq 0 ] && [ -f "$REF/manifest.txt" ]; then
        ref_ok=1; record "reference states" ok "$(wc -w < "$REF/manifest.txt") configurations, rebuilt with $TORCH_PY in $(secs_since "$ref_t0") s"
    else record "reference states" FAIL "$TORCH_PY dev/moe_ref.py: exit $rrc: $(grep -i -m 1 -E 'error|exception' "$LOG/ref.log" | cut -c1-90)"; fi
elif [ -f "$REF/manifest.txt" ]; then
    ref_ok=1; record "reference states" ok "$(wc -w < "$REF/manifest.txt") configurations in $REF (as they were)"
elif [ -z "$TORCH_PY" ]; then record "reference states" FAIL "no $REF/manifest.txt, and no python that imports torch to make it"
else record "reference states" FAIL "no $REF/manifest.txt (GPU_CHECK_REBUILD=0)"; fi
echo "preflight took $(elapsed) s"
checkpoint

# ----------------------------------------------------------------------------------------------------
# the parts

# 1, 2. the GPU test: every reference configuration, checkpoints, determinism, decoding, the trainers
part_test() { # ROW TEST TRAINER BUDGET
    local row=$1 test=$2 trainer=$3 budget=$4 log="$LOG/$2.log" summary first
    echo "[$row] $BIN/$test $REF $BIN/$trainer $BIN/train_moe"
    needs_or_skip "$row" "$budget" ref "$test" "$trainer" train_moe && return
    timed "$log" "$limit" "$BIN/$test" "$REF" "$BIN/$trainer" "$BIN/train_moe"
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    first=$(grep -m 1 -E '^ *FAIL' "$log" | sed 's/^ *//' | cut -c1-100)
    if [ $rc -eq 0 ] && [ -n "$summary" ]; then record "$row" ok "$summary" "$secs"
    else record "$row" FAIL "$(why_failed "$log" $rc "$secs" "$limit")${summary:+; $summary}${first:+; first: $first}" "$secs"; fi
}

# 3. the cuDNN build's quick subset, and that cuDNN ran
part_cudnn() {
    local row="3 test cuDNN (quick)" log="$LOG/test_moe_cu_cudnn.log" summary n
    echo "[$row] $BIN/test_moe_cu_cudnn -q $REF"
    if [ $have_cudnn = 0 ] && [ "$DRY" = 0 ]; then record "$row" "not run" "no cuDNN build (no cudnn_frontend.h where it was built)"; return; fi
    needs_or_skip "$row" 25 ref test_moe_cu_cudnn && return
    timed "$log" "$limit" "$BIN/test_moe_cu_cudnn" -q "$REF"
    summary=$(grep -E '^quick subset' "$log" | tail -n 1 | sed 's/^quick subset (-q): //')
    n=$(cudnn_execs "$log")
    if [ $rc -ne 0 ] || [ -z "$summary" ]; then record "$row" FAIL "$(why_failed "$log" $rc "$secs" "$limit")${summary:+; $summary}" "$secs"
    elif [ -z "$n" ]; then record "$row" FAIL "$summary, but no 'cudnn: N graph executions' line: cuDNN's use unknown" "$secs"
    elif [ "$n" -eq 0 ]; then record "$row" FAIL "$summary, but cuDNN did not execute (0 graph executions): the built-in attention ran" "$secs"
    else record "$row" ok "$summary; cuDNN: $n graph executions" "$secs"; fi
}

# 4. determinism: two identical runs per build, at once, their final checkpoints compared byte for byte
det_flags=("${SMALL[@]}" -x 10 -u 5 -v 0 -s 0 -i "$TRAIN_GLOB" -j "$VAL_GLOB")
part_determinism() {
    local row="4 determinism" dd="$LOG/determinism" b r builds=(train_moe_cu) pids=() bad="" okb=() ck n note=""
    if [ $have_cudnn = 1 ] || [ "$DRY" = 1 ]; then builds+=(train_moe_cu_cudnn); else note=" (no cuDNN build)"; fi
    echo "[$row] ${builds[*]}, twice each, all at once: ${det_flags[*]} -o DIR"
    if [ "$DRY" = 1 ] && have train_moe && [ $data_ok = 1 ]; then part_determinism_cpu; fi
    needs_or_skip "$row" 25 data "${builds[@]}" && return
    local t0; t0=$(date +%s)
    for b in "${builds[@]}"; do for r in a b; do
        rm -rf "$dd/$b/$r"; mkdir -p "$dd/$b"
        ( timed "$dd/$b/$r.log" "$limit" "$BIN/$b" "${det_flags[@]}" -o "$dd/$b/$r"; echo "$rc $secs" > "$dd/$b/$r.rc" ) &
        pids+=($!)
    done; done
    wait "${pids[@]}"
    for b in "${builds[@]}"; do
        for r in a b; do
            read -r rc secs < "$dd/$b/$r.rc"
            if [ "$rc" -ne 0 ]; then bad="$b run $r: $(why_failed "$dd/$b/$r.log" "$rc" "$secs" "$limit")"; break 2; fi
        done
        ck=$(cd "$dd/$b/a" 2> /dev/null && ls model_*.bin 2> /dev/null | tail -n 1)
        if [ -z "$ck" ]; then bad="$b: no checkpoint in $dd/$b/a"; break; fi
        if ! cmp -s "$dd/$b/a/$ck" "$dd/$b/b/$ck"; then bad="$b: $ck differs between two runs"; break; fi
        if [ "$b" = train_moe_cu_cudnn ]; then
            n=$(cudnn_execs "$dd/$b/a.log")
            if [ "${n:-0}" -eq 0 ]; then bad="$b: cuDNN did not execute (${n:-no} 'cudnn: N graph executions' line)"; break; fi
            okb+=("cuDNN ($n graph executions)")
        else okb+=(bf16); fi
    done
    rm -f "$dd"/*/*/model_*.bin
    if [ -z "$bad" ]; then record "$row" ok "identical checkpoints after 10 steps: ${okb[*]}$note" "$(( $(date +%s) - t0 ))"
    else record "$row" FAIL "$bad" "$(( $(date +%s) - t0 ))"; fi
}
# the same comparison on the CPU trainer: the dry run's stand-in
part_determinism_cpu() {
    local dd="$LOG/determinism/cpu" r ck t0 flags=(-nl 1 -nc 64 -nh 2 -ne 4 -nk 2 -b 4 -t 64 -x 2 -u 1 -v 0 -s 0 -i "$TRAIN_GLOB" -j "$VAL_GLOB")
    t0=$(now_ms)
    for r in a b; do
        rm -rf "$dd/$r"; mkdir -p "$dd"
        OMP_NUM_THREADS=1 timed "$dd/$r.log" 60 "$BIN/train_moe" "${flags[@]}" -o "$dd/$r"
        if [ $rc -ne 0 ]; then record "4 determinism, CPU stand-in" FAIL "train_moe run $r: $(why_failed "$dd/$r.log" $rc "$secs" 60)"; return; fi
    done
    ck=$(cd "$dd/a" && ls model_*.bin 2> /dev/null | tail -n 1)
    if [ -n "$ck" ] && cmp -s "$dd/a/$ck" "$dd/b/$ck"; then record "4 determinism, CPU stand-in" ok "train_moe twice, identical checkpoints" "$(secs_since "$t0")"
    else record "4 determinism, CPU stand-in" FAIL "train_moe: ${ck:-no checkpoint} differs between two runs"; fi
    rm -f "$dd"/*/model_*.bin
}

# 5. training at the paper's shape on the cuDNN build: MFU, tok/s, peak memory, the time before step 1
part_d1024() {
    local row="5 d1024-E8-k2 T=4096" trainer=train_moe_cu_cudnn note="" fig n log="$LOG/train_d1024.log"
    if [ $have_cudnn = 0 ] && [ "$DRY" = 0 ]; then trainer=train_moe_cu; note=" (built-in attention: no cuDNN build)"; fi
    echo "[$row] $BIN/$trainer ${BIG[*]} -x 8 -u 1000 -v 0 -s 0"
    needs_or_skip "$row" 50 data "$trainer" && return
    timed "$log" "$limit" "$BIN/$trainer" "${BIG[@]}" -x 8 -u 1000 -v 0 -s 0 -i "$TRAIN_GLOB" -j "$VAL_GLOB"
    fig=$(awk -v secs="$secs" '/^step +[0-9]+\/[0-9]+ \|/ {
                   split($2, s, "/"); n = s[1] + 0
                   for (i = 1; i <= NF; i++) { if ($i == "MFU") m = $(i + 1); if ($i == "tok/s") t = $(i - 1); if ($i == "ms") ms += $(i - 1) }
                   sub("%", "", m)
                   if (n > 2) { mfu[++k] = m + 0; tok[k] = t + 0 }
                   steps = n }
               /^peak gpu memory/ { peak = $4 }
               END {
                   if (k == 0) exit 1
                   for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (mfu[j] < mfu[i]) { x = mfu[i]; mfu[i] = mfu[j]; mfu[j] = x }
                   for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (tok[j] < tok[i]) { x = tok[i]; tok[i] = tok[j]; tok[j] = x }
                   printf "MFU %.1f%%, %.0f tok/s (medians of steps 3-%d), peak %s MiB, %.0f s before and between the steps",
                          mfu[int((k + 1) / 2)], tok[int((k + 1) / 2)], steps, peak == "" ? "?" : peak, secs - ms / 1000
               }' "$log")
    n=$(cudnn_execs "$log")
    if [ $rc -ne 0 ] || [ -z "$fig" ]; then record "$row" FAIL "$(why_failed "$log" $rc "$secs" "$limit")" "$secs"
    elif [ "$trainer" = train_moe_cu_cudnn ] && [ "${n:-0}" -eq 0 ]; then
        record "$row" FAIL "$fig; but cuDNN did not execute (${n:-no} 'cudnn: N graph executions' line)" "$secs"
    else record "$row" ok "$fig$note${n:+; cuDNN: $n graph executions}" "$secs"; fi
}

# 6. GRPO: the one-update check against the CPU on dev/ref's fixed rollouts; one GRPO step on CPU and GPU
part_grpo() {
    local row="6 grpo update vs CPU" log="$LOG/test_moe_cu_grpo.log" summary lines bad t0
    if grep -aq 'grpo subset (-g)' "$BIN/test_moe_cu" 2> /dev/null; then
        echo "[$row] $BIN/test_moe_cu -g $REF"
        if ! needs_or_skip "$row" 15 ref test_moe_cu; then
            timed "$log" "$limit" "$BIN/test_moe_cu" -g "$REF"
            summary=$(grep -E '^grpo subset' "$log" | tail -n 1 | sed 's/^grpo subset (-g): //')
            if [ $rc -eq 0 ] && [ -n "$summary" ]; then record "$row" ok "test_moe_cu -g: $summary" "$secs"
            else record "$row" FAIL "$(why_failed "$log" $rc "$secs" "$limit")${summary:+; $summary}" "$secs"; fi
        fi
    else # the same cases ran inside parts 1-2: their lines
        lines=$(cat "$LOG/test_moe_cu_fp32.log" "$LOG/test_moe_cu.log" 2> /dev/null | grep -c -E '^\[.* grpo\] update')
        bad=$(cat "$LOG/test_moe_cu_fp32.log" "$LOG/test_moe_cu.log" 2> /dev/null | grep -m 1 -E '^ *FAIL.*grpo' | sed 's/^ *//' | cut -c1-90)
        if [ -n "$bad" ]; then record "$row" FAIL "in parts 1-2 (test_moe_cu has no -g): $bad"
        elif [ "$lines" -gt 0 ]; then record "$row" ok "in parts 1-2 (test_moe_cu has no -g): $lines GRPO update cases checked"
        else record "$row" "not run" "test_moe_cu has no -g (GRPO subset), and parts 1-2 did not reach their GRPO cases"; fi
    fi
    # one GRPO step from the same checkpoint and seed, CPU and GPU (fp32): equal rollouts (the same RNG
    # scheme), so equal reward, length and entropy, and loss, kl, clip, norm within rounding
    local gd="$LOG/grpo" row2="6 grpo step CPU vs GPU" ck cpu gpu cmpmsg
    local pre=(-nl 1 -nc 64 -nh 2 -ne 4 -nk 2 -b 4 -t 64 -x 1 -u 1 -v 0 -s 0 -i "$ARITH/arith_train_000.bin" -j "$ARITH/arith_val_000.bin")
    local rl=(-rl "$ARITH/arith_rl.bin" -j "$ARITH/arith_val_000.bin" -t 64 -rp 4 -rg 4 -rm 2 -rr 16 -x 1 -v 0 -s 0 -sd 7)
    echo "[$row2] $BIN/train_moe ${pre[*]} -o DIR; then train_moe and train_moe_cu_fp32 -e DIR/model_00000001.bin ${rl[*]}"
    mkdir -p "$gd"; t0=$(now_ms)
    if [ "$DRY" = 1 ] && have train_moe && [ -f "$ARITH/arith_rl.bin" ]; then # the CPU half: the stand-in
        local row2="6 grpo step, CPU stand-in"
        grpo_cpu_half 60 && record "$row2" ok "$(grep -m 1 '^rl step' "$gd/cpu.log" | cut -d'|' -f2-4 | sed 's/  */ /g')" "$(secs_since "$t0")"
        row2="6 grpo step CPU vs GPU"
    fi
    needs_or_skip "$row2" 15 arith train_moe train_moe_cu_fp32 && return
    t0=$(date +%s)
    grpo_cpu_half "$limit" || return
    local left=$(( limit - ($(date +%s) - t0) )); [ $left -lt 1 ] && left=1
    timed "$gd/gpu.log" "$left" "$BIN/train_moe_cu_fp32" -e "$ck" "${rl[@]}"
    if [ $rc -ne 0 ]; then record "$row2" FAIL "train_moe_cu_fp32: $(why_failed "$gd/gpu.log" $rc "$secs" "$left")" "$(( $(date +%s) - t0 ))"; return; fi
    cpu=$(grep -m 1 '^rl step' "$gd/cpu.log"); gpu=$(grep -m 1 '^rl step' "$gd/gpu.log")
    cmpmsg=$(printf '%s\n%s\n' "$cpu" "$gpu" | awk '
        { line[NR] = $0 }
        END {
            if (line[1] == "" || line[2] == "") { print "FAIL no rl step line"; exit }
            n = split("reward solved flat len loss kl clip entropy norm", keys, " ")
            for (r = 1; r <= 2; r++) { m = split(line[r], w, /[ |]+/); for (i = 1; i < m; i++) v[r, w[i]] = w[i + 1] }
            for (i = 1; i <= n; i++) {
                k = keys[i]; a = v[1, k]; b = v[2, k]
                exact = (k == "reward" || k == "solved" || k == "flat" || k == "len")
                d = a - b; d = d < 0 ? -d : d; tol = 1e-3 * (b < 0 ? -b : b); split(b, f, "."); unit = 2 * 10 ^ -length(f[2])
                if (tol < unit) tol = unit
                if ((exact && a != b) || (!exact && d > tol)) { print "FAIL " k " " a " (CPU) vs " b " (GPU)"; exit }
            }
            print "ok reward " v[2, "reward"] " len " v[2, "len"] " entropy " v[2, "entropy"] " loss " v[2, "loss"] " clip " v[2, "clip"] ": as the CPU step"
        }')
    if [ "${cmpmsg%% *}" = ok ]; then record "$row2" ok "${cmpmsg#ok }" "$(( $(date +%s) - t0 ))"
    else record "$row2" FAIL "${cmpmsg#FAIL }" "$(( $(date +%s) - t0 ))"; fi
}
# the CPU half of the GRPO step: a one-step checkpoint of a tiny model, then one GRPO step from it; sets ck
grpo_cpu_half() { # LIMIT
    rm -rf "$gd/pre"
    timed "$gd/pre.log" "$1" "$BIN/train_moe" "${pre[@]}" -o "$gd/pre"
    ck=$gd/pre/model_00000001.bin
    if [ $rc -ne 0 ] || [ ! -f "$ck" ]; then record "$row2" FAIL "train_moe (the checkpoint): $(why_failed "$gd/pre.log" $rc "$secs" "$1")"; return 1; fi
    timed "$gd/cpu.log" "$1" "$BIN/train_moe" -e "$ck" "${rl[@]}"
    if [ $rc -ne 0 ]; then record "$row2" FAIL "train_moe -rl: $(why_failed "$gd/cpu.log" $rc "$secs" "$1")"; return 1; fi
}

# 7. compute-sanitizer memcheck on the quick subset
part_memcheck() {
    local row="7 memcheck (quick)" log="$LOG/memcheck.log" cs summary quick m
    cs=${GPU_CHECK_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -n 1)}
    echo "[$row] ${cs:-compute-sanitizer} --tool memcheck --error-exitcode 1 $BIN/test_moe_cu -q $REF"
    if [ -z "$cs" ] || ! [ -x "$cs" ]; then record "$row" n/a "not available here: no compute-sanitizer"; return; fi
    needs_or_skip "$row" 40 ref test_moe_cu && return
    timed "$log" "$limit" "$cs" --tool memcheck --error-exitcode 1 --print-limit 20 "$BIN/test_moe_cu" -q "$REF"
    m=$(grep -i -m 1 -E 'device not supported|not supported on this (device|platform)|unable to (find|load)|failed to initialize' "$log" | cut -c1-100)
    summary=$(grep -E 'ERROR SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')
    quick=$(grep -E '^quick subset' "$log" | tail -n 1 | sed 's/^quick subset (-q): //')
    if [ -n "$m" ] && [ -z "$quick" ]; then record "$row" n/a "not available here: $m" "$secs"
    elif [ $rc -eq 0 ] && [ -n "$quick" ]; then record "$row" ok "${summary:-no errors}; test $quick" "$secs"
    else record "$row" FAIL "$(why_failed "$log" $rc "$secs" "$limit"); ${summary:-no ERROR SUMMARY}; test ${quick:-did not finish}" "$secs"; fi
}

# 8. the kernel lab: every version of every file validated, then timed
part_lab() {
    local row="8 kernel lab" log="$LOG/kernel_lab.log" summary files bad skipped
    echo "[$row] LAB_BIN=$BIN/lab LAB_TIMEOUT=12 LAB_BUDGET=N LOG_DIR=$LOG/kernel_lab dev/cuda/run_all.sh"
    needs_or_skip "$row" 45 lab/adamw && return
    timed "$log" "$(( limit + 5 ))" env LAB_BIN="$BIN/lab" LAB_TIMEOUT=12 LAB_BUDGET="$limit" LOG_DIR="$LOG/kernel_lab" dev/cuda/run_all.sh
    summary=$(grep -E '^[0-9]+ results, [0-9]+ failed validation' "$log" | tail -n 1 | sed 's/\. peaks.*//')
    files=$(grep -c '^ran ' "$log"); bad=$(grep -E '^ran ' "$log" | grep -vc 'exit 0,'); skipped=$(grep -c '^not run ' "$log")
    if [ $rc -eq 0 ]; then record "$row" ok "$files files, $summary" "$secs"
    else record "$row" FAIL "$(why_failed "$log" $rc "$secs" "$(( limit + 5 ))"): $bad of $files files failed${skipped:+, $skipped not run (out of time)}; ${summary:-no table}" "$secs"; fi
}

# 9. data parallel: train_moe_cu_mpi under mpiexec (the MPI runtime archived beside it) on the small model,
# 10 steps with val loss, samples and a checkpoint. R=1: every step's figures, the val loss and the
# checkpoint equal to train_moe_cu's; -b 9 over 2 ranks (an error before any GPU work): one message, a
# non-zero exit, no hang; R=2 (two GPUs or more): the losses within 1e-3 (relative) of train_moe_cu's
dp_flags=("${SMALL[@]}" -x 10 -u 5 -v 10 -m 2 -s 10 -g 4 -i "$TRAIN_GLOB" -j "$VAL_GLOB")
dd="$LOG/data_parallel"
ngpu=0; mpirun=(); plain_ok=0; dp_allowed=0; dp_t0=0
# the seconds left of the part's allowance (at least 1: timeout takes 0 as no limit)
dp_left() { local s=$(( dp_allowed - ($(date +%s) - dp_t0) )); [ $s -lt 1 ] && s=1; echo $s; }
# mpi_setup: sets mpirun (the launcher of the MPI runtime unpacked in the preflight, in the environment the
# binary needs: the runtime's libraries, and the preflight's LD_LIBRARY_PATH, NCCL's folder where needed) or why
mpi_setup() {
    mpirun=(); why=""
    if [ ! -f "$BIN/mpi_runtime.tar.xz" ]; then why="no $BIN/mpi_runtime.tar.xz"; return; fi
    if [ ! -x "$MPI_DIR/mpi_runtime/bin/mpiexec" ]; then why="cannot unpack mpi_runtime.tar.xz: $(head -c 90 "$LOG/mpi_unpack.log")"; return; fi
    local libs=$MPI_DIR/mpi_runtime/lib missing
    missing=$(lddx "$BIN/train_moe_cu_mpi" | awk '/not found/ { print $1 }' | paste -sd ' ' -)
    if [ -n "$missing" ]; then why="train_moe_cu_mpi: $missing not found"; return; fi
    mpirun=(env "LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$MPI_DIR/mpi_runtime/bin/mpiexec" -launcher fork)
}
# dp_figures LOG: a line per step (step, loss, ce, aux, z, lr, norm: the step line without its timings)
# and one per val loss
dp_figures() {
    awk '/^step +[0-9]+\/[0-9]+ \|/ { s = $0; sub(/^step +/, "", s); split(s, f, "|"); split(f[1], n, "/")
                                       line = n[1] " " f[2] " " f[3] " " f[4]; gsub(/[()]/, "", line)
                                       m = split(line, w, " "); out = w[1]; for (i = 2; i <= m; i++) out = out " " w[i]; print out }
         /^val loss / { print "val", $3 }' "$1"
}
# dp_maxrel A B: the largest relative difference between the losses (loss, ce, aux, z, val) of two
# dp_figures listings, and where; "mismatch" if their lines do not pair up
dp_maxrel() {
    awk 'NR == FNR { a[FNR] = $0; na = FNR; next }
         { nb = FNR; ny = split($0, y, " "); if (split(a[FNR], x, " ") != ny) bad = 1
           for (i = 1; i < ny; i++) if (y[i] ~ /^(loss|ce|aux|z|val)$/) {
               if (x[i] != y[i]) bad = 1
               d = x[i + 1] - y[i + 1]; d = d < 0 ? -d : d; r = x[i + 1] < 0 ? -x[i + 1] : x[i + 1]
               if (r > 0) d /= r
               if (d > worst) { worst = d; at = y[1] == "val" ? "val loss" : y[i] " of step " y[1] } } }
         END { if (bad || na != nb || nb == 0) print "mismatch"; else printf "%.2e%s\n", worst, (at ? " (" at ")" : "") }' "$1" "$2"
}
dp_end() { if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then echo "timed out after $2 s"; else echo "exit $1"; fi; }
# dp_b_error LIMIT: -b 9 with 2 ranks; sets b_ok (1: a non-zero exit in time, one error naming -b) and b_msg
dp_b_error() {
    timed "$dd/b_error.log" "$1" "${mpirun[@]}" -n 2 "$BIN/train_moe_cu_mpi" -b 9 -x 1
    local n
    n=$(grep -c 'flag -b' "$dd/b_error.log")
    b_ok=0; b_msg="-b 9 over 2 ranks: $(dp_end $rc "$secs"), $n errors naming -b"
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ "$n" = 1 ]; then b_ok=1; b_msg="-b 9 over 2 ranks: one error, exit $rc"; fi
}
part_dp() {
    local row1="9 data parallel R=1" row2="9 data parallel R=2" prc psecs r1rc r1secs nsteps ck worst
    echo "[data parallel] mpiexec -n R $BIN/train_moe_cu_mpi ${dp_flags[*]} -o DIR, R = 1 (vs train_moe_cu) and 2 (2+ GPUs)"
    mkdir -p "$dd"
    if ! have train_moe_cu_mpi; then record "$row1" "not run" "no MPI build (no MPICH where the binaries were built)"; return; fi
    [ "$DRY" = 0 ] && ngpu=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU')
    if [ "$DRY" = 1 ]; then # the launcher, MPI and the -b error need no GPU
        local t0; t0=$(now_ms)
        mpi_setup
        if [ -n "$why" ]; then record "9 data parallel, CPU stand-in" FAIL "$why"
        else
            dp_b_error 20
            if [ $b_ok = 1 ]; then record "9 data parallel, CPU stand-in" ok "mpiexec from mpi_runtime.tar.xz, $b_msg" "$(secs_since "$t0")"
            else record "9 data parallel, CPU stand-in" FAIL "$b_msg: $(grep -m 1 -i 'error' "$dd/b_error.log" | cut -c1-80)"; fi
        fi
    fi
    needs_or_skip "$row1" 20 data train_moe_cu train_moe_cu_mpi && return
    dp_allowed=$limit; dp_t0=$(date +%s)
    mpi_setup
    if [ -n "$why" ]; then record "$row1" FAIL "$why"; return; fi
    dp_b_error "$(dp_left)"
    rm -rf "$dd/plain" "$dd/r1" "$dd/r2"
    timed "$dd/plain.log" "$(dp_left)" "$BIN/train_moe_cu" "${dp_flags[@]}" -o "$dd/plain"
    prc=$rc; psecs=$secs; [ $prc -eq 0 ] && plain_ok=1
    timed "$dd/r1.log" "$(dp_left)" "${mpirun[@]}" -n 1 "$BIN/train_moe_cu_mpi" "${dp_flags[@]}" -o "$dd/r1"
    r1rc=$rc; r1secs=$secs
    dp_figures "$dd/plain.log" > "$dd/plain.txt"; dp_figures "$dd/r1.log" > "$dd/r1.txt"
    nsteps=$(grep -vc '^val' "$dd/plain.txt"); ck=model_00000010.bin
    if [ $prc -ne 0 ]; then record "$row1" FAIL "train_moe_cu: $(why_failed "$dd/plain.log" $prc "$psecs" "$dp_allowed")"
    elif [ $r1rc -ne 0 ]; then record "$row1" FAIL "mpiexec -n 1: $(why_failed "$dd/r1.log" $r1rc "$r1secs" "$dp_allowed")"
    elif [ "$nsteps" != 10 ] || ! cmp -s "$dd/plain.txt" "$dd/r1.txt"; then
        record "$row1" FAIL "$nsteps steps; vs train_moe_cu: $(diff "$dd/plain.txt" "$dd/r1.txt" | grep -m 1 '^>' | cut -c1-80)"
    elif ! cmp -s "$dd/plain/$ck" "$dd/r1/$ck"; then record "$row1" FAIL "the losses agree with train_moe_cu's, the checkpoints ($ck) do not"
    elif [ $b_ok = 0 ]; then record "$row1" FAIL "$b_msg: $(grep -m 1 -i 'error' "$dd/b_error.log" | cut -c1-80)"
    else record "$row1" ok "10 steps, val loss, checkpoint: as train_moe_cu's; $b_msg" "$(( $(date +%s) - dp_t0 ))"; fi
    if [ "$ngpu" -lt 2 ]; then record "$row2" "not run" "nvidia-smi lists $ngpu GPU: R=2 needs two (NCCL: one rank per GPU)"
    elif [ $plain_ok = 0 ]; then record "$row2" "not run" "no train_moe_cu run to compare with (R=1 above)"
    elif [ "$(dp_left)" -lt 5 ]; then record "$row2" "not run" "out of time (the part's $dp_allowed s)"
    else
        timed "$dd/r2.log" "$(dp_left)" "${mpirun[@]}" -n 2 "$BIN/train_moe_cu_mpi" "${dp_flags[@]}" -o "$dd/r2"
        dp_figures "$dd/r2.log" > "$dd/r2.txt"
        worst=$(dp_maxrel "$dd/plain.txt" "$dd/r2.txt")
        if [ $rc -ne 0 ]; then record "$row2" FAIL "mpiexec -n 2: $(why_failed "$dd/r2.log" $rc "$secs" "$(dp_left)")"
        elif [ "$worst" = mismatch ] || awk -v w="${worst%% *}" 'BEGIN { exit !(w + 0 > 1e-3) }'; then
            record "$row2" FAIL "losses vs train_moe_cu's: max relative difference $worst (limit 1e-3)"
        else record "$row2" ok "2 GPUs, 10 steps and val loss: max relative difference $worst from train_moe_cu's" "$secs"; fi
    fi
    rm -f "$dd"/*/model_*.bin
}

# the benchmark against PyTorch (bench mode): train_moe_cu, eager, torch.compile; a third of the part each
part_bench() {
    local row="bench d1024-E8-k2" allowed side fig
    allowed=$(allowance "$BUDGET"); side=$(( (allowed - 10) / 3 )); [ $side -lt 20 ] && side=20
    local cmd=("${TORCH_PY:-python3}" scripts/bench_gpu.py --configs d1024-E8-k2 --steps 4 --warmup 1 --timeout "$side"
               --trainer "$BIN/train_moe_cu" --python "${TORCH_PY:-python3}" --json "$LOG/bench.json")
    echo "[bench] ${cmd[*]}"
    if [ -z "$TORCH_PY" ]; then record "$row" "not run" "no python that imports torch"; return; fi
    needs_or_skip "$row" "$BUDGET" data train_moe_cu && return
    timed "$LOG/bench.log" "$allowed" "${cmd[@]}"
    fig=$(python3 - "$LOG/bench.json" <<'EOF' 2> /dev/null
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
c = r.get("c") or {}
if c.get("mfu_pct") is None:
    print("FAIL train_moe_cu: " + str(c.get("error", "no figures"))[:90]); sys.exit()
def side(m, ratio):
    s = r.get(m) or {}
    if ratio is not None: return f"{ratio:.2f}x {m}"
    return f"{m} n/a ({str(s.get('error', '?'))[:30]})"
print(f"ok train_moe_cu {c['tok_s_median']:.0f} tok/s, MFU {c['mfu_pct']:.1f}%; "
      f"{side('eager', r.get('ratio_eager'))}, {side('compile', r.get('ratio_compile'))}")
EOF
)
    if [ $rc -eq 0 ] && [ "${fig%% *}" = ok ]; then record "$row" ok "${fig#ok }" "$secs"
    else record "$row" FAIL "$(why_failed "$LOG/bench.log" $rc "$secs" "$allowed")${fig:+: ${fig#FAIL }}" "$secs"; fi
}

if [ "$MODE" = bench ]; then
    part_bench; checkpoint
else
    # run_part KEY NUMBER FUNCTION ARGS...: the part, when PARTS selects it; then the table and the logs
    run_part() {
        local key=$1 num=$2; shift 2
        if selected "$key" "$num"; then "$@"; checkpoint; fi
    }
    run_part fp32 1 part_test "1 test fp32" test_moe_cu_fp32 train_moe_cu_fp32 40
    run_part bf16 2 part_test "2 test bf16" test_moe_cu train_moe_cu 40
    run_part cudnn 3 part_cudnn
    run_part determinism 4 part_determinism
    run_part d1024 5 part_d1024
    run_part grpo 6 part_grpo
    run_part memcheck 7 part_memcheck
    run_part lab 8 part_lab
    run_part dp 9 part_dp
    [ "$PARTS" = all ] || echo "(PARTS=$PARTS: the other parts were not run)"
fi
state=finished
exit $failed
