#!/usr/bin/env python3
"""
The v3 sparsity study's report (scripts/sweep_configs/study3.json, scripts/sweep_results/study_v3/):
the gate, then a verdict per finding of Nakamura et al. (arXiv 2508.18672), with the statistics done
by scipy and statsmodels (pinned in dev/requirements.txt) instead of hand-written formulas.

    .venv/bin/python scripts/study3_report.py RESULTS.csv --items DIR [--half-csv HALF.csv] --out DIR

Inputs: the sweep's results.csv (plan.json beside it, when present, names the families), the per-fact
results of the fact_bits stage (DIR/<run>/fact_items.txt.gz: scripts/sweep.py's results_dir), and
for the gate the results.csv of the dense model trained on the half fact set (study3_half.json).

The unit is the model: a model's value is the mean over its seeds, and a test between models uses
its seeds as replicates (Welch). Item-level comparisons pair the same facts across models, and the
same reasoning items (DIR/<run>/log.txt.gz's "step S items TASK 0110..." lines of the final eval, which
train_moe writes for every eval file it scores) beside F2 and F3.

Margins and thresholds are declared here, before any v3 run (MARGINS, GATE): changing them after
seeing results is visible in the history of this file.

Gate (after seed 1; gate()): the dense model is storage-bound (its stored bits on the full fact set
are under GATE["storage_ratio"] x its bits on the half set), E=8 stores clearly more than dense (at
least GATE["e8_ratio"] x, and the paired per-fact difference's 95% interval above 0), and dense
in-distribution reasoning lies in GATE["reason_range"]. Each condition is reported with its figure;
a missing input makes the condition "not measured", and the gate does not pass.

Verdicts: reproduced, not reproduced, inconclusive, or not testable (a precondition fails; the
verdict names it). A statistic needs >= 2 finished seeds in each model it compares.
  F1 memorization improves with total params (family E): precondition, the gate's storage-bound
     condition. Kendall's tau (exact, one-sided) of the model means of stored bits per fact against
     total params: increasing at p < 0.05 -> reproduced; decreasing at p < 0.05, or the largest model
     equivalent to dense (TOST, MARGINS["bits_per_fact"]) -> not reproduced; else inconclusive.
     Beside it: the same for greedy facts accuracy, and each model against dense paired per fact.
  F2 reasoning saturates or regresses as sparsity grows (family E, E >= 8, fixed active params):
     preconditions, val loss does not rise with total params over those models (Kendall, p >= 0.05)
     and dense reason_id accuracy is off the floor and the ceiling (GATE["reason_range"]).
     Decreasing trend (p < 0.05) -> reproduced (regresses); the largest model equivalent to E=8
     (TOST, MARGINS["acc"]) -> reproduced (saturates); an increasing trend without equivalence ->
     not reproduced; else inconclusive. reason_shift beside it.
  F3 top-k alone matters little (family topk: K*F and E*F constant, K >= 2): precondition, >= 3
     values of K with the invariants holding. Every pair of K: the 90% interval of the difference
     of model means (Welch) for facts_acc, reason_id_acc (MARGINS["acc"]) and val_loss
     (MARGINS["val_loss"]). All pairs inside the margins for both accuracies -> reproduced; any pair
     entirely outside a margin -> not reproduced (named); else inconclusive.
  F4 GRPO does not rescue sparse models / F5 nor does test-time compute: precondition, the GRPO
     (grpo0_/grpo_ columns) or test-time compute (maj<n>) results on >= 2 models of each side. The
     gain (after - before; maj@N - maj@1 on the same items) of the sparse side (E >= 16) minus the dense side (E <= 8),
     model means, Welch 90% interval: its upper end below MARGINS["acc"] -> reproduced (no rescue);
     its lower end above MARGINS["acc"] -> not reproduced; else inconclusive.
  F6 the reasoning optimum is near 20 tokens per param: precondition, the family's tokens per total
     param bracket 20. The best model by mean reason_id_acc: within a factor 2 of 20 and better
     than both ends of the grid (Welch, one-sided p < 0.05) -> reproduced; outside that factor and
     better than the model nearest 20 (p < 0.05) -> not reproduced; else inconclusive.
Writes verdict.md, stats.json and figures (matplotlib) to --out.
"""
import argparse
import csv
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from sweep import open_log, read_fact_items  # noqa: E402

# declared before any v3 run: the equivalence margins and the gate's thresholds
MARGINS = {"acc": 0.03, "val_loss": 0.02, "bits_per_fact": 0.25}
REASON_TASKS = ("reason_id", "reason_shift")  # the eval files' names in the per-item lines
GATE = {"storage_ratio": 1.25, "e8_ratio": 1.10, "reason_range": (0.15, 0.75)}
ALPHA = 0.05
MAIN, TOPK, K1 = "E", "topk", "k1"
# Added after seeds 1 and 2 were seen, for the post-hoc analysis only (post_hoc(); no verdict uses it):
# the paper's least-fed experts, d2048-E128-k2 in rioyokotalab/optimal-sparsity's pre-training scripts,
# see 125e9 tokens x K=2 / (E=128 x 3 x C=2048 x F=4096) = 77.6 tokens per expert parameter.
PAPER_LEAST_FED = 125e9 * 2 / (128 * 3 * 2048 * 4096)
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not testable")


