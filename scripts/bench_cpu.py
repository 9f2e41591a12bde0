#!/usr/bin/env python3
"""
CPU benchmark: train_moe (C; the built-in GEMM, and the OpenBLAS build train_moe_blas where it
exists) vs the PyTorch reference (dev/moe_ref.py) on the same configuration, the same thread count
and the same kind of batches, in one command. Prints the processor, the machine's sgemm limit (a
large fp32 matmul with the same threads through every BLAS at hand: PyTorch's, numpy's own and the
system's OpenBLAS; the best of them, named), and per configuration each side's median step time,
tokens/s, model FLOP/s and its share of that limit, the ratio to PyTorch, and peak memory (max RSS).
A share above 100% is flagged: it means the limit was measured too low, not that a side beat it.

    python3 scripts/bench_cpu.py                    # every configuration, 5 alternating repeats
    python3 scripts/bench_cpu.py --configs default --steps 12 --threads 2 --repeats 3

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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import flops_per_token  # noqa: E402  (train_moe.cu's count: 6 x matmul params + attention)
from sweep import trainer_env  # noqa: E402  (OpenBLAS's AVX-512 kernels for the BLAS build, as the sweeps run it)

# name: (L, C, H, Hkv, E, K, F, B, T); V = 4096 (the bundled tokenizer's)
CONFIGS = {
    "default": (4, 128, 4, 4, 8, 2, 256, 16, 128),
    "large": (4, 512, 4, 4, 16, 2, 1024, 4, 512),
    "E8": (2, 256, 4, 4, 8, 2, 512, 16, 256),
    "E64": (2, 256, 4, 4, 64, 2, 512, 16, 256),
}
V = 4096


def cpu_model():
    """The processor's name and the vector extensions that matter for sgemm."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]
    return f"{name} ({', '.join(ext) or 'no AVX'})", flags


SGEMM_N = 2048


def numpy_blas(np, threads):
    """numpy's own BLAS: its name and version, and for the OpenBLAS a numpy wheel bundles (symbols prefixed
    scipy_openblas, 64-bit ints) the kernels it chose; its thread count is set here as well as by
    OPENBLAS_NUM_THREADS in the environment."""
    import ctypes
    import glob
    what = f"numpy {np.__version__}'s BLAS"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        what = f"numpy {np.__version__}'s {blas['name']} {blas['version']}"
    except Exception:  # noqa: BLE001  (older numpy: no dict mode; the name is cosmetic)
        pass
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*")):
        lib = ctypes.CDLL(path)
        for suffix in ("64_", ""):
            get = getattr(lib, f"scipy_openblas_get_corename{suffix}", None)
            put = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
            if get is not None:
                get.restype = ctypes.c_char_p
                if put is not None:
                    put(ctypes.c_int(threads))
                return f"{what}, {get().decode()} kernels"
    return what


def sgemm_child(backend, threads):
    """Runs in a subprocess: GFLOP/s of the best of 8 fp32 C = A.B^T, N = SGEMM_N, on `threads` threads,
    through `backend`: torch (PyTorch's BLAS, MKL on x86), numpy (numpy's own, an OpenBLAS in PyPI's
    wheels) or openblas (the system's libopenblas, through ctypes)."""
    n = SGEMM_N
    if backend == "torch":
        import torch
        torch.set_num_threads(threads)
        a, b = torch.randn(n, n), torch.randn(n, n)
        run = lambda: a @ b.T  # noqa: E731
        what = f"torch {torch.__version__}"
    elif backend == "numpy":
        import numpy as np
        what = numpy_blas(np, threads)
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
        c = np.zeros((n, n), np.float32)
        run = lambda: np.matmul(a, b.T, out=c)  # noqa: E731
    else:
        import ctypes
        import ctypes.util
        import numpy as np
        lib = ctypes.CDLL(ctypes.util.find_library("openblas") or "libopenblas.so.0")
        lib.openblas_set_num_threads(threads)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
        c = np.zeros((n, n), np.float32)
        # cblas_sgemm(RowMajor=101, NoTrans=111, Trans=112, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                                         ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                                                         ctypes.c_void_p, ctypes.c_int]
        run = lambda: lib.cblas_sgemm(101, 111, 112, n, n, n, 1.0, a.ctypes.data, n, b.ctypes.data, n, 0.0,  # noqa: E731
                                      c.ctypes.data, n)
        what = f"the system's OpenBLAS ({lib.openblas_get_corename().decode()} kernels)"
    run()
    best = min(timed(run) for _ in range(8))
    print(json.dumps({"gflops": 2.0 * n ** 3 / best / 1e9, "what": what}))


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# backend: what it is called when it cannot be measured
SGEMM_BACKENDS = {"torch": "PyTorch's BLAS", "numpy": "numpy's BLAS", "openblas": "the system's OpenBLAS"}
AVX512_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")  # OpenBLAS kernel sets with AVX-512


