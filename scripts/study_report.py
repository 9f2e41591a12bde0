#!/usr/bin/env python3
"""
The sparsity study's report: what a sweep (scripts/sweep.py) says about each finding of Nakamura et
al., "Optimal Sparsity of Mixture-of-Experts Language Models for Reasoning Tasks" (arXiv 2508.18672).

    .venv/bin/python scripts/study_report.py out/sweeps/study --out out/sweeps/study/report
    .venv/bin/python scripts/study_report.py path/results.csv --out DIR --lr-csv path/lr_scan/results.csv

Input: results.csv (a sweep directory means its results.csv) and plan.json beside it when present
(family labels and members; without it the CSV's `families` column alone says which run is in which
family). Only rows with status `done` are used; the others are counted as not finished. Rows of one
model (the `model` column: the run name without its -s<seed>) differ only in their seed.

Families (their names can be changed with --main, --topk, --small):
  E      E in {1, 4, 8, 16, 32, 64} experts at fixed active parameters (the main family)
  topk   E = 16, K in {1, 2, 4, 8}, F = 256 / K (fixed active parameters)
  small  a smaller active size, E in {1, 8, 32}

Statistics (every interval is 95%; x = log2(total params), so a slope is "per doubling of total
params"; accuracies are fractions in the data and percentage points in the report):
  per model     mean and standard error (sd / sqrt(n), n = finished seeds) of every metric column;
                a model with one seed has se = nan (it is still tabulated and plotted).
  slope         OLS slope of a metric against x over all seed rows of the chosen models (each seed
                row one point), with a Student-t interval, df = points - 2. The seed rows are taken
                as independent points. Needs >= 3 points over >= 2 model sizes.
  model slope   the same over model means (one point per model, df = models - 2), for GRPO, which
                runs on one seed per model. Needs >= 3 models.
  t quantile    t_{0.975, df} by bisection on the Student-t CDF, written with the regularized
                incomplete beta function (continued fraction), so no table and no scipy.
  bootstrap     2000 resamples with a fixed RNG seed: the seed rows of each model are redrawn with
                replacement (each model keeps its number of seeds, its x does not change) and the
                statistic is recomputed; the interval is the 2.5-97.5 percentiles. It needs >= 2
                seeds in every model (with one seed the interval would collapse to a point). Used
                for the difference of two slopes on the same rows, slope(facts_acc) -
                slope(reasoning), and for the tokens per parameter of the best model.
  permutation   "K has no effect": the one-way ANOVA F of the seed rows grouped by model (the
                between-model variance of the model means over the within-model variance); the K
                labels are shuffled over all seed rows 5000 times (fixed RNG seed) and
                p = (1 + #{F_shuffled >= F}) / (1 + 5000). Needs more rows than models.

Findings and their verdicts (E >= 8 is the sparse end of the main family):
  F1 memorization improves with total params: slope of facts_acc over the main family (and, for
     context, the small family). reproduced: interval above 0; not reproduced: below 0; else
     inconclusive.
  F2 reasoning saturates or regresses as sparsity grows: slope of reason_id_acc (and separately
     reason_shift_acc) over the main family with E >= 8. reproduced (regresses): interval below 0;
     not reproduced: above 0; reproduced (saturates): the interval contains 0 and the bootstrap
     interval of slope(facts_acc) - slope(reason_id_acc) on the same models is above 0; else
     inconclusive. The verdict is reason_id's; reason_shift's and the slope over the whole main
     family are reported beside it.
  F3 top-k matters little at fixed active params: the permutation test on the topk family for
     facts_acc, reason_id_acc and val_loss, and the range (max - min) of the model means beside the
     largest standard error. reproduced: p >= 0.05 for both accuracies; not reproduced: p < 0.05
     for either (named).
  F4 GRPO does not rescue sparse models: on the main family's rows with GRPO columns, the model
     slope of grpo_reason_id_acc over E >= 8, and the model slope of the gain (grpo_ - grpo0_) over
     the whole family. not reproduced: the after-GRPO interval lies above 0; reproduced: the
     after-GRPO interval does not lie above 0 and the gain's interval does not lie above 0;
     inconclusive otherwise or with fewer than 3 models.
  F5 test-time compute does not rescue them: F2's rule applied to reason_id_maj<n> and
     reason_id_pass<n> (n the largest present) over E >= 8. reproduced: both are reproduced (either
     kind); not reproduced: either is not reproduced (named); else inconclusive.
  F6 the reasoning optimum is near 20 tokens per parameter: for the main and the small family, the
     tpp (tokens / total params) of the model with the best mean reason_id_acc, with a bootstrap
     interval of the best model's tpp (2.5-97.5 percentiles of the resampled argmax's tpp); the
     tokens per non-embedding param of that model beside it. The grid is coarse (a factor ~1.3-2
     between neighbours), so "contains 20" is asked of the interval widened to the grid cells of its
     ends: each grid point stands for the tpp up to the geometric midpoints to its neighbours
     (half a step beyond at the ends of the grid). The best model is "at the edge" when it is the
     largest- or the smallest-tpp model of the family in at least half of the resamples.
     Not at the edge: reproduced if the interval contains 20, else not reproduced. At the edge:
     not reproduced if the interval excludes 20 although the family's tpp range spans 20 (the
     optimum lies at the far end of the grid from 20), else inconclusive (the optimum may lie beyond
     the grid). The verdict is the main family's; the small family's is reported beside it.
  A statistic without enough runs gives "inconclusive (too few runs: ...)".

Writes to --out:
  verdict.md                  the finding table (finding | the paper | measured | verdict (why)),
                              the per-model table and, with --lr-csv, the learning-rate table
  stats.json                  every number behind them
  study_vs_total_params.png   facts, reason_id, reason_shift accuracy, val loss, gsm8k and triviaqa
                              task loss against total params: one line per family (main, small),
                              model mean +- 1 se, seeds as faint dots
  study_topk.png              the same against K for the topk family
  study_grpo.png              reason_id and reason_shift accuracy before and after GRPO (main family)
  study_ttc.png               maj@n and pass@n of reason_id (and facts) against total params for
                              n in {1, 4, 32}, and maj@n against n for every model
  study_tpp.png               reason_id and facts accuracy against tokens per parameter
A figure whose columns are absent is skipped with a note (--no-figures: none). The finding table is
printed too.

With --lr-csv (the learning-rate scan's results.csv): val loss and accuracies per (model shape, lr),
and per active size (one family of the scan) the chosen lr: the lowest mean val loss over the
family's shapes (among the lrs that every shape of the family finished, when there are any).

Needs numpy and matplotlib (pip install numpy matplotlib; the repository's .venv has them).
"""
import argparse
import csv
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    import numpy as np
except ImportError:
    np = None

