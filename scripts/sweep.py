#!/usr/bin/env python3
"""
Fixed-compute sparsity sweeps: plan, run (resumably) and collect a family of MoE training runs.

    python3 scripts/sweep.py scripts/sweep_configs/cpu_mini.json --dry-run   # the plan, nothing runs
    python3 scripts/sweep.py scripts/sweep_configs/cpu_mini.json             # run it (again: resumes)
    python3 scripts/sweep.py scripts/sweep_configs/cpu_mini.json --bench 6   # time a few steps of each model
    python3 scripts/sweep.py scripts/sweep_configs/cpu_mini.json --collect   # only (re)write results.csv

Compute. Every run gets the same training compute C = 6 * N * D (the config's `budget_flops`), where D
is the number of training tokens and N is, by default, the ACTIVE NON-EMBEDDING parameter count: what
one token passes through, minus the token embedding (V x C) and the LM head (V x C). This is the
paper's convention (arXiv 2508.18672 counts active non-embedding parameters; Kaplan et al.'s N). With
`"flops_params": "active"` N counts the embedding and the head too (`dev/MODEL.md`'s "active params").
Attention's T-dependent FLOPs are left out either way. So D = budget / (6 N), steps = round(D / (B*T*ga))
and every run in the sweep has the same 6*N*D up to the rounding of one step (the plan prints the
actual figure). Total params, active params, sparsity (1 - K/E) and TPP (tokens / total params)
follow `dev/MODEL.md`'s "Counting"; total params are checked against the trainer's own "model:" line.

The config (JSON; `scripts/sweep_configs/README.md` documents every field) gives the budget, the
data, B, T, the LR schedule, the eval files, the default model shape, and a list of families:

  {"name": "A", "C": 64, "K": 2, "F": 128, "E": [1, 2, 4, 8, 16, 32]}  vary E at fixed K and F (fixed
        active params); E = 1 in the list is the dense model with the same active params: K = 1,
        F = K * F (a SwiGLU of the summed width);
  {"name": "topk", "E": 16, "KF": 256, "K": [1, 2, 4, 8]}              vary K at fixed E and K*F
        (fixed active params), F = KF / K;
  {"name": "topk", "KF": 256, "EF": 2048, "K": [2, 4, 8]}              vary K at fixed K*F and E*F
        (fixed active and total params), F = KF / K, E = EF / F; a family that declares KF or EF
        keeps it (a run that breaks it is an error);
  {"name": "x", "runs": [{"E": 8, "K": 2, "F": 64}, ...]}               any explicit list.

Every run is validated before anything runs (K > E, C % H, H % Hkv, odd head size, KF % K, a family
invariant broken, a step count below 1, missing data or eval files, data that do not fit the model's
vocabulary, unknown fields ...): each problem is reported naming the run and the field, and the
script exits with status 2.

Runs live in <root>/<sweep name>/<run name>/ (root: out/sweeps). The run name is the shape
(L2-C64-H4-E8-K2-F128); a shape that two families share is trained once and counted in both. A run
is finished when its final checkpoint model_<steps>.bin exists and log.txt has the final
"step <steps> val" line: it is never rerun. Anything else is started (or resumed) with `-y 1 -o DIR`,
which continues from the newest checkpoint bit for bit (`checkpoints` per run set how often the
trainer writes one; older ones are deleted as newer ones appear unless "keep_checkpoints": "all").
A run directory whose recorded arguments differ from the current plan is an error (delete it or
rename the sweep) so that a changed config never silently mixes two runs.

Progress: a line when a run starts and ends, and every --progress seconds the current step, tok/s,
the run's ETA and the sweep's ETA. The ETA of runs not yet started comes from the measured
throughput of finished runs (training FLOP/s = 6 N tok/s, taken from the same family where one has
finished, else from all; plus the measured seconds per eval point), before any has finished from
--bench figures if present, else from the running run.

With `ttc_samples` in the config, each finished run's final checkpoint also gets test-time compute
(`-y 1 -ex 1 -tn S -tt T`: majority vote and pass@n on acc_items items per eval file); `ttc_seeds`
limits it to the runs of those seeds, `ttc_files` to those eval files and `ttc_items` to that many
items per file. With
`fact_bits`, the final checkpoint's stored bits on every fact of an eval file of one-token answers
(fact_bits_eval: the trainer's -fi/-fo forward on the facts packed like training documents), with one
line per fact in fact_items.txt.gz for paired comparisons.

At the end (and with --collect) every run's final metrics go to <root>/<name>/results.csv (and to
--csv PATH): shape, total/active/non-embedding params, sparsity, TPP, tokens, FLOPs, train loss
(mean ce over the last 5% of steps), val loss, per eval task bpt, bpb, acc, n, and with test-time
compute <task>_maj<n>, <task>_pass<n>. plan.json next to it records the families for scripts/plot.py.
"""
import argparse
import concurrent.futures
import csv
import glob
import gzip
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# config

TOP_KEYS = {
    "name", "description", "trainer", "budget_flops", "flops_params", "train", "val", "tokenizer",
    "eval_files", "B", "T", "grad_accum", "lr", "warmup", "warmup_frac", "min_lr_frac", "weight_decay",
    "grad_clip", "seed", "evals", "val_batches", "acc_items", "checkpoints", "keep_checkpoints",
    "model", "families", "extra_args", "threads", "notes", "ttc_samples", "ttc_temp",
    "ttc_seeds", "ttc_files", "ttc_items", "seeds", "results_dir", "grpo", "fact_bits",
}
GRPO_KEYS = {"rl_file", "steps", "eval_every", "eval_files", "args", "families", "seeds"}
MODEL_KEYS = {"V", "L", "C", "H", "Hkv", "E", "K", "F", "aux_coef", "z_coef", "rope_theta"}
RUN_KEYS = MODEL_KEYS | {"lr", "warmup", "warmup_frac", "init_std"}
FAMILY_KEYS = RUN_KEYS | {"name", "label", "KF", "EF", "runs", "seeds", "budget_flops", "ttc_samples"}
FACT_BITS_KEYS = {"file", "rows"}
DEFAULT_MODEL = {"V": 4096, "L": 2, "C": 64, "H": 4, "Hkv": None, "E": 8, "K": 2, "F": 128}
FLOPS_PARAMS = ("active_nonembedding", "active")


class ConfigError(Exception):
    pass


def count_params(V, L, C, H, Hkv, E, K, F):
    """Parameter counts by dev/MODEL.md's layout (wte, norms, attention, router, experts, head)."""
    D = C // H
    attn = L * (H * D * C + 2 * Hkv * D * C + C * H * D)
    norms = 2 * L * C + C
    router = L * E * C
    experts = L * E * 3 * F * C
    emb = 2 * V * C  # token embedding + LM head (untied)
    total = emb + attn + norms + router + experts
    active = total - L * (E - K) * 3 * F * C
    return {"total_params": total, "active_params": active, "total_nonembed_params": total - emb,
            "active_nonembed_params": active - emb, "embed_params": emb}


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_config(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config '{path}': {e.strerror}")
    except json.JSONDecodeError as e:
        raise ConfigError(f"config '{path}' is not valid JSON: {e}")
    if not isinstance(cfg, dict):
        raise ConfigError(f"config '{path}': the top level must be a JSON object")
    return cfg


def resolve(p):
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(ROOT, p))


