#!/usr/bin/env bash
# The GPU check: one run that says whether the CUDA side of this repository works on this GPU, in
# under 10 minutes on one H100 or H200, ending with one table (part | ok / FAIL / not run | key figure)
# and a non-zero exit status if anything failed. Run it once on any machine with an NVIDIA GPU:
#
#   make gpu-check                       build what is missing into out/gpu_bin, then run every part
#   make gpu-check GPU_BIN=dir           the binaries prebuilt in dir, as they are (built elsewhere with
#                                        make -f dev/cuda_build.mk gpu-check-build GPU_BIN=dir)
#   GPU_CHECK_DRY=1 make gpu-check       every step that needs no GPU (building, data, reference states,
#                                        the commands, a CPU stand-in for the determinism part, the
#                                        table); also what happens when nvidia-smi finds no GPU
#
# The parts, in the order they run, each under its own `timeout` (seconds: its budget, from its size),
# each logging to one file of the log folder (out/gpu_check/<UTC time>/, or GPU_CHECK_LOG):
#   part                   budget  what
#   gpu test fp32              50  test_moe_cu_fp32: every dev/ref configuration against PyTorch at 1e-4,
#                                  CPU <-> GPU checkpoints, determinism, resume, task eval, the trainer
#                                  binary (~11 trainer processes, CPU and GPU, of a tiny model)
#   gpu test bf16              50  the same for the bf16 build, at the bf16 tolerances
#   determinism                40  train_moe_cu (bf16, fp32, cuDNN) twice each, 20 steps of a small model
#                                  with val loss and samples: the final checkpoints must be equal (cmp)
#   data parallel              20  train_moe_cu_mpi (USE_MPI=1, NCCL) under mpiexec, 10 steps of the same
#                                  model, two rows. R=1: step figures, val loss and checkpoint equal to
#                                  train_moe_cu's, and -b 9 over 2 ranks stops both with one error;
#                                  R=2 (where nvidia-smi lists 2+ GPUs): losses within 1e-3 (relative)
#   train d1024-E8-k2          50  20 steps at the paper's shape (L=16 C=1024 E=8 K=2 F=2048 V=32768,
#                                  B=2 T=4096, 0.94e9 parameters, random init; drawing the init on the
#                                  host takes ~20 s: 21 ns per value here): MFU, tok/s, peak memory
#   memcheck                   35  compute-sanitizer --tool memcheck on test_moe_cu -q (the quick subset:
#                                  top-k on NaN/Inf, decoding over 16k positions, one configuration)
#   racecheck                  35  compute-sanitizer --tool racecheck on the same
#   gpu test cuDNN             50  test_moe_cu_cudnn (USE_CUDNN=1 attention), where it was built
#   grpo                       25  train_moe_cu on data/arith (python3 data/build_arith.py): 300 pre-training
#                                  steps of the default model, then 10 GRPO steps (-rl) from that checkpoint
#                                  with the held-out eval before and after (50 items): it runs, and the figures
#   kernel lab                 65  dev/cuda/run_all.sh: every version of every kernel file validated
#                                  against the CPU, then timed (30 s at most per file)
#   bench                      55  scripts/bench_gpu.py on d1024-E8-k2, 4 steps per side: train_moe_cu,
#                                  PyTorch eager and torch.compile, a third of the part each (a PyTorch
#                                  side that runs out of time is n/a; only train_moe_cu's can fail it)
#                             ---
#                             475  s, plus nvidia-smi and the prerequisite checks (~5 s). A part gets no more
#                                  than what is left of GPU_CHECK_BUDGET (480 s) when it starts; a part
#                                  that would get under 10 s is not run. The GPU figures are estimates
#                                  from the sizes (no GPU was at hand when they were set).
# CPU-side steps, measured on a 2-core machine without a GPU (sharing its cores with other work):
# make -f dev/cuda_build.mk gpu-check-build -j2 from scratch, every binary: 5.5-6.5 min (the two cuDNN
# builds ~3 min each; without them ~1.5 min); dev/moe_ref.py for dev/ref: 4 s; the dry run (checks,
# data, commands, the CPU determinism stand-in, the table): 3 s. What is carried to the GPU machine:
# out/gpu_bin 37.7 MiB (12 lab binaries 16.7 MiB, 8 trainer and test binaries 16.9 MiB, the MPI
# runtime archive 4.2 MiB), dev/ref 5.8 MiB, data 7.6 MiB: 51 MiB. The MPI binary and its archive add
# ~20 s to the build.
#
# Environment: GPU_BIN (default out/gpu_bin), GPU_CHECK_PREBUILT (1: use GPU_BIN as it is; make sets it
# when GPU_BIN is given), GPU_CHECK_DRY (1: no GPU parts), GPU_CHECK_LOG (the log folder),
# GPU_CHECK_BUDGET (480: with a machine's ~1-2 min start, under 10 min), GPU_CHECK_JOBS (parallel compiles when building; default nproc), NVCC,
# PYTHON (the interpreter with a CUDA torch for the bench: default .venv/bin/python, else python3).
# Needs: bash, coreutils (timeout), cmp, python3 (the data check, the bench), tar with xz (the MPI runtime).
set -u
cd "$(dirname "$0")/.."