def libs():
    try:
        import numpy  # noqa: F401
        import scipy.stats  # noqa: F401
        import statsmodels.stats.weightstats  # noqa: F401
    except ImportError as e:
        print(f"study3_report: {e.name} is missing: make venv (dev/requirements.txt pins numpy, scipy, "
              f"statsmodels), then run with .venv/bin/python", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# input

def num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_rows(path):
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f)]


def group_models(rows, items_dir=None):
    """{model: {"E", "K", "F", "total", "tpp", "families", "seeds": [row], "items": {seed: (bits,
    right)}}} over the finished rows."""
    models = {}
    for r in rows:
        if r.get("status") != "done":
            continue
        m = models.setdefault(r["model"], {"model": r["model"], "E": int(r["E"]), "K": int(r["K"]),
                                           "F": int(r["F"]), "total": float(r["total_params"]),
                                           "tpp": num(r.get("tpp")), "families": set(), "seeds": [],
                                           "items": {}})
        m["families"] |= set(r.get("families", "").split(";")) - {""}
        m["seeds"].append(r)
        m.setdefault("reason_items", {})
        if items_dir:
            p = os.path.join(items_dir, r["name"], "fact_items.txt.gz")
            if os.path.exists(p):
                m["items"][r.get("seed", "")] = read_fact_items(p)
            lines = read_item_lines(os.path.join(items_dir, r["name"], "log.txt"))
            if lines:
                m["reason_items"][r.get("seed", "")] = lines
    return models


def read_item_lines(path):
    """{task: [0 or 1 per item]} from a log's per-item lines at its last step that has them ({} if
    none): "step S items TASK 0110..."; of two lines for a task at that step (test-time compute's
    eval on fewer items), the longer."""
    last, out = -1, {}
    f = open_log(path)  # results_dir keeps logs gzipped (log.txt.gz)
    if f is None:
        return out
    with f:
        for line in f:
            w = line.split()
            if len(w) != 5 or w[0] != "step" or w[2] != "items" or not w[1].isdigit() or set(w[4]) - {"0", "1"}:
                continue
            s = int(w[1])
            if s > last:
                last, out = s, {}
            if s == last and len(w[4]) >= len(out.get(w[3], [])):
                out[w[3]] = [int(c) for c in w[4]]
    return out


def vals(m, metric):
    return [v for v in (num(r.get(metric)) for r in m["seeds"]) if v is not None]


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def fam(models, name, min_E=None, max_E=None):
    out = [m for m in models.values() if name in m["families"]
           and (min_E is None or m["E"] >= min_E) and (max_E is None or m["E"] <= max_E)]
    return sorted(out, key=lambda m: (m["total"], m["K"]))


def bits_per_fact(m):
    return vals(m, "facts_all_bits_per_fact")


# ----------------------------------------------------------------------------------------------
# statistics (scipy, statsmodels)

def enough(ms, metric, seeds=2):
    """None if every model has >= seeds values of metric, else the reason."""
    short = [m["model"] for m in ms if len(vals(m, metric)) < seeds]
    return f"fewer than {seeds} finished seeds with {metric}: {', '.join(short)}" if short else None


def trend(ms, metric, key="total"):
    """Kendall's tau of the model means against key, exact, with both one-sided p-values."""
    from scipy.stats import kendalltau
    x = [m[key] for m in ms]
    y = [mean(vals(m, metric)) for m in ms]
    up = kendalltau(x, y, alternative="greater", method="exact" if len(set(y)) == len(y) else "auto")
    down = kendalltau(x, y, alternative="less", method="exact" if len(set(y)) == len(y) else "auto")
    return {"metric": metric, "n_models": len(ms), "tau": float(up.statistic), "p_increasing": float(up.pvalue),
            "p_decreasing": float(down.pvalue), "means": {m["model"]: y[i] for i, m in enumerate(ms)}}


def diff_ci(a, b, alpha=0.10):
    """Welch: mean(a) - mean(b) and its (1 - alpha) interval; seeds are the replicates."""
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW
    import numpy as np
    cm = CompareMeans(DescrStatsW(np.asarray(a, float)), DescrStatsW(np.asarray(b, float)))
    d = float(np.mean(a) - np.mean(b))
    if np.var(a) == 0 and np.var(b) == 0:  # no spread on either side: the interval is the point
        return {"diff": d, "lo": d, "hi": d, "level": 1 - alpha}
    lo, hi = cm.tconfint_diff(alpha=alpha, usevar="unequal")
    return {"diff": d, "lo": float(lo), "hi": float(hi), "level": 1 - alpha}


