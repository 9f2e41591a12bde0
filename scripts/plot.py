#!/usr/bin/env python3
"""
Figures of a sweep (scripts/sweep.py): PNGs of the paper's plots in miniature.

    python3 scripts/plot.py out/sweeps/cpu_mini/results.csv --out out/sweeps/cpu_mini/figures

Writes to --out:
  vs_total_params.png  train loss, val loss and, per eval task, task loss and accuracy against total
                       parameters (log x), one line per family that varies E (one active size each),
                       points labelled with E; the dense model is the hollow marker
  vs_tpp.png           the same against tokens per parameter (training tokens / total params)
  topk.png             the same for families that vary K at fixed E and K*F (x = K)
  ttc.png              test-time compute (sweep config ttc_samples): majority-vote and pass@n
                       accuracy against total parameters (or K), one line per n, per family
  curves.png           val loss and task losses over training, every run (from the run logs)
  expert_load_<run>.png  the share of token slots each expert received (colour) over training
                       (x = step) for one run, one panel per layer, from the "router layer" lines
                       of its log.txt (default: the run with the most experts; --heatmap-run NAME)

GRPO post-training (train_moe -rl, dev/GRPO.md):

    python3 scripts/plot.py --grpo out/grpo/log.txt --out out/grpo

writes grpo.png: the reward (share of right samples) and the share of prompts with a right sample
over RL steps, the held-out greedy accuracy of each -ev task at its eval steps, and beside them the
KL to the reference, the clipped-token share, the mean response length and the policy's entropy.

Families come from plan.json next to the CSV (written by sweep.py); without it they are inferred
from the CSV's families column. Only finished runs (status done) are plotted unless --all.
Needs matplotlib (pip install matplotlib, or apt-get install python3-matplotlib for Debian's
/usr/bin/python3).
"""
import argparse
import csv
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def need_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"plot.py needs matplotlib, which {sys.executable} cannot import. Install it with\n"
              f"    {sys.executable} -m pip install matplotlib\n"
              f"or, for Debian's /usr/bin/python3:  apt-get install python3-matplotlib", file=sys.stderr)
        sys.exit(2)


def num(x):
    if x is None or x == "":
        return None
    try:
        v = float(x)
    except ValueError:
        return x
    return int(v) if v.is_integer() and "." not in x and "e" not in x.lower() else v


