#!/usr/bin/env python3
"""Training across processes on one machine: step time and tokens/s (a benchmark, not a test).

Runs, alternating, in the same command: the one-process trainer with all the cores' threads, and
R = 2 processes (mpiexec) with the threads split between them, data parallel (-ep 1) and expert
parallel (-ep 2); the median step time of each run (its first steps left out), the median over
repeats, the ratio to one process, and the all-to-all bytes per step against 2 x N x K x C x 4 per
layer (forward) as the trainer reports them.

  python3 scripts/bench_dist.py --mpiexec .venv/bin/mpiexec [--repeats 3] [--steps 30]
"""
import argparse
import os
import platform
import re
import statistics
import subprocess
import sys


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("bench_dist: %s failed:\n%s" % (" ".join(cmd), (p.stdout + p.stderr)[-2000:]))
    ms = [float(m.group(1)) for m in re.finditer(r"^step +\d+/\d+ .*\| ([\d.]+) ms \|", p.stdout, re.M)]
    a2a = re.search(r"^all-to-all: .*$", p.stdout, re.M)
    return ms, a2a.group(0) if a2a else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--trainer", default="./train_moe")
    ap.add_argument("--mpi-trainer", default="./train_moe_mpi")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="first steps of each run left out")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    # the default model of make train (L=4 C=128 E=8 K=2 F=256), B=16 T=128, no evals
    flags = ["-x", str(args.steps), "-v", "0", "-s", "0", "-b", "16", "-t", "128"]
    cases = [("1 process, %d threads" % cores, [args.trainer] + flags, cores),
             ("2 ranks data parallel, %d thread(s) each" % (cores // 2),
              [args.mpiexec, "-n", "2", args.mpi_trainer] + flags, max(1, cores // 2)),
             ("2 ranks expert parallel (-ep 2), %d thread(s) each" % (cores // 2),
              [args.mpiexec, "-n", "2", args.mpi_trainer] + flags + ["-ep", "2"], max(1, cores // 2))]
    meds = {name: [] for name, _, _ in cases}
    a2a = None
    for rep in range(args.repeats):
        for name, cmd, threads in cases:
            ms, line = run(cmd, dict(os.environ, OMP_NUM_THREADS=str(threads)))
            meds[name].append(statistics.median(ms[args.skip:]))
            a2a = line or a2a
    tokens = 16 * 128
    base = statistics.median(meds[cases[0][0]])
    print("%s, %d cores; default model, B=16 T=128 (%d tokens per step); median of steps %d-%d, median of %d repeats"
          % (cpu_name(), cores, tokens, args.skip + 1, args.steps, args.repeats))
    print("| run | step ms | tok/s | vs 1 process | repeats (ms) |")
    print("|---|---|---|---|---|")
    for name, _, _ in cases:
        m = statistics.median(meds[name])
        print("| %s | %.1f | %.0f | %.2fx | %s |" % (name, m, tokens / (m / 1e3), base / m,
                                                   " ".join("%.1f" % x for x in meds[name])))
    if a2a:
        print(a2a)


if __name__ == "__main__":
    main()