RNG_SEED = 20250825    # every bootstrap and permutation draws from this seed
N_BOOT = 2000          # bootstrap resamples
N_PERM = 5000          # permutations
SPARSE_E = 8           # the sparse end of the main family: E >= SPARSE_E
TPP_TARGET = 20.0      # the paper's reasoning optimum, tokens per parameter

PAPER = {
    "F1": "memorization improves with total parameters",
    "F2": "reasoning saturates or regresses as sparsity grows",
    "F3": "top-k alone matters little at fixed active params",
    "F4": "GRPO post-training does not rescue overly sparse models",
    "F5": "test-time compute (maj@n / pass@n) does not either",
    "F6": "the reasoning optimum sits near 20 tokens per parameter",
}
TITLE = {"F1": "F1 memorization", "F2": "F2 reasoning vs sparsity", "F3": "F3 top-k",
         "F4": "F4 GRPO", "F5": "F5 test-time compute", "F6": "F6 tokens per parameter"}

# columns that describe a run rather than measure it
META = {"name", "model", "seed", "families", "status", "L", "C", "H", "Hkv", "E", "K", "F", "V",
        "total_params", "active_params", "total_nonembed_params", "active_nonembed_params", "flops_N",
        "sparsity", "steps", "B", "T", "grad_accum", "tokens", "flops", "tpp", "tpp_active", "lr",
        "train_tok_s", "wall_s"}

FIG_METRICS = [("facts_acc", "facts accuracy (%)"), ("reason_id_acc", "reason_id accuracy (%)"),
               ("reason_shift_acc", "reason_shift accuracy (%)"), ("val_loss", "val loss (nats/token)"),
               ("gsm8k_bpt", "gsm8k task loss (bits/token)"), ("triviaqa_bpt", "triviaqa task loss (bits/token)")]


def need_libraries():
    """numpy and matplotlib (Agg), or a message saying how to install them and exit status 2."""
    try:
        if np is None:
            raise ImportError("numpy")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"study_report.py needs numpy and matplotlib, which {sys.executable} cannot import.\n"
              f"Install them with\n    pip install numpy matplotlib\n"
              f"(or run it with the repository's .venv/bin/python)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# reading

def num(s):
    """A CSV cell as a float; None when empty, not a number, or not finite."""
    if s is None:
        return None
    s = str(s).strip()
    if not s:
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def resolve_input(path):
    """(results.csv, plan.json or None) for a sweep directory or a CSV path."""
    csv_path = os.path.join(path, "results.csv") if os.path.isdir(path) else path
    plan = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "plan.json")
    return csv_path, (plan if os.path.isfile(plan) else None)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_plan(path):
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


def family_labels(plan, rows):
    """{family name: label}: plan.json's labels, else the names found in the families column."""
    labels = {}
    for f in (plan or {}).get("families", []):
        labels[f["name"]] = f.get("label") or f["name"]
    for r in rows:
        for f in (r.get("families") or "").split(";"):
            if f:
                labels.setdefault(f, f)
    return labels


# ----------------------------------------------------------------------------------------------
# models: the finished seed rows of one shape

def model_key(row):
    m = (row.get("model") or "").strip()
    return m or re.sub(r"-s\d+$", "", row.get("name") or "")


def as_int(x):
    v = num(x)
    return int(v) if v is not None else None


def group_models(rows, plan):
    """The finished rows grouped by model: a list of {model, rows, families, E, K, F, total,
    nonembed, active_nonembed, tokens, tpp, tpp_nonembed, seeds}, sorted by (E, K, total)."""
    plan_members = {}
    for f in (plan or {}).get("families", []):
        for name in f.get("runs", []):
            plan_members.setdefault(name, set()).add(f["name"])
    grouped = {}
    for r in rows:
        grouped.setdefault(model_key(r), []).append(r)
    models = []
    for key, rs in grouped.items():
        rs.sort(key=lambda r: (num(r.get("seed")) is None, num(r.get("seed")) or 0))
        fams = set()
        for r in rs:
            fams |= {f for f in (r.get("families") or "").split(";") if f}
            fams |= plan_members.get(r.get("name"), set())
        first = rs[0]
        total, nonembed, tokens = (num(first.get(k)) for k in ("total_params", "total_nonembed_params", "tokens"))
        tpp = num(first.get("tpp")) or (tokens / total if tokens and total else None)
        models.append({
            "model": key, "rows": rs, "families": sorted(fams),
            "E": as_int(first.get("E")), "K": as_int(first.get("K")), "F": as_int(first.get("F")),
            "total": total, "nonembed": nonembed, "active_nonembed": num(first.get("active_nonembed_params")),
            "tokens": tokens, "tpp": tpp,
            "tpp_nonembed": tokens / nonembed if tokens and nonembed else None,
            "seeds": [r.get("seed") for r in rs]})
    models.sort(key=lambda m: (m["E"] or 0, m["K"] or 0, m["total"] or 0, m["model"]))
    return models


def family(models, name, min_E=None):
    """The models of one family, optionally only those with E >= min_E."""
    return [m for m in models if name in m["families"] and (min_E is None or (m["E"] or 0) >= min_E)]


def values(model, metric):
    """The metric's value in each seed row of the model that has it."""
    return [v for v in (num(r.get(metric)) for r in model["rows"]) if v is not None]


def mean_se(vs):
    """(mean, standard error sd/sqrt(n), n); se is nan for one value, both nan for none."""
    n = len(vs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(vs) / n
    if n < 2:
        return m, math.nan, n
    sd = math.sqrt(sum((v - m) ** 2 for v in vs) / (n - 1))
    return m, sd / math.sqrt(n), n


def metric_columns(rows):
    cols = []
    for r in rows:
        for k, v in r.items():
            if k and k not in META and k not in cols and num(v) is not None:
                cols.append(k)
    return cols


def summarize(models, cols):
    """model["stats"][metric] = {mean, se, n} for every metric the model has."""
    for m in models:
        m["stats"] = {}
        for c in cols:
            mu, se, n = mean_se(values(m, c))
            if n:
                m["stats"][c] = {"mean": mu, "se": se, "n": n}


# ----------------------------------------------------------------------------------------------
# statistics

def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p, df):
    """The p-quantile of Student's t (bisection on t_cdf, to 1e-12 relative)."""
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_T975 = {}


def t975(df):
    if df not in _T975:
        _T975[df] = t_ppf(0.975, df)
    return _T975[df]


def too_few(what):
    return {"error": f"too few runs: {what}"}


