#!/usr/bin/env python3
"""
Export one of our checkpoints (model_NNNNNNNN.bin, see README "File formats") to a Hugging Face
Mixtral directory that transformers.MixtralForCausalLM.from_pretrained(OUTDIR) loads:

    OUTDIR/config.json
    OUTDIR/generation_config.json
    OUTDIR/model.safetensors            (or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                         with --max-shard-mb)

Tensor names are those of the released Mixtral checkpoints (model.layers.l.block_sparse_moe.experts.e.w1.weight,
...), which every transformers version with Mixtral loads (recent versions fuse the experts internally
while loading). The optimizer state of the checkpoint, if any, is ignored. Needs numpy and the
`safetensors` package (pip install safetensors), which writes the files.

usage: python scripts/export_hf.py CKPT OUTDIR [--dtype float32|bfloat16|float16] [--eot-id N] [--max-shard-mb MB]
"""
import argparse
import json
import os
import sys

import numpy as np

try:
    import safetensors
    import safetensors.numpy
except ImportError:  # an ExportError when the weights are written; --help and the reader work without it
    safetensors = None

CKPT_MAGIC = 20251123
CKPT_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ExportError(Exception):
    pass


def f32_from_bits(i):
    return float(np.array([i], dtype=np.int32).view(np.float32)[0])


def clean_float(x):
    """Shortest decimal that reads back as the same float32 (1e-05 rather than 9.99999974737875e-06)."""
    return float(str(np.float32(x)))


def read_checkpoint_header(path):
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) != HEADER_BYTES:
        raise ExportError(f"{path}: file too short for a checkpoint header")
    h = np.frombuffer(raw, dtype="<i4")
    if h[0] != CKPT_MAGIC:
        raise ExportError(f"{path}: bad magic {h[0]} (expected {CKPT_MAGIC})")
    if h[1] != CKPT_VERSION:
        raise ExportError(f"{path}: unsupported checkpoint version {h[1]}")
    V, T, L, C, H, Hkv, E, K, F = (int(v) for v in h[2:11])
    cfg = dict(V=V, T=T, L=L, C=C, H=H, Hkv=Hkv, E=E, K=K, F=F,
               theta=f32_from_bits(h[11]), eps=f32_from_bits(h[12]),
               aux_coef=f32_from_bits(h[13]), z_coef=f32_from_bits(h[14]),
               has_opt=int(h[15]), step=int(h[16]),
               nparams=int(np.uint32(h[24])) | (int(np.uint32(h[25])) << 32))
    for k in ("V", "T", "L", "C", "H", "Hkv", "E", "K", "F"):
        if cfg[k] <= 0:
            raise ExportError(f"{path}: invalid {k}={cfg[k]}")
    if C % H != 0 or (C // H) % 2 != 0:
        raise ExportError(f"{path}: C={C} must be a multiple of H={H} with an even head size")
    if H % Hkv != 0:
        raise ExportError(f"{path}: H={H} is not a multiple of Hkv={Hkv}")
    if not 1 <= K <= E:
        raise ExportError(f"{path}: need 1 <= K={K} <= E={E}")
    return cfg


def param_layout(cfg):
    """Our parameter tensors, in file order: list of (name, shape)."""
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


def load_checkpoint(path):
    """Header dict and {name: read-only float32 memmap} of the parameters (optimizer state ignored)."""
    cfg = read_checkpoint_header(path)
    layout = param_layout(cfg)
    n = sum(int(np.prod(s)) for _, s in layout)
    if cfg["nparams"] not in (0, n):
        raise ExportError(f"{path}: header says {cfg['nparams']} parameters, config implies {n}")
    need = HEADER_BYTES + 4 * n * (3 if cfg["has_opt"] else 1)
    size = os.path.getsize(path)
    if size < HEADER_BYTES + 4 * n:
        raise ExportError(f"{path}: {size} bytes, need at least {HEADER_BYTES + 4 * n} for {n} parameters")
    if size != need:
        print(f"warning: {path} is {size} bytes, expected {need}", file=sys.stderr)
    flat = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES, shape=(n,))
    params, off = {}, 0
    for name, shape in layout:
        cnt = int(np.prod(shape))
        params[name] = flat[off:off + cnt].reshape(shape)
        off += cnt
    return cfg, params