GPU_BIN=${GPU_BIN:-out/gpu_bin}
PREBUILT=${GPU_CHECK_PREBUILT:-0}
BUDGET=${GPU_CHECK_BUDGET:-480}
LOG=${GPU_CHECK_LOG:-out/gpu_check/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$LOG" || exit 1

names=(); states=(); figures=(); failed=0
# record PART STATUS FIGURE: one row of the final table
record() {
    names+=("$1"); states+=("$2"); figures+=("$3")
    [ "$2" = FAIL ] && failed=1
    printf '  -> %s: %s  %s\n' "$1" "$2" "$3"
}
elapsed() { echo $(( $(date +%s) - t_parts )); }
# the seconds a part of budget $1 may take now: its budget, or what is left of BUDGET if less
allowance() {
    local left=$(( BUDGET - $(elapsed) ))
    if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
# timed LOGFILE SECONDS CMD...: CMD under timeout, its output in LOGFILE; sets rc and secs
timed() {
    local logfile=$1 limit=$2 t0
    shift 2
    t0=$(date +%s)
    echo "\$ $*" > "$logfile"
    timeout --kill-after=10 "$limit" "$@" >> "$logfile" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "(stopped by timeout after ${limit} s)" >> "$logfile"; fi
}
# the last line of a log matching a pattern (for the key figure of a failed part)
first_match() { grep -m 1 -E "$2" "$1" 2>/dev/null | cut -c1-110; }
timeout_or() { if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "timed out after ${1} s"; else echo "$2"; fi; }

main() {
echo "== gpu check, log in $LOG"
# ----------------------------------------------------------------------------------------------------
# the GPU, or the reason for a dry run

DRY=${GPU_CHECK_DRY:-}
if [ -z "$DRY" ]; then
    if nvidia-smi -L > /dev/null 2>&1; then DRY=0; else DRY=1; echo "no GPU answers nvidia-smi: a dry run"; fi
fi
if [ "$DRY" = 0 ]; then
    gpu=$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader | head -n 1)
    echo "GPU: $gpu"
    nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1
else
    gpu="none (dry run)"
fi

# ----------------------------------------------------------------------------------------------------
# the binaries: prebuilt (GPU_BIN given), checked against the sources they were built from; else made

progs=(train_moe_cu train_moe_cu_fp32 test_moe_cu test_moe_cu_fp32 train_moe)
t0=$(date +%s)
if [ "$PREBUILT" = 1 ]; then
    missing=()
    for p in "${progs[@]}"; do [ -x "$GPU_BIN/$p" ] || missing+=("$p"); done
    for f in "$GPU_BIN"/SOURCES.sha256 "$GPU_BIN"/BUILD_INFO; do [ -f "$f" ] || missing+=("$(basename "$f")"); done
    if [ ${#missing[@]} -gt 0 ]; then
        record "binaries (prebuilt)" FAIL "$GPU_BIN lacks ${missing[*]} (make -f dev/cuda_build.mk gpu-check-build)"
    elif ! sha256sum --quiet -c "$GPU_BIN/SOURCES.sha256" > "$LOG/sources.txt" 2>&1; then
        record "binaries (prebuilt)" FAIL "built from other sources: $(grep -c FAILED "$LOG/sources.txt") files differ (see sources.txt)"
    else
        record "binaries (prebuilt)" ok "$(cat "$GPU_BIN/BUILD_INFO")"
    fi
else
    jobs=${GPU_CHECK_JOBS:-$(nproc 2>/dev/null || echo 4)}
    echo "building into $GPU_BIN (make -f dev/cuda_build.mk gpu-check-build -j$jobs; log build.txt)"
    make --no-print-directory -j"$jobs" -f dev/cuda_build.mk gpu-check-build GPU_BIN="$GPU_BIN" \
        ${NVCC:+NVCC="$NVCC"} ${GPU_ARCH:+GPU_ARCH="$GPU_ARCH"} > "$LOG/build.txt" 2>&1
    brc=$?
    if [ $brc -ne 0 ]; then
        record "binaries (built here)" FAIL "make gpu-check-build failed: $(first_match "$LOG/build.txt" 'error|Error' || true)"
    else
        record "binaries (built here)" ok "$(cat "$GPU_BIN/BUILD_INFO") in $(( $(date +%s) - t0 )) s"
    fi
fi
have() { [ -x "$GPU_BIN/$1" ]; }
have_cudnn=0
have train_moe_cu_cudnn && have test_moe_cu_cudnn && have_cudnn=1
du -schL "$GPU_BIN" dev/ref data 2> /dev/null | sed 's/^/  size: /'

# ----------------------------------------------------------------------------------------------------
# inputs: the reference states, the data for each shape, the tools

ref_ok=0
if [ -f dev/ref/manifest.txt ]; then
    ref_ok=1
    record "reference states" ok "dev/ref: $(wc -w < dev/ref/manifest.txt) configurations"
else
    record "reference states" FAIL "no dev/ref/manifest.txt (python dev/moe_ref.py --outdir dev/ref, needs torch)"
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
if [ $data_rc -eq 0 ]; then data_ok=1; record "data" ok "$data_msg"; else data_ok=0; record "data" FAIL "$data_msg"; fi

CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -n 1)
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
torch_cuda=$("$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())" 2> /dev/null)
echo "compute-sanitizer: ${CS:-none} | torch for the bench ($PY): ${torch_cuda:-none}"

# ----------------------------------------------------------------------------------------------------
# the parts

t_parts=$(date +%s)
# skip_or_dry PART NEEDS...: records "not run" and returns 0 when the part cannot or must not run
skip_or_dry() {
    local part=$1 why=""
    shift
    for need in "$@"; do
        case $need in
            ref) [ $ref_ok = 1 ] || why="no dev/ref" ;;
            data) [ $data_ok = 1 ] || why="no data" ;;
            cudnn) [ $have_cudnn = 1 ] || why="no cuDNN build (no cudnn_frontend.h where it was built)" ;;
            sanitizer) [ -n "$CS" ] || why="no compute-sanitizer" ;;
            *) have "$need" || why="no $GPU_BIN/$need" ;;
        esac
        [ -n "$why" ] && break
    done
    if [ -z "$why" ] && [ "$DRY" = 1 ]; then why="dry run"; fi
    if [ -z "$why" ] && [ "$(allowance 1000)" -lt 10 ]; then why="out of time (GPU_CHECK_BUDGET=$BUDGET s)"; fi
    if [ -n "$why" ]; then record "$part" "not run" "$why"; return 0; fi
    return 1
}