def read_rows(path):
    with open(path, newline="") as f:
        return [{k: num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def families_of(rows, plan):
    """[{name, label, kind, runs}] from plan.json, else inferred from the rows."""
    if plan and plan.get("families"):
        return plan["families"]
    fams = {}
    for r in rows:
        for f in str(r.get("families") or "").split(";"):
            if f:
                fams.setdefault(f, []).append(r)
    out = []
    for f, rs in fams.items():
        Es, Ks = {r["E"] for r in rs}, {r["K"] for r in rs}
        kind = "K" if len(Ks) > 1 and len(Es) == 1 else "E"
        out.append({"name": f, "label": f, "kind": kind, "runs": [r["name"] for r in rs]})
    return out


def task_names(rows):
    names = []
    for r in rows:
        for k in r:
            if k.endswith("_bpt") and k[:-4] not in names:
                names.append(k[:-4])
    order = {"mem": 0, "reason": 1, "triviaqa": 2, "gsm8k": 3}
    return sorted(names, key=lambda t: (order.get(t, 9), t))


def metrics(rows, loss):
    m = [("train_loss", "train loss (ce, nats/token)"), ("val_loss", "val loss (nats/token)")]
    for t in task_names(rows):
        unit = "bits/token" if loss == "bpt" else "bits/byte"
        m.append((f"{t}_{loss}", f"{t} task loss ({unit})"))
        m.append((f"{t}_acc", f"{t} accuracy (greedy)"))
    return [(k, lab) for k, lab in m if any(r.get(k) is not None for r in rows)]


def grid(plt, n, w=4.2, h=3.3):
    cols = 2 if n <= 4 else (3 if n <= 9 else 4)
    # pairs (loss, accuracy) read best side by side: 2 columns while they fit
    if n in (6, 8):
        cols = 2
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(w * cols, h * rows_), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def fmt_params(x, _pos=None):
    if x >= 1e9:
        return f"{x / 1e9:g}B"
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def log_x(ax, xs, params):
    """Log x axis with readable labels: majors as 1M / 0.01, minors 2x 3x 5x only where the data
    spans under ~1.5 decades (all of them under half a decade; elsewhere they collide)."""
    from matplotlib.ticker import FuncFormatter
    ax.set_xscale("log")
    f = fmt_params if params else (lambda x, _=None: f"{x:.3g}")
    ax.xaxis.set_major_formatter(FuncFormatter(f))
    span = math.log10(max(xs) / min(xs)) if xs and min(xs) > 0 else 9
    show = (2, 3, 4, 5, 6, 7, 8, 9) if span < 0.5 else ((2, 3, 5) if span < 1.5 else ())

    def minor(x, _pos):
        mant = round(x / 10 ** math.floor(math.log10(x) + 1e-9), 3) if x > 0 else 0
        return f(x) if mant in show else ""
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="x", which="both", labelsize=8)


def plot_vs(plt, rows, fams, mets, xkey, xlabel, path, title, kind="E", annotate="E"):
    from matplotlib.ticker import FuncFormatter
    fams = [f for f in fams if f["kind"] == kind]
    by_name = {r["name"]: r for r in rows}
    if not fams:
        return None
    fig, axes = grid(plt, len(mets))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, lab) in zip(axes, mets):
        for i, fam in enumerate(fams):
            pts = [by_name[n] for n in fam["runs"] if n in by_name and by_name[n].get(key) is not None
                   and by_name[n].get(xkey)]
            pts.sort(key=lambda r: r[xkey])
            if not pts:
                continue
            c = colors[i % len(colors)]
            xs, ys = [r[xkey] for r in pts], [r[key] for r in pts]
            ax.plot(xs, ys, "-", color=c, lw=1.5, label=fam.get("label", fam["name"]), zorder=2)
            for r in pts:
                dense = r["E"] == 1
                ax.plot(r[xkey], r[key], "o", ms=6, color=c, mfc="white" if dense else c, mew=1.5, zorder=3)
                ax.annotate(f"{annotate}={r[annotate]}" if annotate == "K" else ("dense" if dense else f"E={r['E']}"),
                            (r[xkey], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
        if kind == "K":
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        else:
            log_x(ax, [r[xkey] for r in rows if r.get(xkey)], xkey.endswith("params"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(lab)
        ax.set_title(lab, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if key.endswith("_acc"):
            top = max([r.get(key) or 0 for r in rows] + [0])
            ax.set_ylim(-0.01 * max(top, 0.05), max(0.05, 1.15 * top))
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_log(path):
    from sweep import parse_log as pl  # one parser for both scripts
    return pl(path)


def plot_ttc(plt, rows, fams, path):
    """Test-time compute: majority-vote and pass@n accuracy against total parameters, one line per
    n, one row of panels per family that varies E (or K)."""
    from matplotlib.ticker import FuncFormatter
    tasks = [t for t in task_names(rows) if any(k.startswith(f"{t}_maj") for r in rows for k in r)]
    if not tasks:
        return None
    ns = sorted({int(k.rsplit("_maj", 1)[1]) for r in rows for k in r if "_maj" in k and r.get(k) is not None})
    fams = [f for f in fams if f["kind"] in ("E", "K")]
    by_name = {r["name"]: r for r in rows}
    cols = [(t, m) for t in tasks for m in ("maj", "pass")]
    fig, axes = plt.subplots(len(fams), len(cols), figsize=(3.6 * len(cols), 3.0 * len(fams)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for fi, fam in enumerate(fams):
        xkey = "K" if fam["kind"] == "K" else "total_params"
        pts = sorted((by_name[n] for n in fam["runs"] if n in by_name), key=lambda r: r[xkey])
        for ci, (t, m) in enumerate(cols):
            ax = axes[fi][ci]
            top = 0.0
            for j, nn in enumerate(ns):
                xy = [(r[xkey], r.get(f"{t}_{m}{nn}")) for r in pts if r.get(f"{t}_{m}{nn}") is not None]
                if not xy:
                    continue
                top = max(top, max(y for _, y in xy))
                ax.plot([x for x, _ in xy], [y for _, y in xy], "o-", ms=3, lw=1.2,
                        color=cmap(j / max(1, len(ns) - 1) * 0.9), label=f"n={nn}")
            if xkey == "K":
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
                ax.set_xlabel("top-k (K)")
            else:
                log_x(ax, [r[xkey] for r in pts], True)
                ax.set_xlabel("total parameters")
            ax.set_ylim(-0.01 * max(top, 0.05), max(0.05, 1.15 * top))
            ax.set_title(f"{fam.get('label', fam['name'])}: {t} {'majority vote' if m == 'maj' else 'pass'}@n",
                         fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(labelsize=8)
        axes[fi][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("test-time compute: n sampled answers per item (does more sampling rescue sparse models?)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(plt, rows, fams, runs_dir, path, loss):
    logs = {}
    for r in rows:
        p = os.path.join(runs_dir, r["name"], "log.txt")
        if os.path.exists(p) or os.path.exists(p + ".gz"):  # results_dir keeps logs gzipped
            logs[r["name"]] = parse_log(p)
    if not logs:
        return None
    tasks = task_names(rows)
    panels = [("val", None, "val loss (nats/token)")] + [("task", t, f"{t} task loss ({loss})") for t in tasks]
    fig, axes = grid(plt, len(panels))
    fam_of = {}
    for i, f in enumerate(fams):
        for n in f["runs"]:
            fam_of.setdefault(n, i)
    cmaps = ["Blues", "Oranges", "Greens", "Reds", "Purples", "Greys"]
    for ax, (kind, t, lab) in zip(axes, panels):
        for fi, f in enumerate(fams):
            members = [r for r in rows if r["name"] in f["runs"] and r["name"] in logs and fam_of.get(r["name"]) == fi]
            members.sort(key=lambda r: (r["E"], r["K"]))
            cmap = plt.get_cmap(cmaps[fi % len(cmaps)])
            for j, r in enumerate(members):
                lg = logs[r["name"]]
                tok = r["B"] * r["T"] * (r.get("grad_accum") or 1)
                if kind == "val":
                    pts = sorted(lg["val"].items())
                else:
                    pts = sorted((s, v[t][loss]) for s, v in lg["task"].items() if t in v)
                if not pts:
                    continue
                col = cmap(0.35 + 0.6 * (j + 1) / (len(members) + 1))
                ax.plot([s * tok for s, _ in pts], [v for _, v in pts], "-", color=col, lw=1.2,
                        label=f"{f['name']} E={r['E']} K={r['K']}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(lab)
        ax.set_title(lab, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("over training (one line per run; colour = family, darker = larger E or K)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(plt, run_dir, name, path, layer=None):
    lg = parse_log(os.path.join(run_dir, "log.txt"))
    steps = sorted(lg["router"])
    if not steps:
        print(f"plot.py: {name}: no 'router layer' lines in its log.txt; no heatmap", file=sys.stderr)
        return None
    layers = sorted({l for s in steps for l in lg["router"][s]})
    if layer is not None:
        if layer not in layers:
            print(f"plot.py: {name} has no layer {layer} (layers {layers})", file=sys.stderr)
            return None
        layers = [layer]
    E = len(lg["router"][steps[0]][layers[0]][0])
    n = len(layers)
    cols = min(n, 4)
    rws = math.ceil(n / cols)
    fig, axes = plt.subplots(rws, cols, figsize=(max(4.5, 0.35 * len(steps) + 2.5) * cols,
                                                  max(3.0, 0.13 * E + 1.8) * rws), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    vmax = 0.0
    mats = []
    for l in layers:
        m = []
        for s in steps:
            loads = lg["router"][s].get(l, ([0] * E,))[0]
            tot = sum(loads) or 1
            m.append([x / tot for x in loads])
        mat = [[m[j][e] for j in range(len(steps))] for e in range(E)]  # [expert][step]
        vmax = max(vmax, max(max(row) for row in mat))
        mats.append(mat)
    # edges between the logged steps, so each column spans its step
    edges = [0.5 * (steps[0] + 0)] if len(steps) == 1 else []
    if len(steps) > 1:
        mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
        edges = [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]
    else:
        edges = [steps[0] * 0.5, steps[0] * 1.5]
    for ax, l, mat in zip(flat, layers, mats):
        im = ax.pcolormesh(edges, [e - 0.5 for e in range(E + 1)], mat, cmap="viridis", vmin=0, vmax=vmax,
                           shading="flat")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"layer {l}", fontsize=10)
        ax.set_ylim(E - 0.5, -0.5)
        if E <= 16:
            ax.set_yticks(range(E))
        cb = fig.colorbar(im, ax=ax, fraction=0.07, pad=0.03)
        cb.set_label(f"share of token slots (uniform = 1/{E} = {1 / E:.3g})", fontsize=8)
    fig.suptitle(f"expert load over training: {name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_grpo_log(path):
    """The 'step N rl key value ...' lines and the 'step N task NAME ... acc X' lines of a GRPO
    run's log.txt: (dict key -> [(step, value)], dict task -> [(step, accuracy)])."""
    rl, acc = {}, {}
    with open(path) as f:
        for line in f:
            w = line.split()
            if len(w) >= 4 and w[0] == "step" and w[2] == "rl":
                step = int(w[1])
                for k, v in zip(w[3::2], w[4::2]):
                    rl.setdefault(k, []).append((step, float(v)))
            elif len(w) >= 5 and w[0] == "step" and w[2] == "task" and "acc" in w:
                acc.setdefault(w[3], []).append((int(w[1]), float(w[w.index("acc") + 1])))
    return rl, acc


def smooth(ys, n):
    """Running mean over the last n values (n = 1: the values)."""
    out, s = [], 0.0
    for i, y in enumerate(ys):
        s += y
        if i >= n:
            s -= ys[i - n]
        out.append(s / min(i + 1, n))
    return out


def plot_grpo(plt, log_path, out_dir):
    rl, acc = read_grpo_log(log_path)
    if "reward" not in rl:
        print(f"plot.py: '{log_path}' has no 'step N rl ...' lines (a train_moe -rl log)", file=sys.stderr)
        return None
    n = max(1, len(rl["reward"]) // 40)  # smoothing window: about 40 points across
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    for key, label, colour in (("reward", "reward (right samples)", "C0"), ("solved", "prompts with a right sample", "C1")):
        xs, ys = zip(*rl[key])
        ax.plot(xs, ys, color=colour, alpha=0.2, lw=0.8)
        ax.plot(xs, smooth(list(ys), n), color=colour, lw=1.6, label=label + (f", mean of {n}" if n > 1 else ""))
    ax.set_title("rollouts (training prompts)")
    ax.set_ylim(0, 1)
    ax = axes[1]
    for i, (task, pts) in enumerate(sorted(acc.items())):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o-", ms=3, color=f"C{i + 2}", label=task)
    ax.set_title("held-out greedy accuracy")
    top = max((y for pts in acc.values() for _, y in pts), default=1.0)
    ax.set_ylim(0, min(1.0, max(0.1, 1.5 * top)))
    for ax, keys, title in ((axes[2], (("kl", "KL to the reference (k3)"), ("clip", "clipped token share")), "KL and clipping"),
                            (axes[3], (("len", "response tokens"), ("entropy", "entropy (nats)")), "responses")):
        twin = None
        for j, (key, label) in enumerate(keys):
            if key not in rl:
                continue
            a = ax if j == 0 else (twin or ax.twinx())
            if j:
                twin = a
            xs, ys = zip(*rl[key])
            a.plot(xs, smooth(list(ys), n), color=f"C{j + 4}", lw=1.4, label=label)
            a.set_ylabel(label, color=f"C{j + 4}")
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    if acc:
        axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"GRPO: {log_path}", fontsize=10)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "grpo.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("csv", nargs="?", help="results.csv of a sweep")
    ap.add_argument("--grpo", metavar="LOG", help="plot a GRPO run's log.txt instead (grpo.png in --out)")
    ap.add_argument("--runs", help="the sweep directory holding the run directories (default: the CSV's directory)")
    ap.add_argument("--out", required=True, help="directory for the PNGs")
    ap.add_argument("--heatmap-run", help="run name(s) for the expert-load heatmap, comma-separated "
                    "(default: the finished run with the most experts)")
    ap.add_argument("--layer", type=int, help="only this layer in the heatmap (default: one panel per layer)")
    ap.add_argument("--loss", choices=("bpt", "bpb"), default="bpt", help="task loss in bits per token (default) or per byte")
    ap.add_argument("--all", action="store_true", help="plot unfinished runs too")
    args = ap.parse_args(argv)

    if args.grpo:
        if not os.path.isfile(args.grpo):
            print(f"plot.py: no such file '{args.grpo}'", file=sys.stderr)
            return 2
        made = plot_grpo(need_matplotlib(), args.grpo, args.out)
        if made:
            print(f"wrote {made}")
        return 0 if made else 1
    if not args.csv:
        ap.error("a results.csv (or --grpo LOG) is needed")
    if not os.path.isfile(args.csv):
        print(f"plot.py: no such file '{args.csv}'", file=sys.stderr)
        return 2
    plt = need_matplotlib()
    runs_dir = args.runs or os.path.dirname(os.path.abspath(args.csv))
    rows = read_rows(args.csv)
    if not args.all:
        rows = [r for r in rows if r.get("status") == "done"]
    if not rows:
        print(f"plot.py: '{args.csv}' has no finished runs to plot", file=sys.stderr)
        return 1
    plan = None
    pj = os.path.join(os.path.dirname(os.path.abspath(args.csv)), "plan.json")
    if os.path.exists(pj):
        with open(pj) as f:
            plan = json.load(f)
    fams = families_of(rows, plan)
    mets = metrics(rows, args.loss)
    os.makedirs(args.out, exist_ok=True)
    name = plan["name"] if plan else os.path.basename(runs_dir)
    budget = f", {plan['budget_flops']:.2g} FLOPs per run" if plan else ""
    made = []
    made.append(plot_vs(plt, rows, fams, mets, "total_params", "total parameters",
                        os.path.join(args.out, "vs_total_params.png"),
                        f"{name}: fixed compute{budget}, against total parameters (one line per active size)"))
    made.append(plot_vs(plt, rows, fams, mets, "tpp", "tokens per parameter (tokens / total params)",
                        os.path.join(args.out, "vs_tpp.png"), f"{name}: against tokens per parameter{budget}"))
    made.append(plot_vs(plt, rows, fams, mets, "K", "top-k (K), K*F fixed", os.path.join(args.out, "topk.png"),
                        f"{name}: top-k at fixed active parameters{budget}", kind="K", annotate="K"))
    made.append(plot_ttc(plt, rows, fams, os.path.join(args.out, "ttc.png")))
    made.append(plot_curves(plt, rows, fams, runs_dir, os.path.join(args.out, "curves.png"), args.loss))
    if args.heatmap_run:
        hm = args.heatmap_run.split(",")
    else:
        cand = sorted(rows, key=lambda r: (-r["E"], -r["total_params"]))
        hm = [cand[0]["name"]] if cand and cand[0]["E"] > 1 else []
    for h in hm:
        rd = os.path.join(runs_dir, h)
        if not os.path.isdir(rd):
            print(f"plot.py: no run directory '{rd}' for the heatmap", file=sys.stderr)
            return 2
        made.append(plot_heatmap(plt, rd, h, os.path.join(args.out, f"expert_load_{h}.png"), args.layer))
    for p in made:
        if p:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
