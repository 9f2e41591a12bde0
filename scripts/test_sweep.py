#!/usr/bin/env python3
"""
Quick test (< 1 minute) of the sweep planner and runner (scripts/sweep.py) and of scripts/plot.py.

    python3 scripts/test_sweep.py                  # uses ./train_moe when it exists
    python3 scripts/test_sweep.py --trainer PATH   # another trainer binary

Checks: parameter counts against the README's default model; bench_cpu.py's sgemm limit (the fastest
BLAS) and its share formatter (a share above 100% is flagged); every family of every config in
scripts/sweep_configs/ gets equal compute (6 N tokens within one step's rounding of the budget);
bad configs (K > E, C % H, KF % K, an unknown field) are rejected with a message naming the run and
the field and exit status 2, before anything runs; --dry-run plans the smoke sweep. With a trainer:
the smoke sweep runs end to end into a temporary directory, results.csv has a finished row per
run, the counts agree with the trainer's, a rerun retrains nothing, an interrupted run resumes from
its checkpoint to the same final checkpoint bit for bit, --collect --csv writes a copy, and plot.py
makes its PNGs (or, without matplotlib, says how to install it). Prints 'N passed, M failed'.
"""
import argparse
import csv
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import sweep  # noqa: E402
from checks import check, summary  # noqa: E402

REQUIRE_ALL = False  # --require-all


def run_sweep(*args, timeout=120):
    r = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), *args], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_counts():
    # README: the default model (L=4 C=128 H=4 E=8 K=2 F=256, V=4096) has 4.46M total, 2.10M active
    c = sweep.count_params(4096, 4, 128, 4, 4, 8, 2, 256)
    check(round(c["total_params"] / 1e6, 2) == 4.46 and round(c["active_params"] / 1e6, 2) == 2.10,
          "parameter counts match the README's default model (4.46M total, 2.10M active)", str(c))
    check(c["active_nonembed_params"] == c["active_params"] - 2 * 4096 * 128, "non-embedding = active - 2 V C")


def test_bench_share():
    """scripts/bench_cpu.py: the limit is the fastest BLAS, named; a share above 100% is never printed unflagged."""
    import bench_cpu
    found = [(198.0, "torch"), (433.0, "numpy's OpenBLAS"), (0.0, "the system's OpenBLAS: not measured")]
    check(bench_cpu.best_limit(found) == (433.0, "numpy's OpenBLAS") and bench_cpu.best_limit(found[2:])[0] == 0.0,
          "bench_cpu: the sgemm limit is the fastest BLAS measured, and none when none was", str(found))
    cells = {gf: bench_cpu.fmt_share(gf, 200.0) for gf in (100.0, 200.0, 200.9, 202.0, 338.0)}
    flagged = {gf for gf, (cell, note) in cells.items() if "limit underestimated" in note}
    check(flagged == {202.0, 338.0} and cells[338.0][0].strip() == "169%" and cells[200.0][0].strip() == "100%"
          and all(len(cell) == 8 for cell, _ in cells.values()) and bench_cpu.fmt_share(1.0, 0.0)[1],
          "bench_cpu: a share above 100% of the sgemm limit is flagged '>100%: limit underestimated'", str(cells))


def test_equal_compute():
    for path in sorted(glob.glob(os.path.join(HERE, "sweep_configs", "*.json"))):
        cfg = sweep.load_config(path)
        try:
            runs, fams = sweep.plan_sweep(cfg, check_files=False)
        except sweep.ConfigError as e:
            check(False, f"{os.path.basename(path)} plans", str(e))
            continue
        by = {r["name"]: r for r in runs}
        for fam in fams:
            rs = [by[n] for n in fam["runs"]]
            # each run: 6 N tokens within half a step of the budget; the family: within one step of each other
            tps = cfg["B"] * cfg["T"] * cfg.get("grad_accum", 1)
            ok = all(abs(6 * r["flops_N"] * r["tokens"] - r["budget_flops"]) <= 6 * r["flops_N"] * tps / 2 + 1
                     for r in rs)
            fl = [r["flops"] for r in rs]
            spread = max(fl) / min(fl) - 1
            tol = max(1.0 / min(r["steps"] for r in rs), 1e-9)
            check(ok and spread <= tol and len(rs) >= 1,
                  f"{os.path.basename(path)} family {fam['name']}: equal compute ({len(rs)} runs, "
                  f"6ND spread {spread:.2e} <= 1 step {tol:.2e})",
                  "; ".join(f"{r['name']}: {r['flops']:.4e}" for r in rs))
            if fam["kind"] == "E" or fam["kind"] == "K":
                act = {r["active_params"] - r["L"] * r["E"] * r["C"] for r in rs}  # active minus the router
                check(len(act) == 1, f"{os.path.basename(path)} family {fam['name']}: fixed active params "
                      f"(router aside)", str(sorted(act)))
        if os.path.basename(path) == "cpu_mini.json":
            check(len(runs) >= 12, f"cpu_mini has at least 12 models ({len(runs)})")


