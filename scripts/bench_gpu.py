#!/usr/bin/env python3
"""
GPU benchmark: train_moe_cu (the CUDA trainer, bf16) vs the PyTorch reference (dev/moe_ref.py) on the
same GPU, eager and torch.compile, in one command. One table row per configuration: each side's median
step time, tokens/s, bf16 MFU and peak GPU memory, and train_moe_cu's tok/s over each PyTorch mode's;
then the targets (>= 40% MFU on d1024-E8-k2; >= 2x eager and >= 1.2x compiled tok/s everywhere).

    python3 scripts/bench_gpu.py                                      # the three configurations of the issue
    python3 scripts/bench_gpu.py --configs tiny --steps 8 --warmup 3  # smoke test (~1-2 min, compile)
    python3 scripts/bench_gpu.py --configs d1024-E8-k2:4 --modes c    # another batch size, the C side only
    python3 scripts/bench_gpu.py --batch 1 --json out/bench_gpu.json  # B=1 everywhere, every figure saved

Configurations (the paper's shapes): T=4096, L=16, head size 128 (H = Hkv = C/128), F=2C, V=32768:
d512-E16-k2, d1024-E8-k2 and d1024-E32-k8 (C-E-K); `tiny` is a small one for smoke tests. NAME:B in
--configs sets one configuration's batch size, --batch all of them; else each has its default (CONFIGS).

The sides
- c: ./train_moe_cu (the default --trainer is made with `make -f dev/cuda_build.mk train_moe_cu` first:
  built when missing, rebuilt when stale) with the shape flags, a random init, no val loss, no samples,
  no checkpoints (no -o), on the bundled shards (ids < 4096, valid for any V >= 4096). Step times are its own
  per-step "ms" (between two cudaDeviceSynchronize: data, forward, backward, clipping, AdamW); its peak
  memory is its "peak gpu memory" line: device memory in use (cudaMemGetInfo, CUDA context included).
- eager / compile: a fresh subprocess per run: moe_ref.init_params moved to the GPU (fp32 master
  params), moe_ref.forward (torch.compile(moe_ref.forward) in compile mode) under
  torch.autocast("cuda", bfloat16), loss.backward(), clip_grad_norm_(1.0), torch.optim.AdamW (fused
  where available); batches are random windows of the same shards. Each step is timed between two
  torch.cuda.synchronize(); peak memory is torch.cuda.max_memory_allocated() (tensors only; the
  device-in-use peak measured as the trainer does is in the notes and the --json file).
The first --warmup steps of every run (compilation included) are left out of the median. MFU =
flops_per_token * B * T / step time / 989.4 TFLOP/s (H100 SXM dense bf16) for every side, from the same
formula as train_moe.cu's flops_per_token (below); the trainer's own printed MFU is checked against it.
(A hidden --device cpu runs the PyTorch side alone on the CPU, in fp32: a smoke test without a GPU.)

Memory. The reference is written to be read, not to be lean: it materialises the B x H x T x T attention
scores (a bf16 copy and the fp32 softmax are kept for the backward: ~0.8 GiB per layer and sequence at
C=1024, T=4096), autocast keeps a bf16 copy of every weight for the backward, and the per-expert slices
w1[e] get full-size gradient buffers in the backward. The expert dispatch itself is fine (a loop over
experts on their own tokens: nothing N x E x F). Rough estimates of the eager peaks at T=4096: d512-E16-k2 ~49 GiB at
B=4; d1024-E8-k2 ~55 GiB at B=2 (~94 at B=4); d1024-E32-k8 ~88 GiB even at B=1: its 3.4B parameters
alone (fp32 weights, gradients, AdamW m and v, bf16 copies) take ~56 GiB. So on an 80 GB H100 the
PyTorch side of d1024-E32-k8 is expected to run out of memory (it should fit a 141 GB H200): a run that
fails (out of memory, a compile error, a timeout) is reported as OOM / n/a with its reason, and the
benchmark goes on. train_moe_cu needs about 15, 23 and 66 GiB at the defaults, B = 4, 2, 1; at B=4 it
would need ~30 GiB on d1024-E8-k2 and ~96 GiB on d1024-E32-k8.

Compile. The reference's dispatch is data dependent (torch.bincount, counts.tolist(), a Python loop
over the experts), so torch.compile breaks the graph in moe_layer; as that happens inside forward's loop
over layers, dynamo runs forward itself eagerly ("graph break in loop": the attention stays eager) and
compiles the functions it calls (rmsnorm, rope, routing, the expert loop, recompiled once as the expert
counts change; seen with torch 2.15 on the CPU). The compile figures are what torch.compile makes of this
code, not of a compile-friendly MoE.
"""
import argparse
import contextlib
import glob
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (L, C, H, Hkv, E, K, F, V, T, default B)
CONFIGS = {
    "d512-E16-k2": (16, 512, 4, 4, 16, 2, 1024, 32768, 4096, 4),
    "d1024-E8-k2": (16, 1024, 8, 8, 8, 2, 2048, 32768, 4096, 2),
    "d1024-E32-k8": (16, 1024, 8, 8, 32, 8, 2048, 32768, 4096, 1),
    "tiny": (2, 128, 2, 2, 4, 2, 256, 4096, 256, 4),
}
ISSUE_CONFIGS = "d512-E16-k2,d1024-E8-k2,d1024-E32-k8"
MODES = ("c", "eager", "compile")
SIDE_NAMES = {"c": "train_moe_cu", "eager": "PyTorch eager", "compile": "PyTorch compile"}
PEAK_TFLOPS = 989.4                # H100 SXM, dense bf16 (train_moe.cu's peak_flops())
TARGET_MFU = ("d1024-E8-k2", 40.0)  # train_moe_cu's MFU, %
TARGET_EAGER, TARGET_COMPILE = 2.0, 1.2  # train_moe_cu tok/s over PyTorch's
TRAIN_GLOB = "data/default/train_*.bin"


