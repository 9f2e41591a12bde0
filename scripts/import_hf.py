#!/usr/bin/env python3
"""
Import a Hugging Face Mixtral directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json) into our checkpoint format (dev/FORMATS.md, "Checkpoint"): no optimizer
state (slot 15 = 0), step 0. Weights stored as bf16/fp16/fp64 are converted to float32.

Accepted tensor names: those of released Mixtral checkpoints and of save_pretrained
(model.layers.l.block_sparse_moe.experts.e.w1.weight, ...), and the fused layout transformers >= 5
keeps in memory (model.layers.l.mlp.gate.weight, model.layers.l.mlp.experts.gate_up_proj [E, 2F, C]
with the gate rows first, model.layers.l.mlp.experts.down_proj [E, C, F]). Configurations our model
cannot represent (biases, sliding window shorter than T, head_dim != hidden_size / heads, scaled or
partial RoPE, another activation, ...) are rejected with an error and exit status 1.

Needs only numpy. The checkpoint is written to CKPT.tmp and renamed over CKPT.

usage: python scripts/import_hf.py HFDIR CKPT [--seq-len T] [--z-coef Z]
"""
import argparse
import json
import os
import re
import sys

import numpy as np

CKPT_MAGIC = 20251123
CKPT_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ImportError_(Exception):
    pass


def bits_of_f32(x):
    return int(np.array([x], dtype=np.float32).view(np.int32)[0])


# ---------------------------------------------------------------------------------------------
# safetensors reader (numpy only)

ST_NP = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2",
         "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1"}


class SafetensorsFile:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 * 2**20:
                raise ImportError_(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n).decode("utf-8"))
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None)
        self.tensors = header
        self.size = os.path.getsize(path)

    def keys(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name]["shape"])

    def raw(self, name):
        """(read-only memmap in the stored dtype, safetensors dtype string)."""
        info = self.tensors[name]
        dt, shape = info["dtype"], tuple(info["shape"])
        b, e = info["data_offsets"]
        if dt not in ("F32", "F16", "F64", "BF16"):
            raise ImportError_(f"{self.path}: tensor {name} has unsupported dtype {dt}")
        if self.data_start + e > self.size:
            raise ImportError_(f"{self.path}: tensor {name} runs past the end of the file")
        count = int(np.prod(shape)) if shape else 1
        npdt = np.dtype(ST_NP[dt])
        if (e - b) != count * npdt.itemsize:
            raise ImportError_(f"{self.path}: tensor {name}: {e - b} bytes for shape {shape} {dt}")
        if count == 0:
            return np.zeros(shape, dtype=npdt), dt
        return np.memmap(self.path, dtype=npdt, mode="r", offset=self.data_start + b, shape=shape), dt


def to_f32(a, dt):
    if dt == "BF16":
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a).astype(np.float32)


class Lazy:
    """A stored tensor, sliced before conversion to float32 (keeps memory at one slice)."""

    def __init__(self, raw, dt):
        self.raw, self.dt = raw, dt
        self.shape = tuple(raw.shape)

    def __getitem__(self, idx):
        return Lazy(self.raw[idx], self.dt)

    def transpose(self, *axes):
        return Lazy(self.raw.transpose(*axes), self.dt)

    def f32(self):
        return to_f32(self.raw, self.dt)


class HFWeights:
    """All tensors of an HF directory, single-file or sharded, read lazily."""

    def __init__(self, hfdir):
        single = os.path.join(hfdir, "model.safetensors")
        index = os.path.join(hfdir, "model.safetensors.index.json")
        self.where = {}
        if os.path.exists(index):
            with open(index) as f:
                wm = json.load(f)["weight_map"]
            files = {}
            for name, fn in wm.items():
                if fn not in files:
                    files[fn] = SafetensorsFile(os.path.join(hfdir, fn))
                if name not in files[fn].tensors:
                    raise ImportError_(f"{fn} lacks {name} listed in model.safetensors.index.json")
                self.where[name] = files[fn]
        elif os.path.exists(single):
            st = SafetensorsFile(single)
            for name in st.keys():
                self.where[name] = st
        else:
            if any(fn.endswith((".bin", ".pt", ".pth")) for fn in os.listdir(hfdir)):
                raise ImportError_(f"{hfdir}: only safetensors weights are supported (found pickle weights; "
                                   "re-save with save_pretrained(..., safe_serialization=True))")
            raise ImportError_(f"{hfdir}: no model.safetensors or model.safetensors.index.json")
        self.used = set()

    def has(self, name):
        return name in self.where

    def shape(self, name):
        return self.where[name].shape(name)

    def get(self, name, shape):
        """Lazy tensor, shape-checked."""
        if name not in self.where:
            raise ImportError_(f"missing tensor {name}")
        have = self.shape(name)
        if have != tuple(shape):
            raise ImportError_(f"tensor {name} has shape {have}, expected {tuple(shape)}")
        self.used.add(name)
        return Lazy(*self.where[name].raw(name))


