#!/usr/bin/env python3
"""
PyTorch reference of the model contract (dev/MODEL.md; file layouts in dev/FORMATS.md).

For each small test configuration NAME it writes into OUTDIR (default dev/ref/):

    NAME_model.bin   the initial checkpoint (no optimizer state, step 0, data position 0, rng 0,
                     run seed = the seed used for the initialisation and the batch)
    NAME_debug.bin   the debug state read by test_moe: x, y, logits, ce, aux[L], zl[L], loss,
                     chosen experts, every parameter gradient (checkpoint layout), then the losses and
                     global gradient norms (before clipping) of 10 AdamW steps on that same batch
    manifest.txt     one NAME per line
    NAME_grpo.bin    for the GRPO_CASES configurations: a rollout batch (rows, targets, rewards,
                     advantages, sampler and reference log-probs) and, per mini-batch update, the
                     GRPO loss, its clipped-token count, grad norm and every gradient
    grpo_manifest.txt  one NAME per line of those
    NAME_grpo_reference.bin  for GRPO_ROLLOUT_CONFIG: a reference model for GRPO (the checkpoint's
                     matrices moved at random), for test_moe's rollout batch, which
                     --check-rollouts then checks

Notes
- Initialisation is Megatron's scheme from a seed (torch.Generator seeded with the config's seed,
  tensors drawn in checkpoint order): every matrix ~ N(0, std), wo and w2 ~ N(0, std/sqrt(2L)),
  norm weights 1. The spec's std is 0.02; the test configurations use std = 0.1 (--init_std) so that
  activations, router logits and gradients are larger and more discriminating.
- Everything is float32. Float constants (theta, eps, coefficients, AdamW settings) are first rounded
  to float32, since that is what the C code reads back from the headers.
- Top-k: a stable ascending sort of -z, so the K largest logits come out largest first and equal
  logits come out lower expert index first (torch.topk does not guarantee the order of ties).
- Dispatch: token slots (N*K) are sorted by expert (stable), each expert processes its contiguous run
  of slots, and the weighted outputs are scattered back with index_add. Experts with no token are
  skipped (their gradient is zero).
- aux_l = E * sum_e f_e * P_e with f_e = count_e/(N*K) a constant (no gradient); the gates
  (softmax over the K chosen logits) carry the gradient of the expert outputs into the router.
- AdamW is written by hand with dev/MODEL.md's formula (decoupled weight decay, matrices only).

CLI
    python dev/moe_ref.py [--outdir DIR] [--configs a,b,...] [--init_std 0.1] [--nsteps 10]
    python dev/moe_ref.py --selftest [--outdir DIR]       re-read the files written there and verify
    python dev/moe_ref.py --gradcheck [--configs ...] [--verbose]   autograd vs float64 central diffs
    python dev/moe_ref.py --check FILE.bin                 validate one checkpoint / debug file
    python dev/moe_ref.py --compare DIR_A DIR_B            max differences between two output dirs
    python dev/moe_ref.py --check-rollouts FILE [--outdir DIR]   test_moe's real rollout batch: its
                           sampler and reference log-probs against this file's

Reusable: read_checkpoint(path), write_checkpoint(path, cfg, params, ...), read_debug(path, cfg),
param_layout(cfg), init_params(cfg, seed, std), forward(cfg, params, x, y).
Works with torch 1.13 (Debian python3-torch) and current torch.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as Fn

CKPT_MAGIC = 20251123
DEBUG_MAGIC = 20251124
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

MATRICES = ("wte", "wq", "wk", "wv", "wo", "wr", "w1", "w3", "w2", "lm_head")  # weight decay
INT_KEYS = ("V", "T", "L", "C", "H", "Hkv", "E", "K", "F")
FLOAT_KEYS = ("theta", "eps", "aux_coef", "z_coef")


def f32(x):
    """Round a Python float to float32 (the value the C code reads from a header)."""
    return float(np.float32(x))


def f32_bits(x):
    return int(np.array([x], dtype=np.float32).view(np.int32)[0])


def bits_f32(i):
    return float(np.array([i], dtype=np.int32).view(np.float32)[0])


# --------------------------------------------------------------------------------------------------
# test configurations

# NAME: V, T, L, C, H, Hkv, E, K, F, B, aux_coef, z_coef
TEST_CONFIGS = [
    ("dense", 67, 8, 2, 32, 4, 4, 1, 1, 64, 2, 1e-2, 1e-3),
    ("k1",    67, 8, 2, 32, 4, 4, 4, 1, 48, 2, 1e-2, 1e-3),
    ("kE",    67, 8, 2, 32, 4, 4, 4, 4, 48, 2, 1e-2, 1e-3),
    ("e6",    67, 8, 2, 32, 4, 4, 6, 2, 40, 2, 1e-2, 1e-3),
    ("gqa",   67, 8, 2, 32, 4, 2, 8, 2, 48, 2, 0.5, 0.1),
    ("mqa",   67, 8, 2, 32, 4, 1, 8, 3, 48, 2, 1e-2, 1e-3),
    ("empty", 67, 8, 2, 32, 4, 4, 16, 1, 48, 1, 1e-2, 1e-3),
]
BASE_SEED = 1337

# AdamW settings of the recorded steps
OPT = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
           warmup=3, min_lr=3e-4)


def make_config(V, T, L, C, H, Hkv, E, K, F, theta=10000.0, eps=1e-5, aux_coef=1e-2, z_coef=1e-3):
    cfg = dict(V=V, T=T, L=L, C=C, H=H, Hkv=Hkv, E=E, K=K, F=F,
               theta=f32(theta), eps=f32(eps), aux_coef=f32(aux_coef), z_coef=f32(z_coef))
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    for k in INT_KEYS:
        if cfg[k] <= 0:
            raise ValueError(f"invalid {k}={cfg[k]}")
    C, H, Hkv, E, K = cfg["C"], cfg["H"], cfg["Hkv"], cfg["E"], cfg["K"]
    if C % H != 0 or (C // H) % 2 != 0:
        raise ValueError(f"C={C} must be a multiple of H={H} with an even head size")
    if H % Hkv != 0:
        raise ValueError(f"H={H} must be a multiple of Hkv={Hkv}")
    if not 1 <= K <= E:
        raise ValueError(f"need 1 <= K={K} <= E={E}")


# --------------------------------------------------------------------------------------------------
# parameter layout and files

def param_layout(cfg):
    """Parameter tensors in checkpoint order: list of (name, shape)."""
    V, L, C, H, Hkv, E, F = (cfg[k] for k in ("V", "L", "C", "H", "Hkv", "E", "F"))
    D = C // H
    return [
        ("wte", (V, C)),
        ("attn_norm", (L, C)),
        ("wq", (L, H * D, C)),
        ("wk", (L, Hkv * D, C)),
        ("wv", (L, Hkv * D, C)),
        ("wo", (L, C, H * D)),
        ("moe_norm", (L, C)),
        ("wr", (L, E, C)),
        ("w1", (L, E, F, C)),
        ("w3", (L, E, F, C)),
        ("w2", (L, E, C, F)),
        ("final_norm", (C,)),
        ("lm_head", (V, C)),
    ]


def num_params(cfg):
    return sum(int(np.prod(s)) for _, s in param_layout(cfg))


def _as_np(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(t, dtype="<f4")


def flatten_params(cfg, params):
    """dict name -> tensor/array  ->  one float32 numpy vector in checkpoint order."""
    parts = []
    for name, shape in param_layout(cfg):
        a = _as_np(params[name])
        if a.shape != tuple(shape):
            raise ValueError(f"{name}: shape {a.shape}, expected {tuple(shape)}")
        parts.append(a.reshape(-1))
    return np.concatenate(parts)


def unflatten_params(cfg, flat):
    """float32 vector in checkpoint order -> dict name -> numpy array (views)."""
    out, off = {}, 0
    for name, shape in param_layout(cfg):
        n = int(np.prod(shape))
        out[name] = flat[off:off + n].reshape(shape)
        off += n
    assert off == flat.size
    return out


def _write_atomic(path, chunks):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c.tobytes() if isinstance(c, np.ndarray) else c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _u64_slots(h, i, value):
    value = int(value)
    h[i] = np.array([value & 0xFFFFFFFF], dtype=np.uint32).view(np.int32)[0]
    h[i + 1] = np.array([(value >> 32) & 0xFFFFFFFF], dtype=np.uint32).view(np.int32)[0]


def _u64_read(h, i):
    lo, hi = (int(u) for u in np.asarray(h[i:i + 2], dtype="<i4").view("<u4"))
    return lo | (hi << 32)


def write_checkpoint(path, cfg, params, m=None, v=None, step=0, data_pos=(0, 0, 0), rng=0, seed=0):
    """Write a checkpoint (dev/FORMATS.md, "Checkpoint"). params (and m, v if given): name -> tensor."""
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = CKPT_MAGIC, VERSION
    for i, k in enumerate(INT_KEYS):
        h[2 + i] = cfg[k]
    for i, k in enumerate(FLOAT_KEYS):
        h[11 + i] = f32_bits(cfg[k])
    has_opt = m is not None and v is not None
    h[15] = 1 if has_opt else 0
    h[16] = step
    h[17], h[18], h[19] = data_pos
    _u64_slots(h, 20, rng)
    _u64_slots(h, 22, seed)
    _u64_slots(h, 24, num_params(cfg))
    chunks = [h, flatten_params(cfg, params)]
    if has_opt:
        chunks += [flatten_params(cfg, m), flatten_params(cfg, v)]
    _write_atomic(path, chunks)


def read_checkpoint(path):
    """Read a checkpoint. Returns dict with cfg, params (dict of numpy float32 arrays), m, v (None if
    absent), step, data_pos, rng, seed, nparams. Raises ValueError on a malformed file."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: too short for a header")
    h = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    if h[0] != CKPT_MAGIC or h[1] != VERSION:
        raise ValueError(f"{path}: bad magic/version {h[0]}/{h[1]}")
    cfg = {k: int(h[2 + i]) for i, k in enumerate(INT_KEYS)}
    cfg.update({k: bits_f32(h[11 + i]) for i, k in enumerate(FLOAT_KEYS)})
    validate_config(cfg)
    n = num_params(cfg)
    nparams = _u64_read(h, 24)
    if nparams != n:
        raise ValueError(f"{path}: header says {nparams} parameters, config gives {n}")
    has_opt = int(h[15])
    if has_opt not in (0, 1):
        raise ValueError(f"{path}: slot 15 = {has_opt}")
    expect = HEADER_BYTES + 4 * n * (3 if has_opt else 1)
    if len(raw) != expect:
        raise ValueError(f"{path}: size {len(raw)}, expected {expect}")
    data = np.frombuffer(raw[HEADER_BYTES:], dtype="<f4").copy()
    out = dict(cfg=cfg, params=unflatten_params(cfg, data[:n]), m=None, v=None,
               step=int(h[16]), data_pos=(int(h[17]), int(h[18]), int(h[19])),
               rng=_u64_read(h, 20), seed=_u64_read(h, 22), nparams=n, has_opt=has_opt)
    if has_opt:
        out["m"] = unflatten_params(cfg, data[n:2 * n])
        out["v"] = unflatten_params(cfg, data[2 * n:3 * n])
    return out