def ols(x, y):
    """Least squares y = a + b x: slope b, its standard error, and b's 95% t-interval (df = n - 2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    w = x - x.mean()
    sxx = float(w @ w)
    b = float(w @ (y - y.mean())) / sxx
    a = float(y.mean()) - b * float(x.mean())
    sse = float(((y - a - b * x) ** 2).sum())
    se = math.sqrt(max(sse, 0.0) / (n - 2) / sxx)
    half = t975(n - 2) * se
    return {"slope": b, "se": se, "lo": b - half, "hi": b + half, "df": n - 2, "n": n, "intercept": a}


def slope(models, metric):
    """OLS slope of the metric against log2(total params) over every seed row of the models."""
    xs, ys, used = [], [], 0
    for m in models:
        vs = values(m, metric)
        if m["total"] and vs:
            used += 1
            xs += [math.log2(m["total"])] * len(vs)
            ys += vs
    if len(xs) < 3 or len(set(xs)) < 2:
        return too_few(f"{len(xs)} runs of {used} models with {metric} (a slope needs 3 over 2 sizes)")
    return dict(ols(xs, ys), models=used, metric=metric)


def model_slope(models, fn, label):
    """OLS slope over model means of fn(row) (rows where it is None left out), df = models - 2."""
    xs, ys = [], []
    for m in models:
        vs = [v for v in (fn(r) for r in m["rows"]) if v is not None]
        if m["total"] and vs:
            xs.append(math.log2(m["total"]))
            ys.append(sum(vs) / len(vs))
    if len(xs) < 3 or len(set(xs)) < 2:
        return too_few(f"{len(xs)} models with {label} (a model slope needs 3)")
    return dict(ols(xs, ys), models=len(xs), metric=label)


def seed_blocks(per_model, n_boot, rng):
    """Resample each model's seed rows with replacement: a list of (n_boot, n_rows, ...) arrays."""
    return [vals[rng.integers(0, len(vals), size=(n_boot, len(vals)))] for vals in per_model]


def percentile_interval(samples):
    """The 2.5 and 97.5 percentiles; for values on a grid, the grid values just outside them."""
    s = np.sort(np.asarray(samples, float))
    n = len(s)
    return float(s[int(math.floor(0.025 * (n - 1)))]), float(s[int(math.ceil(0.975 * (n - 1)))])


def bootstrap_slope_diff(models, m1, m2, n_boot=N_BOOT, seed=RNG_SEED):
    """Seed bootstrap of slope(m1) - slope(m2) on the rows that have both metrics."""
    xs, per = [], []
    for m in models:
        pairs = [(num(r.get(m1)), num(r.get(m2))) for r in m["rows"]]
        pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
        if m["total"] and pairs:
            xs.append(math.log2(m["total"]))
            per.append(np.array(pairs, float))
    n = sum(len(p) for p in per)
    if n < 3 or len(set(xs)) < 2:
        return too_few(f"{n} runs of {len(per)} models with both {m1} and {m2}")
    if min(len(p) for p in per) < 2:
        return too_few(f"a model has one seed with {m1} and {m2} (the seed bootstrap needs 2 per model)")
    x = np.concatenate([[xm] * len(p) for xm, p in zip(xs, per)])
    w = x - x.mean()
    sxx = float(w @ w)
    both = np.concatenate(per)
    point = float((both[:, 0] - both[:, 1]) @ w) / sxx
    rng = np.random.default_rng(seed)
    res = np.concatenate(seed_blocks(per, n_boot, rng), axis=1)  # (n_boot, n, 2)
    diffs = ((res[:, :, 0] - res[:, :, 1]) @ w) / sxx
    lo, hi = percentile_interval(diffs)
    return {"diff": point, "lo": lo, "hi": hi, "n": n, "models": len(per), "n_boot": n_boot,
            "metrics": [m1, m2]}


def between_ss(Y, onehot, counts):
    """Between-group sum of squares of each row of Y (groups given by the one-hot matrix)."""
    means = (Y @ onehot) / counts
    grand = Y.mean(axis=-1, keepdims=True)
    return ((means - grand) ** 2 * counts).sum(axis=-1)


def perm_test(models, metric, n_perm=N_PERM, seed=RNG_SEED):
    """One-way ANOVA F of the seed rows grouped by model and its permutation p-value."""
    groups = [(m, values(m, metric)) for m in models]
    groups = [(m, vs) for m, vs in groups if vs]
    g, n = len(groups), sum(len(vs) for _, vs in groups)
    if g < 2 or n <= g:
        return too_few(f"{n} runs of {g} models with {metric} (the permutation test needs 2 models "
                       f"and more runs than models)")
    y = np.array([v for _, vs in groups for v in vs], float)
    labels = np.array([i for i, (_, vs) in enumerate(groups) for _ in vs])
    onehot = np.eye(g)[labels]
    counts = onehot.sum(axis=0)
    sst = float(((y - y.mean()) ** 2).sum())
    ssb = float(between_ss(y, onehot, counts))
    ssw = sst - ssb
    if ssw > 1e-12 * max(sst, 1e-300):
        F = (ssb / (g - 1)) / (ssw / (n - g))
    else:
        F = math.inf if ssb > 0 else 0.0
    if sst > 0:
        rng = np.random.default_rng(seed)
        Y = rng.permuted(np.tile(y, (n_perm, 1)), axis=1)
        # F rises with the between-group SS at fixed total SS: compare those, with a little slack for rounding
        hits = int((between_ss(Y, onehot, counts) >= ssb - 1e-9 * sst).sum())
        p = (1 + hits) / (1 + n_perm)
    else:
        p = 1.0
    stats = [mean_se(vs) for _, vs in groups]
    means = [s[0] for s in stats]
    ses = [s[1] for s in stats if not math.isnan(s[1])]
    return {"F": F, "p": p, "n_perm": n_perm, "n": n, "models": g, "range": max(means) - min(means),
            "max_se": max(ses) if ses else math.nan,
            "means": {m["model"]: mu for (m, _), mu in zip(groups, means)}, "metric": metric}


def grid_cell(grid, t):
    """The stretch of tpp that the grid point t stands for: from the geometric midpoint to its lower
    neighbour to the one to its upper neighbour (at an end of the grid, mirrored: half a step beyond)."""
    g = sorted(set(float(v) for v in grid))
    i = g.index(float(t))
    if len(g) == 1:
        return g[0], g[0]
    lower = math.sqrt(g[i] * g[i - 1]) if i > 0 else g[0] / math.sqrt(g[1] / g[0])
    upper = math.sqrt(g[i] * g[i + 1]) if i + 1 < len(g) else g[-1] * math.sqrt(g[-1] / g[-2])
    return lower, upper