# ---------------------------------------------------------------------------------------------
# config

def read_config(hfdir, seq_len=None, z_coef=None):
    path = os.path.join(hfdir, "config.json")
    if not os.path.exists(path):
        raise ImportError_(f"{hfdir}: no config.json")
    with open(path) as f:
        c = json.load(f)
    errs = []
    mt = c.get("model_type")
    archs = c.get("architectures") or []
    if mt != "mixtral":
        errs.append(f"model_type is {mt!r}, only 'mixtral' is supported")
    if archs and any(a not in ("MixtralForCausalLM", "MixtralModel") for a in archs):
        errs.append(f"architectures {archs} is not MixtralForCausalLM")

    def req_int(k):
        v = c.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            errs.append(f"{k} = {v!r} is not a positive integer")
            return 1
        return v

    V = req_int("vocab_size")
    C = req_int("hidden_size")
    F = req_int("intermediate_size")
    L = req_int("num_hidden_layers")
    H = req_int("num_attention_heads")
    Hkv = c.get("num_key_value_heads")
    Hkv = H if Hkv is None else Hkv
    if not isinstance(Hkv, int) or Hkv <= 0:
        errs.append(f"num_key_value_heads = {Hkv!r} is not a positive integer")
        Hkv = H
    E = req_int("num_local_experts")
    K = req_int("num_experts_per_tok")
    if C % H != 0:
        errs.append(f"hidden_size {C} is not a multiple of num_attention_heads {H}")
    D = C // H
    hd = c.get("head_dim")
    if hd is not None and hd != D:
        errs.append(f"head_dim {hd} != hidden_size / num_attention_heads = {D} (not representable)")
    if D % 2 != 0:
        errs.append(f"head size {D} is odd (RoPE needs an even head size)")
    if H % Hkv != 0:
        errs.append(f"num_attention_heads {H} is not a multiple of num_key_value_heads {Hkv}")
    if not 1 <= K <= E:
        errs.append(f"num_experts_per_tok {K} must be in 1..num_local_experts {E}")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        errs.append(f"hidden_act {act!r} is not silu")
    for k in ("attention_bias", "mlp_bias", "bias"):
        if c.get(k):
            errs.append(f"{k} is true (our model has no biases)")
    # RoPE: plain rotate-half RoPE over the full head only
    rp = c.get("rope_parameters") or {}
    rs = c.get("rope_scaling")
    theta = rp.get("rope_theta", c.get("rope_theta", 1e6))  # 1e6 = transformers' Mixtral default
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype != "default":
        errs.append(f"rope_parameters.rope_type {rtype!r} is not 'default' (scaled RoPE is not representable)")
    if rs:
        st = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else rs
        if st != "default":
            errs.append(f"rope_scaling {rs!r} is not representable")
    prf = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        errs.append(f"partial_rotary_factor {prf} != 1 is not representable")
    eps = c.get("rms_norm_eps", 1e-5)
    aux = c.get("router_aux_loss_coef", 0.001)
    if z_coef is None:
        z_coef = c.get("router_z_loss_coef", 1e-3)
    maxpos = c.get("max_position_embeddings")
    T = seq_len if seq_len is not None else maxpos
    if not isinstance(T, int) or T <= 0:
        errs.append(f"sequence length {T!r} invalid (config has no max_position_embeddings; pass --seq-len)")
        T = 1
    sw = c.get("sliding_window")
    if sw is not None and sw < T and c.get("use_sliding_window", True) is not False:
        errs.append(f"sliding_window {sw} < sequence length {T} (sliding-window attention is not representable; "
                    f"pass --seq-len <= {sw} to import it as full attention over shorter sequences)")
    if c.get("attention_dropout", 0.0):
        print(f"import_hf: note: attention_dropout {c['attention_dropout']} ignored (we use no dropout)",
              file=sys.stderr)
    if c.get("router_jitter_noise", 0.0):
        print(f"import_hf: note: router_jitter_noise {c['router_jitter_noise']} ignored (training-time only)",
              file=sys.stderr)
    if maxpos is not None and T > maxpos:
        print(f"import_hf: note: sequence length {T} > max_position_embeddings {maxpos}", file=sys.stderr)
    if errs:
        raise ImportError_("cannot represent this model:\n  - " + "\n  - ".join(errs))
    return dict(V=V, T=T, L=L, C=C, H=H, Hkv=Hkv, E=E, K=K, F=F, theta=float(theta), eps=float(eps),
                aux_coef=float(aux), z_coef=float(z_coef), tied=bool(c.get("tie_word_embeddings", False)))


