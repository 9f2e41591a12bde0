#!/usr/bin/env bash
# GRPO in miniature (dev/GRPO.md), on 2 CPU cores:
#   1. data/arith (python3 data/build_arith.py, seconds) if it is missing
#   2. pre-train the default MoE on the arithmetic problems: 4000 steps, a checkpoint every 250 and a
#      held-out eval every 500 (about 7 minutes)
#   3. GRPO from the step-START checkpoint (default: the last) for RL_STEPS steps, the held-out eval
#      on 500 problems (never pre-training documents, never RL prompts) at the start and every 10
#      steps (about 10 minutes)
#   4. the figure, OUT/grpo.png (scripts/plot.py --grpo; needs matplotlib, which make test installs)
# GRPO runs with -rx 1 -rd 1 -b2 0.95 -c 0.1 (the router terms in the RL loss, pre-training's AdamW):
# the settings of the run committed in scripts/grpo_results/, made before -rl's defaults became verl's
#
#   bash scripts/grpo_demo.sh                 (make grpo-demo)
#   OUT=out/x START=2500 RL_STEPS=200 bash scripts/grpo_demo.sh
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-out/grpo_demo}
PRE_STEPS=${PRE_STEPS:-4000}
START=${START:-4000}
RL_STEPS=${RL_STEPS:-150}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
[ -x ./train_moe ] || make train_moe
[ -f data/arith/arith_rl.bin ] || python3 data/build_arith.py > /dev/null
start_ckpt=$OUT/pre/model_$(printf %08d "$START").bin
if [ ! -f "$start_ckpt" ]; then
    echo "== pre-training: $PRE_STEPS steps on data/arith, checkpoints every 250 in $OUT/pre"
    ./train_moe -i data/arith/arith_train_000.bin -j data/arith/arith_val_000.bin -b 16 -t 128 -x "$PRE_STEPS" \
        -v 500 -m 10 -s 0 -n 250 -ev data/arith/arith_eval.bin -ea 200 -o "$OUT/pre" | grep -E '^(step .*(500|000)/|val|task)'
fi
echo "== GRPO: $RL_STEPS steps from $start_ckpt, log in $OUT/rl/log.txt"
t0=$(date +%s)
./train_moe -e "$start_ckpt" -rl data/arith/arith_rl.bin -j data/arith/arith_val_000.bin -t 64 \
    -rp 32 -rg 8 -rm 2 -rr 40 -rt 1.0 -rc 0.2 -rk 0.001 -l 1e-4 -rx 1 -rd 1 -b2 0.95 -c 0.1 \
    -x "$RL_STEPS" -v 10 -m 10 -s 0 -n 50 \
    -ev data/arith/arith_eval.bin -ea 500 -o "$OUT/rl" | grep -E '^(rl step .*0/|task|grpo|val|saved)'
echo "== GRPO took $(( $(date +%s) - t0 )) s"
"$PY" scripts/plot.py --grpo "$OUT/rl/log.txt" --out "$OUT"
