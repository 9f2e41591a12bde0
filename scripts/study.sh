#!/usr/bin/env bash
# The sparsity study in miniature (scripts/sweep_results/study/README.md), resumable in chunks:
#   1. data/study (python3 data/build_study.py, about a minute) unless it matches its manifest
#   2. the learning-rate scan, scripts/sweep_configs/study_lr.json
#   3. the study, scripts/sweep_configs/study.json: 36 runs (3 seeds each), test-time compute and GRPO
#   4. the statistics, the verdict table and the figures (scripts/study_report.py) in OUT
# Every finished run's logs go to scripts/sweep_results/study/{lr_scan,runs}/ (committed): the same
# command on a fresh clone continues from there instead of training again. No run starts after
# HOURS hours (default 2.5), nor one that the finished runs' times predict would end past them.
#
#   bash scripts/study.sh                  (make study)
#   HOURS=1 JOBS=1 THREADS=2 TRAINER=./train_moe_blas bash scripts/study.sh   (TRAINER default: auto, the faster build)
set -eu
cd "$(dirname "$0")/.."
. scripts/study_common.sh   # HOURS, JOBS, THREADS, TRAINER, PY, build_auto_trainers
OUT=${OUT:-scripts/sweep_results/study}
if [ "$TRAINER" = auto ]; then
  build_auto_trainers "study: no OpenBLAS (Debian: libopenblas-dev libopenblas0-openmp): ./train_moe only"
else
  [ -x "$TRAINER" ] || make train_moe
fi
# data/study as the committed manifest describes it (sha256 of every file), else built again
python3 - <<'PY' || python3 data/build_study.py > /dev/null
import hashlib, json, os, sys
m = json.load(open("data/study/manifest.json"))
for name, f in m["files"].items():
    p = os.path.join("data/study", name)
    if not os.path.exists(p) or hashlib.sha256(open(p, "rb").read()).hexdigest() != f["sha256"]:
        print("data/study/%s is missing or differs from manifest.json: building data/study" % name)
        sys.exit(1)
PY
t0=$(date +%s)
left() { python3 -c "print(max(0.0, $HOURS - ($(date +%s) - $t0) / 3600))"; }
python3 scripts/sweep.py scripts/sweep_configs/study_lr.json --trainer "$TRAINER" --jobs "$JOBS" \
    --threads "$THREADS" --hours "$(left)" --progress 300 --csv "$OUT/lr_scan/results.csv"
python3 scripts/sweep.py scripts/sweep_configs/study.json --trainer "$TRAINER" --jobs "$JOBS" \
    --threads "$THREADS" --hours "$(left)" --progress 300 --csv "$OUT/results.csv"
"$PY" scripts/study_report.py "$OUT/results.csv" --lr-csv "$OUT/lr_scan/results.csv" --out "$OUT"