def test_bad_configs(tmp):
    smoke = sweep.load_config(os.path.join(HERE, "sweep_configs", "smoke.json"))
    bad = dict(smoke, name="bad")
    bad["families"] = [{"name": "A", "K": 8, "F": 32, "E": [1, 4, 16]},
                       {"name": "t", "E": 8, "KF": 100, "K": [1, 3]},
                       {"name": "h", "C": 30, "H": 4, "E": [2], "K": 1, "F": 8, "colour": 1}]
    p = os.path.join(tmp, "bad.json")
    with open(p, "w") as f:
        json.dump(bad, f)
    root = os.path.join(tmp, "badroot")
    rc, out, err = run_sweep(p, "--root", root)
    check(rc == 2, "K > E config: exit status 2", f"rc={rc} stderr={err[-500:]}")
    check("run A/E=4" in err and "field 'K'" in err and "K=8 > E=4" in err,
          "K > E: the message names the run, the field and the values", err[-800:])
    check("KF=100 is not divisible by K=3" in err, "KF % K is reported", err[-800:])
    check("C=30 is not divisible by H=4" in err, "C % H is reported", err[-800:])
    check("unknown field(s) ['colour']" in err, "an unknown family field is reported", err[-800:])
    check(not os.path.exists(root), "nothing ran or was created for a bad config")
    rc, out, err = run_sweep(p, "--dry-run", "--root", root)
    check(rc == 2, "--dry-run also rejects it")
    # a task file that does not match its header, and a budget too small for one step
    cut = os.path.join(tmp, "cut_eval.bin")
    with open(os.path.join(ROOT, "data", "tasks", "reason_eval.bin"), "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:
        f.write(data[:len(data) - 100])
    bad2 = dict(smoke, name="bad2", eval_files=[cut + ":loss"])
    bad2["families"] = [{"name": "A", "K": 1, "F": 32, "E": [1, 2]}, {"name": "tiny", "E": 2, "K": 1, "F": 32,
                                                                      "budget_flops": 10.0}]
    p2 = os.path.join(tmp, "bad2.json")
    with open(p2, "w") as f:
        json.dump(bad2, f)
    rc, out, err = run_sweep(p2, "--root", root)
    check(rc == 2 and "cut_eval.bin" in err and "does not match its header" in err,
          "a truncated eval file is refused before anything trains, naming the file", err[-800:])
    check("run tiny" in err and "less than one step" in err, "a family budget too small for one step is refused",
          err[-800:])
    check(not os.path.exists(root), "nothing ran for the bad data config")


def test_dry_run(cfgpath, root):
    rc, out, err = run_sweep(cfgpath, "--dry-run", "--root", root)
    names = [ln.split()[0] for ln in out.splitlines() if ln.startswith("L1-C32")]
    check(rc == 0 and len(names) == 3 and out.count("  new") == 3 and "-x 7" in out,
          "--dry-run plans the smoke sweep (3 runs, commands)", out[-1500:] + err[-500:])
    check(not os.path.exists(os.path.join(root, "smoke")), "--dry-run writes nothing")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end(cfgpath, root, trainer, tmp):
    sd = os.path.join(root, "smoke")
    rc, out, err = run_sweep(cfgpath, "--root", root, "--trainer", trainer, "--progress", "0.5")
    check(rc == 0, "smoke sweep runs end to end", (out + err)[-2000:])
    res = os.path.join(sd, "results.csv")
    if not check(os.path.exists(res), "results.csv written"):
        return
    rows = read_csv(res)
    check(len(rows) == 3 and all(r["status"] == "done" for r in rows), "results.csv: a finished row per run",
          str([(r["name"], r["status"]) for r in rows]))
    need = ["total_params", "active_params", "sparsity", "tpp", "tokens", "train_loss", "val_loss",
            "mem_bpt", "mem_bpb", "mem_acc", "reason_bpt", "reason_bpb", "reason_acc",
            "mem_maj1", "mem_pass2", "reason_maj2", "reason_pass1"]
    missing = [(r["name"], k) for r in rows for k in need if r.get(k) in (None, "")]
    check(not missing, "results.csv has every metric column filled (test-time compute included)", str(missing[:5]))
    infos = [json.load(open(os.path.join(sd, r["name"], "run.json"))) for r in rows]
    check(all("count_mismatch" not in i for i in infos), "planned param counts equal the trainer's 'model:' line",
          str([i.get("count_mismatch") for i in infos]))
    dense = [r for r in rows if r["E"] == "1"]
    check(len(dense) == 1 and float(dense[0]["sparsity"]) == 0.0, "the dense run has sparsity 0")

    # a rerun retrains nothing
    files = sorted(glob.glob(os.path.join(sd, "*", "model_*.bin")) + glob.glob(os.path.join(sd, "*", "log.txt")))
    before = {p: (os.path.getmtime(p), os.path.getsize(p)) for p in files}
    rc, out, err = run_sweep(cfgpath, "--root", root, "--trainer", trainer)
    after = {p: (os.path.getmtime(p), os.path.getsize(p)) for p in files}
    check(rc == 0 and "3 already finished, 0 to run" in out and before == after,
          "a rerun retrains nothing (checkpoints and logs untouched)", out[-800:])

    # an interrupted run resumes from its checkpoint, bit for bit
    run0 = sorted(r["name"] for r in rows)[0]
    rd = os.path.join(sd, run0)
    steps = int(next(r for r in rows if r["name"] == run0)["steps"])
    final = os.path.join(rd, f"model_{steps:08d}.bin")
    cks = sweep.ckpt_steps(rd)
    if check(len(cks) >= 2, f"smoke keeps its intermediate checkpoint ({cks})"):
        h = sha(final)
        mid = cks[-2]
        os.remove(final)
        with open(os.path.join(rd, "log.txt")) as f:  # the log of a run killed one step after the checkpoint
            keep = [ln for ln in f if int(ln.split()[1]) <= mid + 1]
        with open(os.path.join(rd, "log.txt"), "w") as f:
            f.writelines(keep)
        rc, out, err = run_sweep(cfgpath, "--root", root, "--trainer", trainer)
        check(rc == 0 and f"resuming at step {mid}" in out and "2 already finished, 1 to run" in out,
              f"an interrupted run resumes at its checkpoint (step {mid})", (out + err)[-1500:])
        check(os.path.exists(final) and sha(final) == h, "the resumed run's final checkpoint is bit-identical")
        rows2 = read_csv(res)
        r2 = next(r for r in rows2 if r["name"] == run0)
        r1 = next(r for r in rows if r["name"] == run0)
        check(r2["status"] == "done" and r2["val_loss"] == r1["val_loss"] and r2["train_loss"] == r1["train_loss"],
              "after the resume the CSV row is the same (the log's rewound steps are replaced)",
              f"{r1['val_loss']} {r2['val_loss']} {r1['train_loss']} {r2['train_loss']}")

    copy = os.path.join(tmp, "copy", "r.csv")
    rc, out, err = run_sweep(cfgpath, "--root", root, "--collect", "--csv", copy)
    check(rc == 0 and os.path.exists(copy) and read_csv(copy) == read_csv(res), "--collect --csv writes a copy")

    # a changed config does not mix into existing runs
    cfg = sweep.load_config(cfgpath)
    cfg["lr"] = 1e-3
    p = os.path.join(tmp, "smoke_lr.json")
    with open(p, "w") as f:
        json.dump(cfg, f)
    rc, out, err = run_sweep(p, "--root", root, "--trainer", trainer)
    check(rc == 2 and "holds a run with other arguments" in err, "a changed config is refused for existing run dirs",
          (out + err)[-600:])

    # plots
    figs = os.path.join(tmp, "figs")
    r = subprocess.run([sys.executable, os.path.join(HERE, "plot.py"), res, "--out", figs], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    try:
        import matplotlib  # noqa: F401
        have = True
    except ImportError:
        have = False
    if have:
        pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(figs, "*.png")))
        want = {"vs_total_params.png", "vs_tpp.png", "curves.png"}
        check(r.returncode == 0 and want <= set(pngs) and any(p.startswith("expert_load_") for p in pngs),
              f"plot.py writes its PNGs ({', '.join(pngs)})", r.stderr[-1500:])
    else:
        if REQUIRE_ALL:
            check(False, "--require-all: matplotlib is not importable, so the figures are not tested")
        check(r.returncode == 2 and "pip install matplotlib" in r.stderr, "without matplotlib plot.py says how to install it",
              r.stderr[-500:])