# the GPU test: every reference configuration, checkpoints, determinism, decoding, the trainer binary
gpu_test() { # PART TEST TRAINER BUDGET
    local part=$1 test=$2 trainer=$3 budget=$4 log="$LOG/${2}.log"
    echo "[$part] $GPU_BIN/$test dev/ref $GPU_BIN/$trainer $GPU_BIN/train_moe"
    skip_or_dry "$part" ref "$test" "$trainer" train_moe && return
    timed "$log" "$(allowance "$budget")" "$GPU_BIN/$test" dev/ref "$GPU_BIN/$trainer" "$GPU_BIN/train_moe"
    local summary first
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    first=$(first_match "$log" 'FAIL|Error' || true)
    if [ $rc -eq 0 ] && [ -n "$summary" ]; then record "$part" ok "$summary, ${secs} s"
    else record "$part" FAIL "$(timeout_or "$secs" "exit $rc: ${summary:-no summary line}${first:+; $first}")"; fi
}
gpu_test "gpu test fp32" test_moe_cu_fp32 train_moe_cu_fp32 50
gpu_test "gpu test bf16" test_moe_cu train_moe_cu 50

# determinism: two identical runs per build, their final checkpoints compared byte for byte
det_flags=("${SMALL[@]}" -x 20 -u 5 -v 10 -m 2 -s 10 -g 4 -i "$TRAIN_GLOB" -j "$VAL_GLOB")
# same_twice TRAINER DIR LIMIT: two runs of TRAINER into DIR/a and DIR/b; sets same (1/0) and why
same_twice() {
    local trainer=$1 dir=$2 limit=$3 run
    same=0; why=""
    rm -rf "$dir"; mkdir -p "$dir"
    for run in a b; do
        timed "$dir/$run.log" "$limit" "$trainer" "${det_flags[@]}" -o "$dir/$run"
        if [ $rc -ne 0 ]; then why="$(basename "$trainer") run $run: $(timeout_or "$limit" "exit $rc")"; return; fi
    done
    local ck
    ck=$(cd "$dir/a" && ls model_*.bin 2> /dev/null | tail -n 1)
    if [ -z "$ck" ]; then why="no checkpoint in $dir/a"; return; fi
    if cmp -s "$dir/a/$ck" "$dir/b/$ck"; then same=1; else why="$(basename "$trainer"): $ck differs between two runs"; fi
    rm -f "$dir"/a/model_*.bin "$dir"/b/model_*.bin # ~100 MB each: the logs stay
}
det_builds=(train_moe_cu train_moe_cu_fp32)
[ $have_cudnn = 1 ] && det_builds+=(train_moe_cu_cudnn)
echo "[determinism] ${det_builds[*]}, each twice: ${det_flags[*]} -o DIR"
if ! skip_or_dry "determinism" data "${det_builds[@]}"; then
    allowed=$(allowance 40); per=$(( allowed / (2 * ${#det_builds[@]}) )); okb=(); bad=""
    for b in "${det_builds[@]}"; do
        same_twice "$GPU_BIN/$b" "$LOG/determinism/$b" "$per"
        if [ $same = 0 ]; then bad=$why; break; fi
        case $b in *_fp32) okb+=(fp32) ;; *_cudnn) okb+=(cuDNN) ;; *) okb+=(bf16) ;; esac
    done
    if [ -z "$bad" ]; then record "determinism" ok "identical checkpoints after 20 steps: ${okb[*]}"
    else record "determinism" FAIL "$bad"; fi
fi
if [ "$DRY" = 1 ] && have train_moe && [ $data_ok = 1 ]; then # the same comparison, on the CPU trainer
    det_flags=(-nl 1 -nc 64 -nh 2 -ne 4 -nk 2 -b 4 -t 64 -x 2 -u 1 -v 2 -m 1 -s 2 -g 4 -i "$TRAIN_GLOB" -j "$VAL_GLOB")
    t0=$(date +%s)
    OMP_NUM_THREADS=1 same_twice "$GPU_BIN/train_moe" "$LOG/determinism/cpu" 60
    if [ $same = 1 ]; then record "determinism, CPU stand-in" ok "train_moe twice, identical checkpoints ($(( $(date +%s) - t0 )) s)"
    else record "determinism, CPU stand-in" FAIL "$why"; fi
fi

# data parallel: train_moe_cu_mpi under mpiexec (from the MPI runtime archived beside it) on the small
# model, 10 steps with val loss, samples and a checkpoint. R=1: every step's figures, the val loss and
# the checkpoint equal to train_moe_cu's; -b 9 over 2 ranks (an error before any GPU work): one message,
# a non-zero exit, no hang; R=2 (two GPUs or more): the losses within 1e-3 (relative) of train_moe_cu's
dp_flags=("${SMALL[@]}" -x 10 -u 5 -v 10 -m 2 -s 10 -g 4 -i "$TRAIN_GLOB" -j "$VAL_GLOB")
dd="$LOG/data_parallel"
ngpu=0; mpirun=(); plain_ok=0; dp_allowed=0; dp_t0=0
# the seconds left of the part's allowance (at least 1: timeout takes 0 as no limit)
dp_left() { local s=$(( dp_allowed - ($(date +%s) - dp_t0) )); [ $s -lt 1 ] && s=1; echo $s; }
[ "$DRY" = 0 ] && ngpu=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU')
# mpi_setup: the MPI runtime unpacked into $dd/mpi; sets mpirun (the launcher, in the environment the
# binary needs: the runtime's libraries, and NCCL's pip package where the system has no libnccl) or why.
# Its runs read stdin from /dev/null: mpiexec forwards stdin, and under timeout a terminal would stop it.
mpi_setup() {
    mpirun=(); why=""
    if [ ! -f "$GPU_BIN/mpi_runtime.tar.xz" ]; then why="no $GPU_BIN/mpi_runtime.tar.xz"; return; fi
    rm -rf "$dd/mpi"; mkdir -p "$dd/mpi"
    if ! tar -C "$dd/mpi" -xJf "$GPU_BIN/mpi_runtime.tar.xz" > "$dd/mpi.log" 2>&1; then
        why="cannot unpack mpi_runtime.tar.xz: $(head -c 90 "$dd/mpi.log")"; return
    fi
    local libs nccl missing
    libs=$(cd "$dd/mpi/mpi_runtime/lib" && pwd)
    if LD_LIBRARY_PATH="$libs" ldd "$GPU_BIN/train_moe_cu_mpi" 2> /dev/null | grep -q 'libnccl.*not found'; then
        nccl=$("$PY" -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib'))" 2> /dev/null)
        [ -n "$nccl" ] && libs="$libs:$nccl"
    fi
    missing=$(LD_LIBRARY_PATH="$libs" ldd "$GPU_BIN/train_moe_cu_mpi" 2> /dev/null | awk '/not found/ { print $1 }' | paste -sd ' ' -)
    if [ -n "$missing" ]; then why="train_moe_cu_mpi: $missing not found"; return; fi
    mpirun=(env "LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$dd/mpi/mpi_runtime/bin/mpiexec" -launcher fork)
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
# how a run ended: RC SECS -> "exit RC", or "timed out after SECS s"
dp_end() { if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then echo "timed out after $2 s"; else echo "exit $1"; fi; }
# dp_b_error LIMIT: -b 9 with 2 ranks; sets b_ok (1: a non-zero exit in time, one error naming -b) and b_msg
dp_b_error() {
    timed "$dd/b_error.log" "$1" "${mpirun[@]}" -n 2 "$GPU_BIN/train_moe_cu_mpi" -b 9 -x 1 < /dev/null
    local n
    n=$(grep -c 'flag -b' "$dd/b_error.log")
    b_ok=0; b_msg="-b 9 over 2 ranks: $(dp_end $rc "$secs"), $n errors naming -b"
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ "$n" = 1 ]; then b_ok=1; b_msg="-b 9 over 2 ranks: one error, exit $rc"; fi
}
echo "[data parallel] mpiexec -n R $GPU_BIN/train_moe_cu_mpi ${dp_flags[*]} -o DIR, R = 1 (vs train_moe_cu) and 2 (2+ GPUs)"
mkdir -p "$dd"
if [ "$DRY" = 1 ] && have train_moe_cu_mpi; then # the launcher, MPI and the -b error need no GPU
    mpi_setup
    if [ -n "$why" ]; then record "data parallel, CPU stand-in" FAIL "$why"
    else
        dp_b_error 20
        if [ $b_ok = 1 ]; then record "data parallel, CPU stand-in" ok "mpiexec from mpi_runtime.tar.xz, $b_msg (${secs} s)"
        else record "data parallel, CPU stand-in" FAIL "$b_msg: $(first_match "$dd/b_error.log" 'rror' || true)"; fi
    fi
fi
if ! skip_or_dry "data parallel R=1" data train_moe_cu train_moe_cu_mpi; then
    dp_allowed=$(allowance 20); dp_t0=$(date +%s)
    mpi_setup
    if [ -n "$why" ]; then record "data parallel R=1" FAIL "$why"
    else
        dp_b_error "$(dp_left)"
        rm -rf "$dd/plain" "$dd/r1" "$dd/r2"
        timed "$dd/plain.log" "$(dp_left)" "$GPU_BIN/train_moe_cu" "${dp_flags[@]}" -o "$dd/plain"
        prc=$rc; psecs=$secs; [ $prc -eq 0 ] && plain_ok=1
        timed "$dd/r1.log" "$(dp_left)" "${mpirun[@]}" -n 1 "$GPU_BIN/train_moe_cu_mpi" "${dp_flags[@]}" -o "$dd/r1" < /dev/null
        r1rc=$rc; r1secs=$secs
        dp_figures "$dd/plain.log" > "$dd/plain.txt"; dp_figures "$dd/r1.log" > "$dd/r1.txt"
        nsteps=$(grep -vc '^val' "$dd/plain.txt"); ck=model_00000010.bin
        if [ $prc -ne 0 ]; then
            record "data parallel R=1" FAIL "train_moe_cu: $(dp_end $prc "$psecs"): $(first_match "$dd/plain.log" 'Error|error' || true)"
        elif [ $r1rc -ne 0 ]; then
            record "data parallel R=1" FAIL "mpiexec -n 1: $(dp_end $r1rc "$r1secs"): $(first_match "$dd/r1.log" 'Error|error|WARN' || true)"
        elif [ "$nsteps" != 10 ] || ! cmp -s "$dd/plain.txt" "$dd/r1.txt"; then
            record "data parallel R=1" FAIL "$nsteps steps; vs train_moe_cu: $(diff "$dd/plain.txt" "$dd/r1.txt" | grep -m 1 '^>' | cut -c1-80)"
        elif ! cmp -s "$dd/plain/$ck" "$dd/r1/$ck"; then
            record "data parallel R=1" FAIL "the losses agree with train_moe_cu's, the checkpoints ($ck) do not"
        elif [ $b_ok = 0 ]; then
            record "data parallel R=1" FAIL "$b_msg: $(first_match "$dd/b_error.log" 'rror' || true)"
        else
            record "data parallel R=1" ok "10 steps, val loss, checkpoint: as train_moe_cu's (${r1secs} s); $b_msg"
        fi
    fi
fi
if ! skip_or_dry "data parallel R=2" data train_moe_cu train_moe_cu_mpi; then
    if [ "$ngpu" -lt 2 ]; then record "data parallel R=2" "not run" "nvidia-smi lists $ngpu GPU: R=2 needs two (NCCL: one rank per GPU)"
    elif [ -z "${mpirun[*]}" ] || [ $plain_ok = 0 ]; then record "data parallel R=2" "not run" "no MPI runtime or no train_moe_cu run to compare with (R=1 above)"
    elif [ "$(dp_left)" -lt 5 ]; then record "data parallel R=2" "not run" "out of time (the part's $dp_allowed s)"
    else
        timed "$dd/r2.log" "$(dp_left)" "${mpirun[@]}" -n 2 "$GPU_BIN/train_moe_cu_mpi" "${dp_flags[@]}" -o "$dd/r2" < /dev/null
        dp_figures "$dd/r2.log" > "$dd/r2.txt"
        worst=$(dp_maxrel "$dd/plain.txt" "$dd/r2.txt")
        if [ $rc -ne 0 ]; then record "data parallel R=2" FAIL "mpiexec -n 2: $(dp_end $rc "$secs"): $(first_match "$dd/r2.log" 'Error|error|WARN' || true)"
        elif [ "$worst" = mismatch ] || awk -v w="${worst%% *}" 'BEGIN { exit !(w + 0 > 1e-3) }'; then
            record "data parallel R=2" FAIL "losses vs train_moe_cu's: max relative difference $worst (limit 1e-3)"
        else record "data parallel R=2" ok "2 GPUs, 10 steps and val loss: max relative difference $worst from train_moe_cu's (${secs} s)"; fi
    fi
fi
rm -rf "$dd/mpi" "$dd"/*/model_*.bin # the unpacked runtime (18 MB) and the checkpoints (~100 MB each): the logs stay

# training at the paper's shape: MFU, tok/s and peak memory
train_cmd=("$GPU_BIN/train_moe_cu" "${BIG[@]}" -x 20 -u 1000 -v 0 -s 0 -i "$TRAIN_GLOB" -j "$VAL_GLOB")
echo "[train d1024-E8-k2] ${train_cmd[*]}"
if ! skip_or_dry "train d1024-E8-k2" data train_moe_cu; then
    timed "$LOG/train_d1024.log" "$(allowance 50)" "${train_cmd[@]}"
    fig=$(awk '/^step +[0-9]+\/[0-9]+ \|/ {
                   split($2, s, "/"); n = s[1] + 0
                   for (i = 1; i <= NF; i++) { if ($i == "MFU") m = $(i + 1); if ($i == "tok/s") t = $(i - 1) }
                   sub("%", "", m)
                   if (n > 5) { mfu[++k] = m + 0; tok[k] = t + 0 }
                   steps = n }
               /^peak gpu memory/ { peak = $4 }
               END {
                   if (k == 0) exit 1
                   for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (mfu[j] < mfu[i]) { x = mfu[i]; mfu[i] = mfu[j]; mfu[j] = x }
                   for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (tok[j] < tok[i]) { x = tok[i]; tok[i] = tok[j]; tok[j] = x }
                   printf "MFU %.1f%%, %.0f tok/s (medians of steps 6-%d), peak %s MiB", mfu[int((k + 1) / 2)], tok[int((k + 1) / 2)], steps, peak
               }' "$LOG/train_d1024.log")
    if [ $rc -eq 0 ] && [ -n "$fig" ]; then record "train d1024-E8-k2" ok "$fig, ${secs} s"
    else record "train d1024-E8-k2" FAIL "$(timeout_or "$secs" "exit $rc: $(first_match "$LOG/train_d1024.log" 'Error|error' || true)")"; fi
fi

# compute-sanitizer on the quick subset of the GPU test
sanitize() { # TOOL BUDGET
    local tool=$1 budget=$2 log="$LOG/$1.log"
    echo "[$tool] compute-sanitizer --tool $tool --error-exitcode 1 $GPU_BIN/test_moe_cu -q dev/ref"
    skip_or_dry "$tool" sanitizer ref test_moe_cu && return
    timed "$log" "$(allowance "$budget")" "$CS" --tool "$tool" --error-exitcode 1 --print-limit 20 "$GPU_BIN/test_moe_cu" -q dev/ref
    local summary quick
    summary=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')
    quick=$(grep -E '^quick subset' "$log" | tail -n 1 | sed 's/^quick subset (-q): //')
    if [ $rc -eq 0 ] && [ -n "$quick" ]; then record "$tool" ok "${summary:-no errors}; test $quick, ${secs} s"
    else record "$tool" FAIL "$(timeout_or "$secs" "exit $rc: ${summary:-?}; test ${quick:-did not finish}")"; fi
}
sanitize memcheck 35
sanitize racecheck 35

gpu_test "gpu test cuDNN" test_moe_cu_cudnn train_moe_cu_cudnn 50

# GRPO on the GPU: a short pre-training on the arithmetic task, then RL steps from its checkpoint
echo "[grpo] $GPU_BIN/train_moe_cu: 300 steps on data/arith, then 10 GRPO steps (-rl data/arith/arith_rl.bin)"
if [ ! -f data/arith/arith_rl.bin ]; then
    record "grpo" "not run" "no data/arith (python3 data/build_arith.py)"
elif ! skip_or_dry "grpo" train_moe_cu; then
    allowed=$(allowance 25); gd="$LOG/grpo"; mkdir -p "$gd"
    timed "$gd/pre.log" "$(( allowed / 2 ))" "$GPU_BIN/train_moe_cu" -i data/arith/arith_train_000.bin \
        -j data/arith/arith_val_000.bin -b 32 -t 128 -x 300 -u 30 -v 0 -s 0 -o "$gd/pre"
    prc=$rc
    if [ $prc -eq 0 ]; then
        timed "$gd/rl.log" "$(( allowed - secs ))" "$GPU_BIN/train_moe_cu" -e "$gd/pre/model_00000300.bin" \
            -rl data/arith/arith_rl.bin -j data/arith/arith_val_000.bin -t 64 -rp 16 -rg 5 -rm 2 -rr 41 -l 5e-5 \
            -x 10 -v 10 -m 4 -s 0 -ev data/arith/arith_eval.bin -ea 50 -o "$gd/rl"
    fi
    steps=$(grep -c '^rl step' "$gd/rl.log" 2> /dev/null)
    accs=$(grep -o 'accuracy [0-9.]*' "$gd/rl.log" 2> /dev/null | awk '{print $2}' | paste -sd ' ' -)
    last=$(grep '^rl step' "$gd/rl.log" 2> /dev/null | tail -n 1 | grep -o 'reward [0-9.]*\|rollout [0-9]* ms update [0-9]* ms' | paste -sd ' ' -)
    if [ $prc -eq 0 ] && [ $rc -eq 0 ] && [ "${steps:-0}" = 10 ]; then
        record "grpo" ok "10 RL steps; held-out acc (50 items) before/after: ${accs:-?}; last: ${last:-?}"
    else record "grpo" FAIL "$(timeout_or "$secs" "pre-training exit $prc, RL exit $rc, ${steps:-0} RL steps")"; fi
fi

# the kernel lab: every version of every file validated, then timed
echo "[kernel lab] LAB_BIN=$GPU_BIN/lab LAB_TIMEOUT=30 dev/cuda/run_all.sh"
if ! skip_or_dry "kernel lab" lab/adamw; then
    timed "$LOG/kernel_lab.log" "$(allowance 65)" env LAB_BIN="$GPU_BIN/lab" LAB_TIMEOUT=30 LOG_DIR="$(pwd)/$LOG/kernel_lab" \
        dev/cuda/run_all.sh
    summary=$(grep -E '^[0-9]+ results, [0-9]+ failed validation' "$LOG/kernel_lab.log" | tail -n 1 | sed 's/\. peaks.*//')
    files=$(grep -c '^ran ' "$LOG/kernel_lab.log"); badfiles=$(grep -E '^ran ' "$LOG/kernel_lab.log" | grep -vc 'exit 0,')
    if [ $rc -eq 0 ]; then record "kernel lab" ok "$files files, $summary, ${secs} s"
    else record "kernel lab" FAIL "$(timeout_or "$secs" "$badfiles of $files files failed; ${summary:-no table}")"; fi
fi

# the benchmark against PyTorch: train_moe_cu, eager, torch.compile; each side gets a third of the part
allowed=$(allowance 55); side=$(( (allowed - 10) / 3 )); [ $side -lt 20 ] && side=20
bench_cmd=("$PY" scripts/bench_gpu.py --configs d1024-E8-k2 --steps 4 --warmup 1 --timeout "$side"
           --trainer "$GPU_BIN/train_moe_cu" --python "$PY" --json "$LOG/bench.json")
echo "[bench] ${bench_cmd[*]}"
if [ "$DRY" = 0 ] && [ "${torch_cuda##* }" != True ]; then
    record "bench" "not run" "no torch with CUDA for $PY (PYTHON=...): ${torch_cuda:-torch does not import}"
elif ! skip_or_dry "bench" data train_moe_cu; then
    timed "$LOG/bench.log" "$allowed" "${bench_cmd[@]}"
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
    if [ $rc -eq 0 ] && [ "${fig%% *}" = ok ]; then record "bench" ok "${fig#ok }, ${secs} s"
    else record "bench" FAIL "$(timeout_or "$secs" "exit $rc: ${fig#FAIL }")"; fi
fi

# ----------------------------------------------------------------------------------------------------
# the table

{
    echo
    echo "gpu check: $gpu | binaries $GPU_BIN | parts took $(elapsed) s (budget $BUDGET s) | log $LOG"
    printf '%-28s %-8s %s\n' "part" "status" "key figure"
    printf '%-28s %-8s %s\n' "----------------------------" "--------" "----------"
    for i in "${!names[@]}"; do printf '%-28s %-8s %s\n' "${names[$i]}" "${states[$i]}" "${figures[$i]}"; done
    if [ $failed = 0 ]; then echo "gpu check: nothing failed$([ "$DRY" = 1 ] && echo ' (dry run: the GPU parts were not run)')"
    else echo "gpu check: FAILED (see the logs in $LOG)"; fi
} | tee "$LOG/summary.txt"
return $failed
}

main 2>&1 | tee "$LOG/console.txt"
exit "${PIPESTATUS[0]}"