def flops_per_token(L, C, H, Hkv, E, K, F, V, T):
    """Training FLOPs per token, the formula of train_moe.cu's flops_per_token() (keep the two in step):
    6 * (L * (H*D*C + 2*Hkv*D*C + C*H*D + E*C + K*3*F*C) + V*C) for the matmuls (q, k, v, o, router, the
    K experts, the head) + 6 * L * T * H*D for causal attention; embedding, norms, softmax: 0."""
    D = C / H
    HD, KD = H * D, Hkv * D
    matmul = L * (HD * C + 2.0 * KD * C + C * HD + E * C + K * 3.0 * F * C) + V * C
    return 6.0 * matmul + 6.0 * L * T * HD


def mfu_pct(fpt, B, T, ms, peak_tflops=PEAK_TFLOPS):
    return 100.0 * fpt * B * T / (ms / 1e3) / (peak_tflops * 1e12)


# ------------------------------------------------------------------------------------------------
# the C side

# train_moe.cu's main: "step %5d/%d | loss ... | %.1f ms | %.0f tok/s | MFU %.1f%% | mem %.0f MiB"
STEP_RE = re.compile(r"^step\s+(\d+)/(\d+) \|.*\| (\S+) ms \| (\S+) tok/s \| MFU (\S+)% \| mem (\S+) MiB\s*$", re.M)
PEAK_RE = re.compile(r"^peak gpu memory (\S+) MiB", re.M)
DEVICE_RE = re.compile(r"^device: (.*), precision (\S+)\s*$", re.M)


def parse_trainer(text):
    """train_moe_cu's stdout -> dict: per-step lists step, ms, tok_s, mfu (%, as printed), mem (MiB),
    and peak_mib (its last "peak gpu memory" line, else the last step's mem), device, precision."""
    r = {"step": [], "ms": [], "tok_s": [], "mfu": [], "mem": []}
    for m in STEP_RE.finditer(text):
        try:
            vals = [float(m.group(i)) for i in (3, 4, 5, 6)]
        except ValueError:
            continue
        r["step"].append(int(m.group(1)))
        for k, v in zip(("ms", "tok_s", "mfu", "mem"), vals):
            r[k].append(v)
    peaks = PEAK_RE.findall(text)
    r["peak_mib"] = float(peaks[-1]) if peaks else (r["mem"][-1] if r["mem"] else None)
    dev = DEVICE_RE.search(text)
    r["device"], r["precision"] = (dev.group(1), dev.group(2)) if dev else (None, None)
    return r