def test_ttc_options():
    """ttc_seeds, ttc_files, ttc_items: test-time compute on some seeds, files and items only; bad values refused."""
    cfg = sweep.load_config(os.path.join(HERE, "sweep_configs", "smoke.json"))
    cfg.update(name="ttc", seeds=[1, 2], ttc_samples=4, ttc_seeds=[1], ttc_files=["data/tasks/reason_eval.bin"],
               ttc_items=7, acc_items=0)
    cfg["families"] = [{"name": "A", "K": 1, "F": 32, "E": [1, 2]}]
    runs, _ = sweep.plan_sweep(cfg, check_files=False)
    per_seed = sorted({(r["seed"], r["ttc_samples"]) for r in runs})
    check(per_seed == [(1, 4), (2, 0)], "ttc_seeds: test-time compute on seed 1's runs only", str(per_seed))
    r1 = next(r for r in runs if r["seed"] == 1)
    cmd = sweep.ttc_cmd(cfg, r1, "RUN", "T")
    ev, ea = cmd[cmd.index("-ev") + 1], cmd[cmd.index("-ea") + 1]
    check(ev == "data/tasks/reason_eval.bin" and ea == "7" and cmd.count("-ev") == 1 and cmd.count("-ea") == 1
          and cmd[-6:] == ["-ex", "1", "-tn", "4", "-tt", "0.8"],
          "ttc_files and ttc_items replace -ev and -ea in the test-time compute command", " ".join(cmd))
    train = sweep.cmd_for(cfg, r1, "RUN", "T")
    check(train[train.index("-ev") + 1] != ev and train[train.index("-ea") + 1] == "0",
          "training keeps the config's eval files and acc_items", " ".join(train))
    with tempfile.TemporaryDirectory() as d:  # test-time compute's eval of fewer items logs task lines at the same step
        p = os.path.join(d, "log.txt")
        with open(p, "w") as f:
            f.write("step 9 task reason bpt 1.0 bpb 0.5 acc 0.400000 n 1000\n"
                    "step 9 task reason bpt 1.1 bpb 0.6 acc 0.300000 n 200\n")
        got = sweep.parse_log(p)["task"][9]["reason"]
        check(got["acc"] == 0.4 and got["n"] == 1000, "parse_log: a later task line with fewer items does not "
              "replace the full eval's at the same step", str(got))
    for key, bad in (("ttc_seeds", []), ("ttc_seeds", [-1]), ("ttc_files", "x.bin"), ("ttc_items", -2)):
        c = dict(cfg, **{key: bad})
        try:
            sweep.plan_sweep(c, check_files=False)
            refused = ""
        except sweep.ConfigError as e:
            refused = str(e)
        check(key in refused, f"{key} = {bad!r} is refused, naming the key", refused[:200])