def sgemm_run(backend, threads, python, extra=None):
    """(GFLOP/s, which) of one sgemm_child in a subprocess; (0.0, why not) when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), **(extra or {}))
    out = subprocess.run([python, os.path.abspath(__file__), "--sgemm", backend, "--threads", str(threads)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return 0.0, f"{SGEMM_BACKENDS[backend]}: not measured ({(out.stderr.strip().splitlines() or ['failed'])[-1]})"
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["gflops"], r["what"] + "".join(f" ({k}={v})" for k, v in (extra or {}).items())


def sgemm_limit(threads, python, avx512):
    """sgemm GFLOP/s through every BLAS at hand, a list of (GFLOP/s, which; 0 where it could not be
    measured): PyTorch's, numpy's own and the system's OpenBLAS, each OpenBLAS with its default kernels
    and, on an AVX-512 machine where it chose others, its SkylakeX ones (OpenBLAS 0.3.21 picks AVX2
    kernels on AMD Zen 4/5). The limit is the best of them (best_limit): one BLAS alone can be far
    below the machine's speed (PyTorch's MKL at 198 GFLOP/s where numpy's OpenBLAS does 433 on an AMD EPYC)."""
    found = []
    for backend in SGEMM_BACKENDS:
        g, what = sgemm_run(backend, threads, python)
        found.append((g, what))
        if avx512 and backend != "torch" and g > 0 and not any(c in what for c in AVX512_CORES):
            found.append(sgemm_run(backend, threads, python, {"OPENBLAS_CORETYPE": "SkylakeX"}))
    return found


def best_limit(found):
    """(GFLOP/s, which) of the fastest BLAS in sgemm_limit's list; (0.0, reason) when none was measured."""
    best = max(found, key=lambda r: r[0], default=(0.0, "no BLAS"))
    return best if best[0] > 0 else (0.0, "no BLAS could be measured")


def fmt_share(gflops, limit):
    """The 'of limit' cell (8 characters) and a note for the row's end: a share above 100% (as printed)
    means the limit was measured too low, so it is never printed without saying so."""
    if not limit or limit <= 0:
        return f"{'?':>8}", "no sgemm limit measured"
    pct = 100.0 * gflops / limit
    cell = f"{pct:7.0f}%"
    return cell, (">100%: limit underestimated" if round(pct) > 100 else "")


