#!/usr/bin/env bash
# The sparsity study's third design (scripts/sweep_results/study_v3/README.md), resumable in chunks:
#   1. data/study3 and data/study3_half (python3 data/build_study3.py) unless they match their manifests
#   2. the gate: seed 1 of the dense model and of E=8 (study3.json), and the dense model on the half
#      fact set (study3_half.json); scripts/study3_report.py judges it. A gate that does not pass stops
#      here (GATE=ignore goes on anyway)
#   3. the rest of study3.json: 27 runs in all (3 seeds), each with its fact bits
#   4. the statistics, the verdict table and the figures (scripts/study3_report.py) in OUT
# Every finished run's logs and per-fact results go to scripts/sweep_results/study_v3/ (committed): the
# same command on a fresh clone continues from there. No run starts after HOURS hours (default 2.5),
# nor one that the finished runs' times predict would end past them.
#
#   bash scripts/study3.sh
#   HOURS=1 JOBS=1 THREADS=2 TRAINER=/path/to/train_moe bash scripts/study3.sh   (TRAINER default: auto)
set -eu
cd "$(dirname "$0")/.."
. scripts/study_common.sh   # HOURS, JOBS, THREADS, TRAINER, PY, build_auto_trainers
GATE=${GATE:-check}
OUT=${OUT:-scripts/sweep_results/study_v3}
if [ "$TRAINER" = auto ]; then
  build_auto_trainers "study3: no OpenBLAS: ./train_moe only"
else
  [ -x "$TRAINER" ] || { echo "study3: trainer '$TRAINER' not found"; exit 2; }
fi
for d in study3 study3_half; do
  flags=""; [ $d = study3_half ] && flags="--people 6000"
  python3 - "$d" <<'PY' || python3 data/build_study3.py $flags --out "data/$d" > /dev/null
import hashlib, json, os, sys
d = os.path.join("data", sys.argv[1])
m = json.load(open(os.path.join(d, "manifest.json")))
for name, f in m["files"].items():
    p = os.path.join(d, name)
    h = hashlib.sha256()
    if os.path.exists(p):
        with open(p, "rb") as fh:
            for blk in iter(lambda: fh.read(1 << 20), b""):
                h.update(blk)
    if not os.path.exists(p) or h.hexdigest() != f["sha256"]:
        print("%s is missing or differs from its manifest: building %s" % (p, d))
        sys.exit(1)
PY
done
t0=$(date +%s)
left() { python3 -c "print(max(0.0, $HOURS - ($(date +%s) - $t0) / 3600))"; }
report() {
  "$PY" scripts/study3_report.py "$OUT/results.csv" --items "$OUT/runs" --half-csv "$OUT/gate_half/results.csv" --out "$OUT"
}
SW="python3 scripts/sweep.py --trainer $TRAINER --jobs $JOBS --threads $THREADS --progress 300"
$SW scripts/sweep_configs/study3_half.json --hours "$(left)" --csv "$OUT/gate_half/results.csv"
$SW scripts/sweep_configs/study3.json --only L4-C64-H4-E1-K1-F256-s1,L4-C64-H4-E8-K2-F128-s1 --hours "$(left)" \
    --csv "$OUT/results.csv"
report
gate=$("$PY" -c "
import json
g = json.load(open('$OUT/stats.json'))['gate']
print('passed' if g['passed'] else 'unmeasured' if any(c['ok'] is None for c in g['conditions'].values()) else 'failed')")
if [ "$GATE" != ignore ] && [ "$gate" = unmeasured ]; then
  echo "study3: the gate's runs are not finished yet: run the same command again to continue"
  exit 0
fi
if [ "$GATE" != ignore ] && [ "$gate" = failed ]; then
  echo "study3: the gate did not pass ($OUT/verdict.md): resize the data (data/build_study3.py) before the rest, or GATE=ignore"
  exit 3
fi
$SW scripts/sweep_configs/study3.json --hours "$(left)" --csv "$OUT/results.csv"
report