def short_error(text, limit=300):
    """The most telling line of a failed run's output: an error line if there is one, else the last."""
    lines = [s.strip() for s in text.strip().splitlines() if s.strip()]
    if not lines:
        return "no output"
    for s in reversed(lines):
        if "error" in s.lower() or "out of memory" in s.lower():
            return s[:limit]
    return lines[-1][:limit]


def run_c(trainer, cfg, B, steps, timeout):
    L, C, H, Hkv, E, K, F, V, T = cfg
    cmd = [trainer, "-nl", L, "-nc", C, "-nh", H, "-nkv", Hkv, "-ne", E, "-nk", K, "-nf", F, "-nv", V,
           "-b", B, "-t", T, "-x", steps, "-v", 0, "-s", 0, "-u", 1000, "-i", TRAIN_GLOB, "-j", TRAIN_GLOB]
    cmd = [str(c) for c in cmd]  # -j: val shards are never read with -v 0, but must hold one batch
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ms": [], "error": f"timed out after {timeout} s", "cmd": " ".join(cmd)}
    r = parse_trainer(out.stdout)
    r["cmd"] = " ".join(cmd)
    if out.returncode != 0:
        r["error"] = f"exit status {out.returncode}: " + short_error(out.stderr + "\n" + out.stdout)
    elif len(r["ms"]) != steps:
        r["error"] = f"{len(r['ms'])} step lines parsed, expected {steps} (output format changed?)"
    return r


def check_trainer_mfu(r, fpt, B, T):
    """The trainer's printed MFU vs this script's formula on its printed ms: None if they agree, else a
    message (flops_per_token here and in train_moe.cu have drifted apart)."""
    try:
        peak = float(os.environ.get("PEAK_TFLOPS", "0"))
    except ValueError:
        peak = 0.0
    if not peak > 0:
        peak = {"bf16": 989.4, "fp32": 66.9}.get(r.get("precision"), 0.0)
    if not peak or not r["ms"]:
        return None
    worst = 0.0
    for ms, printed in zip(r["ms"], r["mfu"]):
        if not ms > 0:
            continue
        ours = mfu_pct(fpt, B, T, ms, peak)
        tol = 0.051 + ours * 0.051 / ms + 1e-3 * ours  # ms and MFU are printed to 0.1
        worst = max(worst, abs(ours - printed) - tol)
    if worst > 0:
        return (f"train_moe_cu's printed MFU differs from flops_per_token() here by up to {worst:.2f} points "
                f"beyond rounding: has train_moe.cu's flops_per_token changed?")
    return None