def hf_tensor_list(cfg, params):
    """(hf_name, array view) in the order of a released Mixtral checkpoint."""
    out = [("model.embed_tokens.weight", params["wte"])]
    for l in range(cfg["L"]):
        p = f"model.layers.{l}."
        out += [
            (p + "input_layernorm.weight", params["attn_norm"][l]),
            (p + "self_attn.q_proj.weight", params["wq"][l]),
            (p + "self_attn.k_proj.weight", params["wk"][l]),
            (p + "self_attn.v_proj.weight", params["wv"][l]),
            (p + "self_attn.o_proj.weight", params["wo"][l]),
            (p + "post_attention_layernorm.weight", params["moe_norm"][l]),
            (p + "block_sparse_moe.gate.weight", params["wr"][l]),
        ]
        for e in range(cfg["E"]):
            q = p + f"block_sparse_moe.experts.{e}."
            out += [
                (q + "w1.weight", params["w1"][l, e]),
                (q + "w2.weight", params["w2"][l, e]),
                (q + "w3.weight", params["w3"][l, e]),
            ]
    out += [("model.norm.weight", params["final_norm"]), ("lm_head.weight", params["lm_head"])]
    return out


# ---------------------------------------------------------------------------------------------
# safetensors writer: the safetensors package's numpy API

ST_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def f32_to_bf16_bits(a):
    """float32 array -> uint16 bfloat16 bits, round to nearest even (what torch's .to(bfloat16) does)."""
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaNs quiet NaNs
    return r


def encode(a, dtype):
    """The stored array: float32 and float16 as themselves, bfloat16 as its uint16 bits."""
    if dtype == "float32":
        return np.ascontiguousarray(a, dtype="<f4")  # a view of the checkpoint's memmap, no copy
    if dtype == "float16":
        if a.size and float(np.max(np.abs(a))) > 65504.0:
            raise ExportError("a weight exceeds the float16 range (use --dtype bfloat16 or float32)")
        return np.ascontiguousarray(a, dtype="<f2")
    if dtype == "bfloat16":
        return f32_to_bf16_bits(a).astype("<u2")
    raise ExportError(f"unknown dtype {dtype}")


def bf16_spec(bits):
    """A uint16 array of bfloat16 bits as a tensor safetensors stores as BF16 (numpy has no bfloat16)."""
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8 reads the bytes in place
        return safetensors.TensorSpec(dtype="bfloat16", shape=list(bits.shape), data_ptr=bits.ctypes.data,
                                      data_len=bits.nbytes)
    return {"dtype": "bfloat16", "shape": list(bits.shape), "data": bits.tobytes()}