def data_file_problem(path, kind):
    """None, or why the file does not match its own header (read as the trainer reads it): a token
    shard (llm.c's layout, uint16 or uint32 tokens) or an eval file (build_tasks' layout)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(1024)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if len(raw) < 1024:
        return f"is {len(raw)} bytes, shorter than its 1024-byte header"
    h = struct.unpack("<256i", raw)
    if kind == "shard":
        width = 2 if (h[0], h[1]) == (20240520, 1) else 4 if (h[0], h[1]) == (20240801, 7) else None
        if width is None:
            return f"is not a token shard (magic {h[0]} version {h[1]})"
        if h[2] < 1 or size != 1024 + width * h[2]:
            return f"is {size} bytes but its header says {h[2]} tokens (truncated or corrupt)"
        return None
    if (h[0], h[1]) != (20251125, 1):
        return f"is not an eval file (magic {h[0]} version {h[1]})"
    if h[2] < 1 or size != 1024 + 12 * h[2] + 4 * (h[9] + h[10]) + h[11]:
        return f"is {size} bytes, which does not match its header ({h[2]} items; truncated or corrupt)"
    return None


def eval_vocab(path):
    """(V, eot) an eval file was built for (header slots 6 and 7)."""
    with open(path, "rb") as f:
        h = struct.unpack("<256i", f.read(1024))
    return h[6], h[7]


def tokenizer_vocab(path):
    """V of a tokenizer file (llm.c's layout), or None if it is not one."""
    try:
        with open(path, "rb") as f:
            h = struct.unpack("<256I", f.read(1024))
    except (OSError, struct.error):
        return None
    return h[2] if (h[0], h[1]) == (20240328, 2) else None


def shard_max_token(path):
    """The largest token id of a shard (its header is checked by data_file_problem)."""
    import array
    with open(path, "rb") as f:
        h = struct.unpack("<256i", f.read(1024))
        buf = array.array("H" if h[0] == 20240520 else "I")
        buf.frombytes(f.read())
    if sys.byteorder != "little":
        buf.byteswap()
    return max(buf) if len(buf) else -1


def read_eval_items(path):
    """[(prompt ids, answer ids)] of an eval file (data/tasks/README.md's layout) and its header."""
    with open(path, "rb") as f:
        data = f.read()
    h = struct.unpack_from("<256i", data)
    pos, items = 1024, []
    for _ in range(h[2]):
        pl, al = struct.unpack_from("<2i", data, pos)
        toks = struct.unpack_from(f"<{pl + al}i", data, pos + 8)
        pos += 8 + 4 * (pl + al)
        rl = struct.unpack_from("<i", data, pos)[0]
        pos += 4 + rl
        items.append((list(toks[:pl]), list(toks[pl:])))
    return h, items


def vocab_problems(cfg, model, families, ev, err):
    """The vocabulary against the model: the tokenizer's V must be the model's, and no eval file,
    RL or fact file may be built for a larger V, nor any shard hold a token id >= V."""
    Vs = sorted({v for v in [model.get("V")] + [f.get("V") for f in families if isinstance(f, dict)]
                 if _is_int(v)})
    if not Vs:
        return
    tok = cfg.get("tokenizer")
    if isinstance(tok, str) and os.path.isfile(resolve(tok)):
        tv = tokenizer_vocab(resolve(tok))
        if tv is None:
            err("config", "tokenizer", f"'{tok}' is not a tokenizer file (magic 20240328, version 2)")
        elif any(v != tv for v in Vs):
            err("config model", "V", f"V={Vs[0] if Vs[0] != tv else Vs[-1]} but the tokenizer '{tok}' has "
                f"V={tv}: the model's vocabulary must be the tokenizer's")
    files = [("eval_files", f[:-5] if f.endswith(":loss") else f) for f in ev]
    g = cfg.get("grpo") if isinstance(cfg.get("grpo"), dict) else {}
    files += [("grpo", x) for x in [g.get("rl_file")] + list(g.get("eval_files", [])) if isinstance(x, str)]
    fb = cfg.get("fact_bits") if isinstance(cfg.get("fact_bits"), dict) else {}
    if isinstance(fb.get("file"), str):
        files.append(("fact_bits", fb["file"]))
    for field, f in files:
        path = resolve(f)
        if os.path.isfile(path) and not data_file_problem(path, "eval"):
            fv, _eot = eval_vocab(path)
            if fv > Vs[0]:
                err("config", field, f"'{f}' was built for V={fv}, more than the model's V={Vs[0]}: its tokens "
                    f"do not fit the vocabulary")
    for k in ("train", "val"):
        for path in sorted(glob.glob(resolve(cfg[k]))) if isinstance(cfg.get(k), str) else []:
            if not data_file_problem(path, "shard"):
                mx = shard_max_token(path)
                if mx >= Vs[0]:
                    err("config", k, f"'{path}' holds token id {mx}, outside the model's V={Vs[0]}: the data do "
                        f"not fit the vocabulary")


def fact_bits_problem(cfg, T):
    """None, or why the fact_bits stage cannot score its file (single-token answers, fitting T)."""
    fb = cfg["fact_bits"]
    path = resolve(fb["file"])
    if not os.path.isfile(path):
        return f"'{fb['file']}' does not exist"
    why = data_file_problem(path, "eval")
    if why:
        return f"'{fb['file']}' {why}"
    _h, items = read_eval_items(path)
    if any(len(a) != 1 for _p, a in items):
        return f"'{fb['file']}': every answer must be one token (a fact's value)"
    if any(len(p) + 1 > T for p, _a in items):
        return f"'{fb['file']}': an item is longer than T={T}"
    return None


def plan_sweep(cfg, check_files=True):
    """Expand the families into runs, compute steps from the budget, validate everything.
    Returns (runs, families). Raises ConfigError listing every problem found."""
    errs = []

    def err(where, field, msg):
        errs.append(f"{where}: field '{field}': {msg}")

    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        err("config", unknown[0], f"unknown field(s) {unknown} (allowed: {sorted(TOP_KEYS)})")
    name = cfg.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        err("config", "name", f"must be a name of letters, digits, '_', '.', '-' (got {name!r})")
    budget = cfg.get("budget_flops")
    if not _num(budget) or budget <= 0:
        err("config", "budget_flops", f"must be a positive number of training FLOPs (got {budget!r})")
        budget = None
    fp = cfg.get("flops_params", "active_nonembedding")
    if fp not in FLOPS_PARAMS:
        err("config", "flops_params", f"must be one of {FLOPS_PARAMS} (got {fp!r})")
    for k, lo in (("B", 1), ("T", 1), ("grad_accum", 1), ("evals", 1), ("val_batches", 0),
                  ("acc_items", 0), ("checkpoints", 1), ("seed", 0), ("threads", 1), ("ttc_samples", 0)):
        if k in cfg and (not _is_int(cfg[k]) or cfg[k] < lo):
            err("config", k, f"must be an integer >= {lo} (got {cfg[k]!r})")
    for k in ("B", "T", "lr"):
        if k not in cfg:
            err("config", k, "is required")
    for k in ("lr", "min_lr_frac", "weight_decay", "grad_clip", "warmup_frac"):
        if k in cfg and (not _num(cfg[k]) or cfg[k] < 0):
            err("config", k, f"must be a number >= 0 (got {cfg[k]!r})")
    if "ttc_temp" in cfg and (not _num(cfg["ttc_temp"]) or cfg["ttc_temp"] <= 0):
        err("config", "ttc_temp", f"must be a positive temperature (got {cfg['ttc_temp']!r})")
    if cfg.get("ttc_samples") and not cfg.get("eval_files"):
        err("config", "ttc_samples", "test-time compute needs eval_files")
    if "ttc_seeds" in cfg and (not isinstance(cfg["ttc_seeds"], list) or not cfg["ttc_seeds"]
                               or not all(_is_int(x) and x >= 0 for x in cfg["ttc_seeds"])):
        err("config", "ttc_seeds", f"must be a non-empty list of integers >= 0 (got {cfg['ttc_seeds']!r})")
    if "ttc_files" in cfg and (not isinstance(cfg["ttc_files"], list) or not cfg["ttc_files"]
                               or not all(isinstance(x, str) for x in cfg["ttc_files"])):
        err("config", "ttc_files", f"must be a non-empty list of eval files (got {cfg['ttc_files']!r})")
    if "ttc_items" in cfg and (not _is_int(cfg["ttc_items"]) or cfg["ttc_items"] < 0):
        err("config", "ttc_items", f"must be an integer >= 0 (got {cfg['ttc_items']!r})")
    seeds_top = cfg.get("seeds")
    if seeds_top is not None and (not isinstance(seeds_top, list) or not seeds_top
                                  or not all(_is_int(x) and x >= 0 for x in seeds_top)
                                  or len(set(seeds_top)) != len(seeds_top)):
        err("config", "seeds", f"must be a non-empty list of distinct integers >= 0 (got {seeds_top!r})")
        seeds_top = None
    if "seeds" in cfg and "seed" in cfg:
        err("config", "seed", "give 'seed' or 'seeds', not both")
    if "results_dir" in cfg and not isinstance(cfg["results_dir"], str):
        err("config", "results_dir", "must be a path (relative to the repository root)")
    g = cfg.get("grpo")
    if g is not None:
        if not isinstance(g, dict):
            err("config", "grpo", "must be an object")
        else:
            bad = sorted(set(g) - GRPO_KEYS)
            if bad:
                err("config grpo", bad[0], f"unknown field(s) {bad} (allowed: {sorted(GRPO_KEYS)})")
            for k in ("steps", "eval_every"):
                if not _is_int(g.get(k)) or g[k] < 1:
                    err("config grpo", k, f"must be an integer >= 1 (got {g.get(k)!r})")
            if not isinstance(g.get("rl_file"), str):
                err("config grpo", "rl_file", "is required: an RL prompt file (eval format)")
            elif check_files and not os.path.isfile(resolve(g["rl_file"])):
                err("config grpo", "rl_file", f"'{g['rl_file']}' does not exist")
            elif check_files and data_file_problem(resolve(g["rl_file"]), "eval"):
                err("config grpo", "rl_file", f"'{g['rl_file']}' {data_file_problem(resolve(g['rl_file']), 'eval')}")
            for f in g.get("eval_files", []):
                if check_files and not os.path.isfile(resolve(f)):
                    err("config grpo", "eval_files", f"'{f}' does not exist")
            if not isinstance(g.get("families", []), list) or not isinstance(g.get("args", []), list):
                err("config grpo", "families", "'families' and 'args' must be lists")
            if "seeds" in g and (not isinstance(g["seeds"], list) or not all(_is_int(x) for x in g["seeds"])):
                err("config grpo", "seeds", "must be a list of seeds")
    fb = cfg.get("fact_bits")
    if fb is not None:
        if not isinstance(fb, dict) or not isinstance(fb.get("file"), str):
            err("config", "fact_bits", "must be an object with 'file' (an eval file of single-token answers)")
        else:
            bad = sorted(set(fb) - FACT_BITS_KEYS)
            if bad:
                err("config fact_bits", bad[0], f"unknown field(s) {bad} (allowed: {sorted(FACT_BITS_KEYS)})")
            if "rows" in fb and (not _is_int(fb["rows"]) or fb["rows"] < 1):
                err("config fact_bits", "rows", f"must be an integer >= 1 (got {fb['rows']!r})")
            if check_files and _is_int(cfg.get("T")):
                why = fact_bits_problem(cfg, cfg["T"])
                if why:
                    err("config fact_bits", "file", why)
    if cfg.get("keep_checkpoints", "final") not in ("final", "all"):
        err("config", "keep_checkpoints", "must be 'final' or 'all'")
    ev = cfg.get("eval_files", [])
    if not isinstance(ev, list) or not all(isinstance(x, str) for x in ev):
        err("config", "eval_files", "must be a list of paths")
        ev = []
    if not isinstance(cfg.get("extra_args", []), list):
        err("config", "extra_args", "must be a list of strings")
    model = dict(DEFAULT_MODEL)
    m = cfg.get("model", {})
    if not isinstance(m, dict):
        err("config", "model", "must be an object of shape fields")
        m = {}
    bad = sorted(set(m) - MODEL_KEYS)
    if bad:
        err("config model", bad[0], f"unknown field(s) {bad} (allowed: {sorted(MODEL_KEYS)})")
    model.update(m)
    trainer = cfg.get("trainer", "./train_moe")
    if check_files:
        for k in ("train", "val"):
            if k not in cfg:
                err("config", k, "is required (a shard glob)")
            elif not glob.glob(resolve(cfg[k])):
                err("config", k, f"no file matches '{cfg[k]}'")
            else:
                for path in sorted(glob.glob(resolve(cfg[k]))):
                    why = data_file_problem(path, "shard")
                    if why:
                        err("config", k, f"'{path}' {why}")
        for f in ev:  # FILE:loss is scored for task loss only
            path = resolve(f[:-5] if f.endswith(":loss") else f)
            if not os.path.isfile(path):
                err("config", "eval_files", f"'{f}' does not exist")
            elif data_file_problem(path, "eval"):
                err("config", "eval_files", f"'{f}' {data_file_problem(path, 'eval')}")
        if "tokenizer" in cfg and not os.path.isfile(resolve(cfg["tokenizer"])):
            err("config", "tokenizer", f"'{cfg['tokenizer']}' does not exist")
        vocab_problems(cfg, model, cfg.get("families") if isinstance(cfg.get("families"), list) else [], ev, err)

    fams = cfg.get("families")
    if not isinstance(fams, list) or not fams:
        err("config", "families", "must be a non-empty list")
        fams = []
    B, T, ga = cfg.get("B", 1), cfg.get("T", 1), cfg.get("grad_accum", 1)
    tok_per_step = B * T * ga if all(_is_int(x) for x in (B, T, ga)) else None
    runs, families, seen_fam = [], [], set()
    for fi, fam in enumerate(fams):
        if not isinstance(fam, dict):
            err(f"family #{fi}", "-", "must be an object")
            continue
        fname = fam.get("name", f"f{fi}")
        where = f"family '{fname}'"
        if not isinstance(fname, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", fname):
            err(where, "name", "must be letters, digits, '_', '.', '-'")
        if fname in seen_fam:
            err(where, "name", "two families have this name")
        seen_fam.add(fname)
        bad = sorted(set(fam) - FAMILY_KEYS)
        if bad:
            err(where, bad[0], f"unknown field(s) {bad} (allowed: {sorted(FAMILY_KEYS)})")
        base = dict(model)
        base.update({k: v for k, v in fam.items() if k in RUN_KEYS and not isinstance(v, list)})
        lists = [k for k in ("E", "K") if isinstance(fam.get(k), list)]
        members = []  # (label, overrides)
        if "runs" in fam:
            if lists:
                err(where, lists[0], "a family with 'runs' cannot also list E or K")
            if not isinstance(fam["runs"], list) or not fam["runs"]:
                err(where, "runs", "must be a non-empty list of objects")
            else:
                for ri, r in enumerate(fam["runs"]):
                    if not isinstance(r, dict):
                        err(f"{where} run #{ri}", "-", "must be an object")
                        continue
                    bad = sorted(set(r) - RUN_KEYS)
                    if bad:
                        err(f"{where} run #{ri}", bad[0], f"unknown field(s) {bad} (allowed: {sorted(RUN_KEYS)})")
                    members.append((f"run #{ri}", dict(r)))
            kind = "runs"
        elif lists == ["E", "K"]:
            err(where, "E", "vary E or K in one family, not both (use 'runs' for an arbitrary grid)")
            kind = "runs"
        elif lists == ["E"]:
            kind = "E"
            for e in fam["E"]:
                if e == 1:  # dense, same active params: K = 1, F = K * F
                    k0, f0 = base.get("K"), base.get("F")
                    members.append(("E=1", {"E": 1, "K": 1, "F": k0 * f0 if _is_int(k0) and _is_int(f0) else f0}))
                else:
                    members.append((f"E={e}", {"E": e}))
        elif lists == ["K"]:
            kind = "K"
            kf, ef = fam.get("KF"), fam.get("EF")
            if not _is_int(kf) or kf < 1:
                err(where, "KF", f"a family that lists K needs KF (the constant K*F, an integer >= 1; got {kf!r})")
            if "EF" in fam and (not _is_int(ef) or ef < 1):
                err(where, "EF", f"EF (the constant E*F) must be an integer >= 1 (got {ef!r})")
                ef = None
            for k in fam["K"]:
                if _is_int(kf) and _is_int(k) and k >= 1 and kf % k:
                    err(f"{where} K={k}", "KF", f"KF={kf} is not divisible by K={k} (F = KF/K must be an integer)")
                    continue
                f = kf // k if _is_int(kf) and _is_int(k) and k >= 1 else None
                over = {"K": k, "F": f}
                if _is_int(ef) and f:  # fixed total params too: E = EF / F
                    if ef % f:
                        err(f"{where} K={k}", "EF", f"EF={ef} is not divisible by F={f} (E = EF/F must be an integer)")
                        continue
                    over["E"] = ef // f
                members.append((f"K={k}", over))
        else:
            kind = "single"
            members.append(("", {}))
        families.append({"name": fname, "label": fam.get("label", fname), "kind": kind, "runs": []})
        fbudget = fam.get("budget_flops", budget)
        if "budget_flops" in fam and (not _num(fbudget) or fbudget <= 0):
            err(where, "budget_flops", f"must be a positive number of training FLOPs (got {fbudget!r})")
            fbudget = None
        fseeds = fam.get("seeds", seeds_top)
        if "seeds" in fam and (not isinstance(fseeds, list) or not fseeds
                               or not all(_is_int(x) and x >= 0 for x in fseeds)):
            err(where, "seeds", f"must be a non-empty list of integers >= 0 (got {fseeds!r})")
            fseeds = None
        fttc = fam.get("ttc_samples", cfg.get("ttc_samples", 0))
        if not _is_int(fttc) or fttc < 0:
            err(where, "ttc_samples", f"must be an integer >= 0 (got {fttc!r})")
            fttc = 0
        for label, over, seed in [(lb, ov, sd) for lb, ov in members for sd in (fseeds or [None])]:
            r = dict(base)
            r.update(over)
            if r.get("Hkv") is None:
                r["Hkv"] = r.get("H")
            rwhere = f"run {fname}/{label}" if label else f"run {fname}"
            ok = True
            for k in ("V", "L", "C", "H", "Hkv", "E", "K", "F"):
                if not _is_int(r.get(k)) or r[k] < 1:
                    err(rwhere, k, f"must be an integer >= 1 (got {r.get(k)!r})")
                    ok = False
            if not ok:
                continue
            shape = f"(L={r['L']} C={r['C']} H={r['H']} Hkv={r['Hkv']} E={r['E']} K={r['K']} F={r['F']})"
            rw = f"{rwhere} {shape}"
            for inv, (p, q) in (("KF", ("K", "F")), ("EF", ("E", "F"))):
                want = fam.get(inv)
                if _is_int(want) and r[p] * r[q] != want:  # the family's invariant
                    err(rw, inv, f"{p}*{q} = {r[p] * r[q]} breaks the family's invariant {inv}={want} "
                        f"(a family that declares {inv} keeps {p}*{q} constant)")
                    ok = False
            if r["K"] > r["E"]:
                err(rw, "K", f"K={r['K']} > E={r['E']}: top-k cannot choose more experts than exist")
                ok = False
            if r["C"] % r["H"]:
                err(rw, "C", f"C={r['C']} is not divisible by H={r['H']}")
                ok = False
            elif (r["C"] // r["H"]) % 2:
                err(rw, "H", f"head size C/H={r['C'] // r['H']} is odd (RoPE needs an even head size)")
                ok = False
            if r["H"] % r["Hkv"]:
                err(rw, "Hkv", f"H={r['H']} is not divisible by Hkv={r['Hkv']}")
                ok = False
            for k in ("lr", "aux_coef", "z_coef", "rope_theta", "warmup_frac", "init_std"):
                if k in r and (not _num(r[k]) or r[k] < 0):
                    err(rw, k, f"must be a number >= 0 (got {r[k]!r})")
                    ok = False
            if not ok or fbudget is None or tok_per_step is None:
                continue
            counts = count_params(r["V"], r["L"], r["C"], r["H"], r["Hkv"], r["E"], r["K"], r["F"])
            n_flops = counts["active_nonembed_params"] if fp == "active_nonembedding" else counts["active_params"]
            steps = int(round(fbudget / (6.0 * n_flops) / tok_per_step))
            if steps < 1:
                err(rw, "budget_flops", f"budget {fbudget:.3g} gives {fbudget / (6.0 * n_flops):.0f} tokens for "
                    f"N={n_flops}: less than one step of B*T={tok_per_step} tokens")
                continue
            lr = r.get("lr", cfg.get("lr"))
            if "warmup" in r or ("warmup" in cfg and "warmup_frac" not in r):
                warmup = r.get("warmup", cfg.get("warmup"))
            else:
                warmup = max(1, int(round(r.get("warmup_frac", cfg.get("warmup_frac", 0.05)) * steps)))
            if not _is_int(warmup) or warmup < 0:
                err(rw, "warmup", f"must be an integer >= 0 (got {warmup!r})")
                continue
            evals = cfg.get("evals", 4)
            val_every = max(1, math.ceil(steps / evals)) if _is_int(evals) and evals >= 1 else steps
            nck = cfg.get("checkpoints", 4)
            ckpt_every = math.ceil(steps / nck) if _is_int(nck) and nck > 1 and steps > 1 else 0
            if ckpt_every >= steps:
                ckpt_every = 0
            tokens = steps * tok_per_step
            run = {
                "name": None, "families": [fname], "labels": {fname: label},
                "V": r["V"], "L": r["L"], "C": r["C"], "H": r["H"], "Hkv": r["Hkv"], "E": r["E"],
                "K": r["K"], "F": r["F"], "sparsity": 1.0 - r["K"] / r["E"], **counts,
                "flops_params": fp, "flops_N": n_flops, "steps": steps, "B": B, "T": T, "grad_accum": ga,
                "tokens": tokens, "flops": 6.0 * n_flops * tokens, "tpp": tokens / counts["total_params"],
                "tpp_active": tokens / counts["active_params"], "lr": lr, "warmup": warmup,
                "val_every": val_every, "ckpt_every": ckpt_every,
                "n_evals": len(set(list(range(val_every, steps + 1, val_every)) + [steps])),
                "extra": {k: r[k] for k in ("aux_coef", "z_coef", "rope_theta", "init_std") if k in r},
                "where": rw, "seed": seed, "budget_flops": fbudget,
                "ttc_samples": fttc if seed is None or seed in cfg.get("ttc_seeds", [seed]) else 0,
                "own_lr": "lr" in r,
            }
            run["args"] = trainer_args(cfg, run)
            runs.append(run)
    if errs:
        raise ConfigError("\n".join(errs))
    # names: the shape; the same shape with the same arguments (two families) is one run
    merged = []
    by_name = {}
    for run in runs:
        model = f"L{run['L']}-C{run['C']}-H{run['H']}-E{run['E']}-K{run['K']}-F{run['F']}"
        if run["Hkv"] != run["H"]:
            model += f"-kv{run['Hkv']}"
        if run["own_lr"]:  # a family's or run's own learning rate (an lr scan)
            model += f"-lr{run['lr']:g}"
        sfx = f"-s{run['seed']}" if run["seed"] is not None else ""
        nm = model + sfx
        if nm in by_name and by_name[nm]["args"] == run["args"]:
            other = by_name[nm]
            for f in run["families"]:
                if f not in other["families"]:
                    other["families"].append(f)
                    other["labels"].update(run["labels"])
            continue
        if nm in by_name:  # same shape, other arguments (a family's lr, say)
            model += "-" + run["families"][0]
            nm = model + sfx
        run["name"], run["model"] = nm, model
        by_name[nm] = run
        merged.append(run)
    for fam in families:
        fam["runs"] = [r["name"] for r in merged if fam["name"] in r["families"]]
    return merged, families


def trainer_args(cfg, run):
    """The trainer's arguments for one run, with the run directory as {RUN_DIR}."""
    a = ["-i", cfg["train"], "-j", cfg["val"], "-o", "{RUN_DIR}", "-y", "1",
         "-x", run["steps"], "-b", run["B"], "-t", run["T"], "-l", run["lr"], "-u", run["warmup"],
         "-nv", run["V"], "-nl", run["L"], "-nc", run["C"], "-nh", run["H"], "-nkv", run["Hkv"],
         "-ne", run["E"], "-nk", run["K"], "-nf", run["F"],
         "-v", run["val_every"], "-s", 0, "-n", run["ckpt_every"]]
    if run["grad_accum"] != 1:
        a += ["-ga", run["grad_accum"]]
    opt = (("min_lr_frac", "-q"), ("weight_decay", "-c"), ("grad_clip", "-gc"), ("seed", "-sd"),
           ("val_batches", "-m"), ("acc_items", "-ea"), ("tokenizer", "-k"))
    for key, flag in opt:
        if key in cfg:
            a += [flag, cfg[key]]
    if run.get("seed") is not None:
        a += ["-sd", run["seed"]]
    for key, flag in (("aux_coef", "-ac"), ("z_coef", "-zc"), ("rope_theta", "-th"), ("init_std", "-is")):
        if key in run["extra"]:
            a += [flag, run["extra"][key]]
    if cfg.get("eval_files"):
        a += ["-ev", ",".join(cfg["eval_files"])]
    a += list(cfg.get("extra_args", []))
    return [str(x) for x in a]


# ----------------------------------------------------------------------------------------------
# logs

def open_log(path):
    """A log opened for reading: the file itself or, where only that exists, its gzipped copy
    (path.gz: what results_dir keeps); None if neither exists."""
    if os.path.exists(path):
        return open(path, errors="replace")
    if os.path.exists(path + ".gz"):
        return gzip.open(path + ".gz", "rt", errors="replace")
    return None


def parse_log(path):
    """log.txt (or log.txt.gz) -> {"train": {step: {...}}, "val": {step: v}, "task": {step: {name: {...}}},
    "router": {step: {layer: (loads, entropy, aux, z)}}, "ttc": {step: {task: {n: {maj, pass, ..}}}}}.
    The log is appended to across resumes: a step number lower than one already seen means the trainer restarted from an earlier checkpoint,
    and everything logged from that step on is dropped before the new lines are taken."""
    out = {"train": {}, "val": {}, "task": {}, "router": {}, "ttc": {}}
    f = open_log(path)
    if f is None:
        return out
    top = 0
    with f:
        for line in f:
            w = line.split()
            if len(w) < 3 or w[0] != "step":
                continue
            try:
                s = int(w[1])
            except ValueError:
                continue
            if s < top and w[2] == "loss":  # a resume (or fresh restart) rewinds the log
                for d in out.values():
                    for k in [k for k in d if k >= s]:
                        del d[k]
                top = s
            top = max(top, s)
            try:
                if w[2] == "loss":
                    kv = dict(zip(w[2::2], w[3::2]))
                    out["train"][s] = {k: float(v) for k, v in kv.items()}
                elif w[2] == "val":
                    out["val"][s] = float(w[3])
                elif w[2] == "task":  # at a step already logged, the line with fewer items (ttc_items) does not replace it
                    kv = {k: float(v) for k, v in zip(w[4::2], w[5::2])}
                    old = out["task"].setdefault(s, {}).get(w[3])
                    if old is None or kv.get("n", 0.0) >= old.get("n", 0.0):
                        out["task"][s][w[3]] = kv
                elif w[2] == "ttc":  # step S ttc TASK n N maj X pass Y items I temp T
                    kv = dict(zip(w[4::2], w[5::2]))
                    out["ttc"].setdefault(s, {}).setdefault(w[3], {})[int(kv["n"])] = \
                        {k: float(v) for k, v in kv.items() if k != "n"}
                elif w[2] == "router":
                    layer = int(w[4])
                    i = w.index("entropy")
                    loads = [int(x) for x in w[6:i]]
                    out["router"].setdefault(s, {})[layer] = (loads, float(w[i + 1]), float(w[i + 3]), float(w[i + 5]))
            except (ValueError, IndexError):
                continue  # a torn last line of an interrupted run
    return out


def needs_ttc(cfg, run, run_dir):
    """Test-time compute is configured and the final checkpoint has not been through it yet."""
    if not run.get("ttc_samples", cfg.get("ttc_samples")):
        return False
    return run["steps"] not in parse_log(os.path.join(run_dir, "log.txt"))["ttc"]


def run_to_file(cmd, path, env):
    """Runs cmd (killed on an interrupt, as the trainers are) with its output appended to path after
    a header line; returns the exit status."""
    with open(path, "a") as so:
        so.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        so.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=subprocess.STDOUT, env=env)
        with LIVE_LOCK:
            LIVE.add(p)
        try:
            return p.wait()
        finally:
            with LIVE_LOCK:
                LIVE.discard(p)


def ttc_cmd(cfg, run, run_dir, trainer):
    """The run's command with -ex 1 -tn S -tt T, its eval files and items per file those of
    ttc_files and ttc_items where the config names them."""
    cmd = cmd_for(cfg, run, run_dir, trainer)
    for key, flag, value in (("ttc_files", "-ev", lambda v: ",".join(v)), ("ttc_items", "-ea", str)):
        if key in cfg:
            if flag in cmd:
                cmd[cmd.index(flag) + 1] = value(cfg[key])
            else:
                cmd += [flag, value(cfg[key])]
    return cmd + ["-ex", "1", "-tn", str(run.get("ttc_samples", cfg.get("ttc_samples"))),
                  "-tt", str(cfg.get("ttc_temp", 0.8))]


def run_ttc(cfg, run, run_dir, trainer, env, tag):
    """Test-time compute on the final checkpoint: -y 1 -ex 1 -tn S -tt T (the trainer logs the
    "ttc" lines, and the task lines again, at the final step)."""
    n_samples = run.get("ttc_samples", cfg.get("ttc_samples"))
    cmd = ttc_cmd(cfg, run, run_dir, trainer)
    log(f"{tag} {run['name']}: test-time compute, {n_samples} samples per item")
    t0 = time.time()
    rc = run_to_file(cmd, os.path.join(run_dir, "stdout.txt"), env)
    info = read_json(os.path.join(run_dir, "run.json")) or {}
    info["ttc_s"] = time.time() - t0
    write_json(os.path.join(run_dir, "run.json"), info)
    if rc != 0 and not STOP.is_set():
        log(f"{tag} {run['name']}: test-time compute FAILED (exit status {rc}; see stdout.txt)")
    return rc == 0


def grpo_wanted(cfg, run):
    """The config's GRPO stage applies to this run: one of its families, and its seed (by default
    the first seed of the sweep, or every run when the sweep has no seeds)."""
    g = cfg.get("grpo")
    if not g or not set(run["families"]) & set(g.get("families", [])):
        return False
    seeds = g.get("seeds")
    if seeds is None:
        seeds = cfg.get("seeds", [None])[:1]
    return run.get("seed") in seeds


def grpo_log_done(cfg, path):
    """The GRPO log holds its final step's task lines."""
    return cfg["grpo"]["steps"] in parse_log(path)["task"]


def needs_grpo(cfg, run, run_dir):
    return grpo_wanted(cfg, run) and not grpo_log_done(cfg, os.path.join(run_dir, "grpo", "log.txt"))


def run_grpo(cfg, run, run_dir, trainer, env, tag):
    """GRPO from the final checkpoint into <run dir>/grpo (resumable with -y 1): the held-out task
    lines at step 0 and every eval_every steps are in grpo/log.txt."""
    g = cfg["grpo"]
    gdir = os.path.join(run_dir, "grpo")
    os.makedirs(gdir, exist_ok=True)
    cmd = [trainer, "-e", os.path.join(run_dir, f"model_{run['steps']:08d}.bin"), "-rl", resolve(g["rl_file"]),
           "-j", cfg["val"], "-x", str(g["steps"]), "-v", str(g["eval_every"]), "-s", "0",
           "-o", gdir, "-y", "1", "-n", str(g["steps"])]
    for key, flag in (("val_batches", "-m"), ("acc_items", "-ea"), ("tokenizer", "-k")):
        if key in cfg:
            cmd += [flag, str(cfg[key])]
    if run.get("seed") is not None:
        cmd += ["-sd", str(run["seed"])]
    ev = g.get("eval_files", cfg.get("eval_files", []))
    if ev:
        cmd += ["-ev", ",".join(ev)]
    cmd += [str(x) for x in g.get("args", [])]
    log(f"{tag} {run['name']}: GRPO, {g['steps']} steps")
    t0 = time.time()
    rc = run_to_file(cmd, os.path.join(gdir, "stdout.txt"), env)
    info = read_json(os.path.join(run_dir, "run.json")) or {}
    info["grpo_s"] = info.get("grpo_s", 0.0) + time.time() - t0
    info["grpo_command"] = cmd
    write_json(os.path.join(run_dir, "run.json"), info)
    if rc != 0 and not STOP.is_set():
        log(f"{tag} {run['name']}: GRPO FAILED (exit status {rc}; see grpo/stdout.txt)")
    return rc == 0 and grpo_log_done(cfg, os.path.join(gdir, "log.txt"))


def fact_bits_done(cfg, run, d):
    """d holds the fact_bits stage's result for the run's final checkpoint and the configured file."""
    info = read_json(os.path.join(d, "fact_bits.json"))
    return bool(info) and info.get("steps") == run["steps"] and info.get("file") == cfg["fact_bits"]["file"] \
        and os.path.exists(os.path.join(d, "fact_items.txt.gz"))


def needs_fact_bits(cfg, run, run_dir):
    return bool(cfg.get("fact_bits")) and not fact_bits_done(cfg, run, run_dir)


def pack_rows(items, T, eot):
    """Items (prompt, answer) back to back in rows of T tokens, as training documents are packed (an
    item never straddles two rows; a row's unused end is eot). Returns the rows and, per item, (row,
    the position whose logits predict the answer token, the answer token)."""
    rows, where, cur = [], [], []
    for p, a in items:
        seq = p + a
        if len(cur) + len(seq) > T:
            rows.append(cur + [eot] * (T - len(cur)))
            cur = []
        where.append((len(rows), len(cur) + len(p) - 1, a[0]))
        cur += seq
    if cur:
        rows.append(cur + [eot] * (T - len(cur)))
    return rows, where


def answer_scores(logits, V, base, values):
    """From one position's logits (logits[base:base+V]): ln p(answer) over the whole vocabulary, ln p
    over the value tokens alone, and whether the answer is the argmax (lowest id on ties, as the
    trainer's greedy decoding). `values` is (answer token, [value token ids])."""
    ans, vids = values
    row = logits[base:base + V]
    mx = max(row)
    lse = mx + math.log(math.fsum(math.exp(x - mx) for x in row))
    vals = [row[i] for i in vids]
    vmx = max(vals)
    vlse = vmx + math.log(math.fsum(math.exp(x - vmx) for x in vals))
    return row[ans] - lse, row[ans] - vlse, row.index(mx) == ans


def fact_bits_eval(cfg, ckpt, V, T, trainer, env, work_dir, stdout_path):
    """The bits checkpoint `ckpt` stores about every fact of cfg["fact_bits"]["file"]: each item
    (prompt [eot, first, surname, attribute], answer [value]) is packed into rows of T tokens like
    the training documents, the trainer's forward-only mode (-fi/-fo, cfg["fact_bits"]["rows"] rows a
    call) gives the logits, and per fact saved = log2(values) + log2 p(value), p normalised over the
    file's value tokens (0 for a model that knows nothing about it). Returns (summary, [bits saved],
    [greedy right 0/1]) in the file's order, or None if the trainer failed."""
    import array
    fb = cfg["fact_bits"]
    h, items = read_eval_items(resolve(fb["file"]))
    eot = h[7]
    value_ids = sorted({a[0] for _p, a in items})
    nv = len(value_ids)
    rows, where = pack_rows(items, T, eot)
    per_call = fb.get("rows", 128)
    t0 = time.time()
    scores = [None] * len(items)
    by_row = {}
    for i, (r, pos, ans) in enumerate(where):
        by_row.setdefault(r, []).append((i, pos, ans))
    tmpdir = os.path.join(work_dir, "fact_bits.tmp")
    os.makedirs(tmpdir, exist_ok=True)
    fi, fo = os.path.join(tmpdir, "in.bin"), os.path.join(tmpdir, "out.bin")
    try:
        for r0 in range(0, len(rows), per_call):
            chunk = rows[r0:r0 + per_call]
            with open(fi, "wb") as f:
                f.write(struct.pack(f"<{len(chunk) * T}i", *[t for row in chunk for t in row]))
            cmd = [trainer, "-e", ckpt, "-fi", fi, "-fo", fo, "-b", str(len(chunk)), "-t", str(T)]
            if "tokenizer" in cfg:
                cmd += ["-k", resolve(cfg["tokenizer"])]
            if run_to_file(cmd, stdout_path, env) != 0:
                return None
            logits = array.array("f")
            with open(fo, "rb") as f:
                logits.frombytes(f.read())
            if sys.byteorder != "little":
                logits.byteswap()
            if len(logits) != len(chunk) * T * V:
                return None
            for r in range(r0, r0 + len(chunk)):
                for i, pos, ans in by_row.get(r, []):
                    scores[i] = answer_scores(logits, V, ((r - r0) * T + pos) * V, (ans, value_ids))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    ln2 = math.log(2.0)
    saved = [math.log2(nv) + lv / ln2 for _lf, lv, _c in scores]
    right = [int(c) for _lf, _lv, c in scores]
    out = {"file": fb["file"], "facts": len(items), "values": nv,
           "stored_bits": round(math.fsum(saved), 1), "bits_per_fact": math.fsum(saved) / len(items),
           "acc": sum(right) / len(items), "bpt": -math.fsum(lf for lf, _lv, _c in scores) / ln2 / len(items),
           "rows": len(rows), "seconds": time.time() - t0}
    return out, saved, right


def write_fact_items(path, saved, right):
    body = "# bits saved (log2 values + log2 p(value) over the value tokens), greedy right\n" + \
        "".join(f"{b:.1f} {c}\n" for b, c in zip(saved, right))
    with open(path, "wb") as f:
        f.write(gzip.compress(body.encode(), mtime=0))


def run_fact_bits(cfg, run, run_dir, trainer, env, tag):
    """fact_bits_eval on the final checkpoint: fact_bits.json gets the sums, fact_items.txt.gz one
    line per fact (bits saved to 0.1, greedy right 0/1), in the file's order, for paired comparisons."""
    ckpt = os.path.join(run_dir, f"model_{run['steps']:08d}.bin")
    log(f"{tag} {run['name']}: fact bits of every fact in {cfg['fact_bits']['file']}")
    res = fact_bits_eval(cfg, ckpt, run["V"], run["T"], trainer, env, run_dir,
                         os.path.join(run_dir, "fact_bits_stdout.txt"))
    if res is None:
        if not STOP.is_set():
            log(f"{tag} {run['name']}: fact bits FAILED (see fact_bits_stdout.txt)")
        return False
    out, saved, right = res
    out["steps"] = run["steps"]
    write_fact_items(os.path.join(run_dir, "fact_items.txt.gz"), saved, right)
    write_json(os.path.join(run_dir, "fact_bits.json"), out)
    info = read_json(os.path.join(run_dir, "run.json")) or {}
    info["fact_bits_s"] = out["seconds"]
    write_json(os.path.join(run_dir, "run.json"), info)
    log(f"{tag} {run['name']}: fact bits {out['stored_bits']:.0f} stored ({out['bits_per_fact']:.3f} per fact of "
        f"{math.log2(out['values']):.0f}), greedy {100 * out['acc']:.1f}%")
    return True


def read_fact_items(path):
    """fact_items.txt.gz -> ([bits saved], [right 0/1])."""
    bits, right = [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            if not line.startswith("#"):
                b, c = line.split()
                bits.append(float(b))
                right.append(int(c))
    return bits, right


def finish_stages(cfg, run, run_dir, trainer, env, tag):
    """After training: the fact bits, test-time compute and GRPO where configured, then the export of
    the run's logs to results_dir. Returns True when every stage is done."""
    if needs_fact_bits(cfg, run, run_dir) and not run_fact_bits(cfg, run, run_dir, trainer, env, tag):
        return False
    if needs_ttc(cfg, run, run_dir) and not run_ttc(cfg, run, run_dir, trainer, env, tag):
        return False
    if needs_grpo(cfg, run, run_dir) and not run_grpo(cfg, run, run_dir, trainer, env, tag):
        return False
    export_run(cfg, run, run_dir)
    return True


def committed_dir(cfg, run):
    return os.path.join(resolve(cfg["results_dir"]), run["name"]) if cfg.get("results_dir") else None


def export_run(cfg, run, run_dir):
    """Copies a finished run's log.txt (gzipped: log.txt.gz, a third of the size; one line per
    training step makes it 1.5 MB for a study run), run.json and GRPO log into results_dir/<run>/
    (committed, so that a fresh clone finds the run finished and does not train it again)."""
    d = committed_dir(cfg, run)
    if not d:
        return
    os.makedirs(d, exist_ok=True)
    for src, dst in (("log.txt", "log.txt.gz"), ("run.json", "run.json"), (os.path.join("grpo", "log.txt"), "grpo_log.txt"),
                     ("fact_bits.json", "fact_bits.json"), ("fact_items.txt.gz", "fact_items.txt.gz")):
        if os.path.exists(os.path.join(run_dir, src)):
            tmp = os.path.join(d, dst) + ".tmp"
            if dst.endswith(".gz") and not src.endswith(".gz"):
                gzip_file(os.path.join(run_dir, src), tmp)
            else:
                shutil.copyfile(os.path.join(run_dir, src), tmp)
            os.replace(tmp, os.path.join(d, dst))
    if os.path.exists(os.path.join(d, "log.txt")):  # an older export's plain copy
        os.remove(os.path.join(d, "log.txt"))


def gzip_file(src, dst):
    """dst = gzip -9 of src, with no name or time in the header: the same log gives the same bytes."""
    with open(src, "rb") as f, open(dst, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as g:
            shutil.copyfileobj(f, g)


def committed_done(cfg, run):
    """results_dir holds this run, with the same arguments, trained to the end and through every
    configured stage."""
    d = committed_dir(cfg, run)
    if not d:
        return False
    info = read_json(os.path.join(d, "run.json"))
    if not info or info.get("args") != run["args"]:
        return False
    lg = parse_log(os.path.join(d, "log.txt"))
    if run["steps"] not in lg["val"]:
        return False
    if run.get("ttc_samples", cfg.get("ttc_samples")) and run["steps"] not in lg["ttc"]:
        return False
    if cfg.get("fact_bits") and not fact_bits_done(cfg, run, d):
        return False
    return not grpo_wanted(cfg, run) or grpo_log_done(cfg, os.path.join(d, "grpo_log.txt"))


def source_dir(cfg, run, run_dir):
    """Where a run's results are read from: its run directory, unless only results_dir has it."""
    if run_state(run, run_dir)[0] != "done" and committed_done(cfg, run):
        return committed_dir(cfg, run)
    return run_dir


def ckpt_steps(run_dir):
    steps = []
    for p in glob.glob(os.path.join(run_dir, "model_*.bin")):
        m = re.fullmatch(r"model_(\d{8})\.bin", os.path.basename(p))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def run_state(run, run_dir):
    """'done', ('partial', step of newest checkpoint) or 'new'."""
    cks = ckpt_steps(run_dir)
    if run["steps"] in cks and run["steps"] in parse_log(os.path.join(run_dir, "log.txt"))["val"]:
        return "done", run["steps"]
    if cks or os.path.exists(os.path.join(run_dir, "log.txt")):
        return "partial", (cks[-1] if cks else 0)
    return "new", 0


# ----------------------------------------------------------------------------------------------
# timing and ETA

def fmt_s(s):
    if s is None or s != s:
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def chunk_admits(est, left, chunk_s, any_started):
    """--hours: may a run predicted to take `est` seconds (None: unknown) start with `left` of the
    chunk's `chunk_s` seconds to go? Yes if it ends in time; a run longer than a whole chunk starts
    only as the chunk's first, so that it runs at all."""
    return est is None or est <= left or (est > chunk_s and not any_started)


def run_timing(run, run_dir):
    """Measured figures of a run from its log and run.json: train seconds (sum of step ms), train
    tok/s, the training FLOP rate, wall seconds of all sessions, and seconds per eval point."""
    lg = parse_log(os.path.join(run_dir, "log.txt"))
    ms = [v["ms"] for v in lg["train"].values() if "ms" in v]
    if not ms:
        return None
    train_s = sum(ms) / 1e3
    tok = len(ms) * run["B"] * run["T"] * run["grad_accum"]
    t = {"train_s": train_s, "tok_s": tok / train_s if train_s > 0 else None,
         "flops_s": 6.0 * run["flops_N"] * tok / train_s if train_s > 0 else None, "steps_logged": len(ms)}
    info = read_json(os.path.join(run_dir, "run.json")) or {}
    wall = sum(x.get("wall_s", 0) for x in info.get("sessions", []))
    t["wall_s"] = wall or None
    nev = len(lg["val"])
    if wall and nev:
        t["eval_s"] = max(0.0, (wall - train_s - 1.0 * len(info.get("sessions", []))) / nev)
    t["ttc_s"] = info.get("ttc_s")
    t["grpo_s"] = info.get("grpo_s")
    t["fact_bits_s"] = info.get("fact_bits_s")
    return t


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Eta:
    """Predicts run times from finished runs (same family first), else from --bench, else from the
    running run's own rate. Runs named in `grpo` also get the finished runs' median GRPO time."""

    def __init__(self, sweep_dir, runs, grpo=()):
        self.sweep_dir, self.runs, self.grpo = sweep_dir, runs, set(grpo)
        self.finished = {}  # name -> timing
        self.bench = (read_json(os.path.join(sweep_dir, "bench.json")) or {}).get("runs", {})
        self.live = {}  # name -> (step, steps, ms per step)
        self.lock = threading.Lock()

    def add_finished(self, run, timing):
        if timing and timing.get("flops_s"):
            with self.lock:
                self.finished[run["name"]] = (run, timing)

    def predict(self, run):
        """Seconds for a whole run, or None."""
        with self.lock:
            fin = list(self.finished.values())
            live = dict(self.live)
        same = [t for r, t in fin if set(r["families"]) & set(run["families"])]
        pool = same or [t for r, t in fin]
        if pool:
            rate = statistics.median(t["flops_s"] for t in pool)
            evs = [t["eval_s"] for t in pool if t.get("eval_s") is not None]
            ev = statistics.median(evs) if evs else 0.0
            ttc = [t["ttc_s"] for t in pool if t.get("ttc_s")]
            grpo = [t["grpo_s"] for t in pool if t.get("grpo_s")] if run["name"] in self.grpo else []
            fbits = [t["fact_bits_s"] for t in pool if t.get("fact_bits_s")]
            return (run["flops"] / rate + run["n_evals"] * ev + (statistics.median(ttc) if ttc else 0.0)
                    + (statistics.median(grpo) if grpo else 0.0) + (statistics.median(fbits) if fbits else 0.0))
        b = self.bench.get(run["name"])
        if b:
            return run["steps"] * b["ms_step"] / 1e3 + run["n_evals"] * b.get("eval_s", 0.0)
        if live:  # same compute per run: the running run's projection
            proj = [st * ms / 1e3 for (s, st, ms) in live.values() if ms]
            if proj:
                return statistics.mean(proj)
        return None

    def remaining_live(self, run):
        with self.lock:
            s = self.live.get(run["name"])
        if not s or not s[2]:
            return None
        step, steps, ms = s
        rem_evals = sum(1 for k in range(1, run["n_evals"] + 1) if k * run["val_every"] > step) if run["val_every"] else 0
        ev = 0.0
        with self.lock:
            evs = [t.get("eval_s") for r, t in self.finished.values() if t.get("eval_s") is not None]
        b = self.bench.get(run["name"])
        if evs:
            ev = statistics.median(evs)
        elif b:
            ev = b.get("eval_s", 0.0)
        return (steps - step) * ms / 1e3 + rem_evals * ev


def make_eta(cfg, runs, sweep_dir):
    """The sweep's Eta, calibrated by its finished runs (in sweep_dir or results_dir)."""
    eta = Eta(sweep_dir, runs, [r["name"] for r in runs if grpo_wanted(cfg, r)])
    for r in runs:
        rd = os.path.join(sweep_dir, r["name"])
        if run_state(r, rd)[0] == "done" or committed_done(cfg, r):
            eta.add_finished(r, run_timing(r, source_dir(cfg, r, rd)))
    return eta


# ----------------------------------------------------------------------------------------------
# running

LIVE = set()  # running trainer processes, killed on an interrupt
LIVE_LOCK = threading.Lock()
STOP = threading.Event()


def kill_live():
    STOP.set()
    with LIVE_LOCK:
        procs = list(LIVE)
    for p in procs:
        try:
            p.kill()
        except OSError:
            pass


def log(msg):
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def cmd_for(cfg, run, run_dir, trainer):
    return [trainer] + [run_dir if a == "{RUN_DIR}" else a for a in run["args"]]


def check_run_json(run, run_dir):
    info = read_json(os.path.join(run_dir, "run.json"))
    if info and info.get("args") != run["args"]:
        old, new = info.get("args", []), run["args"]
        diff = [f"{o} -> {n}" for o, n in zip(old, new) if o != n] or ["(different length)"]
        raise ConfigError(f"run '{run['name']}': directory '{run_dir}' holds a run with other arguments "
                          f"({', '.join(diff[:4])}); delete that directory or give the sweep another name")
    return info


def execute(cfg, run, run_dir, trainer, eta, ctx):
    """Run (or resume) one run to completion. Returns True on success."""
    os.makedirs(run_dir, exist_ok=True)
    info = check_run_json(run, run_dir) or {"name": run["name"], "args": run["args"], "sessions": []}
    info.update({k: run[k] for k in ("families", "L", "C", "H", "Hkv", "E", "K", "F", "V", "steps", "tokens",
                                     "flops", "total_params", "active_params", "active_nonembed_params")})
    state, at = run_state(run, run_dir)
    env = dict(os.environ)
    if ctx.get("threads"):
        env["OMP_NUM_THREADS"] = str(ctx["threads"])
    env = trainer_env(trainer, env)
    i, n = ctx["index"][run["name"]], ctx["n"]
    if state == "done":  # trained already: only test-time compute, GRPO or the export may be missing
        return finish_stages(cfg, run, run_dir, trainer, env, f"[{i}/{n}]")
    cks = ckpt_steps(run_dir)
    if state == "partial" and not cks and os.path.exists(os.path.join(run_dir, "log.txt")):
        # no checkpoint: the trainer starts over; keep the interrupted log aside
        os.replace(os.path.join(run_dir, "log.txt"), os.path.join(run_dir, f"log.interrupted.{int(time.time())}.txt"))
    cmd = cmd_for(cfg, run, run_dir, trainer)
    what = f"resuming at step {at}" if state == "partial" and at else "starting"
    log(f"[{i}/{n}] {run['name']} ({','.join(run['families'])}): {what}; {run['steps']} steps, "
        f"{run['tokens'] / 1e6:.2f}M tokens, {run['total_params'] / 1e6:.3f}M total / "
        f"{run['active_params'] / 1e6:.3f}M active params")
    t0 = time.time()
    sess = {"start": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": at, "wall_s": 0.0}
    info["sessions"].append(sess)
    info["command"] = cmd
    write_json(os.path.join(run_dir, "run.json"), info)
    step_re = re.compile(r"^step\s+(\d+)/(\d+) \|.*\|\s*([0-9.]+) ms")
    model_re = re.compile(r"^model: .*\| params ([0-9.]+)M total, ([0-9.]+)M active")
    recent, last_print, count_err = [], time.time(), None
    tail = []
    with open(os.path.join(run_dir, "stdout.txt"), "a") as so:
        so.write(f"\n=== {sess['start']} {shlex.join(cmd)}\n")
        so.flush()
        try:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 bufsize=1, env=env)
        except OSError as e:
            log(f"[{i}/{n}] {run['name']}: cannot start '{trainer}': {e.strerror}")
            return False
        with LIVE_LOCK:
            LIVE.add(p)
        try:
            for line in p.stdout:
                so.write(line)
                tail = (tail + [line.rstrip("\n")])[-25:]
                m = step_re.match(line)
                if m:
                    s, S, ms = int(m.group(1)), int(m.group(2)), float(m.group(3))
                    recent = (recent + [ms])[-50:]
                    with eta.lock:
                        eta.live[run["name"]] = (s, S, statistics.median(recent))
                    if time.time() - last_print >= ctx["progress"]:
                        last_print = time.time()
                        so.flush()
                        tok_s = run["B"] * run["T"] * run["grad_accum"] / (statistics.median(recent) / 1e3)
                        rem = eta.remaining_live(run)
                        log(f"[{i}/{n}] {run['name']}: step {s}/{S} ({100 * s / S:.0f}%), {tok_s:.0f} tok/s, "
                            f"run ETA {fmt_s(rem)}, sweep ETA {fmt_s(ctx['sweep_eta'](run))}")
                    continue
                m = model_re.match(line)
                if m:  # our count against the trainer's
                    tot, act = float(m.group(1)), float(m.group(2))
                    if abs(tot - run["total_params"] / 1e6) > 0.0015 or abs(act - run["active_params"] / 1e6) > 0.0015:
                        count_err = (f"trainer reports {tot}M total / {act}M active params, the plan "
                                     f"{run['total_params'] / 1e6:.3f}M / {run['active_params'] / 1e6:.3f}M")
                        log(f"[{i}/{n}] {run['name']}: WARNING: {count_err}")
                    continue
                if line.startswith("saved ") and ctx["keep"] == "final":
                    newest = ckpt_steps(run_dir)
                    for s_old in newest[:-1]:
                        try:
                            os.remove(os.path.join(run_dir, f"model_{s_old:08d}.bin"))
                        except OSError:
                            pass
            rc = p.wait()
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            with LIVE_LOCK:
                LIVE.discard(p)
            sess["wall_s"] = time.time() - t0
            sess["end"] = time.strftime("%Y-%m-%d %H:%M:%S")
            if count_err:
                info["count_mismatch"] = count_err
            write_json(os.path.join(run_dir, "run.json"), info)
            with eta.lock:
                eta.live.pop(run["name"], None)
    if STOP.is_set():
        return False
    if rc != 0:
        log(f"[{i}/{n}] {run['name']}: FAILED (exit status {rc}); the trainer's last lines:")
        for t in tail[-12:]:
            print("    " + t, flush=True)
        return False
    state, _ = run_state(run, run_dir)
    if state != "done" and run["steps"] in ckpt_steps(run_dir):
        repair_final_eval(cfg, run, run_dir, trainer, env)
        state, _ = run_state(run, run_dir)
    if state != "done":
        log(f"[{i}/{n}] {run['name']}: the trainer exited 0 but the run is not complete (no final "
            f"checkpoint or final val line in log.txt)")
        return False
    t = run_timing(run, run_dir)
    eta.add_finished(run, t)
    lg = parse_log(os.path.join(run_dir, "log.txt"))
    log(f"[{i}/{n}] {run['name']}: done in {fmt_s(time.time() - t0)} "
        f"({t['tok_s']:.0f} train tok/s), val {lg['val'].get(run['steps'], float('nan')):.4f}")
    return finish_stages(cfg, run, run_dir, trainer, env, f"[{i}/{n}]")


def repair_final_eval(cfg, run, run_dir, trainer, env):
    """The final checkpoint exists but its val line never reached log.txt (killed between the two):
    evaluate that checkpoint (-y 1 -ex 1 logs the task lines) and append the val line."""
    cmd = cmd_for(cfg, run, run_dir, trainer) + ["-ex", "1"]
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    m = re.search(r"^val loss ([0-9.eE+-]+|nan|inf)", r.stdout, re.M)
    if r.returncode == 0 and m:
        with open(os.path.join(run_dir, "log.txt"), "a") as f:
            f.write(f"step {run['steps']} val {float(m.group(1)):.6f}\n")


# ----------------------------------------------------------------------------------------------
# results

def final_metrics(cfg, run, run_dir):
    committed = source_dir(cfg, run, run_dir) != run_dir
    if committed:
        run_dir = committed_dir(cfg, run)
        state, at = "done", run["steps"]
    else:
        state, at = run_state(run, run_dir)
    lg = parse_log(os.path.join(run_dir, "log.txt"))
    row = {"name": run["name"], "model": run["model"], "seed": "" if run["seed"] is None else run["seed"],
           "families": ";".join(run["families"]), "status": state if state != "partial" else f"partial@{at}"}
    for k in ("L", "C", "H", "Hkv", "E", "K", "F", "V", "total_params", "active_params", "total_nonembed_params",
              "active_nonembed_params", "flops_N"):
        row[k] = run[k]
    row["sparsity"] = round(run["sparsity"], 6)
    for k in ("steps", "B", "T", "grad_accum", "tokens"):
        row[k] = run[k]
    row["flops"] = f"{run['flops']:.6e}"
    row["tpp"] = round(run["tpp"], 4)
    row["tpp_active"] = round(run["tpp_active"], 4)
    row["lr"] = run["lr"]
    tr = lg["train"]
    if tr:
        last = max(tr)
        win = [tr[s]["ce"] for s in sorted(tr) if s > last - max(1, round(0.05 * run["steps"]))]
        row["train_loss"] = round(statistics.mean(win), 6)
        row["train_loss_last"] = tr[last].get("loss")
        row["aux_last"] = tr[last].get("aux")
    if lg["val"]:
        row["val_loss"] = lg["val"][max(lg["val"])]
    if lg["task"]:
        s = max(lg["task"])
        for tname, v in sorted(lg["task"][s].items()):
            for k in ("bpt", "bpb", "acc", "n"):
                if k in v:
                    row[f"{tname}_{k}"] = int(v[k]) if k == "n" else v[k]
    if lg["ttc"]:
        s = max(lg["ttc"])
        for tname, byn in sorted(lg["ttc"][s].items()):
            for nn in sorted(byn):
                row[f"{tname}_maj{nn}"] = byn[nn].get("maj")
                row[f"{tname}_pass{nn}"] = byn[nn].get("pass")
    fbi = read_json(os.path.join(run_dir, "fact_bits.json")) if cfg.get("fact_bits") else None
    if fbi and fbi.get("steps") == run["steps"]:
        row["facts_all_bits"] = fbi["stored_bits"]
        row["facts_all_bits_per_fact"] = round(fbi["bits_per_fact"], 6)
        row["facts_all_acc"] = round(fbi["acc"], 6)
        row["facts_all_bpt"] = round(fbi["bpt"], 6)
        row["facts_all_n"] = fbi["facts"]
    if cfg.get("grpo") and grpo_wanted(cfg, run):
        gl = parse_log(os.path.join(run_dir, "grpo_log.txt" if committed else os.path.join("grpo", "log.txt")))
        if cfg["grpo"]["steps"] in gl["task"]:
            for when, st in (("0", 0), ("", cfg["grpo"]["steps"])):
                for tname, v in sorted(gl["task"].get(st, {}).items()):
                    if "acc" in v:
                        row[f"grpo{when}_{tname}_acc"] = v["acc"]
    t = run_timing(run, run_dir)
    if t:
        row["train_tok_s"] = round(t["tok_s"], 1) if t["tok_s"] else ""
        row["wall_s"] = round(t["wall_s"], 1) if t.get("wall_s") else ""
    return row


def collect(cfg, runs, families, sweep_dir, csv_copy=None):
    for r in runs:  # runs finished before results_dir was set, or before a stage was added
        rd = os.path.join(sweep_dir, r["name"])
        if (cfg.get("results_dir") and run_state(r, rd)[0] == "done" and not needs_ttc(cfg, r, rd)
                and not needs_grpo(cfg, r, rd) and not needs_fact_bits(cfg, r, rd) and not committed_done(cfg, r)):
            export_run(cfg, r, rd)
    rows = [final_metrics(cfg, r, os.path.join(sweep_dir, r["name"])) for r in runs]
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    # task columns after the fixed ones, timing last
    timing = [k for k in ("train_tok_s", "wall_s") if k in keys]
    keys = [k for k in keys if k not in timing] + timing
    os.makedirs(sweep_dir, exist_ok=True)
    path = os.path.join(sweep_dir, "results.csv")
    for p in [path] + ([csv_copy] if csv_copy else []):
        d = os.path.dirname(os.path.abspath(p))
        os.makedirs(d, exist_ok=True)
        tmp = p + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow(r)
        os.replace(tmp, p)
    write_json(os.path.join(sweep_dir, "plan.json"), {
        "name": cfg["name"], "budget_flops": cfg["budget_flops"],
        "flops_params": cfg.get("flops_params", "active_nonembedding"), "B": cfg["B"], "T": cfg["T"],
        "families": families,
        "runs": [{k: v for k, v in r.items() if k != "where"} for r in runs]})
    done = sum(1 for r in rows if r["status"] == "done")
    log(f"results: {path} ({len(rows)} runs, {done} finished)" + (f", copy {csv_copy}" if csv_copy else ""))
    return path, rows


# ----------------------------------------------------------------------------------------------
# bench: a few steps of each model, to size a sweep before running it; --trainer auto

def short_cmd(trainer, run, nsteps, val_every):
    """The run's trainer command cut to nsteps steps, without an output dir (a timing run)."""
    cmd = [trainer] + [a for a in run["args"]]
    i = cmd.index("-o")
    del cmd[i:i + 2]
    i = cmd.index("-y")
    del cmd[i:i + 2]
    for flag, val in (("-x", nsteps), ("-v", val_every), ("-n", 0), ("-u", 1)):
        cmd[cmd.index(flag) + 1] = str(val)
    return cmd


def trainer_env(trainer, env):
    """env for a trainer binary: for the OpenBLAS build on an AVX-512 machine, OpenBLAS's AVX-512
    kernels (0.3.21 takes its AVX2 or Cooperlake ones on AMD Zen 4/5, about half as fast: README,
    "Speed on 2 CPU cores"), unless OPENBLAS_CORETYPE is set already."""
    if "blas" in os.path.basename(trainer):
        try:
            avx512 = "avx512f" in open("/proc/cpuinfo").read().split()
        except OSError:
            avx512 = False
        if avx512 and "OPENBLAS_CORETYPE" not in env:
            env = dict(env, OPENBLAS_CORETYPE="SkylakeX")
    return env


AUTO_TRAINERS = ("./train_moe", "./train_moe_blas")


def choose_trainer(run, threads):
    """pick_trainer, with the choice and the times logged."""
    best, med = pick_trainer(run, threads)
    times = ", ".join(f"{os.path.relpath(t, ROOT)} {'failed' if ms is None else '%.1f ms' % ms}" for t, ms in med.items())
    log(f"trainer auto: {os.path.relpath(best, ROOT)}" + (f" ({times} per step on {run['name']})" if len(med) > 1 else
                                                          " (the only one built)"))
    return best


def pick_trainer(run, threads, nsteps=12, repeats=2):
    """--trainer auto: the faster of the CPU trainer builds that exist (train_moe, and the OpenBLAS
    build train_moe_blas), by the median step time of nsteps steps of `run`, alternating, repeats
    times each, with the sweep's threads. Which is faster depends on the machine (README, "Speed on
    2 CPU cores"). Returns (path, {path: ms or None})."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    step_re = re.compile(r"^step\s+(\d+)/(\d+) \|.*\|\s*([0-9.]+) ms")
    cands = [resolve(t) for t in AUTO_TRAINERS]
    cands = [t for t in cands if os.path.isfile(t) and os.access(t, os.X_OK)]
    times = {t: [] for t in cands}
    if len(cands) > 1:
        for _ in range(repeats):
            for t in cands:
                r = subprocess.run(short_cmd(t, run, nsteps, 0), cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=trainer_env(t, env))
                ms = [float(m.group(3)) for m in map(step_re.match, r.stdout.splitlines()) if m]
                if r.returncode == 0 and len(ms) > 2:
                    times[t].append(statistics.median(ms[2:]))
    med = {t: (statistics.median(v) if v else None) for t, v in times.items()}
    timed = [t for t in cands if med[t] is not None]
    best = min(timed, key=lambda t: med[t]) if timed else (cands[0] if cands else resolve(AUTO_TRAINERS[0]))
    return best, med


def bench(cfg, runs, sweep_dir, trainer, nsteps, threads):
    res = {}
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    step_re = re.compile(r"^step\s+(\d+)/(\d+) \|.*\|\s*([0-9.]+) ms")
    total = 0.0
    print(f"{'run':28s} {'ms/step':>8s} {'eval s':>7s} {'steps':>6s} {'evals':>5s} {'est. run':>9s}")
    for run in runs:
        cmd = short_cmd(trainer, run, nsteps, nsteps)  # one eval point at the end
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=trainer_env(trainer, env))
        wall = time.time() - t0
        if r.returncode != 0:
            print(f"{run['name']}: trainer failed:\n{r.stdout[-2000:]}")
            sys.exit(1)
        ms = [float(m.group(3)) for m in map(step_re.match, r.stdout.splitlines()) if m]
        ms_step = statistics.median(ms[1:] if len(ms) > 2 else ms)
        eval_s = max(0.0, wall - sum(ms) / 1e3 - 0.5)  # an untrained model: generation runs to the limit
        est = run["steps"] * ms_step / 1e3 + run["n_evals"] * eval_s
        total += est
        res[run["name"]] = {"ms_step": ms_step, "eval_s": eval_s, "wall_s": wall, "steps_timed": len(ms)}
        print(f"{run['name']:28s} {ms_step:8.1f} {eval_s:7.1f} {run['steps']:6d} {run['n_evals']:5d} {fmt_s(est):>9s}",
              flush=True)
    print(f"estimated sweep time: {fmt_s(total)} (eval time measured on the untrained model, whose answers "
          f"run to the length limit unless it happens to emit a newline or eot early; a trained model's "
          f"reasoning answers are about 60 tokens, so expect similar)")
    os.makedirs(sweep_dir, exist_ok=True)
    write_json(os.path.join(sweep_dir, "bench.json"), {"steps": nsteps, "runs": res, "total_s": total,
                                                       "when": time.strftime("%Y-%m-%d %H:%M:%S")})


# ----------------------------------------------------------------------------------------------

def print_plan(cfg, runs, families, sweep_dir, trainer, eta):
    print(f"sweep '{cfg['name']}': budget {cfg['budget_flops']:.3e} FLOPs = 6 * N * tokens, N = "
          f"{cfg.get('flops_params', 'active_nonembedding')} params; B={cfg['B']} T={cfg['T']}; "
          f"{len(runs)} runs in {sweep_dir}")
    for fam in families:
        print(f"  family {fam['name']} ({fam['kind']}): {', '.join(fam['runs'])}")
    hdr = (f"{'run':26s} {'families':10s} {'E':>3s} {'K':>2s} {'F':>5s} {'total':>9s} {'active':>9s} "
           f"{'N(flops)':>9s} {'spars':>5s} {'steps':>6s} {'tokens':>9s} {'TPP':>7s} {'6ND':>9s} {'est':>7s}  status")
    print(hdr)
    tot_est, unknown = 0.0, False
    for r in runs:
        state, at = run_state(r, os.path.join(sweep_dir, r["name"]))
        if committed_done(cfg, r):
            state, at = "done", r["steps"]
        est = eta.predict(r)
        if state != "done":
            if est is None:
                unknown = True
            else:
                tot_est += est * (1 - at / r["steps"])
        st = "done" if state == "done" else (f"partial (ckpt {at})" if state == "partial" else "new")
        print(f"{r['name']:26s} {';'.join(r['families']):10s} {r['E']:3d} {r['K']:2d} {r['F']:5d} "
              f"{r['total_params']:9d} {r['active_params']:9d} {r['flops_N']:9d} {r['sparsity']:5.3f} "
              f"{r['steps']:6d} {r['tokens']:9d} {r['tpp']:7.2f} {r['flops']:9.3e} "
              f"{'-' if state == 'done' else fmt_s(est):>7s}  {st}")
    print(f"estimated time left: {'unknown (run --bench N first)' if unknown and not tot_est else fmt_s(tot_est)}"
          + (" (some runs unknown)" if unknown and tot_est else ""))
    print("commands:")
    for r in runs:
        print("  " + shlex.join(cmd_for(cfg, r, os.path.join(sweep_dir, r["name"]), trainer)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Config fields: scripts/sweep_configs/README.md")
    ap.add_argument("config", help="sweep config (JSON)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan and commands; run nothing")
    ap.add_argument("--collect", action="store_true", help="only collect the metrics of existing runs into the CSV")
    ap.add_argument("--bench", type=int, metavar="STEPS", help="time STEPS steps + one eval of each model, "
                    "print the estimated sweep time, save bench.json (used for the ETA); train nothing")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for each trainer (default: the config's, else unset)")
    ap.add_argument("--root", default=os.path.join(ROOT, "out", "sweeps"), help="sweeps directory (default out/sweeps)")
    ap.add_argument("--csv", help="also write the results CSV to this path")
    ap.add_argument("--only", help="comma-separated run or family names to run (the CSV still lists all)")
    ap.add_argument("--trainer", help="trainer binary (default: the config's 'trainer', else ./train_moe); 'auto': "
                    "the faster of ./train_moe and ./train_moe_blas on this machine, timed on the first run to train")
    ap.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines (default 60)")
    ap.add_argument("--hours", type=float, help="a chunk of a long sweep: start no run after this many hours, "
                    "nor one whose predicted time (from the finished runs) would end it past them; the same "
                    "command continues it")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(args.config)
        runs, families = plan_sweep(cfg, check_files=True)
    except ConfigError as e:
        print(f"sweep config error in {args.config}:", file=sys.stderr)
        for line in str(e).splitlines():
            print("  " + line, file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    sweep_dir = os.path.join(os.path.abspath(args.root), cfg["name"])
    auto = (args.trainer or cfg.get("trainer")) == "auto"
    trainer = resolve(AUTO_TRAINERS[0] if auto else (args.trainer or cfg.get("trainer", "./train_moe")))
    threads = args.threads or cfg.get("threads")
    try:
        for r in runs:
            check_run_json(r, os.path.join(sweep_dir, r["name"]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eta = make_eta(cfg, runs, sweep_dir)
    if args.dry_run:
        if auto:
            print(f"trainer auto: the faster of {', '.join(AUTO_TRAINERS)} (those built), chosen when the sweep runs; "
                  f"the commands below show {AUTO_TRAINERS[0]}")
        print_plan(cfg, runs, families, sweep_dir, trainer, eta)
        return 0
    if args.collect:
        collect(cfg, runs, families, sweep_dir, args.csv)
        return 0
    if not (os.path.isfile(trainer) and os.access(trainer, os.X_OK)):
        print(f"error: trainer '{trainer}' not found or not executable (build it: make train_moe, or "
              f"make -f dev/cuda_build.mk train_moe_cu)", file=sys.stderr)
        return 2
    if args.bench:
        if auto:
            trainer = choose_trainer(runs[0], threads)
        bench(cfg, runs, sweep_dir, trainer, args.bench, threads)
        return 0

    def finished(r):
        rd = os.path.join(sweep_dir, r["name"])
        return committed_done(cfg, r) or (run_state(r, rd)[0] == "done" and not needs_ttc(cfg, r, rd)
                                          and not needs_grpo(cfg, r, rd) and not needs_fact_bits(cfg, r, rd))
    todo = [r for r in runs if not finished(r)]
    if cfg.get("seeds"):  # seed-major: every model's first seed before any model's second
        todo.sort(key=lambda r: cfg["seeds"].index(r["seed"]) if r["seed"] in cfg["seeds"] else 0)
    if args.only:
        sel = set(args.only.split(","))
        todo = [r for r in todo if r["name"] in sel or sel & set(r["families"])]
    ndone = sum(1 for r in runs if finished(r))
    log(f"sweep '{cfg['name']}': {len(runs)} runs, {ndone} already finished, {len(todo)} to run -> {sweep_dir}")
    if auto and todo:
        trainer = choose_trainer(todo[0], threads)
    os.makedirs(sweep_dir, exist_ok=True)
    shutil.copyfile(args.config, os.path.join(sweep_dir, "config.json"))
    pending = {r["name"] for r in todo}
    plock = threading.Lock()

    def sweep_eta(current):
        with plock:
            names = set(pending)
        total = 0.0
        for r in todo:
            if r["name"] not in names:
                continue
            if r["name"] in eta.live:
                x = eta.remaining_live(r)
            else:
                x = eta.predict(r)
            if x is None:
                return None
            total += x
        return total / min(args.jobs, max(1, len(names)))

    ctx = {"index": {r["name"]: i + 1 for i, r in enumerate(runs)}, "n": len(runs), "threads": threads,
           "progress": args.progress, "keep": cfg.get("keep_checkpoints", "final"), "sweep_eta": sweep_eta}
    failed, skipped, started = [], [], []

    def one(r):
        if STOP.is_set():
            return
        if args.hours is not None:
            left = args.hours * 3600 - (time.time() - t0)
            if left <= 0:
                if not STOP.is_set():
                    log(f"time limit of {args.hours:g} h reached: {len(pending)} runs left; run the same command "
                        f"again to continue")
                STOP.set()
                return
            est = eta.predict(r)
            with plock:
                fits = chunk_admits(est, left, args.hours * 3600, bool(started))
                (started if fits else skipped).append(r["name"])
            if not fits:
                log(f"{r['name']}: predicted {fmt_s(est)}, more than the {fmt_s(left)} left of the {args.hours:g} h "
                    f"chunk: not started (the same command runs it next time)")
                return
        ok = execute(cfg, r, os.path.join(sweep_dir, r["name"]), trainer, eta, ctx)
        with plock:
            pending.discard(r["name"])
        if not ok:
            failed.append(r["name"])
        elif pending:
            log(f"sweep: {len(runs) - len(pending) - len(failed)}/{len(runs)} finished, ETA {fmt_s(sweep_eta(None))}")

    def on_term(signum, frame):  # kill/timeout: stop like Ctrl-C (the running trainer is killed, run.json kept)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.time()
    try:
        if args.jobs == 1:
            for r in todo:
                one(r)
        else:
            ex = concurrent.futures.ThreadPoolExecutor(args.jobs)
            futs = [ex.submit(one, r) for r in todo]
            try:
                while not all(f.done() for f in futs):
                    time.sleep(0.2)
                for f in futs:
                    f.result()
            finally:
                if not all(f.done() for f in futs):
                    kill_live()
                ex.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:
        kill_live()
        log("interrupted: run the same command again to resume")
        collect(cfg, runs, families, sweep_dir, args.csv)
        return 130
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"sweep '{cfg['name']}' finished its work in {fmt_s(time.time() - t0)}"
        + (f"; {len(skipped)} runs left for the next chunk" if skipped else "")
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    collect(cfg, runs, families, sweep_dir, args.csv)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