def debug_sizes(cfg, B, T, nsteps):
    """(name, dtype, count) of the debug file's sections, in order."""
    V, L, K = cfg["V"], cfg["L"], cfg["K"]
    N = B * T
    return [("x", "<i4", N), ("y", "<i4", N), ("logits", "<f4", N * V), ("ce", "<f4", 1),
            ("aux", "<f4", L), ("zl", "<f4", L), ("loss", "<f4", 1), ("experts", "<i4", L * N * K),
            ("grads", "<f4", num_params(cfg)), ("losses", "<f4", nsteps), ("norms", "<f4", nsteps)]


def write_debug(path, cfg, opt, d):
    B, T = d["x"].shape
    nsteps = len(d["losses"])
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = DEBUG_MAGIC, VERSION
    h[2], h[3], h[4] = B, T, nsteps
    for i, k in enumerate(("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip")):
        h[5 + i] = f32_bits(opt[k])
    h[11] = opt["warmup"]
    h[12] = f32_bits(opt["min_lr"])
    chunks = [h]
    for name, dt, cnt in debug_sizes(cfg, B, T, nsteps):
        val = d[name]
        if name == "grads":
            a = flatten_params(cfg, val)
        else:
            a = np.ascontiguousarray(val.detach().cpu().numpy() if isinstance(val, torch.Tensor)
                                     else np.asarray(val), dtype=dt).reshape(-1)
        assert a.size == cnt, (name, a.size, cnt)
        chunks.append(a)
    _write_atomic(path, chunks)


