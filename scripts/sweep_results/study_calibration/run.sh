#!/usr/bin/env bash
# The first calibration point of data/study (python3 data/build_study.py): the default MoE shape and
# its dense twin at the same active parameters, 3000 steps of 16 x 128 tokens (6.1M tokens), with
# the three study evals (200 items each for accuracy) every 1000 steps. About 12 minutes on 2 cores.
set -eu
cd "$(dirname "$0")/../../.."
D=data/study
EV=$D/facts_eval.bin,$D/reason_id_eval.bin,$D/reason_shift_eval.bin
mkdir -p out/study_calibration
for shape in "moe -ne 8 -nk 2 -nf 256" "dense -ne 1 -nk 1 -nf 512"; do
    set -- $shape; name=$1; shift
    ./train_moe -i "$D/study_train_*.bin" -j $D/study_val_000.bin -b 16 -t 128 -x 3000 -v 1000 -m 10 -s 0 \
        "$@" -ev $EV -ea 200 -o out/study_calibration/$name > out/study_calibration/$name.out 2>&1
done