def write_safetensors(path, tensors, dtype="float32", metadata=None):
    """tensors: list of (name, array). Writes PATH.tmp with safetensors.numpy.save_file (bfloat16: with
    safetensors.serialize_file, which save_file calls, given the dtype by name), then renames it over PATH.
    The package orders the tensors itself (by dtype, then name); readers look them up by name."""
    if safetensors is None:
        raise ExportError("the safetensors package is needed to write the weights (pip install safetensors)")
    arrays = {name: encode(a, dtype) for name, a in tensors}
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    tmp = path + ".tmp"
    if dtype == "bfloat16":
        safetensors.serialize_file({name: bf16_spec(b) for name, b in arrays.items()}, tmp, metadata=meta)
    else:
        safetensors.numpy.save_file(arrays, tmp, metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sum(a.nbytes for a in arrays.values())


def hf_config(cfg, dtype="float32", eot_id=None):
    C, H = cfg["C"], cfg["H"]
    theta = clean_float(cfg["theta"])
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg["V"],
        "hidden_size": C,
        "intermediate_size": cfg["F"],
        "num_hidden_layers": cfg["L"],
        "num_attention_heads": H,
        "num_key_value_heads": cfg["Hkv"],
        "head_dim": C // H,
        "num_local_experts": cfg["E"],
        "num_experts_per_tok": cfg["K"],
        "hidden_act": "silu",
        "max_position_embeddings": cfg["T"],
        "rms_norm_eps": clean_float(cfg["eps"]),
        # transformers >= 5 reads rope_parameters, older versions rope_theta
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "router_aux_loss_coef": clean_float(cfg["aux_coef"]),
        "router_z_loss_coef": clean_float(cfg["z_coef"]),  # not used by transformers; kept for import_hf.py
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": None,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def export(ckpt, outdir, dtype="float32", eot_id=None, max_shard_mb=0, quiet=False):
    cfg, params = load_checkpoint(ckpt)
    os.makedirs(outdir, exist_ok=True)
    tensors = hf_tensor_list(cfg, params)
    itemsize = ST_DTYPES[dtype][1]
    meta = {"format": "pt"}
    # remove files of a previous export with another sharding so the directory is unambiguous
    for fn in os.listdir(outdir):
        if (fn.startswith("model") and fn.endswith(".safetensors")) or fn == "model.safetensors.index.json":
            os.remove(os.path.join(outdir, fn))
    if max_shard_mb and max_shard_mb > 0:
        limit = int(max_shard_mb * 1024 * 1024)
        shards, cur, cur_bytes = [], [], 0
        for name, a in tensors:
            nb = a.size * itemsize
            if cur and cur_bytes + nb > limit:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append((name, a))
            cur_bytes += nb
        if cur:
            shards.append(cur)
    else:
        shards = [tensors]
    total = 0
    if len(shards) == 1:
        total = write_safetensors(os.path.join(outdir, "model.safetensors"), shards[0], dtype, meta)
        files = ["model.safetensors"]
    else:
        n = len(shards)
        weight_map, files = {}, []
        for i, sh in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            total += write_safetensors(os.path.join(outdir, fn), sh, dtype, meta)
            files.append(fn)
            for name, _ in sh:
                weight_map[name] = fn
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(outdir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype, eot_id), f, indent=2)
        f.write("\n")
    gen = {"_from_model_config": True}
    if eot_id is not None:
        gen.update(bos_token_id=eot_id, eos_token_id=eot_id)
    with open(os.path.join(outdir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    if not quiet:
        n = sum(a.size for _, a in tensors)
        print(f"exported {ckpt} (step {cfg['step']}, {n} parameters, V={cfg['V']} T={cfg['T']} L={cfg['L']} "
              f"C={cfg['C']} H={cfg['H']} Hkv={cfg['Hkv']} E={cfg['E']} K={cfg['K']} F={cfg['F']}) "
              f"-> {outdir} [{dtype}, {', '.join(files)}, {total / 2**20:.1f} MiB]")
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description="our MoE checkpoint -> Hugging Face Mixtral directory")
    ap.add_argument("ckpt")
    ap.add_argument("outdir")
    ap.add_argument("--dtype", default="float32", choices=sorted(ST_DTYPES),
                    help="storage dtype of the weights (default float32, exact)")
    ap.add_argument("--eot-id", type=int, default=None,
                    help="end-of-text token id, written as bos/eos_token_id (default: none)")
    ap.add_argument("--max-shard-mb", type=float, default=0,
                    help="split the weights into shards of at most this many MiB (default: one file)")
    args = ap.parse_args(argv)
    try:
        export(args.ckpt, args.outdir, args.dtype, args.eot_id, args.max_shard_mb)
    except (ExportError, OSError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