def read_debug(path, cfg):
    """Read a debug state; cfg from the matching checkpoint. Returns dict of numpy arrays + header."""
    with open(path, "rb") as f:
        raw = f.read()
    h = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    if h[0] != DEBUG_MAGIC or h[1] != VERSION:
        raise ValueError(f"{path}: bad magic/version {h[0]}/{h[1]}")
    B, T, nsteps = int(h[2]), int(h[3]), int(h[4])
    opt = {k: bits_f32(h[5 + i]) for i, k in
           enumerate(("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"))}
    opt["warmup"] = int(h[11])
    opt["min_lr"] = bits_f32(h[12])
    secs = debug_sizes(cfg, B, T, nsteps)
    expect = HEADER_BYTES + 4 * sum(c for _, _, c in secs)
    if len(raw) != expect:
        raise ValueError(f"{path}: size {len(raw)}, expected {expect}")
    out, off = dict(B=B, T=T, nsteps=nsteps, opt=opt), HEADER_BYTES
    for name, dt, cnt in secs:
        out[name] = np.frombuffer(raw, dtype=dt, count=cnt, offset=off).copy()
        off += 4 * cnt
    N, L, K = B * T, cfg["L"], cfg["K"]
    out["x"] = out["x"].reshape(B, T)
    out["y"] = out["y"].reshape(B, T)
    out["logits"] = out["logits"].reshape(B, T, cfg["V"])
    out["experts"] = out["experts"].reshape(L, N, K)
    out["grads"] = unflatten_params(cfg, out["grads"])
    return out


# --------------------------------------------------------------------------------------------------
# model

def init_params(cfg, seed, std=0.02, dtype=torch.float32):
    """Megatron init: matrices ~ N(0, std), wo and w2 ~ N(0, std/sqrt(2L)), norms 1."""
    g = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * cfg["L"])
    params = {}
    for name, shape in param_layout(cfg):
        if name in ("attn_norm", "moe_norm", "final_norm"):
            params[name] = torch.ones(shape, dtype=dtype)
        else:
            s = out_std if name in ("wo", "w2") else std
            params[name] = (torch.randn(shape, generator=g, dtype=torch.float32) * s).to(dtype)
    return params


def rmsnorm(v, w, eps):
    return v * torch.rsqrt((v * v).mean(-1, keepdim=True) + eps) * w