def tost(a, b, margin):
    """TOST equivalence of mean(a) - mean(b) within +-margin (Welch): p < ALPHA -> equivalent."""
    from statsmodels.stats.weightstats import ttost_ind
    import numpy as np
    p, _lo, _hi = ttost_ind(np.asarray(a, float), np.asarray(b, float), -margin, margin, usevar="unequal")
    d = diff_ci(a, b, alpha=2 * ALPHA)
    return dict(d, p_tost=float(p), margin=margin, equivalent=bool(p < ALPHA))


def welch_greater(a, b):
    """One-sided Welch p of mean(a) > mean(b)."""
    from scipy.stats import ttest_ind
    return float(ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)


def paired_items(ma, mb, which=0):
    """Per-fact paired comparison of two models (each fact's value averaged over the model's seeds):
    mean difference a - b with its 95% interval (paired t) and the Wilcoxon signed-rank p. which 0:
    bits saved, 1: greedy right. None without per-fact results for both."""
    if not ma["items"] or not mb["items"]:
        return None
    return paired_arrays(ma["model"], mb["model"], [v[which] for v in ma["items"].values()],
                         [v[which] for v in mb["items"].values()])


def paired_reasoning(ma, mb, task):
    """Per-item paired comparison of two models' greedy results on a reasoning eval file (each item's
    result averaged over the model's seeds), as paired_items. None without per-item lines for both."""
    a = [v[task] for v in ma.get("reason_items", {}).values() if task in v]
    b = [v[task] for v in mb.get("reason_items", {}).values() if task in v]
    return paired_arrays(ma["model"], mb["model"], a, b) if a and b else None


def paired_arrays(name_a, name_b, a_seeds, b_seeds):
    """Mean difference a - b over items of the seed means, its 95% interval (paired t) and the
    Wilcoxon signed-rank p; None if the item counts differ."""
    import numpy as np
    from scipy.stats import ttest_rel, wilcoxon
    a = np.mean([np.asarray(v, float) for v in a_seeds], axis=0)
    b = np.mean([np.asarray(v, float) for v in b_seeds], axis=0)
    if a.shape != b.shape:
        return None
    t = ttest_rel(a, b)
    ci = t.confidence_interval(0.95)
    d = a - b
    w = wilcoxon(d) if np.any(d != 0) else None
    return {"a": name_a, "b": name_b, "n_items": int(a.size), "diff": float(d.mean()),
            "lo": float(ci.low), "hi": float(ci.high), "p_t": float(t.pvalue),
            "p_wilcoxon": float(w.pvalue) if w is not None else 1.0,
            "seeds": [len(a_seeds), len(b_seeds)]}


# ----------------------------------------------------------------------------------------------
# the gate

def gate(dense, e8, dense_half):
    """The three conditions on seed 1 (or whatever seeds the rows hold), each with its figures."""
    conds = {}
    if dense is None or dense_half is None or not bits_per_fact(dense) or not bits_per_fact(dense_half):
        conds["storage_bound"] = {"ok": None, "why": "not measured: needs the dense model's stored bits on the "
                                  "full and on the half fact set"}
    else:
        full = mean(vals(dense, "facts_all_bits"))
        half = mean(vals(dense_half, "facts_all_bits"))
        ratio = full / half if half > 0 else float("inf")
        conds["storage_bound"] = {"ok": ratio < GATE["storage_ratio"], "full_bits": full, "half_bits": half,
                                  "ratio": ratio, "threshold": GATE["storage_ratio"]}
    if dense is None or e8 is None or not bits_per_fact(dense) or not bits_per_fact(e8):
        conds["e8_stores_more"] = {"ok": None, "why": "not measured: needs dense and E=8 stored bits"}
    else:
        bd, be = mean(vals(dense, "facts_all_bits")), mean(vals(e8, "facts_all_bits"))
        ratio = be / bd if bd > 0 else float("inf")
        pi = paired_items(e8, dense)
        ok = ratio >= GATE["e8_ratio"] and (pi is not None and pi["lo"] > 0)
        conds["e8_stores_more"] = {"ok": ok, "dense_bits": bd, "e8_bits": be, "ratio": ratio,
                                   "threshold": GATE["e8_ratio"], "paired_per_fact": pi}
        if pi is None:
            conds["e8_stores_more"]["why"] = "no per-fact results (fact_items.txt.gz) for the paired test"
    acc = mean(vals(dense, "reason_id_acc")) if dense is not None else None
    lo, hi = GATE["reason_range"]
    conds["dense_reasoning"] = ({"ok": None, "why": "not measured: no dense reason_id accuracy"} if acc is None
                                else {"ok": lo <= acc <= hi, "acc": acc, "range": [lo, hi]})
    passed = all(c["ok"] is True for c in conds.values())
    return {"passed": passed, "conditions": conds}


# ----------------------------------------------------------------------------------------------
# findings

def finding(fid, claim, verdict, why, stats):
    assert verdict in VERDICTS
    return {"id": fid, "claim": claim, "verdict": verdict, "why": why, "stats": stats}