def best_tpp(models, metric, n_boot=N_BOOT, seed=RNG_SEED):
    """The tokens per parameter of the model with the best mean metric, and its seed bootstrap."""
    ms = [(m, np.array(values(m, metric), float)) for m in models if m["tpp"] and values(m, metric)]
    if len(ms) < 3:
        return too_few(f"{len(ms)} models with {metric} and tpp (the optimum needs 3)")
    tpp = np.array([m["tpp"] for m, _ in ms])
    tne = np.array([m["tpp_nonembed"] or math.nan for m, _ in ms])
    means = np.array([v.mean() for _, v in ms])
    best = int(np.argmax(means))
    out = {"metric": metric, "model": ms[best][0]["model"], "E": ms[best][0]["E"], "tpp": float(tpp[best]),
           "tpp_nonembed": float(tne[best]), "grid_tpp": [float(t) for t in tpp], "models": len(ms),
           "n": int(sum(len(v) for _, v in ms))}
    if min(len(v) for _, v in ms) < 2:
        out["error"] = f"too few runs: a model has one seed with {metric} (the seed bootstrap needs 2 per model)"
        return out
    rng = np.random.default_rng(seed)
    boot = np.stack([b.mean(axis=1) for b in seed_blocks([v for _, v in ms], n_boot, rng)], axis=1)
    arg = boot.argmax(axis=1)  # ties go to the first (smallest E) model
    edges = np.flatnonzero((tpp == tpp.min()) | (tpp == tpp.max()))
    out["lo"], out["hi"] = percentile_interval(tpp[arg])
    out["cell_lo"], out["cell_hi"] = grid_cell(tpp, out["lo"])[0], grid_cell(tpp, out["hi"])[1]
    out["nonembed_lo"], out["nonembed_hi"] = percentile_interval(tne[arg])
    out["edge_share"] = float(np.isin(arg, edges).mean())
    out["n_boot"] = n_boot
    return out


# ----------------------------------------------------------------------------------------------
# findings: each returns {id, paper, measured, verdict, why, stats}

def is_acc(metric):
    return metric.endswith("_acc") or re.search(r"_(maj|pass)\d+$", metric) is not None


def fmt_slope(s, metric=None):
    """'+5.10 ± 2.03 pp/doubling (n=18 runs, 6 models)' (pp for accuracies and gains), or the error."""
    if "error" in s:
        return s["error"]
    metric = metric or s.get("metric", "")
    k, unit = (100.0, " pp") if is_acc(metric) or metric.startswith("gain") else (1.0, "")
    n = f"n={s['models']} models" if s["n"] == s["models"] else f"n={s['n']} runs, {s['models']} models"
    return f"{k * s['slope']:+.2f} ± {k * (s['hi'] - s['slope']):.2f}{unit}/doubling ({n})"


def fmt_diff(d):
    if "error" in d:
        return d["error"]
    return f"{100 * d['diff']:+.2f} pp/doubling [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}] (bootstrap)"


def side(s):
    """Where a 95% interval lies relative to 0: 'above', 'below' or 'contains'."""
    return "above" if s["lo"] > 0 else ("below" if s["hi"] < 0 else "contains")


def finding(fid, measured, verdict, why, stats):
    return {"id": fid, "title": TITLE[fid], "paper": PAPER[fid], "measured": measured, "verdict": verdict,
            "why": why, "stats": stats}


def sign_verdict(s):
    """F1's rule: reproduced above 0, not reproduced below 0, else inconclusive."""
    if "error" in s:
        return f"inconclusive ({s['error']})", ""
    return {"above": ("reproduced", "interval above 0"), "below": ("not reproduced", "interval below 0"),
            "contains": ("inconclusive", "interval contains 0")}[side(s)]


def memorization(models, fams):
    main, small = family(models, fams["main"]), family(models, fams["small"])
    s_main, s_small = slope(main, "facts_acc"), slope(small, "facts_acc")
    verdict, why = sign_verdict(s_main)
    v_small, w_small = sign_verdict(s_small)
    why = "; ".join(x for x in (f"{fams['main']} family: {why}" if why else "",
                                f"{fams['small']} family: {v_small}" + (f", {w_small}" if w_small else "")) if x)
    measured = (f"facts_acc slope, {fams['main']}: {fmt_slope(s_main, 'facts_acc')}; "
                f"{fams['small']}: {fmt_slope(s_small, 'facts_acc')}")
    return finding("F1", measured, verdict, why, {"slope_main": s_main, "slope_small": s_small})


def saturation(models, metric, contrast="facts_acc"):
    """F2's rule for one reasoning metric over the given (sparse) models: (verdict, why, stats)."""
    s = slope(models, metric)
    d = bootstrap_slope_diff(models, contrast, metric)
    stats = {"slope": s, "diff_vs_" + contrast: d}
    if "error" in s:
        return f"inconclusive ({s['error']})", "", stats
    where = side(s)
    if where == "below":
        return "reproduced (regresses)", "slope interval below 0", stats
    if where == "above":
        return "not reproduced", "slope interval above 0: it still improves with sparsity", stats
    if "error" in d:
        return "inconclusive", f"slope interval contains 0; no bootstrap of the difference ({d['error']})", stats
    if d["lo"] > 0:
        return ("reproduced (saturates)", f"slope interval contains 0 while {contrast} rises faster "
                f"(bootstrap interval of the slope difference above 0)", stats)
    return ("inconclusive", f"slope interval contains 0 but the difference to {contrast}'s slope "
            f"is not clearly above 0", stats)


def reasoning(models, fams):
    sparse = family(models, fams["main"], SPARSE_E)
    v_id, why_id, st_id = saturation(sparse, "reason_id_acc")
    v_sh, why_sh, st_sh = saturation(sparse, "reason_shift_acc")
    full = slope(family(models, fams["main"]), "reason_id_acc")
    measured = (f"E>={SPARSE_E} reason_id_acc slope {fmt_slope(st_id['slope'])}; facts-reason_id "
                f"{fmt_diff(st_id['diff_vs_facts_acc'])}; reason_shift_acc slope {fmt_slope(st_sh['slope'])}; "
                f"all E reason_id_acc slope {fmt_slope(full)}")
    why = "; ".join(x for x in (f"reason_id: {why_id}" if why_id else "",
                                f"reason_shift: {v_sh}" + ("" if v_sh.startswith("reproduced") or not why_sh
                                                           else f", {why_sh}")) if x)
    return finding("F2", measured, v_id, why, {"reason_id": st_id, "reason_shift": st_sh, "reason_id_all_E": full})