def build_trainer(trainer):
    """make the default trainer (a no-op when it is up to date); any other --trainer must exist."""
    default = os.path.realpath(trainer) == os.path.realpath(os.path.join(ROOT, "train_moe_cu"))
    if default:
        print("make -f dev/cuda_build.mk train_moe_cu ...", file=sys.stderr, flush=True)
        out = subprocess.run(["make", "-f", "dev/cuda_build.mk", "train_moe_cu"], cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode != 0:
            if not os.path.exists(trainer):
                sys.exit("building train_moe_cu failed (make -f dev/cuda_build.mk train_moe_cu):\n"
                         + out.stdout[-3000:] + out.stderr[-3000:])
            print(f"warning: make -f dev/cuda_build.mk train_moe_cu failed, using the existing {trainer}:\n"
                  + short_error(out.stderr + out.stdout), file=sys.stderr)
    if not os.access(trainer, os.X_OK):
        sys.exit(f"trainer '{trainer}' not found or not executable (--trainer)")


def check_gpu():
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        ok, msg = out.returncode == 0 and "GPU" in out.stdout, (out.stderr or out.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, msg = False, str(e)
    if not ok:
        sys.exit(f"no NVIDIA GPU: `nvidia-smi -L` failed ({msg[:300]}). train_moe_cu needs one "
                 f"(--modes eager,compile --device cpu runs the PyTorch side on the CPU, for smoke tests)")
    return out.stdout.strip().splitlines()[0].split(" (UUID")[0]


# ------------------------------------------------------------------------------------------------
# the PyTorch side

def load_samples(T, V):
    """Every T+1-token window of the bundled train shards, cut as the C loader cuts them (sample i is
    tokens i*T .. i*T+T of its shard): inputs X and targets Y, int64 n x T on the CPU."""
    import torch
    xs, ys = [], []
    for path in sorted(glob.glob(os.path.join(ROOT, TRAIN_GLOB))):
        with open(path, "rb") as f:
            raw = f.read()
        magic, version, ntok = struct.unpack("<3i", raw[:12])
        if (magic, version) == (20240520, 1):
            width, dt, mask = 2, torch.int16, 0xFFFF
        elif (magic, version) == (20240801, 7):
            width, dt, mask = 4, torch.int32, 0xFFFFFFFF
        else:
            raise ValueError(f"{path}: not a token shard (magic {magic} version {version})")
        body = bytearray(raw[1024:1024 + ntok * width])
        if len(body) != ntok * width:
            raise ValueError(f"{path}: truncated")
        tok = torch.frombuffer(body, dtype=dt).long() & mask
        n = (ntok - 1) // T
        if n > 0:
            xs.append(tok[:n * T].view(n, T))
            ys.append(tok[1:n * T + 1].view(n, T))
    if not xs:
        raise ValueError(f"no window of T+1={T + 1} tokens in {TRAIN_GLOB}")
    X, Y = torch.cat(xs), torch.cat(ys)
    if int(X.max()) >= V or int(Y.max()) >= V:
        raise ValueError(f"{TRAIN_GLOB} has token ids >= V={V}")
    return X, Y


def torch_child(cfg, B, mode, steps, device):
    """Runs in a subprocess: `steps` reference training steps; prints one JSON line with the step times
    and memory, with "error" set (not a crash) when a step fails: out of memory, a compile error."""
    import traceback
    import torch
    sys.path.insert(0, os.path.join(ROOT, "dev"))
    import moe_ref
    L, C, H, Hkv, E, K, F, V, T = cfg
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    res = {"torch": torch.__version__, "mode": mode, "device": str(dev), "ms": []}
    try:
        if cuda:
            if not torch.cuda.is_available():
                raise RuntimeError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
            if dev.index is None:  # some torch versions' mem_get_info want an explicit index
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
            if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
                try:  # less fragmentation from the uneven per-expert tensors (torch >= 2.1)
                    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
                except (AttributeError, RuntimeError) as e:
                    res["allocator_note"] = str(e)[:200]
            res["gpu"] = torch.cuda.get_device_name(dev)
        X, Y = load_samples(T, V)
        mc = moe_ref.make_config(V, T, L, C, H, Hkv, E, K, F)
        params = {k: t.to(dev).requires_grad_(True) for k, t in moe_ref.init_params(mc, 1337, 0.02).items()}
        plist = list(params.values())

        def adamw(fused):  # fresh groups each time: a failed constructor leaves its settings in them
            groups = [{"params": [t for k, t in params.items() if k in moe_ref.MATRICES], "weight_decay": 0.1},
                      {"params": [t for k, t in params.items() if k not in moe_ref.MATRICES], "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))
        opt = None
        if cuda:
            try:
                opt, res["adamw"] = adamw(True), "fused"
            except (TypeError, RuntimeError, ValueError) as e:
                res["adamw_fused_error"] = str(e)[:200]
        if opt is None:
            opt, res["adamw"] = adamw(False), "default"
        fwd = moe_ref.forward
        if mode == "compile":
            if not hasattr(torch, "compile"):
                raise RuntimeError(f"torch {torch.__version__} has no torch.compile")
            fwd = torch.compile(moe_ref.forward)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        # the CPU (--device cpu, smoke tests only) runs in fp32: CPU autocast leaves softmax in bf16, and
        # moe_layer's index_add then meets a bf16 source (CUDA autocast runs softmax in fp32)
        amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            rows = torch.randint(0, X.shape[0], (B,), generator=g)
            x, y = X[rows], Y[rows]
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = fwd(mc, params, x.to(dev), y.to(dev))["loss"]  # the logits etc. are dropped here
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plist, 1.0)
            opt.step()
            sync()
            res["ms"].append((time.perf_counter() - t0) * 1e3)
            if cuda:  # device memory in use, sampled after each step as train_moe_cu does
                free, total = torch.cuda.mem_get_info(dev)
                res["dev_used_mib"] = max(res.get("dev_used_mib", 0.0), (total - free) / 2**20)
        res["loss"] = float(loss)
    except Exception as e:  # noqa: BLE001 -- any failure is a result to report
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        oom = isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()
        res["error"] = ("out of memory: " if oom else "") + f"{type(e).__name__}: {first}"[:300]
    if cuda and torch.cuda.is_available():
        res["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        res["reserved_mib"] = torch.cuda.max_memory_reserved(dev) / 2**20
    print(json.dumps(res))


def run_torch(python, name, B, mode, steps, device, timeout):
    cmd = [python, os.path.abspath(__file__), "--child", name, "--mode", mode, "--batch", str(B),
           "--steps", str(steps), "--device", device]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ms": [], "error": f"timed out after {timeout} s"}
    lines = [s for s in out.stdout.splitlines() if s.startswith("{")]
    if not lines:
        return {"ms": [], "error": f"exit status {out.returncode}: " + short_error(out.stderr + "\n" + out.stdout)}
    r = json.loads(lines[-1])
    if "error" not in r and len(r["ms"]) != steps:
        r["error"] = f"{len(r['ms'])} steps timed, expected {steps}"
    return r


def check_torch(python, device):
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps([torch.__version__, "
            "torch.version.cuda, c, torch.cuda.get_device_name(0) if c else None, hasattr(torch, 'compile')]))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        sys.exit(f"cannot run {python} (--python): {e}")
    if out.returncode != 0:
        sys.exit(f"{python} cannot import torch (--python): " + short_error(out.stderr))
    ver, cuda_ver, avail, gpu, has_compile = json.loads(out.stdout.strip().splitlines()[-1])
    if device == "cuda" and not avail:
        sys.exit(f"torch {ver} of {python} sees no CUDA GPU (built for CUDA {cuda_ver}): install a CUDA build "
                 f"of torch, or point --python at an interpreter that has one")
    return ver, gpu, has_compile


# ------------------------------------------------------------------------------------------------
# the table

def summarize(r, B, T, fpt, warmup):
    """Adds median_ms, tok_s, mfu_pct to a run's dict (None when it failed)."""
    ms = r.get("ms") or []
    if r.get("error") or len(ms) <= warmup:
        r["median_ms"] = r["tok_s_median"] = r["mfu_pct"] = None
        return
    med = statistics.median(ms[warmup:])
    if not med > 0:  # the trainer prints ms to 0.1
        r["error"] = f"median step time {med} ms: too short to measure"
        r["median_ms"] = r["tok_s_median"] = r["mfu_pct"] = None
        return
    r["median_ms"], r["tok_s_median"], r["mfu_pct"] = med, B * T / med * 1e3, mfu_pct(fpt, B, T, med)


def label(r):
    err = r.get("error", "")
    return "OOM" if "out of memory" in err.lower() else "timeout" if err.startswith("timed out") else "n/a"


def cell(r):
    if r is None:
        return f"{'-':>8} {'-':>9} {'-':>6} {'-':>7}"
    if r["median_ms"] is None:
        return f"{label(r):>8} {'':>9} {'':>6} {'':>7}"
    mem = f"{r['peak_mib']:7.0f}" if r.get("peak_mib") is not None else f"{'?':>7}"
    return f"{r['median_ms']:8.1f} {r['tok_s_median']:9.0f} {r['mfu_pct']:5.1f}% {mem}"


def ratio(row, mode):
    c, t = row.get("c"), row.get(mode)
    if not c or not t or c["median_ms"] is None or t["median_ms"] is None:
        return None
    return c["tok_s_median"] / t["tok_s_median"]


def verdict(x, target):
    return "n/a" if x is None else f"{x:.2f}x {'ok' if x >= target else 'MISSED'}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=ISSUE_CONFIGS,
                    help=f"comma-separated NAME or NAME:B, NAME in {','.join(CONFIGS)} (default {ISSUE_CONFIGS})")
    ap.add_argument("--steps", type=int, default=20, help="steps per run, warm-up included (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of the median (default 5)")
    ap.add_argument("--batch", type=int, help="batch size B of every configuration (default: each one's own)")
    ap.add_argument("--modes", default="c,eager,compile", help="comma-separated subset of c,eager,compile")
    ap.add_argument("--trainer", default="./train_moe_cu", help="CUDA trainer (default ./train_moe_cu, made first)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with the CUDA torch to compare against")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run before it is stopped (default 1800)")
    ap.add_argument("--json", help="also write every figure (per-step times included) to this file")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke-test the PyTorch side
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return torch_child(CONFIGS[a.child][:9], a.batch, a.mode, a.steps, a.device)

    if a.warmup < 0 or a.steps <= a.warmup:
        ap.error("need 0 <= --warmup < --steps")
    if a.batch is not None and a.batch <= 0:
        ap.error("--batch must be positive")
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown {','.join(bad)} (choose from {','.join(MODES)})")
    modes = [m for m in MODES if m in modes]
    runs = []
    for item in a.configs.split(","):
        name, _, b = item.strip().partition(":")
        if name not in CONFIGS:
            ap.error(f"unknown config '{name}' (choose from {','.join(CONFIGS)})")
        if b and not (b.isdigit() and int(b) > 0):
            ap.error(f"'{item}': the batch size after ':' must be a positive integer")
        runs.append((name, int(b) if b else (a.batch or CONFIGS[name][9])))
    if a.device != "cuda" and "c" in modes:
        print(f"note: --device {a.device}: train_moe_cu is skipped (it needs a GPU)", file=sys.stderr)
        modes.remove("c")
        if not modes:
            ap.error("nothing to run")

    trainer = os.path.abspath(a.trainer) if os.path.exists(a.trainer) else os.path.join(ROOT, a.trainer)
    info = []
    if "c" in modes:
        info.append(check_gpu())
        build_trainer(trainer)
        info.append(f"trainer {os.path.relpath(trainer, ROOT) if trainer.startswith(ROOT) else trainer}")
    torch_modes = [m for m in modes if m != "c"]
    if torch_modes:
        ver, gpu, has_compile = check_torch(a.python, a.device)
        info.append(f"torch {ver} ({a.python})" + (f" on {gpu}" if a.device == "cuda" and "c" not in modes else ""))
        if "compile" in modes and not has_compile:
            print(f"note: torch {ver} has no torch.compile: the compile column will be n/a", file=sys.stderr)
    print(" | ".join(info))
    print(f"{a.steps} steps per run, median of steps {a.warmup + 1}..{a.steps}; "
          f"MFU against {PEAK_TFLOPS} TFLOP/s (bf16 dense); device {a.device}")
    sys.stdout.flush()

    grp = 33
    hdr1 = f"{'':13} {'':7} | " + " | ".join(f"{SIDE_NAMES[m]:^{grp}}" for m in MODES) + \
           f" | {'train_moe_cu tok/s /':^19}"
    hdr2 = f"{'config':13} {'B x T':>7} | " + " | ".join(
        f"{'ms':>8} {'tok/s':>9} {'MFU':>6} {'MiB':>7}" for _ in MODES) + f" | {'eager':>9} {'compile':>9}"
    rows, notes = [], []
    table = []
    for name, B in runs:
        L, C, H, Hkv, E, K, F, V, T = CONFIGS[name][:9]
        fpt = flops_per_token(L, C, H, Hkv, E, K, F, V, T)
        row = {"config": name, "B": B, "T": T, "shape": dict(L=L, C=C, H=H, Hkv=Hkv, E=E, K=K, F=F, V=V),
               "flops_per_token": fpt}
        for mode in modes:
            t0 = time.time()
            if mode == "c":
                r = run_c(trainer, CONFIGS[name][:9], B, a.steps, a.timeout)
            else:
                r = run_torch(a.python, name, B, mode, a.steps, a.device, a.timeout)
            summarize(r, B, T, fpt, a.warmup)
            r["wall_s"] = time.time() - t0
            row[mode] = r
            what = (f"{r['median_ms']:.1f} ms, {r['tok_s_median']:.0f} tok/s, MFU {r['mfu_pct']:.1f}%"
                    if r["median_ms"] is not None else f"failed: {r.get('error')}")
            print(f"[{name} B={B}] {SIDE_NAMES[mode]}: {what} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            if r.get("error"):
                notes.append(f"{name} {SIDE_NAMES[mode]}: {r['error']}")
            if mode == "c" and r["median_ms"] is not None:
                msg = check_trainer_mfu(r, fpt, B, T)
                if msg:
                    notes.append(f"{name}: {msg}")
                if r.get("precision") not in (None, "bf16"):
                    notes.append(f"{name}: train_moe_cu is a {r['precision']} build; MFU is still against bf16 peak")
            if mode == "compile" and r.get("ms"):
                notes.append(f"{name} PyTorch compile: first step {r['ms'][0] / 1e3:.1f} s (compilation included)")
        rx = [ratio(row, "eager"), ratio(row, "compile")]
        row["ratio_eager"], row["ratio_compile"] = rx
        used = [f"{m} {row[m]['dev_used_mib']:.0f} MiB" for m in ("eager", "compile")
                if m in row and row[m].get("dev_used_mib") is not None]
        if used:
            notes.append(f"{name}: PyTorch device memory in use (as train_moe_cu counts it): " + ", ".join(used))
        rows.append(row)
        table.append(f"{name:13} {f'{B}x{T}':>7} | " + " | ".join(cell(row.get(m)) for m in MODES) + " | " +
                     " ".join(f"{x:8.2f}x" if x is not None else f"{'n/a':>9}" for x in rx))

    print(hdr1)
    print(hdr2)
    print("-" * len(hdr2))
    print("\n".join(table))
    print("MiB: train_moe_cu = device memory in use (cudaMemGetInfo: CUDA context, cuBLAS workspaces included); "
          "PyTorch = torch.cuda.max_memory_allocated()")
    if notes:
        print("notes:")
        print("\n".join("  " + n for n in notes))

    print("targets:")
    tname, tmfu = TARGET_MFU
    trow = next((r for r in rows if r["config"] == tname), None)
    got = trow["c"]["mfu_pct"] if trow and trow.get("c") else None
    print(f"  train_moe_cu MFU >= {tmfu:.0f}% on {tname}: " +
          ("not measured" if got is None else f"{got:.1f}% {'ok' if got >= tmfu else 'MISSED'}"))
    print(f"  train_moe_cu tok/s >= {TARGET_EAGER:g}x eager, >= {TARGET_COMPILE:g}x compiled:")
    for r in rows:
        print(f"    {r['config']:13} eager {verdict(r['ratio_eager'], TARGET_EAGER):14} "
              f"compiled {verdict(r['ratio_compile'], TARGET_COMPILE)}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"steps": a.steps, "warmup": a.warmup, "peak_tflops": PEAK_TFLOPS, "device": a.device,
                       "info": info, "results": rows}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