def test_seeds_results_grpo(trainer, tmp):
    """seeds, results_dir (a fresh clone continues from the committed logs), the GRPO stage and --hours."""
    cfg = sweep.load_config(os.path.join(HERE, "sweep_configs", "smoke.json"))
    cfg.update(name="seeded", seeds=[1, 2], ttc_samples=0, results_dir=os.path.join(tmp, "committed"))
    cfg["families"] = [{"name": "A", "K": 1, "F": 32, "E": [1, 2]}]
    cfg["grpo"] = {"rl_file": "data/tasks/reason_eval.bin", "steps": 2, "eval_every": 1,
                   "eval_files": ["data/tasks/reason_eval.bin"], "families": ["A"],
                   "args": ["-rp", "2", "-rg", "2", "-rm", "1", "-rr", "8"]}
    p = os.path.join(tmp, "seeded.json")
    with open(p, "w") as f:
        json.dump(cfg, f)
    runs, _ = sweep.plan_sweep(cfg, check_files=False)
    names = sorted(r["name"] for r in runs)
    check(names == ["L1-C32-H2-E1-K1-F32-s1", "L1-C32-H2-E1-K1-F32-s2", "L1-C32-H2-E2-K1-F32-s1",
                    "L1-C32-H2-E2-K1-F32-s2"] and all(["-sd", str(r["seed"])] == r["args"][r["args"].index("-sd"):][:2]
                                                      for r in runs),
          "seeds: one run per model and seed, named -s<seed>, trained with -sd <seed>", str(names))
    root = os.path.join(tmp, "seeded_root")
    rc, out, err = run_sweep(p, "--root", root, "--trainer", trainer, "--hours", "0")
    check(rc == 0 and "time limit" in out and not glob.glob(os.path.join(root, "seeded", "L1*")),
          "--hours: past the limit no new run starts", (out + err)[-800:])
    rc, out, err = run_sweep(p, "--root", root, "--trainer", trainer)
    check(rc == 0, "the seeded sweep with GRPO runs", (out + err)[-2000:])
    com = cfg["results_dir"]
    logs = sorted(os.path.basename(os.path.dirname(x)) for x in glob.glob(os.path.join(com, "*", "log.txt.gz")))
    glogs = sorted(os.path.basename(os.path.dirname(x)) for x in glob.glob(os.path.join(com, "*", "grpo_log.txt")))
    check(logs == names and glogs == [n for n in names if n.endswith("-s1")],
          "results_dir gets every run's log, and GRPO logs for the first seed only", f"{logs} {glogs}")
    res = os.path.join(root, "seeded", "results.csv")
    rows = read_csv(res) if os.path.exists(res) else []
    g = [r for r in rows if r.get("grpo_reason_acc") not in (None, "") and r.get("grpo0_reason_acc") not in (None, "")]
    check(len(rows) == 4 and sorted(r["name"] for r in g) == [n for n in names if n.endswith("-s1")]
          and all(r["model"] + "-s" + r["seed"] == r["name"] for r in rows),
          "results.csv: model and seed columns, GRPO accuracy before and after for the GRPO runs",
          str([(r["name"], r.get("grpo_reason_acc")) for r in rows]))
    by = {r["name"]: r for r in rows}
    check(len(by) == 4 and by[names[0]]["val_loss"] != by[names[1]]["val_loss"],
          "two seeds of one model give different runs")
    shutil.rmtree(root)  # a fresh clone: only the committed logs are left
    rc, out, err = run_sweep(p, "--root", root, "--trainer", trainer)
    rows2 = read_csv(res) if os.path.exists(res) else []
    check(rc == 0 and "4 already finished, 0 to run" in out and not glob.glob(os.path.join(root, "seeded", "L1*"))
          and rows2 == rows, "after a fresh clone the sweep trains nothing and its CSV is the same", (out + err)[-800:])
    cfg["seeds"] = [1, 2, 3]  # two new runs; the four finished ones predict how long each takes
    with open(p, "w") as f:
        json.dump(cfg, f)
    check([sweep.chunk_admits(*a) for a in ((None, 10, 100, True), (50, 60, 100, True), (70, 60, 100, True),
                                            (70, 60, 100, False), (150, 100, 100, False), (150, 100, 100, True))]
          == [True, True, False, False, True, False],
          "chunk_admits: a run starts if it ends within the chunk, or is longer than any chunk and comes first")
    rc, out, err = run_sweep(p, "--root", root, "--trainer", trainer, "--hours", "0.0001")
    s3 = [os.path.basename(d) for d in glob.glob(os.path.join(root, "seeded", "L1*-s3"))]
    check(rc == 0 and len(s3) == 1 and "time limit" in out,
          "--hours 0.0001: a run longer than the whole chunk starts first, and nothing after it", (out + err)[-800:])
    runs3, _ = sweep.plan_sweep(cfg, check_files=False)
    eta = sweep.make_eta(cfg, runs3, os.path.join(root, "seeded"))
    by3 = {r["name"]: r for r in runs3}
    g1 = sweep.read_json(os.path.join(com, "L1-C32-H2-E1-K1-F32-s1", "run.json")) or {}
    with_grpo = eta.predict(by3["L1-C32-H2-E1-K1-F32-s1"]) - eta.predict(by3["L1-C32-H2-E1-K1-F32-s3"])
    check(g1.get("grpo_s", 0) > 0 and with_grpo > 0, "the ETA of a run with GRPO adds the GRPO time",
          f"grpo_s={g1.get('grpo_s')} difference={with_grpo}")


