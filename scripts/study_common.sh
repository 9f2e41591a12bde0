# Sourced by scripts/study.sh and scripts/study3.sh, from the repository root: the settings that a
# study takes from the environment, and the build of the trainers that sweep.py --trainer auto picks from.
HOURS=${HOURS:-2.5}     # no run starts after HOURS hours
JOBS=${JOBS:-2}         # two runs at a time on one thread each: more runs per hour on 2 cores than one on two
THREADS=${THREADS:-1}
TRAINER=${TRAINER:-auto}  # auto: the faster of ./train_moe and ./train_moe_blas on this machine (sweep.py --trainer auto)
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}  # the reports' Python

# build_auto_trainers NOTE: ./train_moe, and ./train_moe_blas where OpenBLAS is installed; prints NOTE
# when that one does not build
build_auto_trainers() {
  make -s train_moe
  make -s train_moe_blas > /dev/null 2>&1 || echo "$1"
}