def trend_finding(fid, claim, stats, tr, eq, outcomes, otherwise, **fields):
    """F1's and F2's decision on a Kendall trend tr and a TOST equivalence eq: outcomes are (test,
    verdict, why) in order, test "increasing" or "decreasing" (the trend's one-sided p < ALPHA) or
    "equivalent"; the first that holds gives the finding, none the verdict inconclusive, why
    `otherwise`. A why is a str.format template of tau, p_increasing, p_decreasing, p_tost and fields."""
    holds = {"increasing": tr["p_increasing"] < ALPHA, "decreasing": tr["p_decreasing"] < ALPHA,
             "equivalent": eq["equivalent"]}
    verdict, why = next(((v, w) for t, v, w in outcomes if holds[t]), ("inconclusive", otherwise))
    return finding(fid, claim, verdict, why.format(tau=tr["tau"], p_increasing=tr["p_increasing"],
                                                   p_decreasing=tr["p_decreasing"], p_tost=eq["p_tost"], **fields),
                   stats)


def f1_memorization(models, gate_res):
    claim = "memorization improves with total parameters"
    ms = fam(models, MAIN)
    pre = gate_res["conditions"]["storage_bound"]
    if pre["ok"] is not True:
        why = pre.get("why") or (f"the facts do not fill the dense model: its stored bits on the full set are "
                                 f"{pre['ratio']:.2f} x those on the half set (>= {GATE['storage_ratio']})")
        return finding("F1", claim, "not testable", why, {"storage_bound": pre})
    short = enough(ms, "facts_all_bits_per_fact")
    if len(ms) < 4 or short:
        return finding("F1", claim, "not testable", short or f"{len(ms)} models in family {MAIN} (needs >= 4)", {})
    tr = trend(ms, "facts_all_bits_per_fact")
    acc = trend(ms, "facts_acc") if not enough(ms, "facts_acc") else None
    dense, top = ms[0], ms[-1]
    eq = tost(bits_per_fact(top), bits_per_fact(dense), MARGINS["bits_per_fact"])
    paired = [p for p in (paired_items(m, dense) for m in ms[1:]) if p]
    st = {"trend_bits": tr, "trend_acc": acc, "largest_vs_dense": eq, "paired_vs_dense": paired}
    return trend_finding("F1", claim, st, tr, eq, [
        ("increasing", "reproduced", "stored bits per fact rise with total params (Kendall tau {tau:.2f}, one-sided "
         "p = {p_increasing:.3g})"),
        ("decreasing", "not reproduced", "stored bits per fact fall with total params (tau {tau:.2f}, p = "
         "{p_decreasing:.3g})"),
        ("equivalent", "not reproduced", "{top} stores the same as dense within {margin} bits per fact (TOST p = "
         "{p_tost:.3g})")],
        "no monotone trend (tau {tau:.2f}, p = {p_increasing:.3g}) and no equivalence (TOST p = {p_tost:.3g})",
        top=top["model"], margin=MARGINS["bits_per_fact"])


def f2_reasoning(models, metric="reason_id_acc"):
    claim = "reasoning saturates or regresses as sparsity grows (fixed active params)"
    allm = fam(models, MAIN)
    ms = fam(models, MAIN, min_E=8)
    short = enough(ms, metric) or enough(ms, "val_loss")
    if len(ms) < 3 or short:
        return finding("F2", claim, "not testable", short or f"{len(ms)} models with E >= 8 (needs >= 3)", {})
    vl = trend(ms, "val_loss")
    if vl["p_increasing"] < ALPHA:
        return finding("F2", claim, "not testable", f"pre-training val loss rises with total params over E >= 8 "
                       f"(tau {vl['tau']:.2f}, p = {vl['p_increasing']:.3g}): a reasoning drop would be explained "
                       f"by loss", {"trend_val_loss": vl})
    dense = next((m for m in allm if m["E"] == 1), None)
    lo, hi = GATE["reason_range"]
    d_acc = mean(vals(dense, metric)) if dense else None
    if d_acc is None or not lo <= d_acc <= hi:
        return finding("F2", claim, "not testable", "dense reasoning accuracy " + ("missing" if d_acc is None else
                       f"{100 * d_acc:.1f}% is outside {100 * lo:.0f}-{100 * hi:.0f}% (floor or ceiling)"),
                       {"trend_val_loss": vl})
    tr = trend(ms, metric)
    e8, top = ms[0], ms[-1]
    eq = tost(vals(top, metric), vals(e8, metric), MARGINS["acc"])
    per_item = {t: paired_reasoning(top, e8, t) for t in REASON_TASKS}
    st = {"trend": tr, "trend_val_loss": vl, "largest_vs_E8": eq,
          "per_item": {t: v for t, v in per_item.items() if v} or
          "not available: the runs' logs have no per-item lines (train_moe before they were logged)"}
    return trend_finding("F2", claim, st, tr, eq, [
        ("decreasing", "reproduced", "regresses: {metric} falls with total params over E >= 8 (tau {tau:.2f}, p = "
         "{p_decreasing:.3g}) while val loss does not rise"),
        ("equivalent", "reproduced", "saturates: {top} is within {margin:.2f} of E=8 (TOST p = {p_tost:.3g})"),
        ("increasing", "not reproduced", "{metric} rises with total params over E >= 8 (tau {tau:.2f}, p = "
         "{p_increasing:.3g}) and is not equivalent at the ends")],
        "no trend (p = {p_decreasing:.3g} falling, {p_increasing:.3g} rising) and no equivalence (TOST p = "
        "{p_tost:.3g})", top=top["model"], margin=MARGINS["acc"], metric=metric)