def test_auto_trainer(tmp):
    """"trainer": "auto": the faster of ./train_moe and ./train_moe_blas (those built) is timed, logged and used."""
    cfg = sweep.load_config(os.path.join(HERE, "sweep_configs", "smoke.json"))
    cfg.update(name="auto", trainer="auto", ttc_samples=0)
    cfg["families"] = [{"name": "A", "K": 1, "F": 32, "E": [2]}]
    p = os.path.join(tmp, "auto.json")
    with open(p, "w") as f:
        json.dump(cfg, f)
    root = os.path.join(tmp, "auto_root")
    rc, out, err = run_sweep(p, "--dry-run", "--root", root)
    check(rc == 0 and "trainer auto: the faster of" in out, "--dry-run names the auto choice", (out + err)[-800:])
    rc, out, err = run_sweep(p, "--root", root)
    line = next((ln for ln in out.splitlines() if "trainer auto:" in ln), "")
    built = [t for t in sweep.AUTO_TRAINERS if os.access(os.path.join(ROOT, t), os.X_OK)]
    m = re.search(r"trainer auto: (\S+)", line)
    chosen = m.group(1) if m else None
    times = {t: float(v) for t, v in re.findall(r"([\w./-]+) ([0-9.]+) ms", line)}
    if len(built) > 1:
        ok = len(times) == len(built) and chosen in times and times[chosen] == min(times.values())
        check(ok, f"auto: {len(built)} builds timed, the faster one chosen", line)
    else:
        check("(the only one built)" in line, "auto: the only build is taken without timing", line)
    info = sweep.read_json(os.path.join(root, "auto", "L1-C32-H2-E2-K1-F32", "run.json")) or {}
    check(rc == 0 and chosen is not None and info.get("command", [""])[0] == os.path.join(ROOT, chosen),
          "auto: the run is trained with the chosen build",
          f"rc={rc} chosen={chosen} command={info.get('command', [''])[:1]} {(out + err)[-600:]}")