def rope_tables(T, D, theta, dtype):
    i = torch.arange(D // 2, dtype=torch.float64)
    inv = theta ** (-2.0 * i / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # T x D/2
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def rope(x, cos, sin):
    """x: (B, heads, T, D), rotate-half convention (HF Llama/Mixtral)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def route(z, K):
    """Top-K expert ids per row of z (N x E), largest logit first, equal logits lower index first."""
    order = torch.sort(-z.detach(), dim=1, stable=True).indices  # ascending -z, stable
    return order[:, :K]


def moe_layer(m, z, w1, w3, w2, K):
    """m: N x C, z: N x E router logits, w1/w3: E x F x C, w2: E x C x F.
    Returns (output N x C, chosen ids N x K, counts E)."""
    N, C = m.shape
    E = z.shape[1]
    idx = route(z, K)                                   # N x K
    gates = torch.softmax(z.gather(1, idx), dim=1)      # N x K, softmax over the chosen logits
    slot_e = idx.reshape(-1)                            # N*K slots
    slot_t = torch.arange(N, device=m.device).repeat_interleave(K)  # token of each slot
    slot_g = gates.reshape(-1)
    perm = torch.sort(slot_e, stable=True).indices      # slots grouped by expert
    counts = torch.bincount(slot_e, minlength=E)
    out = torch.zeros_like(m)
    start = 0
    for e, cnt in enumerate(counts.tolist()):
        if cnt == 0:
            continue
        sl = perm[start:start + cnt]
        start += cnt
        tok = slot_t[sl]
        xe = m[tok]                                                  # cnt x C
        hid = Fn.silu(xe @ w1[e].t()) * (xe @ w3[e].t())             # cnt x F
        ye = (hid @ w2[e].t()) * slot_g[sl].unsqueeze(1)             # cnt x C
        out = out.index_add(0, tok, ye)
    return out, idx, counts


def forward(cfg, p, x, y):
    """x, y: B x T int64 tensors (y = -1: ignored). Returns dict with loss and intermediates."""
    B, T = x.shape
    N = B * T
    L, C, H, Hkv, E, K = (cfg[k] for k in ("L", "C", "H", "Hkv", "E", "K"))
    D = C // H
    eps = cfg["eps"]
    dtype = p["wte"].dtype
    dev = p["wte"].device                                            # cpu: .to(dev) is a no-op
    cos, sin = rope_tables(T, D, cfg["theta"], dtype)                 # built on the cpu in float64
    cos, sin = cos.to(dev), sin.to(dev)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()

    h = p["wte"][x.reshape(-1)]                                      # N x C
    aux, zl, experts, counts, zs = [], [], [], [], []
    for l in range(L):
        a = rmsnorm(h, p["attn_norm"][l], eps)
        q = (a @ p["wq"][l].t()).view(B, T, H, D).transpose(1, 2)    # B x H x T x D
        k = (a @ p["wk"][l].t()).view(B, T, Hkv, D).transpose(1, 2)  # B x Hkv x T x D
        v = (a @ p["wv"][l].t()).view(B, T, Hkv, D).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = H // Hkv                                                # query head h -> kv head h//rep
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        ya = (att @ v).transpose(1, 2).reshape(N, H * D)
        h = h + ya @ p["wo"][l].t()

        m = rmsnorm(h, p["moe_norm"][l], eps)
        z = m @ p["wr"][l].t()                                        # N x E
        out, idx, cnt = moe_layer(m, z, p["w1"][l], p["w3"][l], p["w2"][l], K)
        h = h + out
        f = (cnt.to(dtype) / (N * K)).detach()                        # constant, no gradient
        P = torch.softmax(z, dim=1).mean(0)
        aux.append(E * (f * P).sum())
        zl.append((torch.logsumexp(z, dim=1) ** 2).mean())
        experts.append(idx)
        counts.append(cnt)
        zs.append(z.detach())

    logits = rmsnorm(h, p["final_norm"], eps) @ p["lm_head"].t()     # N x V
    ce = Fn.cross_entropy(logits, y.reshape(-1), ignore_index=-1)
    aux_t, zl_t = torch.stack(aux), torch.stack(zl)
    loss = ce + cfg["aux_coef"] * aux_t.sum() + cfg["z_coef"] * zl_t.sum()
    return dict(loss=loss, ce=ce, aux=aux_t, zl=zl_t, logits=logits.view(B, T, -1),
                experts=torch.stack(experts), counts=torch.stack(counts), z=zs)


def route_margin(z, K):
    """Smallest gap between the K-th and (K+1)-th largest logit over tokens (inf if K == E)."""
    E = z.shape[1]
    if K == E:
        return float("inf")
    s = torch.sort(z, dim=1, descending=True).values
    return float((s[:, K - 1] - s[:, K]).min())


# --------------------------------------------------------------------------------------------------
# training steps

def lr_at(opt, s, steps):
    lr, warmup, min_lr = opt["lr"], opt["warmup"], opt["min_lr"]
    if s < warmup:
        return lr * (s + 1) / warmup
    r = (s - warmup) / (steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (lr - min_lr)


def grads_of(cfg, params, x, y):
    ps = {k: t.detach().clone().requires_grad_(True) for k, t in params.items()}
    out = forward(cfg, ps, x, y)
    out["loss"].backward()
    out = {k: (t.detach() if isinstance(t, torch.Tensor) else t) for k, t in out.items()}
    return out, {k: t.grad.detach().clone() for k, t in ps.items()}


def global_norm(grads):
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))


def adamw_steps(cfg, params, x, y, opt, nsteps):
    """nsteps AdamW steps on one batch (dev/MODEL.md, "Optimizer and schedule"). Returns losses, norms,
    min route margin."""
    p = {k: t.detach().clone() for k, t in params.items()}
    m = {k: torch.zeros_like(t) for k, t in p.items()}
    v = {k: torch.zeros_like(t) for k, t in p.items()}
    b1, b2, eps, wd, clip = (opt[k] for k in ("beta1", "beta2", "eps", "weight_decay", "grad_clip"))
    losses, norms, margin = [], [], float("inf")
    for s in range(nsteps):
        out, g = grads_of(cfg, p, x, y)
        margin = min([margin] + [route_margin(z, cfg["K"]) for z in out["z"]])
        losses.append(float(out["loss"]))
        norm = global_norm(g)
        norms.append(norm)
        scale = clip / norm if (clip > 0 and norm > clip) else 1.0
        lr = lr_at(opt, s, nsteps)
        t = s + 1
        for k in p:
            gk = g[k] * scale if scale != 1.0 else g[k]
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            mhat = m[k] / (1 - b1 ** t)
            vhat = v[k] / (1 - b2 ** t)
            dk = wd if k in MATRICES else 0.0
            p[k] = p[k] - lr * (mhat / (torch.sqrt(vhat) + eps) + dk * p[k])
    return losses, norms, margin


# --------------------------------------------------------------------------------------------------
# generation

def make_batch(V, B, T, seed):
    """Random tokens; y is x shifted left with one extra random token; a few targets ignored."""
    g = torch.Generator().manual_seed(seed + 1000003)
    tok = torch.randint(0, V, (B, T + 1), generator=g)
    x, y = tok[:, :T].clone(), tok[:, 1:].clone()
    y[0, :3] = -1          # first 3 targets of sequence 0
    y[B - 1, T - 1] = -1   # last target of the last sequence
    return x, y


def generate(name, spec, index, outdir, init_std, nsteps, verbose=True):
    V, T, L, C, H, Hkv, E, K, F, B, aux_coef, z_coef = spec
    cfg = make_config(V, T, L, C, H, Hkv, E, K, F, aux_coef=aux_coef, z_coef=z_coef)
    opt = {k: (f32(v) if isinstance(v, float) else v) for k, v in OPT.items()}
    seed = BASE_SEED + index
    params = init_params(cfg, seed, init_std)
    x, y = make_batch(V, B, T, seed)

    out, grads = grads_of(cfg, params, x, y)
    if name == "empty":
        zero = (out["counts"] == 0).any(dim=1)
        assert bool(zero.all()), f"{name}: every layer needs an expert with no token"
    losses, norms, margin = adamw_steps(cfg, params, x, y, opt, nsteps)
    assert abs(losses[0] - float(out["loss"])) <= 1e-6 * abs(losses[0])

    write_checkpoint(os.path.join(outdir, f"{name}_model.bin"), cfg, params, seed=seed)
    d = dict(x=x, y=y, logits=out["logits"], ce=out["ce"].reshape(1), aux=out["aux"],
             zl=out["zl"], loss=out["loss"].reshape(1), experts=out["experts"], grads=grads,
             losses=np.array(losses), norms=np.array(norms))
    write_debug(os.path.join(outdir, f"{name}_debug.bin"), cfg, opt, d)
    if verbose:
        print(f"{name:6s} seed {seed} params {num_params(cfg):6d} loss {float(out['loss']):.6f} "
              f"ce {float(out['ce']):.6f} aux {[round(float(a), 4) for a in out['aux']]} "
              f"zl {[round(float(a), 4) for a in out['zl']]} "
              f"counts {out['counts'].tolist()} | steps loss {losses[0]:.4f}->{losses[-1]:.4f} "
              f"norm0 {norms[0]:.3f} min route margin {margin:.2e}")
    return margin


# --------------------------------------------------------------------------------------------------
# GRPO (dev/GRPO.md; the math in dev/MODEL.md, "GRPO post-training"): group advantages, the
# PPO-clipped surrogate with the k3 KL to a reference, the three loss aggregations, and M mini-batch
# AdamW updates on one rollout batch. NAME_grpo.bin (next to NAME_model.bin, listed in
# grpo_manifest.txt) holds a rollout batch made up here (random prompts and responses, rewards, the
# sampler's and the reference's log-probs) and, per mini-batch update, the loss, the clipped token
# count, the grad norm and every gradient.

GRPO_MAGIC = 20251127
GRPO_VERSION = 2
GRPO_KL_MAX = 10.0
# NAME (a TEST_CONFIGS name), P prompts, G samples each, M mini-batches, aggregation (0 token mean,
# 1 per-sequence mean, 2 Dr. GRPO), rewards ("mixed": group 0 all equal, the others random with both
# values; "equal": every reward 1), KL coefficient, clip epsilon, temperature of every log-prob,
# router losses in the loss (1) or not, weight decay on the matrices only (1, as pre-training) or on
# every parameter (0, verl's AdamW), AdamW beta2 and weight decay, response tokens whose reference
# log-prob is pushed up by 4 so that their KL term is clamped
GRPO_CASES = [
    ("dense", 4, 3, 2, 0, "mixed", 0.05, 0.2, 1.0, 1, 1, 0.95, 0.1, 0),    # pre-training's AdamW, router terms in
    ("e6",    3, 3, 3, 0, "mixed", 0.05, 0.2, 0.7, 0, 0, 0.999, 0.01, 3),  # verl's settings, T < 1, clamped KL
    ("gqa",   2, 5, 1, 1, "mixed", 0.05, 0.2, 1.3, 0, 0, 0.999, 0.01, 0),  # per-sequence mean, T > 1
    ("mqa",   2, 3, 2, 2, "mixed", 0.05, 0.2, 1.0, 0, 0, 0.999, 0.01, 2),  # Dr. GRPO with a reference
    ("kE",    2, 4, 2, 0, "equal", 0.05, 0.2, 1.0, 1, 0, 0.999, 0.01, 0),  # no advantage: KL and router only
]
GRPO_OPT = dict(lr=1e-3, beta1=0.9, eps=1e-8, grad_clip=1.0)


def grpo_advantages(reward, G):
    """(r - group mean) / (group std + 1e-6), std with Bessel's correction; all-equal groups: 0."""
    g = reward.double().view(-1, G)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)
    adv[(g == g[:, :1]).all(1)] = 0.0
    return adv.view(-1).float()


def grpo_logp(cfg, p, x, y, temp):
    """Per-position log-probs of the targets y at temperature temp (the logits divided by it, as
    verl does), and the forward's outputs."""
    out = forward(cfg, p, x, y)
    B, T = x.shape
    logits = out["logits"].reshape(B * T, -1) / temp
    return -Fn.cross_entropy(logits, y.reshape(-1).clamp(min=0), reduction="none"), out


def grpo_loss(cfg, p, x, y, adv, old_logp, ref_logp, clip, beta, agg, R, temp=1.0, router=True):
    """The GRPO loss of rows x (targets y: response tokens, -1 elsewhere), with the router terms if
    router. Returns (loss, number of clipped tokens, per-position log-probs, ratios, number of
    clamped KL tokens)."""
    logp_all, out = grpo_logp(cfg, p, x, y, temp)
    B, T = x.shape
    yf = y.reshape(-1)
    sel = (yf >= 0).nonzero().view(-1)                  # the response tokens
    row = sel // T
    logp = logp_all[sel]
    ratio = torch.exp(logp - old_logp.reshape(-1)[sel])
    A = adv[row]
    pg1, pg2 = -A * ratio, -A * torch.clamp(ratio, 1 - clip, 1 + clip)
    tok = torch.maximum(pg1, pg2)
    clamped = 0
    if beta > 0:
        d = ref_logp.reshape(-1)[sel] - logp
        k3 = torch.exp(d) - d - 1
        clamped = int((k3 > GRPO_KL_MAX).sum())
        tok = tok + beta * torch.clamp(k3, max=GRPO_KL_MAX)
    lens = torch.bincount(row, minlength=B).to(tok.dtype)
    nseq = int((lens > 0).sum())
    if agg == 0:
        L = tok.sum() / sel.numel()
    elif agg == 1:
        L = (tok / lens[row]).sum() / nseq
    else:
        L = tok.sum() / (nseq * R)
    loss = L + (cfg["aux_coef"] * out["aux"].sum() + cfg["z_coef"] * out["zl"].sum() if router else 0.0)
    return loss, int((pg2 > pg1).sum()), logp_all.view(B, T), ratio, clamped


def grpo_rollout_batch(cfg, P, G, rewards, g):
    """Random prompt + response rows laid out as the trainer's rollouts (rollouts_set_row)."""
    V, T = cfg["V"], cfg["T"]
    eot = V - 1
    rows = P * G
    x = torch.full((rows, T), eot, dtype=torch.long)
    y = torch.full((rows, T), -1, dtype=torch.long)
    for pi in range(P):
        plen = int(torch.randint(1, 4, (1,), generator=g))
        prompt = torch.randint(0, V, (plen,), generator=g)
        for j in range(G):
            rlen = int(torch.randint(1, T + 2 - plen, (1,), generator=g))
            seq = torch.cat([prompt, torch.randint(0, V, (rlen,), generator=g)])
            n = min(plen + rlen, T)
            x[pi * G + j, :n] = seq[:n]
            y[pi * G + j, plen - 1:plen + rlen - 1] = seq[plen:plen + rlen]
    if rewards == "equal":
        r = torch.ones(rows)
    else:
        r = torch.zeros(rows)
        r[:G] = 1.0                                      # group 0: all right (zero variance)
        for pi in range(1, P):
            k = 1 + int(torch.randint(0, G - 1, (1,), generator=g))   # 1..G-1 right: both values
            r[pi * G + torch.randperm(G, generator=g)[:k]] = 1.0
    return x, y, r


def grpo_generate(case, outdir, verbose=True):
    name, P, G, M, agg, rewards, beta, clip, temp, router, decay_matrices_only, beta2, wd, n_clamp = case
    index = [c[0] for c in TEST_CONFIGS].index(name)
    ck = read_checkpoint(os.path.join(outdir, f"{name}_model.bin"))
    cfg = ck["cfg"]
    R = cfg["T"]
    opt = {k: f32(v) for k, v in dict(GRPO_OPT, beta2=beta2, weight_decay=wd).items()}
    beta, clip, temp = f32(beta), f32(clip), f32(temp)
    for trial in range(50):  # a batch whose ratios all stay clear of the clip boundaries
        g = torch.Generator().manual_seed(BASE_SEED + 100 * index + trial)
        p = {k: torch.from_numpy(a.copy()) for k, a in ck["params"].items()}
        x, y, reward = grpo_rollout_batch(cfg, P, G, rewards, g)
        adv = grpo_advantages(reward, G)
        with torch.no_grad():
            logp0 = grpo_logp(cfg, p, x, y, temp)[0].view(x.shape)
        mask = y >= 0
        # pi_old: the current policy moved by a random amount, so some ratios fall outside 1 +- eps
        old_logp = torch.where(mask, logp0 + 0.3 * torch.randn(x.shape, generator=g), torch.zeros(x.shape))
        ref_logp = torch.where(mask, logp0 + 0.5 * torch.randn(x.shape, generator=g), torch.zeros(x.shape))
        # the first n_clamp response tokens (in row order) get a reference log-prob 4 above the policy's:
        # exp(4) - 4 - 1 = 49.6, far above the clamp at 10
        for i in mask.reshape(-1).nonzero().view(-1)[:n_clamp].tolist():
            ref_logp.view(-1)[i] = logp0.view(-1)[i] + 4.0
        m_state = {k: torch.zeros_like(t) for k, t in p.items()}
        v_state = {k: torch.zeros_like(t) for k, t in p.items()}
        mb, steps, margin = P * G // M, [], float("inf")
        for m in range(M):
            s = slice(m * mb, (m + 1) * mb)
            ps = {k: t.clone().requires_grad_(True) for k, t in p.items()}
            loss, clipped, _, ratio, clamped = grpo_loss(cfg, ps, x[s], y[s], adv[s], old_logp[s], ref_logp[s], clip,
                                                         beta, agg, R, temp, router)
            loss.backward()
            grads = {k: t.grad.detach().clone() for k, t in ps.items()}
            r_ = ratio.detach()
            margin = min(margin, float(torch.minimum((r_ - (1 - clip)).abs(), (r_ - (1 + clip)).abs()).min()))
            norm = global_norm(grads)
            scale = opt["grad_clip"] / norm if norm > opt["grad_clip"] else 1.0
            t = m + 1
            for k in p:  # torch's AdamW: p * (1 - lr * wd), then the Adam step
                dk = opt["weight_decay"] if (k in MATRICES or not decay_matrices_only) else 0.0
                p[k] = p[k] - opt["lr"] * dk * p[k]
                gk = grads[k] * scale
                m_state[k] = opt["beta1"] * m_state[k] + (1 - opt["beta1"]) * gk
                v_state[k] = opt["beta2"] * v_state[k] + (1 - opt["beta2"]) * gk * gk
                mhat = m_state[k] / (1 - opt["beta1"] ** t)
                vhat = v_state[k] / (1 - opt["beta2"] ** t)
                p[k] = p[k] - opt["lr"] * (mhat / (torch.sqrt(vhat) + opt["eps"]))
            steps.append(dict(loss=float(loss), clipped=clipped, clamped=clamped, norm=norm, grads=grads))
        if margin > 1e-3:
            break
    else:
        raise RuntimeError(f"{name}: no rollout batch with ratios clear of the clip boundaries")
    clipped_total = sum(st["clipped"] for st in steps)
    if rewards == "mixed" and clipped_total == 0:
        raise RuntimeError(f"{name}: no clipped token")
    if sum(st["clamped"] for st in steps) < n_clamp:
        raise RuntimeError(f"{name}: fewer clamped KL tokens than the {n_clamp} planted")
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = GRPO_MAGIC, GRPO_VERSION
    h[2:9] = [P * G, cfg["T"], P, G, M, agg, R]
    for i, v in enumerate((clip, beta, opt["lr"], opt["beta1"], opt["beta2"], opt["eps"], opt["weight_decay"],
                           opt["grad_clip"], temp)):
        h[9 + i] = f32_bits(v)
    h[18], h[19] = router, decay_matrices_only
    chunks = [h, x.numpy().astype("<i4"), y.numpy().astype("<i4"), reward.numpy().astype("<f4"),
              adv.numpy().astype("<f4"), old_logp.numpy().astype("<f4"), ref_logp.numpy().astype("<f4")]
    for st in steps:
        chunks += [np.array([st["loss"], st["clipped"], st["norm"], st["clamped"]], dtype="<f4"),
                   flatten_params(cfg, st["grads"])]
    _write_atomic(os.path.join(outdir, f"{name}_grpo.bin"), chunks)
    if verbose:
        print(f"grpo {name:6s} P {P} G {G} M {M} agg {agg} rewards {rewards} kl {beta:g} temp {temp:g} router {router} "
              f"decay {'matrices' if decay_matrices_only else 'all'} | losses "
              f"{[round(st['loss'], 5) for st in steps]} clipped {[st['clipped'] for st in steps]} "
              f"clamped {[st['clamped'] for st in steps]} "
              f"norms {[round(st['norm'], 4) for st in steps]} | zero-variance groups "
              f"{int((reward.view(-1, G) == reward.view(-1, G)[:, :1]).all(1).sum())} | min ratio margin {margin:.1e}")


# A real rollout batch (test_moe's test_rollouts_for_pytorch): the C sampler's log-probs (pi_old) and
# the C reference model's, both at the rollouts' temperature, against PyTorch's from the two
# checkpoints. The reference model is the policy's checkpoint with every matrix moved at random, so
# that a reference computed with the policy fails the check.
GRPO_ROLLOUT_CONFIG = "e6"
ROLLOUTS_MAGIC = 20251128
ROLLOUT_TOL = 1e-4


def grpo_reference_model(outdir):
    name = GRPO_ROLLOUT_CONFIG
    ck = read_checkpoint(os.path.join(outdir, f"{name}_model.bin"))
    g = torch.Generator().manual_seed(BASE_SEED + 7)
    params = {}
    for k, a in ck["params"].items():
        t = torch.from_numpy(a.copy())
        params[k] = t + 0.02 * torch.randn(t.shape, generator=g) if k in MATRICES else t
    write_checkpoint(os.path.join(outdir, f"{name}_grpo_reference.bin"), ck["cfg"], params, seed=ck["seed"])


def check_rollouts(path, outdir):
    """Returns True if the rollout batch's two log-probs match PyTorch's (see above)."""
    raw = open(path, "rb").read()
    h = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    if h[0] != ROLLOUTS_MAGIC or h[1] != 1:
        print(f"{path}: not a rollout batch (magic {h[0]}, version {h[1]})")
        return False
    rows, T, temp = int(h[2]), int(h[3]), bits_f32(h[4])
    N = rows * T
    body = np.frombuffer(raw[HEADER_BYTES:], dtype="<i4")
    if body.size != 4 * N:
        print(f"{path}: {body.size * 4} bytes after the header, expected {16 * N}")
        return False
    x = torch.from_numpy(body[:N].astype(np.int64)).view(rows, T)
    y = torch.from_numpy(body[N:2 * N].astype(np.int64)).view(rows, T)
    old_logp = torch.from_numpy(body[2 * N:3 * N].view("<f4").copy())
    ref_logp = torch.from_numpy(body[3 * N:].view("<f4").copy())
    name = GRPO_ROLLOUT_CONFIG
    logp = {}
    for which, f in (("policy", f"{name}_model.bin"), ("reference", f"{name}_grpo_reference.bin")):
        ck = read_checkpoint(os.path.join(outdir, f))
        p = {k: torch.from_numpy(a.copy()) for k, a in ck["params"].items()}
        with torch.no_grad():
            logp[which] = grpo_logp(ck["cfg"], p, x, y, temp)[0]
    sel = y.reshape(-1) >= 0
    d_old = float((old_logp - logp["policy"])[sel].abs().max())
    d_ref = float((ref_logp - logp["reference"])[sel].abs().max())
    apart = float((logp["policy"] - logp["reference"])[sel].abs().max())
    with torch.no_grad():  # the same tokens at temperature 1: what the log-probs were before GRPO took them at -rt
        ck = read_checkpoint(os.path.join(outdir, f"{name}_model.bin"))
        untempered = grpo_logp(ck["cfg"], {k: torch.from_numpy(a.copy()) for k, a in ck["params"].items()}, x, y, 1.0)[0]
    d_temp = float((old_logp - untempered)[sel].abs().max())
    ok = d_old <= ROLLOUT_TOL and d_ref <= ROLLOUT_TOL and apart > 10 * ROLLOUT_TOL and d_temp > 10 * ROLLOUT_TOL
    print(f"rollouts {path}: {rows} rows, {int(sel.sum())} response tokens, temperature {temp:g} | sampler (pi_old) vs "
          f"PyTorch policy max|diff| {d_old:.2e}, reference vs PyTorch reference {d_ref:.2e} (tolerance {ROLLOUT_TOL:g}) | "
          f"policy vs reference {apart:.2e}, temperature {temp:g} vs 1 {d_temp:.2e} (each must exceed "
          f"{10 * ROLLOUT_TOL:g}): {'ok' if ok else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------------------------------
# checks

def selftest(outdir, init_std):
    """Re-read every file of the manifest: sizes, headers, and a fresh recomputation of the debug
    state from the re-read checkpoint. Also checks the tie-breaking of route()."""
    ok = True
    z = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 5.0, 5.0, 4.0]])
    got = route(z, 3).tolist()
    want = [[1, 2, 4], [0, 1, 2], [2, 3, 4]]
    if got != want:
        print(f"FAIL route tie-breaking: {got} != {want}")
        ok = False
    with open(os.path.join(outdir, "manifest.txt")) as f:
        names = [s.strip() for s in f if s.strip()]
    for name in names:
        ck = read_checkpoint(os.path.join(outdir, f"{name}_model.bin"))
        cfg = ck["cfg"]
        size = os.path.getsize(os.path.join(outdir, f"{name}_model.bin"))
        assert size == HEADER_BYTES + 4 * num_params(cfg) and ck["has_opt"] == 0 and ck["step"] == 0
        d = read_debug(os.path.join(outdir, f"{name}_debug.bin"), cfg)
        params = {k: torch.from_numpy(a.copy()) for k, a in ck["params"].items()}
        x, y = torch.from_numpy(d["x"]).long(), torch.from_numpy(d["y"]).long()
        out, g = grads_of(cfg, params, x, y)
        errs = dict(
            logits=float((out["logits"] - torch.from_numpy(d["logits"])).abs().max()),
            loss=abs(float(out["loss"]) - float(d["loss"][0])),
            loss_sum=abs(float(d["ce"][0]) + cfg["aux_coef"] * float(d["aux"].sum())
                         + cfg["z_coef"] * float(d["zl"].sum()) - float(d["loss"][0])),
            grads=max(float((g[k] - torch.from_numpy(d["grads"][k])).abs().max()) for k in g),
            losses0=abs(float(d["losses"][0]) - float(d["loss"][0])),
        )
        same_experts = bool((out["experts"].numpy() == d["experts"]).all())
        # chosen experts are ordered by router logit, ids distinct and in range
        ex = d["experts"]
        distinct = all(len(set(r)) == len(r) for r in ex.reshape(-1, cfg["K"]).tolist())
        inrange = bool(((ex >= 0) & (ex < cfg["E"])).all())
        ignored = int((d["y"] == -1).sum())
        bad = (max(errs.values()) > 1e-5 or not same_experts or not distinct or not inrange
               or ignored == 0 or not np.isfinite(d["norms"]).all())
        ok = ok and not bad
        print(f"{'FAIL' if bad else 'ok  '} {name:6s} sizes/headers ok, max|diff| "
              + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
              + f" experts_same {same_experts} ignored_targets {ignored}")
    print("selftest " + ("PASSED" if ok else "FAILED"))
    return ok