def f3_topk(models):
    claim = "top-k alone matters little (fixed active and total params)"
    ms = [m for m in fam(models, TOPK) if m["K"] >= 2]
    ks = sorted({m["K"] for m in ms})
    kf, ef = {m["K"] * m["F"] for m in ms}, {m["E"] * m["F"] for m in ms}
    if len(ks) < 3 or len(kf) != 1 or len(ef) != 1:
        why = (f"K*F or E*F is not constant over the family (K*F {sorted(kf)}, E*F {sorted(ef)})"
               if ms and (len(kf) != 1 or len(ef) != 1) else f"{len(ks)} values of K >= 2 (needs >= 3)")
        return finding("F3", claim, "not testable", why, {})
    mets = [("facts_acc", MARGINS["acc"]), ("reason_id_acc", MARGINS["acc"]), ("val_loss", MARGINS["val_loss"])]
    short = next((enough(ms, mt) for mt, _ in mets if enough(ms, mt)), None)
    if short:
        return finding("F3", claim, "not testable", short, {})
    pairs = {}
    for i, a in enumerate(ms):
        for b in ms[i + 1:]:
            for mt, mg in mets:
                pairs[f"{mt} K={b['K']} - K={a['K']}"] = tost(vals(b, mt), vals(a, mt), mg)
    acc_pairs = {k: v for k, v in pairs.items() if not k.startswith("val_loss")}
    beyond = [k for k, v in acc_pairs.items() if v["lo"] > v["margin"] or v["hi"] < -v["margin"]]
    per_item = {f"reason_id K={b['K']} - K={a['K']}": paired_reasoning(b, a, "reason_id")
                for i, a in enumerate(ms) for b in ms[i + 1:]}
    st = {"pairs": pairs, "K": ks, "per_item": {k: v for k, v in per_item.items() if v} or "not available"}
    if beyond:
        return finding("F3", claim, "not reproduced", "outside the margin: " + "; ".join(
            f"{k} {acc_pairs[k]['diff']:+.3f} [{acc_pairs[k]['lo']:+.3f}, {acc_pairs[k]['hi']:+.3f}]" for k in beyond), st)
    if all(v["equivalent"] for v in acc_pairs.values()):
        return finding("F3", claim, "reproduced", f"every pair of K is equivalent within {MARGINS['acc']:.2f} on "
                       f"facts and reasoning accuracy (TOST, largest p = "
                       f"{max(v['p_tost'] for v in acc_pairs.values()):.3g})", st)
    return finding("F3", claim, "inconclusive", "some pairs neither equivalent nor beyond the margin: " + ", ".join(
        k for k, v in acc_pairs.items() if not v["equivalent"]), st)


def rescue(models, fid, claim, gain_fn, what):
    ms = fam(models, MAIN)
    gains = {m["model"]: [g for g in (gain_fn(r) for r in m["seeds"]) if g is not None] for m in ms}
    sparse = [mean(gains[m["model"]]) for m in ms if m["E"] >= 16 and gains[m["model"]]]
    densep = [mean(gains[m["model"]]) for m in ms if m["E"] <= 8 and gains[m["model"]]]
    if len(sparse) < 2 or len(densep) < 2:
        return finding(fid, claim, "not testable", f"no {what} results on >= 2 models of each side "
                       f"(E >= 16: {len(sparse)}, E <= 8: {len(densep)})", {})
    d = diff_ci(sparse, densep, alpha=2 * ALPHA)
    st = {"gain_sparse": sparse, "gain_dense": densep, "difference": d, "margin": MARGINS["acc"]}
    if d["hi"] < MARGINS["acc"]:
        return finding(fid, claim, "reproduced", f"the sparse models' {what} gain exceeds the dense side's by "
                       f"less than {MARGINS['acc']:.2f} ({d['diff']:+.3f}, 90% up to {d['hi']:+.3f})", st)
    if d["lo"] > MARGINS["acc"]:
        return finding(fid, claim, "not reproduced", f"the sparse models gain more from {what} ({d['diff']:+.3f}, "
                       f"90% from {d['lo']:+.3f})", st)
    return finding(fid, claim, "inconclusive", f"gain difference {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]", st)


def grpo_gain(r):
    a, b = num(r.get("grpo_reason_id_acc")), num(r.get("grpo0_reason_id_acc"))
    return a - b if a is not None and b is not None else None