def run_c(cfg, steps, threads, binary="train_moe"):
    L, C, H, Hkv, E, K, F, B, T = cfg
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", os.path.join(ROOT, binary),
           "-nl", str(L), "-nc", str(C), "-nh", str(H), "-nkv", str(Hkv), "-ne", str(E), "-nk", str(K),
           "-nf", str(F), "-nv", str(V), "-b", str(B), "-t", str(T), "-x", str(steps),
           "-v", "0", "-s", "0", "-u", "1000"]
    env = trainer_env(binary, dict(os.environ, OMP_NUM_THREADS=str(threads)))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{binary} failed:\n" + out.stdout + out.stderr)
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
    ap.add_argument("--repeats", type=int, default=5, help="alternate the sides' runs this many times (noisy machines)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--builds", default="train_moe,train_moe_blas",
                    help="C binaries to time (a missing train_moe_blas is built with make USE_BLAS=1 if it can be)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with the torch to compare against")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sgemm", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return torch_child(CONFIGS[a.child], a.steps, a.threads)
    if a.sgemm:
        return sgemm_child(a.sgemm, a.threads)
    builds = []
    for b in a.builds.split(","):
        if not os.path.exists(os.path.join(ROOT, b)):
            r = subprocess.run(["make", "-C", ROOT, b], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"note: {b} could not be built ({(r.stderr.strip().splitlines() or ['?'])[-1]}): not timed")
                continue
        builds.append(b)
    cpu, flags = cpu_model()
    print(f"cpu: {cpu}, {a.threads} threads")
    limits = sgemm_limit(a.threads, a.python, "avx512f" in flags)
    for g, what in limits:
        print(f"sgemm {SGEMM_N}^3 fp32, {a.threads} threads: " + (f"{g:6.1f} GFLOP/s through {what}" if g else what))
    limit, limit_what = best_limit(limits)
    print(f"sgemm limit (the best of those): {limit:.1f} GFLOP/s, through {limit_what}" if limit else
          f"sgemm limit: not measured ({limit_what}); no share of it is printed")
    print(f"{a.steps} steps per run, median of steps {a.warmup + 1}..{a.steps}, median over {a.repeats} alternating "
          f"run(s) per side; GF/s = model FLOP/s (bench_gpu.flops_per_token x tokens / step time)")
    sides = builds + ["torch"]
    hdr = f"{'config':8} {'side':15} | {'ms/step':>8} {'spread':>6} {'tok/s':>7} {'GF/s':>6} {'of limit':>8} {'RSS MiB':>7} | {'vs torch':>8}"
    print(hdr)
    print("-" * len(hdr))
    rows = {}
    t = {"torch": "?"}
    for name in a.configs.split(","):
        cfg = CONFIGS[name]
        L, C, H, Hkv, E, K, F, B, T = cfg
        meds = {sd: [] for sd in sides}
        rss = {sd: 0 for sd in sides}
        for _ in range(a.repeats):  # alternate the sides so drifting machine load hits them alike
            for sd in sides:
                if sd == "torch":
                    t = run_torch(name, a.steps, a.threads, a.python)
                    ms, r = t["ms"], t["rss"]
                else:
                    ms, r = run_c(cfg, a.steps, a.threads, sd)
                meds[sd].append(statistics.median(ms[a.warmup:]))
                rss[sd] = max(rss[sd], r)
        fpt = flops_per_token(L, C, H, Hkv, E, K, F, V, T)
        tmed = statistics.median(meds["torch"])
        for sd in sides:
            m = statistics.median(meds[sd])
            spread = (max(meds[sd]) - min(meds[sd])) / m
            gf = fpt * B * T / (m / 1e3) / 1e9
            rows[(name, sd)] = (m, rss[sd])
            vs = "" if sd == "torch" else f"{tmed / m:7.2f}x"
            share, flag = fmt_share(gf, limit)
            notes = ([flag] if flag else []) + (["repeats spread widely: a noisy machine"] if spread > 0.15 else [])
            print(f"{name:8} {sd:15} | {m:8.1f} {100 * spread:5.0f}% {B * T / m * 1e3:7.0f} {gf:6.1f} {share} "
                  f"{rss[sd] / 2**20:7.0f} | {vs:>8}" + ("   <- " + "; ".join(notes) if notes else ""))
        sys.stdout.flush()
    print(f"(torch {t['torch']}; vs torch = PyTorch ms / this side's ms; spread = (max - min) / median of the repeats)")
    if all((n, b) in rows for n in ("E8", "E64") for b in builds[:1]):
        (m8, r8), (m64, r64) = rows[("E8", builds[0])], rows[("E64", builds[0])]
        L, C, H, Hkv, E8, K, F, B, T = CONFIGS["E8"]
        extra = L * (CONFIGS["E64"][4] - E8) * 3 * F * C  # extra expert parameters
        print(f"{builds[0]} E=64 vs E=8 (same K, F): step time ratio {m64 / m8:.2f} | peak RSS +{(r64 - r8) / 2**20:.0f} MiB; "
              f"the extra parameters with their gradient and AdamW m, v are {extra * 16 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