def gradcheck(names, init_std, verbose=False, nper=3, h=1e-5, atol=1e-9, rtol=1e-6):
    """Compare float64 autograd gradients with central differences for a few entries per tensor
    (all configs' tensors, plus entries of the busiest expert of layer 0 for w1/w3/w2). An entry passes
    if |autograd - fd| <= atol + rtol*|fd|; perturbations that change the routing are skipped."""
    worst = 0.0
    for index, spec in enumerate(TEST_CONFIGS):
        name = spec[0]
        if name not in names:
            continue
        V, T, L, C, H, Hkv, E, K, F, B, aux_coef, z_coef = spec[1:]
        cfg = make_config(V, T, L, C, H, Hkv, E, K, F, aux_coef=aux_coef, z_coef=z_coef)
        seed = BASE_SEED + index
        p = {k: t.double() for k, t in init_params(cfg, seed, init_std).items()}
        x, y = make_batch(V, B, T, seed)
        out, g = grads_of(cfg, p, x, y)
        base_experts = out["experts"]
        rng = np.random.RandomState(seed)
        cworst, lines, nz = 0.0, [], 0
        for k in p:
            flat = p[k].view(-1)
            gf = g[k].view(-1)
            picks = list(rng.randint(0, flat.numel(), nper))
            if k in ("w1", "w2", "w3"):   # also pick entries of an expert that received tokens
                used = int(out["counts"][0].argmax())
                per = flat.numel() // (L * E)
                picks += [used * per + int(rng.randint(per)) for _ in range(nper)]
            for i in picks:
                old = float(flat[i])
                with torch.no_grad():
                    flat[i] = old + h
                o1 = forward(cfg, p, x, y)
                with torch.no_grad():
                    flat[i] = old - h
                o2 = forward(cfg, p, x, y)
                with torch.no_grad():
                    flat[i] = old
                if not (torch.equal(o1["experts"], base_experts) and torch.equal(o2["experts"], base_experts)):
                    continue  # routing changed: not differentiable here
                fd = (float(o1["loss"]) - float(o2["loss"])) / (2 * h)
                ad = float(gf[i])
                err = abs(fd - ad)
                ratio = err / (atol + rtol * abs(fd))          # <= 1 passes
                cworst = max(cworst, ratio)
                nz += ad != 0.0
                lines.append(f"  {k}[{i}] autograd {ad:+.10e} fd {fd:+.10e} |diff| {err:.1e}"
                             + ("  FAIL" if ratio > 1 else ""))
        worst = max(worst, cworst)
        print(f"{name}: {len(lines)} entries ({nz} nonzero), worst |diff|/(atol+rtol|fd|) = {cworst:.2f}")
        if verbose or cworst > 1:
            print("\n".join(lines))
    ok = worst <= 1.0
    print(f"gradcheck (atol {atol:g}, rtol {rtol:g}) {'PASSED' if ok else 'FAILED'}")
    return ok