def topk(models, fams):
    tk = family(models, fams["topk"])
    tests = {m: perm_test(tk, m) for m in ("facts_acc", "reason_id_acc", "val_loss")}
    parts = []
    for m, t in tests.items():
        if "error" in t:
            parts.append(f"{m}: {t['error']}")
            continue
        k, unit = (100.0, " pp") if is_acc(m) else (1.0, "")
        parts.append(f"{m}: p={t['p']:.3g}, F={t['F']:.3g}, range of means {k * t['range']:.3g}{unit} "
                     f"(largest se {k * t['max_se']:.3g}{unit})")
    some = next((t for t in tests.values() if "error" not in t), None)
    measured = "; ".join(parts) + (f" ({some['n']} runs, {some['models']} models, {N_PERM} permutations)" if some else "")
    accs = ("facts_acc", "reason_id_acc")
    errs = [tests[m]["error"] for m in accs if "error" in tests[m]]
    if errs:
        return finding("F3", measured, f"inconclusive ({errs[0]})", "", tests)
    sig = [m for m in accs if tests[m]["p"] < 0.05]
    vl = tests["val_loss"]
    ctx = "" if "error" in vl else f"; val_loss p={vl['p']:.3g}"
    if sig:
        return finding("F3", measured, "not reproduced", f"K changes {' and '.join(sig)} (p < 0.05){ctx}", tests)
    return finding("F3", measured, "reproduced", f"p >= 0.05 for both accuracies: no detectable effect of K{ctx}", tests)


def grpo_gain(row, task):
    """Accuracy after GRPO minus before (step 0), or None when either is missing."""
    after, before = num(row.get(f"grpo_{task}_acc")), num(row.get(f"grpo0_{task}_acc"))
    return after - before if after is not None and before is not None else None


