#!/usr/bin/env python3
"""
CPU benchmark: train_moe (C) vs the PyTorch reference (dev/moe_ref.py) on the same configuration,
the same thread count and the same kind of batches, in one command. Prints the median step time,
tokens/s, their ratio and peak memory (max RSS) of each side.

    python3 scripts/bench_cpu.py                    # the three configurations of the CPU issue
    python3 scripts/bench_cpu.py --configs default --steps 12 --threads 2

The C side runs ./train_moe as a subprocess (random init, no eval, no sampling) and reads its
per-step "ms" figures; the PyTorch side runs the reference forward + autograd backward +
torch.optim.AdamW in a fresh subprocess, so each peak RSS is that side's alone.
The first `--warmup` steps of each side are left out of the median.
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (L, C, H, Hkv, E, K, F, B, T); V = 4096 (the bundled tokenizer's)
CONFIGS = {
    "default": (4, 128, 4, 4, 8, 2, 256, 16, 128),
    "large": (4, 512, 4, 4, 16, 2, 1024, 4, 512),
    "E8": (2, 256, 4, 4, 8, 2, 512, 16, 256),
    "E64": (2, 256, 4, 4, 64, 2, 512, 16, 256),
}
V = 4096


def run_c(cfg, steps, threads):
    L, C, H, Hkv, E, K, F, B, T = cfg
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", os.path.join(ROOT, "train_moe"),
           "-nl", str(L), "-nc", str(C), "-nh", str(H), "-nkv", str(Hkv), "-ne", str(E), "-nk", str(K),
           "-nf", str(F), "-nv", str(V), "-b", str(B), "-t", str(T), "-x", str(steps),
           "-v", "0", "-s", "0", "-u", "1000"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("train_moe failed:\n" + out.stdout + out.stderr)
    ms = [float(x) for x in re.findall(r"\| ([0-9.]+) ms \|", out.stdout)]
    rss = int(re.search(r"MAXRSS_KB (\d+)", out.stderr).group(1)) * 1024
    return ms, rss


def torch_child(cfg, steps, threads):
    """Runs in a subprocess: reference training steps, prints JSON with the step times and max RSS."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "dev"))
    import moe_ref
    torch.set_num_threads(threads)
    L, C, H, Hkv, E, K, F, B, T = cfg
    mc = moe_ref.make_config(V, T, L, C, H, Hkv, E, K, F)
    params = {k: t.requires_grad_(True) for k, t in moe_ref.init_params(mc, 1337, 0.02).items()}
    decay = [params[k] for k in params if k in moe_ref.MATRICES]
    no_decay = [params[k] for k in params if k not in moe_ref.MATRICES]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    ms = []
    for _ in range(steps):
        tok = torch.randint(0, V, (B, T + 1), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = moe_ref.forward(mc, params, tok[:, :T], tok[:, 1:])
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        ms.append((time.perf_counter() - t0) * 1e3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ms": ms, "rss": rss, "torch": torch.__version__}))


def run_torch(name, steps, threads, python):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([python, os.path.abspath(__file__), "--child", name, "--steps", str(steps),
                          "--threads", str(threads)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("PyTorch reference failed:\n" + out.stdout + out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="default,large,E8,E64")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternate C and PyTorch runs this many times (noisy machines)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", default=sys.executable, help="interpreter with the torch to compare against")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return torch_child(CONFIGS[a.child], a.steps, a.threads)
    if not os.path.exists(os.path.join(ROOT, "train_moe")):
        subprocess.run(["make", "-C", ROOT, "train_moe"], check=True)
    rows = {}
    print(f"threads {a.threads}, {a.steps} steps per run, median of steps {a.warmup + 1}..{a.steps}, "
          f"median over {a.repeats} alternating run(s) per side")
    hdr = f"{'config':8} {'L/C/E/K/F B x T':>24} | {'C ms':>8} {'C tok/s':>9} {'C RSS MiB':>9} | " \
          f"{'torch ms':>8} {'torch tok/s':>11} {'torch RSS MiB':>13} | {'ratio':>5}"
    print(hdr)
    print("-" * len(hdr))
    for name in a.configs.split(","):
        cfg = CONFIGS[name]
        L, C, H, Hkv, E, K, F, B, T = cfg
        cmeds, tmeds, crss, trss = [], [], 0, 0
        for _ in range(a.repeats):  # alternate the two sides so drifting machine load hits both alike
            cms, rss = run_c(cfg, a.steps, a.threads)
            cmeds.append(statistics.median(cms[a.warmup:]))
            crss = max(crss, rss)
            t = run_torch(name, a.steps, a.threads, a.python)
            tmeds.append(statistics.median(t["ms"][a.warmup:]))
            trss = max(trss, t["rss"])
        cmed, tmed = statistics.median(cmeds), statistics.median(tmeds)
        ntok = B * T
        rows[name] = (cmed, crss)
        print(f"{name:8} {f'{L}/{C}/{E}/{K}/{F} {B}x{T}':>24} | {cmed:8.1f} {ntok / cmed * 1e3:9.0f} {crss / 2**20:9.0f} | "
              f"{tmed:8.1f} {ntok / tmed * 1e3:11.0f} {trss / 2**20:13.0f} | {tmed / cmed:5.2f}x")
        sys.stdout.flush()
    print(f"(torch {t['torch']}; ratio = train_moe tok/s / PyTorch tok/s)")
    if "E8" in rows and "E64" in rows:
        (m8, r8), (m64, r64) = rows["E8"], rows["E64"]
        L, C, H, Hkv, E8, K, F, B, T = CONFIGS["E8"]
        E64 = CONFIGS["E64"][4]
        extra = L * (E64 - E8) * 3 * F * C  # extra expert parameters
        print(f"E=64 vs E=8 (same K, F): step time ratio {m64 / m8:.2f} | peak RSS +{(r64 - r8) / 2**20:.0f} MiB; "
              f"the extra parameters with their gradient and AdamW m, v are {extra * 16 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