# ----------------------------------------------------------------------------------------------
# the v3 study: data/build_study3.py's small vocabulary, the family invariants, the fact_bits stage

def build_v3(out, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", "build_study3.py"), "--out", out, *flags],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)


V3_TINY = ["--people", "40", "--mentions", "5", "--total-tokens", "250000", "--reason-eval", "20", "--reason-rl", "20",
           "--fact-eval", "240", "--val-tokens", "6000"]


def test_v3_data(tmp):
    """build_study3.py: a tiny build, its checks, refusals before anything is built, nesting, --check."""
    d = os.path.join(tmp, "s3")
    r = build_v3(d, *V3_TINY)
    if not check(r.returncode == 0, "build_study3: a tiny build", r.stderr[-800:]):
        return None
    m = json.load(open(os.path.join(d, "manifest.json")))
    V = m["vocabulary"]["V"]
    toks = sweep.tokenizer_vocab(os.path.join(d, "tokenizer.bin"))
    evs = {f: sweep.eval_vocab(os.path.join(d, f)) for f in ("facts_all.bin", "facts_eval.bin", "reason_id_eval.bin")}
    check(toks == V and V < 1024 and all(v == (V, V - 1) for v in evs.values()),
          f"build_study3: its own vocabulary (V={V}), in the tokenizer and every eval header, eot = V - 1", str(evs))
    mm = m["memorization"]
    check(mm["facts"] == 240 and mm["fact_bits"] == 240 * 8 and mm["tokens_per_fact_mention"] < 4,
          "build_study3: 40 people x 6 attributes x 256 values = 1,920 bits, under 4 tokens per fact mention", str(mm))
    _h, items = sweep.read_eval_items(os.path.join(d, "facts_all.bin"))
    check(len(items) == 240 and all(len(p) == 4 and len(a) == 1 for p, a in items),
          "facts_all: every fact once, prompt [eot, first, surname, attribute], a one-token answer")
    for flags, what in ((["--people", "20000"], "--people 20000"), (["--values", "100000"], "--values 100000"),
                        (["--people", "40", "--total-tokens", "1000"], "--total-tokens 1000")):
        bad = os.path.join(tmp, "s3_bad")
        r = build_v3(bad, *flags)
        check(r.returncode == 2 and "does not fit" in r.stderr and not os.path.exists(bad),
              f"build_study3 {what}: a fact set that does not fit is refused before anything is built", r.stderr[-400:])
    half = os.path.join(tmp, "s3_half")
    r = build_v3(half, *[{"40": "20", "240": "120"}.get(x, x) for x in V3_TINY])
    _h, hitems = sweep.read_eval_items(os.path.join(half, "facts_all.bin")) if r.returncode == 0 else (None, [])
    sys.path.insert(0, os.path.join(ROOT, "data"))
    import build_study3

    def texts(dd, its):  # as text: the two builds' reasoning parts differ, so may their token ids
        voc = build_study3.read_vocab(os.path.join(dd, "tokenizer.bin"))
        return {voc.decode(p[1:] + a) for p, a in its}
    check(r.returncode == 0 and len(hitems) == 120 and texts(half, hitems) <= texts(d, items),
          "build_study3 --people 20: its facts are the first 20 people's of the 40-people build (nested)")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "build_study3.py"), "--out", d, "--check"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    check(r.returncode == 0 and "identical" in r.stdout, "build_study3 --check: a rebuild is byte-identical",
          (r.stdout + r.stderr)[-400:])
    return d, V


def v3_cfg(d, V, **kw):
    cfg = {"name": "v3t", "budget_flops": 2e8, "train": f"{d}/study3_train_*.bin", "val": f"{d}/study3_val_000.bin",
           "tokenizer": f"{d}/tokenizer.bin", "eval_files": [f"{d}/facts_eval.bin"],
           "fact_bits": {"file": f"{d}/facts_all.bin", "rows": 16}, "B": 4, "T": 8, "lr": 3e-3, "evals": 1,
           "val_batches": 2, "acc_items": 0, "checkpoints": 1, "model": {"V": V, "L": 1, "C": 32, "H": 2},
           "families": [{"name": "E", "K": 1, "F": 32, "E": [1, 2]}]}
    cfg.update(kw)
    return cfg