def mean_interval(vs):
    """Mean of vs with its 95% t-interval (df = n - 1); lo = hi = mean for one value."""
    n = len(vs)
    m = sum(vs) / n
    if n < 2:
        return {"mean": m, "lo": m, "hi": m, "n": n}
    sd = math.sqrt(sum((v - m) ** 2 for v in vs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def fmt_gain(g):
    return f"{100 * g['mean']:+.1f} [{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}] points (n={g['n']})"


def grpo(models, fams):
    main = [m for m in family(models, fams["main"])
            if any(num(r.get("grpo_reason_id_acc")) is not None for r in m["rows"])]
    sparse = [m for m in main if (m["E"] or 0) >= SPARSE_E]
    stats, parts = {}, []
    for t in ("reason_id", "reason_shift"):
        after_col = f"grpo_{t}_acc"
        after = model_slope(sparse, lambda r, c=after_col: num(r.get(c)), after_col)
        g = model_slope(main, lambda r, task=t: grpo_gain(r, task), f"gain_{t}")
        stats[t] = {"after_slope_sparse": after, "gain_slope_all_E": g}
        parts.append(f"{t}: after GRPO, E>={SPARSE_E} slope {fmt_slope(after, after_col)}; "
                     f"gain vs size, all E {fmt_slope(g, 'gain')}")
    measured = "; ".join(parts)
    after, g = stats["reason_id"]["after_slope_sparse"], stats["reason_id"]["gain_slope_all_E"]
    errs = [s["error"] for s in (after, g) if "error" in s]
    if errs:
        return finding("F4", measured, f"inconclusive ({errs[0]})", "", stats)
    gains = [sum(v) / len(v) for v in ([grpo_gain(r, "reason_id") for r in m["rows"]
                                        if grpo_gain(r, "reason_id") is not None] for m in main) if v]
    mg = mean_interval(gains)
    stats["reason_id"]["mean_gain"] = mg
    measured += f"; mean reason_id gain over the models {fmt_gain(mg)}"
    if mg["lo"] <= 0.0:  # "does not rescue" is only a test where GRPO helps at all
        return finding("F4", measured, "inconclusive",
                       "GRPO did not improve the models on average (the mean gain's interval reaches 0), "
                       "so whether it rescues sparse ones cannot be told", stats)
    if side(after) == "above":
        return finding("F4", measured, "not reproduced",
                       f"after GRPO reason_id still rises with sparsity at E>={SPARSE_E} (interval above 0)", stats)
    if side(g) == "above":
        return finding("F4", measured, "inconclusive",
                       "the after-GRPO slope is not above 0, but the GRPO gain grows with total params", stats)
    return finding("F4", measured, "reproduced",
                   f"after-GRPO slope interval {'below' if side(after) == 'below' else 'contains'} 0 and the "
                   f"gain's interval does not lie above 0", stats)


def ttc_sizes(models, task="reason_id"):
    """The n of every <task>_maj<n> column the models have."""
    pat = re.compile(rf"^{re.escape(task)}_maj(\d+)$")
    return sorted({int(mt.group(1)) for m in models for r in m["rows"] for k, v in r.items()
                   if k and (mt := pat.match(k)) and num(v) is not None})


def test_time_compute(models, fams):
    sparse = family(models, fams["main"], SPARSE_E)
    ns = ttc_sizes(sparse)
    if not ns:
        return finding("F5", "no reason_id_maj<n> columns", "inconclusive (too few runs: no test-time compute "
                       f"columns at E>={SPARSE_E})", "", {})
    n = ns[-1]
    stats, parts, verdicts = {"n": n}, [], {}
    for kind in ("maj", "pass"):
        metric = f"reason_id_{kind}{n}"
        v, why, st = saturation(sparse, metric)
        stats[metric] = st
        verdicts[metric] = (v, why)
        parts.append(f"E>={SPARSE_E} {metric} slope {fmt_slope(st['slope'])}; facts-{kind}@{n} "
                     f"{fmt_diff(st['diff_vs_facts_acc'])}")
    measured = "; ".join(parts)
    why = "; ".join(f"{m}: {v}" + (f", {w}" if w and not v.startswith("reproduced") else "")
                    for m, (v, w) in verdicts.items())
    vs = [v for v, _ in verdicts.values()]
    bad = [m for m, (v, _) in verdicts.items() if v.startswith("not reproduced")]
    if bad:
        return finding("F5", measured, "not reproduced", f"{' and '.join(bad)} still rise: " + why, stats)
    if all(v.startswith("reproduced") for v in vs):
        return finding("F5", measured, "reproduced", why, stats)
    few = [v for v in vs if "too few" in v]
    return finding("F5", measured, few[0] if few else "inconclusive", why, stats)


def tpp_verdict(b):
    """F6's rule for one family's best_tpp result: (verdict, why)."""
    if "lo" not in b:
        return f"inconclusive ({b['error']})", ""
    contains = b["cell_lo"] <= TPP_TARGET <= b["cell_hi"]
    spans = min(b["grid_tpp"]) <= TPP_TARGET <= max(b["grid_tpp"])
    share = f"at the grid's edge in {100 * b['edge_share']:.0f}% of resamples"
    if b["edge_share"] < 0.5:
        if contains:
            return "reproduced", f"interval contains {TPP_TARGET:g}; {share}"
        return "not reproduced", f"interval excludes {TPP_TARGET:g}; {share}"
    if not contains and spans:
        return "not reproduced", f"{share}, the far end from {TPP_TARGET:g}, which the grid spans"
    return "inconclusive", f"{share}: the optimum may lie beyond the grid"


def fmt_best(b, fam):
    if "model" not in b:
        return f"{fam}: {b['error']}"
    s = f"{fam}: best reason_id at tpp {b['tpp']:.3g} ({b['model']})"
    if "lo" in b:
        s += (f", 95% [{b['lo']:.3g}, {b['hi']:.3g}] (grid cells {b['cell_lo']:.3g}-{b['cell_hi']:.3g}), "
              f"{100 * b['edge_share']:.0f}% at the edge; per non-embedding "
              f"param {b['tpp_nonembed']:.3g} [{b['nonembed_lo']:.3g}, {b['nonembed_hi']:.3g}]")
    else:
        s += f", per non-embedding param {b['tpp_nonembed']:.3g} (no interval: one seed)"
    return s + f"; grid tpp {min(b['grid_tpp']):.3g}-{max(b['grid_tpp']):.3g}, n={b['n']} runs"


def optimum(models, fams):
    res = {f: best_tpp(family(models, fams[f]), "reason_id_acc") for f in ("main", "small")}
    verdict, why = tpp_verdict(res["main"])
    v_small, w_small = tpp_verdict(res["small"])
    why = "; ".join(x for x in (f"{fams['main']}: {why}" if why else "",
                                f"{fams['small']}: {v_small}" + (f", {w_small}" if w_small else "")) if x)
    measured = "; ".join(fmt_best(res[f], fams[f]) for f in ("main", "small"))
    return finding("F6", measured, verdict, why, {"main": res["main"], "small": res["small"]})


def analyze(models, fams):
    """All six findings, in order."""
    return [memorization(models, fams), reasoning(models, fams), topk(models, fams),
            grpo(models, fams), test_time_compute(models, fams), optimum(models, fams)]


# ----------------------------------------------------------------------------------------------
# learning-rate scan

def shape_of(r):
    s = "-".join(f"{k}{as_int(r.get(k))}" for k in ("L", "C", "H", "E", "K", "F"))
    if as_int(r.get("Hkv")) not in (None, as_int(r.get("H"))):
        s += f"-kv{as_int(r.get('Hkv'))}"
    return s


def lr_scan(path):
    """Per (family, shape, lr) the seed means of val loss and accuracies, and per family the lr with the
    lowest mean val loss over its shapes (among the lrs that every shape finished, when there are any)."""
    rows = read_csv(path)
    done = [r for r in rows if r.get("status") == "done" and num(r.get("lr")) is not None]
    cells = {}
    for r in done:
        fam = (r.get("families") or "").split(";")[0]
        cells.setdefault((fam, shape_of(r), num(r["lr"])), []).append(r)
    table = []
    for (fam, shape, lr), rs in sorted(cells.items()):
        entry = {"family": fam, "shape": shape, "lr": lr, "seeds": len(rs)}
        for c in ("val_loss", "facts_acc", "reason_id_acc", "reason_shift_acc"):
            mu, se, n = mean_se([v for v in (num(r.get(c)) for r in rs) if v is not None])
            entry[c] = {"mean": mu, "se": se, "n": n}
        table.append(entry)
    chosen, by_lr = {}, {}
    for fam in sorted({e["family"] for e in table}):
        es = [e for e in table if e["family"] == fam and e["val_loss"]["n"]]
        shapes = {e["shape"] for e in es}
        lrs = {}
        for e in es:
            lrs.setdefault(e["lr"], []).append(e["val_loss"]["mean"])
        complete = {lr: v for lr, v in lrs.items() if len(v) == len(shapes)}
        pool = complete or lrs
        means = {lr: sum(v) / len(v) for lr, v in pool.items()}
        if means:
            chosen[fam] = min(means, key=means.get)
            by_lr[fam] = {"mean_val_loss": means, "shapes": sorted(shapes), "complete": bool(complete)}
    for e in table:
        e["chosen"] = chosen.get(e["family"]) == e["lr"]
    return {"path": path, "rows": table, "chosen": chosen, "by_lr": by_lr,
            "not_finished": len(rows) - len(done)}


# ----------------------------------------------------------------------------------------------
# report

def fmt_ms(st, acc=False):
    """'45.2 ± 1.3' (accuracies in %), 'n/a' for a missing se, '—' for a missing value."""
    if not st or st["n"] == 0:
        return "—"
    k, d = (100.0, 1) if acc else (1.0, 4)
    se = "n/a" if math.isnan(st["se"]) else f"{k * st['se']:.{d}f}"
    return f"{k * st['mean']:.{d}f} ± {se}"


def fmt_count(x):
    if x is None:
        return "—"
    for lim, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= lim:
            return f"{x / lim:.3g}{suf}"
    return f"{x:g}"


def findings_table(findings):
    lines = ["| finding | the paper | measured (value ± 95% interval, n) | verdict (why) |", "|---|---|---|---|"]
    for f in findings:
        v = f"**{f['verdict']}**" + (f" ({f['why']})" if f["why"] else "")
        lines.append(f"| {f['title']} | {f['paper']} | {f['measured']} | {v} |")
    return "\n".join(lines)


def table_order(models, fams):
    """The models grouped by family (main, topk, small, others), then by E and K."""
    rank = {fams[k]: i for i, k in enumerate(("main", "topk", "small"))}
    return sorted(models, key=lambda m: (min([rank.get(f, 3) for f in m["families"]] or [3]),
                                         m["E"] or 0, m["K"] or 0, m["model"]))


def models_table(models):
    lines = ["| model | family | E | K | total params | tpp | seeds | val loss | facts % | reason_id % | reason_shift % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        s = m["stats"]
        tpp = f"{m['tpp']:.3g}" if m["tpp"] else "—"
        lines.append(f"| {m['model']} | {';'.join(m['families'])} | {m['E']} | {m['K']} | {fmt_count(m['total'])} | "
                     f"{tpp} | {len(m['rows'])} | {fmt_ms(s.get('val_loss'))} | {fmt_ms(s.get('facts_acc'), True)} | "
                     f"{fmt_ms(s.get('reason_id_acc'), True)} | {fmt_ms(s.get('reason_shift_acc'), True)} |")
    return "\n".join(lines)


def lr_table(lr):
    lines = [f"Source: `{lr['path']}` (not finished: {lr['not_finished']}). The chosen lr of each family "
             f"(one active size) has the lowest mean val loss over the family's shapes.", "",
             "| family | shape | lr | seeds | val loss | facts % | reason_id % | reason_shift % | chosen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in lr["rows"]:
        lines.append(f"| {e['family']} | {e['shape']} | {e['lr']:g} | {e['seeds']} | {fmt_ms(e['val_loss'])} | "
                     f"{fmt_ms(e['facts_acc'], True)} | {fmt_ms(e['reason_id_acc'], True)} | "
                     f"{fmt_ms(e['reason_shift_acc'], True)} | {'**chosen**' if e['chosen'] else ''} |")
    lines.append("")
    for fam, lrv in lr["chosen"].items():
        b = lr["by_lr"][fam]
        means = ", ".join(f"{k:g}: {v:.4f}" for k, v in sorted(b["mean_val_loss"].items()))
        lines.append(f"- {fam}: lr {lrv:g} (mean val loss over {len(b['shapes'])} shapes: {means}"
                     + ("" if b["complete"] else "; no lr finished on every shape") + ")")
    return "\n".join(lines)


RULES = f"""- F1: slope of facts_acc vs log2(total params) over every seed row of the main family, t-interval
  (df = runs - 2). reproduced: above 0; not reproduced: below 0; else inconclusive.
- F2: slope of reason_id_acc over the main family at E >= {SPARSE_E}. reproduced (regresses): below 0;
  not reproduced: above 0; reproduced (saturates): contains 0 and the seed-bootstrap interval of
  slope(facts_acc) - slope(reason_id_acc) is above 0; else inconclusive.
- F3: permutation test ({N_PERM} shuffles of K over the seed rows, one-way ANOVA F) on the topk family.
  reproduced: p >= 0.05 for facts_acc and reason_id_acc; not reproduced: p < 0.05 for either.
- F4: slopes over model means (GRPO runs one seed per model). not reproduced: the after-GRPO reason_id
  slope at E >= {SPARSE_E} lies above 0; reproduced: it does not, and the slope of the gain
  (after - before) over the main family does not lie above 0; else inconclusive.
- F5: F2's rule for reason_id_maj<n> and reason_id_pass<n> (largest n). reproduced: both reproduced;
  not reproduced: either not reproduced; else inconclusive.
- F6: tpp of the best-reason_id model, seed bootstrap ({N_BOOT} resamples); "contains" is asked of the
  interval widened to its ends' grid cells (up to the geometric midpoints to the neighbouring models).
  Not at the grid's edge (best model the largest- or smallest-tpp one in < 50% of resamples):
  reproduced if the interval contains {TPP_TARGET:g}, else not reproduced. At the edge: not reproduced
  if the interval excludes {TPP_TARGET:g} and the grid spans it, else inconclusive.
- Too few runs for a statistic: inconclusive (too few runs: ...)."""


def render(src, findings, models, n_done, n_not, fams, labels, lr):
    fam_txt = ", ".join(f"{fams[k]} ({labels.get(fams[k], 'absent')})" for k in ("main", "topk", "small"))
    parts = ["# Sparsity study: the paper's findings against this sweep", "",
             f"Source: `{src}`: {n_done} finished runs of {len(models)} models, {n_not} not finished. "
             f"Families: {fam_txt}.",
             "Intervals are 95%; slopes are per doubling of total parameters, accuracies in percentage points "
             "(pp). Paper: Nakamura et al., arXiv 2508.18672.", "",
             findings_table(findings), "", "## Per model (mean ± standard error over seeds)", "",
             models_table(table_order(models, fams))]
    if lr:
        parts += ["", "## Learning-rate scan", "", lr_table(lr)]
    parts += ["", "## How the verdicts are decided", "", RULES, ""]
    return "\n".join(parts)


def clean(x):
    """JSON-safe: nan/inf become null, numpy scalars plain numbers, tuples lists."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if np is not None and isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def stats_json(src, findings, models, n_done, n_not, fams, lr):
    return clean({
        "source": src, "finished_runs": n_done, "not_finished_runs": n_not, "families": fams,
        "settings": {"rng_seed": RNG_SEED, "n_boot": N_BOOT, "n_perm": N_PERM, "sparse_E": SPARSE_E,
                     "tpp_target": TPP_TARGET},
        "findings": findings,
        "models": [{k: m[k] for k in ("model", "families", "E", "K", "F", "total", "nonembed", "active_nonembed",
                                      "tokens", "tpp", "tpp_nonembed", "seeds", "stats")} for m in models],
        "lr_scan": lr})


# ----------------------------------------------------------------------------------------------
# figures

def note(what):
    print(f"study_report.py: {what}")


def label_E(m):
    return "dense" if m["E"] == 1 else f"E={m['E']}"


def family_line(ax, models, metric, xfn, color, label, scale=1.0, annotate=None):
    """Model means +- 1 se joined by a line, every seed a faint dot; False when nothing to draw."""
    pts = sorted(((xfn(m), values(m, metric), m) for m in models if xfn(m) and values(m, metric)),
                 key=lambda p: p[0])
    if not pts:
        return False
    for x, vs, _ in pts:
        ax.plot([x] * len(vs), [scale * v for v in vs], ".", color=color, alpha=0.3, ms=5, zorder=1)
    stats = [mean_se(vs) for _, vs, _ in pts]
    xs = [p[0] for p in pts]
    ms = [scale * s[0] for s in stats]
    es = [0.0 if math.isnan(s[1]) else scale * s[1] for s in stats]
    ax.errorbar(xs, ms, yerr=es, fmt="o-", color=color, ms=5, lw=1.5, capsize=3, label=label, zorder=2)
    if annotate:
        for x, y, (_, _, m) in zip(xs, ms, pts):
            ax.annotate(annotate(m), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    return True


def log2_axis(ax):
    from matplotlib.ticker import FuncFormatter
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))


def legend(ax):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def save(plt, fig, title, path):
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_families(plt, fam_models, metrics, xfn, xkind, xlabel, path, title, annotate):
    """One panel per metric, one line per family: fam_models = [(label, models)]."""
    from plot import grid, log_x
    panels = [(k, lab) for k, lab in metrics if any(values(m, k) for _, ms in fam_models for m in ms)]
    if not panels:
        note(f"no data for {os.path.basename(path)}; skipped")
        return None
    fig, axes = grid(plt, len(panels))
    xs_all = [xfn(m) for _, ms in fam_models for m in ms if xfn(m)]
    for ax, (key, lab) in zip(axes, panels):
        for i, (flab, ms) in enumerate(fam_models):
            family_line(ax, ms, key, xfn, f"C{i}", flab, 100.0 if is_acc(key) else 1.0, annotate)
        if xkind == "K":
            log2_axis(ax)
        else:
            log_x(ax, xs_all, xkind == "params")
        if xkind == "tpp":
            ax.axvline(TPP_TARGET, color="grey", ls="--", lw=1, label=f"{TPP_TARGET:g} tokens/param")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(lab)
        ax.set_title(lab, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    legend(axes[0])
    return save(plt, fig, title, path)


def plot_grpo(plt, models, label, path):
    tasks = [t for t in ("reason_id", "reason_shift") if any(values(m, f"grpo_{t}_acc") for m in models)]
    if not tasks:
        note(f"no grpo_<task>_acc columns in the main family; {os.path.basename(path)} skipped")
        return None
    from plot import log_x
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    total = lambda m: m["total"]  # noqa: E731
    for ax, t in zip(axes[0], tasks):
        family_line(ax, models, f"grpo0_{t}_acc", total, "C0", "before GRPO (step 0)", 100.0, label_E)
        family_line(ax, models, f"grpo_{t}_acc", total, "C3", "after GRPO", 100.0)
        log_x(ax, [m["total"] for m in models if m["total"]], True)
        ax.set_xlabel("total parameters")
        ax.set_ylabel(f"{t} accuracy (%)")
        ax.set_title(f"{t} accuracy (greedy)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        legend(ax)
    return save(plt, fig, f"{label}: GRPO post-training, before and after (does it rescue sparse models?)", path)


def plot_ttc(plt, models, label, path):
    ns = ttc_sizes(models)
    if not ns:
        note(f"no <task>_maj<n> columns in the main family; {os.path.basename(path)} skipped")
        return None
    from plot import grid, log_x
    show = [n for n in (1, 4, 32) if n in ns] + ([ns[-1]] if ns[-1] not in (1, 4, 32) else [])
    tasks = [t for t in ("reason_id", "facts") if ttc_sizes(models, t)]
    panels = [(t, kind) for t in tasks for kind in ("maj", "pass")] + [("reason_id", "vs_n")]
    fig, axes = grid(plt, len(panels))
    cmap = plt.get_cmap("viridis")
    total = lambda m: m["total"]  # noqa: E731
    for ax, (t, kind) in zip(axes, panels):
        if kind == "vs_n":
            for j, m in enumerate(models):
                pts = [(n, mean_se(values(m, f"{t}_maj{n}"))) for n in ns if values(m, f"{t}_maj{n}")]
                if pts:
                    ax.errorbar([n for n, _ in pts], [100 * s[0] for _, s in pts],
                                yerr=[0.0 if math.isnan(s[1]) else 100 * s[1] for _, s in pts], fmt="o-", ms=3,
                                lw=1.2, capsize=2, color=cmap(0.9 * j / max(1, len(models) - 1)), label=label_E(m))
            log2_axis(ax)
            ax.set_xlabel("samples n")
            ax.set_title(f"{t} majority vote@n, per model", fontsize=10)
        else:
            for j, n in enumerate(show):
                family_line(ax, models, f"{t}_{kind}{n}", total, cmap(0.9 * j / max(1, len(show) - 1)), f"n={n}", 100.0)
            log_x(ax, [m["total"] for m in models if m["total"]], True)
            ax.set_xlabel("total parameters")
            ax.set_title(f"{t} {'majority vote' if kind == 'maj' else 'pass'}@n", fontsize=10)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        legend(ax)
    return save(plt, fig, f"{label}: test-time compute (does more sampling rescue sparse models?)", path)


def make_figures(plt, models, fams, labels, out):
    main, small, tk = (family(models, fams[k]) for k in ("main", "small", "topk"))
    lab = lambda k: labels.get(fams[k], fams[k])  # noqa: E731
    by_size = [(lab("main"), main), (lab("small"), small)]
    made = [
        plot_families(plt, by_size, FIG_METRICS, lambda m: m["total"], "params", "total parameters",
                      os.path.join(out, "study_vs_total_params.png"),
                      "fixed compute: against total parameters (mean ± 1 se over seeds; dots: seeds)", label_E),
        plot_families(plt, [(lab("topk"), tk)], FIG_METRICS, lambda m: m["K"], "K", "top-k (K), K*F fixed",
                      os.path.join(out, "study_topk.png"), "top-k at fixed active parameters (mean ± 1 se)",
                      lambda m: f"K={m['K']}"),
        plot_grpo(plt, main, lab("main"), os.path.join(out, "study_grpo.png")),
        plot_ttc(plt, main, lab("main"), os.path.join(out, "study_ttc.png")),
        plot_families(plt, by_size, [FIG_METRICS[1], FIG_METRICS[0]], lambda m: m["tpp"], "tpp",
                      "tokens per parameter (tokens / total params)", os.path.join(out, "study_tpp.png"),
                      "against tokens per parameter (the paper: reasoning is best near 20)", label_E),
    ]
    return [p for p in made if p]


# ----------------------------------------------------------------------------------------------
# main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("input", help="a sweep directory (its results.csv) or a results.csv")
    ap.add_argument("--out", required=True, help="directory for verdict.md, stats.json and the PNGs")
    ap.add_argument("--lr-csv", help="the learning-rate scan's results.csv: adds the lr table")
    ap.add_argument("--main", default="E", help="the family that varies E at fixed active params (default E)")
    ap.add_argument("--topk", default="topk", help="the family that varies K (default topk)")
    ap.add_argument("--small", default="small", help="the smaller active size's E family (default small)")
    ap.add_argument("--no-figures", action="store_true", help="only verdict.md and stats.json")
    args = ap.parse_args(argv)
    plt = need_libraries()
    csv_path, plan_path = resolve_input(args.input)
    if not os.path.isfile(csv_path):
        print(f"study_report.py: no such file '{csv_path}'", file=sys.stderr)
        return 2
    if args.lr_csv and not os.path.isfile(args.lr_csv):
        print(f"study_report.py: no such file '{args.lr_csv}'", file=sys.stderr)
        return 2
    rows = read_csv(csv_path)
    plan = read_plan(plan_path)
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        note(f"'{csv_path}' has no finished runs; every finding is inconclusive")
    fams = {"main": args.main, "topk": args.topk, "small": args.small}
    labels = family_labels(plan, rows)
    models = group_models(done, plan)
    summarize(models, metric_columns(done))
    findings = analyze(models, fams)
    lr = lr_scan(args.lr_csv) if args.lr_csv else None
    n_not = len(rows) - len(done)

    os.makedirs(args.out, exist_ok=True)
    md = render(csv_path, findings, models, len(done), n_not, fams, labels, lr)
    with open(os.path.join(args.out, "verdict.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats_json(csv_path, findings, models, len(done), n_not, fams, lr), f, indent=1)
    made = [] if args.no_figures else make_figures(plt, models, fams, labels, args.out)
    print(findings_table(findings))
    print(f"\n{len(done)} finished runs of {len(models)} models, {n_not} not finished")
    for p in [os.path.join(args.out, "verdict.md"), os.path.join(args.out, "stats.json")] + made:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