def maj_ns(r):
    """The sample counts n of a row's reason_id maj@n results, ascending."""
    return sorted(int(k[len("reason_id_maj"):]) for k in r if k.startswith("reason_id_maj") and num(r[k]) is not None)


def ttc_gain(r):
    """maj@N (the most samples) minus maj@1: both on the items test-time compute scored (ttc_items may
    be fewer than the greedy eval's), at the same temperature."""
    ns = maj_ns(r)
    if len(ns) < 2 or ns[0] != 1:
        return None
    return num(r[f"reason_id_maj{ns[-1]}"]) - num(r["reason_id_maj1"])


def f6_optimum(models):
    claim = "the reasoning optimum is near 20 tokens per parameter"
    ms = [m for m in fam(models, MAIN) if m["tpp"]]
    if len(ms) < 3:
        return finding("F6", claim, "not testable", f"{len(ms)} models (needs >= 3)", {})
    tpps = [m["tpp"] for m in ms]
    if not min(tpps) < 20 < max(tpps):
        return finding("F6", claim, "not testable", f"the grid's tokens per parameter ({min(tpps):.1f}-"
                       f"{max(tpps):.1f}) do not bracket 20", {})
    short = enough(ms, "reason_id_acc")
    if short:
        return finding("F6", claim, "not testable", short, {})
    best = max(ms, key=lambda m: mean(vals(m, "reason_id_acc")))
    ends = [m for m in (min(ms, key=lambda m: m["tpp"]), max(ms, key=lambda m: m["tpp"])) if m is not best]
    near = min(ms, key=lambda m: abs(math.log(m["tpp"] / 20)))
    p_ends = {m["model"]: welch_greater(vals(best, "reason_id_acc"), vals(m, "reason_id_acc")) for m in ends}
    st = {"best": best["model"], "best_tpp": best["tpp"], "p_best_over_ends": p_ends, "nearest_20": near["model"]}
    if 10 <= best["tpp"] <= 40:
        if len(ends) == 2 and all(p < ALPHA for p in p_ends.values()):
            return finding("F6", claim, "reproduced", f"{best['model']} ({best['tpp']:.1f} tokens/param) beats both "
                           f"ends of the grid (p {', '.join(f'{p:.3g}' for p in p_ends.values())})", st)
        return finding("F6", claim, "inconclusive", f"best at {best['tpp']:.1f} tokens/param but not better than "
                       f"both ends", st)
    p_near = welch_greater(vals(best, "reason_id_acc"), vals(near, "reason_id_acc"))
    st["p_best_over_nearest_20"] = p_near
    if p_near < ALPHA:
        return finding("F6", claim, "not reproduced", f"{best['model']} at {best['tpp']:.1f} tokens/param beats "
                       f"{near['model']} ({near['tpp']:.1f}), p = {p_near:.3g}", st)
    return finding("F6", claim, "inconclusive", f"best at {best['tpp']:.1f} tokens/param, not clearly better than "
                   f"{near['model']} (p = {p_near:.3g})", st)


def expert_feed(m):
    """Tokens per expert parameter, tokens x K / (3 C E F), over the model's seeds' mean tokens (None
    without tokens or C in the rows)."""
    c = num(m["seeds"][0].get("C"))
    return mean(vals(m, "tokens")) * m["K"] / (3 * c * m["E"] * m["F"]) if c and vals(m, "tokens") else None


def post_hoc(models):
    """Not a verdict (added after seeds 1 and 2 were seen): F1's trend test again without the family E
    models whose experts see fewer than half the tokens per parameter of the paper's least-fed
    (PAPER_LEAST_FED), and the val loss trend over the same models. None if under 4 models remain."""
    ms = fam(models, MAIN)
    feed = {m["model"]: expert_feed(m) for m in ms}
    if None in feed.values():
        return None
    keep = [m for m in ms if feed[m["model"]] >= PAPER_LEAST_FED / 2]
    if len(keep) < 4 or enough(keep, "facts_all_bits_per_fact") or enough(keep, "val_loss"):
        return None
    return {"rule": f"tokens per expert parameter >= {PAPER_LEAST_FED / 2:.1f} (half the paper's least-fed, "
                    f"{PAPER_LEAST_FED:.1f})",
            "dropped": {m["model"]: feed[m["model"]] for m in ms if m not in keep},
            "trend_bits": trend(keep, "facts_all_bits_per_fact"), "trend_val_loss": trend(keep, "val_loss")}


def analyze(models, gate_res):
    return [f1_memorization(models, gate_res), f2_reasoning(models), f3_topk(models),
            rescue(models, "F4", "GRPO does not rescue sparse models", grpo_gain, "GRPO"),
            rescue(models, "F5", "test-time compute does not rescue sparse models", ttc_gain, "test-time compute"),
            f6_optimum(models)]


# ----------------------------------------------------------------------------------------------
# output

def pct(x):
    return "" if x is None else f"{100 * x:.1f}"