# ---------------------------------------------------------------------------------------------
# conversion

def moe_prefix(w, l):
    p = f"model.layers.{l}."
    for cand in ("block_sparse_moe.", "mlp."):
        if w.has(p + cand + "gate.weight"):
            return p + cand
    raise ImportError_(f"missing router {p}block_sparse_moe.gate.weight")


def layer_pieces(w, cfg, l, kind):
    """Our tensor `kind` of layer l, as a list of Lazy pieces that concatenate to it (experts one by one)."""
    C, H, Hkv, E, F = (cfg[k] for k in ("C", "H", "Hkv", "E", "F"))
    D = C // H
    p = f"model.layers.{l}."
    simple = {
        "attn_norm": ("input_layernorm.weight", (C,)),
        "wq": ("self_attn.q_proj.weight", (H * D, C)),
        "wk": ("self_attn.k_proj.weight", (Hkv * D, C)),
        "wv": ("self_attn.v_proj.weight", (Hkv * D, C)),
        "wo": ("self_attn.o_proj.weight", (C, H * D)),
        "moe_norm": ("post_attention_layernorm.weight", (C,)),
    }
    if kind in simple:
        return [w.get(p + simple[kind][0], simple[kind][1])]
    moe = moe_prefix(w, l)
    if kind == "wr":
        return [w.get(moe + "gate.weight", (E, C))]
    fused = moe + "experts.gate_up_proj"
    if w.has(fused):
        if kind in ("w1", "w3"):
            shp = w.shape(fused)
            if shp == (E, 2 * F, C):
                gu = w.get(fused, shp)
            elif shp == (E, C, 2 * F) and C != 2 * F:
                gu = w.get(fused, shp).transpose(0, 2, 1)
            else:
                raise ImportError_(f"{fused} has shape {shp}, expected {(E, 2 * F, C)}")
            rows = slice(0, F) if kind == "w1" else slice(F, 2 * F)  # gate rows first, then up
            return [gu[e][rows] for e in range(E)]
        down = moe + "experts.down_proj"
        if not w.has(down):
            raise ImportError_(f"missing tensor {down}")
        shp = w.shape(down)
        if shp == (E, C, F):
            dp = w.get(down, shp)
        elif shp == (E, F, C) and C != F:
            dp = w.get(down, shp).transpose(0, 2, 1)
        else:
            raise ImportError_(f"{down} has shape {shp}, expected {(E, C, F)}")
        return [dp[e] for e in range(E)]
    shape = (C, F) if kind == "w2" else (F, C)
    return [w.get(moe + f"experts.{e}.{kind}.weight", shape) for e in range(E)]


def param_layout(cfg):
    V, L, C, H, Hkv, E, F = (cfg[k] for k in ("V", "L", "C", "H", "Hkv", "E", "F"))
    D = C // H
    return [("wte", (V, C)), ("attn_norm", (L, C)), ("wq", (L, H * D, C)), ("wk", (L, Hkv * D, C)),
            ("wv", (L, Hkv * D, C)), ("wo", (L, C, H * D)), ("moe_norm", (L, C)), ("wr", (L, E, C)),
            ("w1", (L, E, F, C)), ("w3", (L, E, F, C)), ("w2", (L, E, C, F)), ("final_norm", (C,)),
            ("lm_head", (V, C))]


IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def import_hf(hfdir, ckpt, seq_len=None, z_coef=None, quiet=False):
    cfg = read_config(hfdir, seq_len, z_coef)
    w = HFWeights(hfdir)
    bias = [n for n in w.where if n.endswith(".bias")]
    if bias:
        raise ImportError_(f"cannot represent this model: it has bias tensors ({', '.join(bias[:4])}"
                           f"{', ...' if len(bias) > 4 else ''})")
    V, L, C = cfg["V"], cfg["L"], cfg["C"]
    layout = param_layout(cfg)
    nparams = sum(int(np.prod(s)) for _, s in layout)
    wte = w.get("model.embed_tokens.weight", (V, C))
    if w.has("lm_head.weight"):
        lm_head = w.get("lm_head.weight", (V, C))
    elif cfg["tied"]:
        lm_head = wte
    else:
        raise ImportError_("missing tensor lm_head.weight (and tie_word_embeddings is false)")
    final_norm = w.get("model.norm.weight", (C,))

    hdr = np.zeros(HEADER_INTS, dtype="<i4")
    hdr[0], hdr[1] = CKPT_MAGIC, CKPT_VERSION
    hdr[2:11] = [cfg[k] for k in ("V", "T", "L", "C", "H", "Hkv", "E", "K", "F")]
    hdr[11:15] = [bits_of_f32(cfg[k]) for k in ("theta", "eps", "aux_coef", "z_coef")]
    hdr[15] = 0
    hdr[16] = 0
    hdr[24] = np.uint32(nparams & 0xFFFFFFFF).view(np.int32)
    hdr[25] = nparams >> 32

    # our layout is tensor-major with layers (then experts) inside; pieces are converted one at a time
    per_layer = ["attn_norm", "wq", "wk", "wv", "wo", "moe_norm", "wr", "w1", "w3", "w2"]
    tmp = ckpt + ".tmp"
    written = 0
    with open(tmp, "wb") as f:
        f.write(hdr.tobytes())

        def put(piece):
            nonlocal written
            a = np.ascontiguousarray(piece.f32(), dtype="<f4")
            f.write(a.tobytes())
            written += a.size

        put(wte)
        for kind in per_layer:
            for l in range(L):
                for piece in layer_pieces(w, cfg, l, kind):
                    put(piece)
        put(final_norm)
        put(lm_head)
        f.flush()
        os.fsync(f.fileno())
    if written != nparams:
        os.remove(tmp)
        raise ImportError_(f"internal error: wrote {written} parameters, expected {nparams}")
    leftover = sorted(n for n in w.where if n not in w.used and not IGNORABLE.search(n))
    if leftover:
        os.remove(tmp)
        raise ImportError_(f"cannot represent this model: unexpected tensors {', '.join(leftover[:6])}"
                           f"{', ...' if len(leftover) > 6 else ''} ({len(leftover)} in all)")
    os.replace(tmp, ckpt)
    if not quiet:
        print(f"imported {hfdir} -> {ckpt} ({nparams} parameters, V={V} T={cfg['T']} L={L} C={C} H={cfg['H']} "
              f"Hkv={cfg['Hkv']} E={cfg['E']} K={cfg['K']} F={cfg['F']} theta={cfg['theta']:g} "
              f"eps={cfg['eps']:g} aux_coef={cfg['aux_coef']:g} z_coef={cfg['z_coef']:g})")
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description="Hugging Face Mixtral directory -> our MoE checkpoint")
    ap.add_argument("hfdir")
    ap.add_argument("ckpt")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="sequence length T stored in the checkpoint (default: max_position_embeddings)")
    ap.add_argument("--z-coef", type=float, default=None,
                    help="router z-loss coefficient (default: config's router_z_loss_coef, else 1e-3)")
    args = ap.parse_args(argv)
    try:
        import_hf(args.hfdir, args.ckpt, args.seq_len, args.z_coef)
    except (ImportError_, OSError, ValueError, KeyError) as e:
        print(f"import_hf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