def test_v3_config_errors(tmp, d, V):
    """Bad input is refused before anything trains: a family breaking its invariant, data that do not
    fit the model's vocabulary, a budget below one step."""
    root = os.path.join(tmp, "v3_bad_root")
    cases = [
        (v3_cfg(d, V, families=[{"name": "topk", "runs": [{"E": 16, "K": 2, "F": 128}, {"E": 32, "K": 4, "F": 32}],
                                  "KF": 256, "EF": 2048}]),
         ["run topk/run #1", "K*F = 128 breaks the family's invariant KF=256", "E*F = 1024 breaks the family's invariant EF=2048"],
         "a family whose runs break its declared K*F and E*F"),
        (v3_cfg(d, V, families=[{"name": "topk", "K": [2, 3], "KF": 192, "EF": 1000}]),
         ["EF=1000 is not divisible by F=96"], "a K family whose E = EF/F is not an integer"),
        (v3_cfg(d, V, model={"V": 512, "L": 1, "C": 32, "H": 2}),
         ["the tokenizer", f"has V={V}", f"was built for V={V}, more than the model's V=512", "do not fit the vocabulary"],
         "a model vocabulary smaller than the data's (tokenizer, eval files, shards)"),
        (v3_cfg(d, V, budget_flops=1e3), ["less than one step"], "a budget below one step"),
        (v3_cfg(d, V, fact_bits={"file": f"{d}/reason_id_eval.bin"}), ["every answer must be one token"],
         "a fact_bits file whose answers are not single tokens"),
    ]
    for i, (cfg, needles, what) in enumerate(cases):
        p = os.path.join(tmp, f"v3_bad{i}.json")
        with open(p, "w") as f:
            json.dump(cfg, f)
        rc, out, err = run_sweep(p, "--root", root)
        check(rc == 2 and all(n in err for n in needles) and not os.path.exists(root),
              f"v3 config: {what} is refused (exit 2) before anything trains", err[-900:])
    runs, fams = sweep.plan_sweep(v3_cfg(d, V, families=[{"name": "topk", "K": [2, 4, 8], "KF": 256, "EF": 2048}],
                                         model={"V": V, "L": 4, "C": 64, "H": 4}), check_files=False)
    check([(r["E"], r["K"], r["F"]) for r in runs] == [(16, 2, 128), (32, 4, 64), (64, 8, 32)]
          and len({r["total_params"] - r["L"] * r["E"] * r["C"] for r in runs}) == 1,
          "a K family with KF and EF: E16-K2-F128, E32-K4-F64, E64-K8-F32, equal total params (router aside)",
          str([(r["E"], r["K"], r["F"], r["total_params"]) for r in runs]))
    s3 = sweep.load_config(os.path.join(HERE, "sweep_configs", "study3.json"))
    runs, fams = sweep.plan_sweep(s3, check_files=False)
    by_fam = {f["name"]: f["runs"] for f in fams}
    dense = next(r for r in runs if r["E"] == 1)
    check(sorted(n.rsplit("-s", 1)[0] for n in by_fam["topk"])[::3] == ["L4-C64-H4-E16-K2-F128", "L4-C64-H4-E32-K4-F64",
                                                                        "L4-C64-H4-E64-K8-F32"]
          and all("-K1-" in n for n in by_fam["k1"]) and not any("-K1-" in n for n in by_fam["topk"])
          and abs(dense["tokens"] - 30e6) < 2048 and len(runs) == 27,
          "study3.json: topk holds K*F and E*F, K=1 is outside it, the dense model reads 30.0M tokens, 27 runs",
          str(by_fam))