def check_file(path):
    with open(path, "rb") as f:
        magic = int(np.frombuffer(f.read(4), dtype="<i4")[0])
    if magic == CKPT_MAGIC:
        ck = read_checkpoint(path)
        print(f"{path}: checkpoint ok, cfg {ck['cfg']}, params {ck['nparams']}, optimizer {ck['has_opt']}, "
              f"step {ck['step']}, data {ck['data_pos']}, rng {ck['rng']}, seed {ck['seed']}")
    elif magic == DEBUG_MAGIC:
        mp = path.replace("_debug.bin", "_model.bin")
        d = read_debug(path, read_checkpoint(mp)["cfg"])
        print(f"{path}: debug state ok (cfg from {mp}), B {d['B']} T {d['T']} nsteps {d['nsteps']} "
              f"opt {d['opt']} loss {d['loss'][0]:.6f} losses {np.round(d['losses'], 5).tolist()}")
    else:
        raise ValueError(f"{path}: unknown magic {magic}")


def compare(dir_a, dir_b):
    with open(os.path.join(dir_a, "manifest.txt")) as f:
        names = [s.strip() for s in f if s.strip()]
    for name in names:
        ca = read_checkpoint(os.path.join(dir_a, f"{name}_model.bin"))
        cb = read_checkpoint(os.path.join(dir_b, f"{name}_model.bin"))
        da = read_debug(os.path.join(dir_a, f"{name}_debug.bin"), ca["cfg"])
        db = read_debug(os.path.join(dir_b, f"{name}_debug.bin"), cb["cfg"])
        pd = max(float(np.abs(ca["params"][k] - cb["params"][k]).max()) for k in ca["params"])
        gd = max(float(np.abs(da["grads"][k] - db["grads"][k]).max()) for k in da["grads"])
        gs = max(float(np.abs(da["grads"][k]).max()) for k in da["grads"])
        print(f"{name:6s} params {pd:.1e} logits {np.abs(da['logits'] - db['logits']).max():.1e} "
              f"loss {abs(da['loss'][0] - db['loss'][0]):.1e} grads {gd:.1e} (max|g| {gs:.2f}) "
              f"losses {np.abs(da['losses'] - db['losses']).max():.1e} "
              f"norms {np.abs(da['norms'] - db['norms']).max():.1e} "
              f"x,y,experts equal {bool((da['x'] == db['x']).all() and (da['y'] == db['y']).all() and (da['experts'] == db['experts']).all())}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--outdir", default=os.path.join(here, "ref"))
    ap.add_argument("--configs", default=",".join(c[0] for c in TEST_CONFIGS),
                    help="comma-separated subset of: " + ",".join(c[0] for c in TEST_CONFIGS))
    ap.add_argument("--init_std", type=float, default=0.1, help="init std (spec: 0.02; tests: 0.1)")
    ap.add_argument("--nsteps", type=int, default=10)
    ap.add_argument("--selftest", action="store_true", help="verify the files in --outdir")
    ap.add_argument("--gradcheck", action="store_true", help="autograd vs finite differences")
    ap.add_argument("--verbose", action="store_true", help="gradcheck: print every entry")
    ap.add_argument("--check", metavar="FILE", help="validate one checkpoint or debug file")
    ap.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"))
    ap.add_argument("--check-rollouts", metavar="FILE", help="test_moe's rollout batch against PyTorch (--outdir: "
                    "the checkpoints)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [s for s in args.configs.split(",") if s]
    known = [c[0] for c in TEST_CONFIGS]
    for n in names:
        if n not in known:
            ap.error(f"unknown config {n}")
    if args.check:
        check_file(args.check)
        return 0
    if args.compare:
        compare(*args.compare)
        return 0
    if args.check_rollouts:
        return 0 if check_rollouts(args.check_rollouts, args.outdir) else 1
    if args.gradcheck:
        return 0 if gradcheck(names, args.init_std, args.verbose) else 1
    if args.selftest:
        return 0 if selftest(args.outdir, args.init_std) else 1
    os.makedirs(args.outdir, exist_ok=True)
    print(f"torch {torch.__version__}, writing {args.outdir}")
    for index, spec in enumerate(TEST_CONFIGS):
        if spec[0] in names:
            generate(spec[0], spec[1:], index, args.outdir, args.init_std, args.nsteps)
    _write_atomic(os.path.join(args.outdir, "manifest.txt"), ["".join(n + "\n" for n in names).encode()])
    cases = [c for c in GRPO_CASES if c[0] in names]
    for case in cases:
        grpo_generate(case, args.outdir)
    _write_atomic(os.path.join(args.outdir, "grpo_manifest.txt"), ["".join(c[0] + "\n" for c in cases).encode()])
    if GRPO_ROLLOUT_CONFIG in names:
        grpo_reference_model(args.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