def model_rows(models):
    out = ["| model | families | E | K | F | total params | tokens/param | tokens/expert param | seeds | val loss | "
           "stored bits/fact | facts_all acc % | facts acc % | reason_id % | reason_shift % |", "|" + "---|" * 15]
    for m in sorted(models.values(), key=lambda m: (min(m["families"]) if m["families"] else "", m["total"], m["K"])):
        def mm(k, f):
            v = vals(m, k)
            return f(mean(v)) if v else ""
        feed = expert_feed(m)
        feed = "" if feed is None else f"{feed:.1f}"
        out.append(f"| {m['model']} | {','.join(sorted(m['families']))} | {m['E']} | {m['K']} | {m['F']} | "
                   f"{m['total'] / 1e6:.2f}M | {m['tpp']:.1f} | {feed} | {len(m['seeds'])} | {mm('val_loss', lambda x: f'{x:.4f}')} | "
                   f"{mm('facts_all_bits_per_fact', lambda x: f'{x:.3f}')} | {mm('facts_all_acc', pct)} | "
                   f"{mm('facts_acc', pct)} | {mm('reason_id_acc', pct)} | {mm('reason_shift_acc', pct)} |")
    return out


def gate_md(g):
    out = [f"## Gate: {'passed' if g['passed'] else 'not passed'}", "",
           "| condition | figures | holds |", "|---|---|---|"]
    for k, c in g["conditions"].items():
        if c["ok"] is None:
            fig = c["why"]
        elif k == "storage_bound":
            fig = (f"dense stores {c['full_bits']:.0f} bits on the full set, {c['half_bits']:.0f} on the half: "
                   f"{c['ratio']:.2f} x (needs < {c['threshold']})")
        elif k == "e8_stores_more":
            pi = c.get("paired_per_fact")
            fig = (f"E=8 {c['e8_bits']:.0f} bits, dense {c['dense_bits']:.0f}: {c['ratio']:.2f} x (needs >= "
                   f"{c['threshold']})" + (f"; per fact {pi['diff']:+.3f} [{pi['lo']:+.3f}, {pi['hi']:+.3f}]" if pi else
                                           "; " + c.get("why", "")))
        else:
            fig = f"dense reason_id {100 * c['acc']:.1f}% (needs {100 * c['range'][0]:.0f}-{100 * c['range'][1]:.0f}%)"
        out.append(f"| {k} | {fig} | {'—' if c['ok'] is None else ('yes' if c['ok'] else 'no')} |")
    return out


def post_hoc_md(ph):
    if ph is None:
        return []
    tb, tv = ph["trend_bits"], ph["trend_val_loss"]
    drop = ", ".join(f"{k} ({v:.1f})" for k, v in ph["dropped"].items()) or "none"
    return ["## Post hoc, not a verdict: experts fed as in the paper", "",
            f"Added after seeds 1 and 2 were seen. Kept: family E models with {ph['rule']}; dropped: {drop}.", "",
            "| over the models kept | Kendall tau | one-sided p, increasing | one-sided p, decreasing |",
            "|---|---|---|---|",
            f"| stored bits per fact against total params ({tb['n_models']} models) | {tb['tau']:.2f} | "
            f"{tb['p_increasing']:.3g} | {tb['p_decreasing']:.3g} |",
            f"| val loss against total params | {tv['tau']:.2f} | {tv['p_increasing']:.3g} | {tv['p_decreasing']:.3g} |",
            ""]


def render(findings, models, g, src, ph=None):
    lines = ["# Sparsity study v3: verdicts", "", f"Source: `{src}`. Margins: accuracy {MARGINS['acc']}, val loss "
             f"{MARGINS['val_loss']} nats, stored bits {MARGINS['bits_per_fact']} per fact (declared before the runs).",
             ""] + gate_md(g) + ["", "## Findings", "", "| finding | the paper | verdict | why |", "|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f['id']} | {f['claim']} | **{f['verdict']}** | {f['why']} |")
    lines += [""] + post_hoc_md(ph) + ["## Models (means over seeds)", ""] + model_rows(models) + [""]
    return "\n".join(lines)


def clean(x):
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def e_name(m):
    return "dense" if m["E"] == 1 else f"E={m['E']}"