def test_v3_fact_bits(trainer, tmp, d, V):
    """The fact_bits stage: packing, the scores, and end to end against the trainer's own task loss."""
    rows, where = sweep.pack_rows([([9, 1, 2, 3], [7]), ([9, 4, 5], [6]), ([9, 1, 1, 1], [5])], 10, 9)
    check(rows == [[9, 1, 2, 3, 7, 9, 4, 5, 6, 9], [9, 1, 1, 1, 5, 9, 9, 9, 9, 9]]
          and where == [(0, 3, 7), (0, 7, 6), (1, 3, 5)],
          "pack_rows: items back to back, never across two rows, each answer's predicting position", f"{rows} {where}")
    import array
    lg = array.array("f", [0.0, 1.0, 3.0, 2.0])
    lf, lv, right = sweep.answer_scores(lg, 4, 0, (2, [2, 3]))
    exp_f = 3.0 - math.log(sum(math.exp(x) for x in (0, 1, 3, 2)))
    exp_v = 3.0 - math.log(math.exp(3) + math.exp(2))
    check(abs(lf - exp_f) < 1e-12 and abs(lv - exp_v) < 1e-12 and right,
          "answer_scores: log p over the vocabulary and over the value tokens, greedy right", f"{lf} {lv} {right}")
    cfg = v3_cfg(d, V, results_dir=os.path.join(tmp, "v3_committed"))
    p = os.path.join(tmp, "v3.json")
    with open(p, "w") as f:
        json.dump(cfg, f)
    root = os.path.join(tmp, "v3_root")
    rc, out, err = run_sweep(p, "--root", root, "--trainer", trainer, timeout=300)
    if not check(rc == 0 and "fact bits" in out, "v3: a sweep with the fact_bits stage runs", (out + err)[-1500:]):
        return
    res = read_csv(os.path.join(root, "v3t", "results.csv"))
    for r in res:
        fb = json.load(open(os.path.join(root, "v3t", r["name"], "fact_bits.json")))
        bits, right = sweep.read_fact_items(os.path.join(root, "v3t", r["name"], "fact_items.txt.gz"))
        check(fb["facts"] == 240 == len(bits) and abs(sum(bits) - fb["stored_bits"]) <= 0.05 * 240 + 0.1
              and sum(right) == round(fb["acc"] * 240),
              f"{r['name']}: fact_bits.json and one line per fact agree ({fb['stored_bits']} bits)")
        # T=8 holds one fact per row, so the packed forward sees what the trainer's own task eval sees
        check(abs(float(r["facts_all_bpt"]) - float(r["facts_bpt"])) < 1e-3 * float(r["facts_bpt"])
              and abs(float(r["facts_all_acc"]) - float(r["facts_acc"])) < 1e-9,
              f"{r['name']}: fact bits' loss and greedy accuracy equal the trainer's task eval on the same facts",
              f"fact_bits bpt {r['facts_all_bpt']} acc {r['facts_all_acc']}; trainer bpt {r['facts_bpt']} acc {r['facts_acc']}")
    com = sorted(glob.glob(os.path.join(tmp, "v3_committed", "*", "fact_items.txt.gz")))
    check(len(com) == 2, "results_dir gets every run's fact_items.txt.gz and fact_bits.json", str(com))
    shutil.rmtree(root)
    rc, out, err = run_sweep(p, "--root", root, "--trainer", trainer)
    res2 = read_csv(os.path.join(root, "v3t", "results.csv")) if rc == 0 else []
    check(rc == 0 and "2 already finished, 0 to run" in out and [r["facts_all_bits"] for r in res2]
          == [r["facts_all_bits"] for r in res], "v3: a fresh clone finds the fact bits committed and trains nothing",
          (out + err)[-600:])


def main():
    ap = argparse.ArgumentParser(description="quick test of scripts/sweep.py and scripts/plot.py")
    ap.add_argument("--trainer", default=os.path.join(ROOT, "train_moe"))
    ap.add_argument("--require-all", action="store_true",
                    help="a missing trainer binary or matplotlib is a failure, not a skip (make test)")
    args = ap.parse_args()
    global REQUIRE_ALL
    REQUIRE_ALL = args.require_all
    cfgpath = os.path.join(HERE, "sweep_configs", "smoke.json")
    test_counts()
    test_bench_share()
    test_equal_compute()
    test_ttc_options()
    with tempfile.TemporaryDirectory(prefix="test_sweep_") as tmp:
        root = os.path.join(tmp, "sweeps")
        test_bad_configs(tmp)
        test_dry_run(cfgpath, root)
        v3 = test_v3_data(tmp)
        if v3:
            test_v3_config_errors(tmp, *v3)
        if os.path.isfile(args.trainer) and os.access(args.trainer, os.X_OK):
            test_end_to_end(cfgpath, root, os.path.abspath(args.trainer), tmp)
            test_seeds_results_grpo(os.path.abspath(args.trainer), tmp)
            test_auto_trainer(tmp)
            if v3:
                test_v3_fact_bits(os.path.abspath(args.trainer), tmp, *v3)
        else:
            if REQUIRE_ALL:
                check(False, f"--require-all: no trainer at {args.trainer} (make train_moe)")
            print(f"SKIP end-to-end: no trainer at {args.trainer} (make train_moe)")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
