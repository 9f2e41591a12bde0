#!/usr/bin/env python3
"""
Calibration points of the v3 sparsity study (scripts/sweep_results/study_v3/): the stored bits of
every checkpoint a run writes, not only the final one, so that the gate's figures come with their
history (how the stored bits grow with tokens) and a failing regime shows early.

    python3 scripts/study3_calibrate.py scripts/sweep_configs/study3.json out/sweeps/study3/RUN ... \\
        --trainer /path/to/train_moe --out scripts/sweep_results/study_v3/calibration [--watch 60]

For each run directory and each model_<step>.bin in it that points.jsonl does not have yet, the
checkpoint is copied aside (the sweep deletes older checkpoints as newer ones appear) and scored by
sweep.fact_bits_eval on the config's fact_bits file; one JSON line per point goes to
<out>/points.jsonl: run, config, data (the train glob), step, tokens, stored bits, bits per fact,
greedy accuracy over all facts, and the val loss and task accuracies the run's log.txt has at that
step. --watch N polls every N seconds until every named run has its final checkpoint scored.

    python3 scripts/study3_calibrate.py --table scripts/sweep_results/study_v3/calibration/points.jsonl
prints the points as a markdown table.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sweep  # noqa: E402


def done_points(path):
    pts = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    p = json.loads(line)
                    pts.add((p["run"], p["config"], p["step"]))
    return pts


def score_new(cfg, cfg_name, runs, run_dirs, trainer, out, env):
    """Scores every checkpoint not yet in points.jsonl; returns the runs whose final step is scored."""
    path = os.path.join(out, "points.jsonl")
    have = done_points(path)
    finished = set()
    for d in run_dirs:
        name = os.path.basename(os.path.normpath(d))
        run = runs.get(name)
        if run is None:
            print(f"{name}: not a run of {cfg_name}; skipped", file=sys.stderr)
            finished.add(name)
            continue
        for step in sweep.ckpt_steps(d):
            if (name, cfg_name, step) in have:
                continue
            with tempfile.TemporaryDirectory(prefix="cal_") as tmp:
                ck = os.path.join(tmp, "model.bin")
                try:
                    shutil.copyfile(os.path.join(d, f"model_{step:08d}.bin"), ck)
                except OSError:
                    continue  # deleted by the sweep meanwhile: its successor is there
                res = sweep.fact_bits_eval(cfg, ck, run["V"], run["T"], trainer, env, tmp,
                                           os.path.join(tmp, "stdout.txt"))
            if res is None:
                print(f"{name} step {step}: the trainer failed", file=sys.stderr)
                continue
            summary = res[0]
            lg = sweep.parse_log(os.path.join(d, "log.txt"))
            tasks = lg["task"].get(step, {})
            point = {"run": name, "config": cfg_name, "data": cfg["train"], "step": step,
                     "steps": run["steps"], "tokens": step * run["B"] * run["T"] * run["grad_accum"],
                     "E": run["E"], "K": run["K"], "F": run["F"], "total_params": run["total_params"],
                     "stored_bits": summary["stored_bits"], "bits_per_fact": round(summary["bits_per_fact"], 5),
                     "facts": summary["facts"], "facts_all_acc": round(summary["acc"], 5),
                     "val_loss": lg["val"].get(step),
                     "tasks": {k: v.get("acc") for k, v in tasks.items()},
                     "when": time.strftime("%Y-%m-%d %H:%M")}
            with open(path, "a") as f:
                f.write(json.dumps(point, sort_keys=True) + "\n")
            have.add((name, cfg_name, step))
            print(f"{name} step {step}: {summary['stored_bits']:.0f} bits stored "
                  f"({summary['bits_per_fact']:.3f}/fact), greedy {100 * summary['acc']:.1f}%", flush=True)
        if (name, cfg_name, run["steps"]) in have:
            finished.add(name)
    return finished


def table(path):
    pts = [json.loads(line) for line in open(path) if line.strip()]
    pts.sort(key=lambda p: (p["config"], p["E"], p["K"], p["run"], p["step"]))
    print("| config (data) | run | step | tokens | stored bits | bits/fact | greedy (all facts) | val loss | "
          "facts / reason_id / reason_shift % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in pts:
        t = p.get("tasks") or {}
        accs = " / ".join("" if t.get(k) is None else f"{100 * t[k]:.1f}" for k in ("facts", "reason_id", "reason_shift"))
        vl = "" if p.get("val_loss") is None else f"{p['val_loss']:.4f}"
        print(f"| {p['config']} ({p['facts']} facts) | {p['run']} | {p['step']}/{p['steps']} | {p['tokens'] / 1e6:.1f}M | "
              f"{p['stored_bits']:.0f} | {p['bits_per_fact']:.3f} | {100 * p['facts_all_acc']:.1f}% | {vl} | {accs} |")


def main(argv=None):
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--table":
        table(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("config")
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--watch", type=float, help="poll every N seconds until the final checkpoints are scored")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    cfg = sweep.load_config(a.config)
    if not cfg.get("fact_bits"):
        print(f"{a.config} has no fact_bits stage", file=sys.stderr)
        return 2
    runs, _ = sweep.plan_sweep(cfg, check_files=False)
    runs = {r["name"]: r for r in runs}
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    names = {os.path.basename(os.path.normpath(d)) for d in a.run_dirs}
    while True:
        finished = score_new(cfg, cfg["name"], runs, a.run_dirs, os.path.abspath(a.trainer), a.out, env)
        if not a.watch or finished >= names:
            return 0
        time.sleep(a.watch)


if __name__ == "__main__":
    sys.exit(main())