def figures(models, out):
    """Per metric (stored bits per fact, reason_id accuracy, val loss) a figure of two panels: family E
    against total parameters, and top-k at fixed active and total parameters against K (E8-K1 apart, an
    open marker: its gate is the constant 1). Seeds are the small dots, model means the line. Then
    study3_rescue.png: test-time compute (maj@n against n) and GRPO (before, after) on family E."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study3_report: no matplotlib: figures skipped (make venv)", file=sys.stderr)
        return []
    made = []

    def series(ax, ms, metric, x, color, label, line="o-", **kw):
        pts = [(x(m), mean(vals(m, metric)), vals(m, metric)) for m in ms if vals(m, metric)]
        if not pts:
            return []
        ax.plot([p[0] for p in pts], [p[1] for p in pts], line, color=color, label=label, **kw)
        for px, _py, vs in pts:
            ax.plot([px] * len(vs), vs, ".", color=color, alpha=0.4)
        return pts

    for metric, label, fn in (("facts_all_bits_per_fact", "stored bits per fact (of 8)", "study3_bits.png"),
                              ("reason_id_acc", "reason_id accuracy", "study3_reason.png"),
                              ("val_loss", "val loss (nats)", "study3_val.png")):
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
        ms = fam(models, MAIN)
        for (px, py, _vs), m in zip(series(ax, ms, metric, lambda m: m["total"], "C0", "family E (K=2, F=128)"),
                                    [m for m in ms if vals(m, metric)]):
            ax.annotate(e_name(m), (px, py), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total parameters (active fixed at 0.26M non-embedding)")
        ax.set_ylabel(label)
        ax.set_title("more experts, same active parameters", fontsize=10)
        series(bx, sorted(fam(models, TOPK), key=lambda m: m["K"]), metric, lambda m: m["K"], "C1",
               "top-k family (K x F, E x F fixed)")
        series(bx, fam(models, K1), metric, lambda m: m["K"], "C2", "E8-K1-F256 (outside the family)",
               line="o", mfc="none")
        bx.set_xscale("log", base=2)
        bx.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        bx.set_xlabel("K (1.77M total, 0.26M active non-embedding)")
        bx.set_title("top-k alone", fontsize=10)
        for a in (ax, bx):
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fn), dpi=110)
        plt.close(fig)
        made.append(fn)

    ms = fam(models, MAIN)
    ttc = [next((t for t in ((m, r, maj_ns(r)) for r in m["seeds"]) if len(t[2]) >= 2), None) for m in ms]
    ttc = [t for t in ttc if t]
    grpo = [(m, num(r.get("grpo0_reason_id_acc")), num(r.get("grpo_reason_id_acc"))) for m in ms for r in m["seeds"][:1]]
    grpo = [g for g in grpo if g[1] is not None and g[2] is not None]
    if not ttc and not grpo:
        return made
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (m, r, ns) in enumerate(ttc):
        ax.plot(ns, [num(r[f"reason_id_maj{n}"]) for n in ns], "o-", color=f"C{i}", label=f"{e_name(m)} maj@n", ms=3)
        pk = [n for n in ns if num(r.get(f"reason_id_pass{n}")) is not None]
        ax.plot(pk, [num(r[f"reason_id_pass{n}"]) for n in pk], ":", color=f"C{i}", alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples n (temperature 0.8; dotted: pass@n)")
    ax.set_ylabel("reason_id accuracy")
    ax.set_title("test-time compute", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    for i, (m, before, after) in enumerate(grpo):
        bx.annotate("", (i, after), (i, before), arrowprops={"arrowstyle": "->", "color": "C0"})
        bx.plot([i], [before], "o", color="C0", ms=4)
    bx.set_xticks(range(len(grpo)), [e_name(m) for m, _b, _a in grpo])
    bx.set_ylabel("reason_id accuracy (greedy)")
    bx.set_title("GRPO: before -> after (seed 1)", fontsize=10)
    if grpo:
        lo = min(min(b, a) for _m, b, a in grpo)
        hi = max(max(b, a) for _m, b, a in grpo)
        bx.set_ylim(lo - 0.03, hi + 0.03)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "study3_rescue.png"), dpi=110)
    plt.close(fig)
    made.append("study3_rescue.png")
    return made


def pick(models, E, K):
    return next((m for m in models.values() if m["E"] == E and m["K"] == K), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("results")
    ap.add_argument("--items", help="directory of <run>/fact_items.txt.gz (the sweep's results_dir)")
    ap.add_argument("--half-csv", help="results.csv of the dense model on the half fact set (the gate)")
    ap.add_argument("--gate-seeds", default="1", help="seeds the gate reads (default 1)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    libs()
    rows = read_rows(a.results)
    models = group_models(rows, a.items)
    gseeds = set(a.gate_seeds.split(","))
    grows = [r for r in rows if str(r.get("seed", "")) in gseeds]
    gm = group_models(grows, a.items)
    half = group_models([r for r in read_rows(a.half_csv) if str(r.get("seed", "")) in gseeds]) if a.half_csv else {}
    g = gate(pick(gm, 1, 1), pick(gm, 8, 2), pick(half, 1, 1))
    findings = analyze(models, g)
    ph = post_hoc(models)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "verdict.md"), "w") as f:
        f.write(render(findings, models, g, a.results, ph))
    with open(os.path.join(a.out, "stats.json"), "w") as f:
        json.dump(clean({"margins": MARGINS, "gate_thresholds": GATE, "gate": g, "findings": findings,
                         "post_hoc": ph}), f,
                  indent=1, sort_keys=True)
        f.write("\n")
    made = figures(models, a.out)
    print(f"gate: {'passed' if g['passed'] else 'not passed'}")
    for fd in findings:
        print(f"{fd['id']}: {fd['verdict']} ({fd['why']})")
    print(f"wrote {a.out}/verdict.md, stats.json" + (", " + ", ".join(made) if made else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
