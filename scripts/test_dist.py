#!/usr/bin/env python3
"""Training across processes equals training in one (dev/DISTRIBUTED.md).

Runs the one-process trainer and the MPI build under mpiexec on the same global batches, from the
same init, and checks:
  - data parallel (R = 2, 3), expert parallel (R = 2, 4 with -ep R) and both (R = 4, -ep 2): every
    step's loss, ce, aux and z within 1e-5 relative, the per-expert loads of every layer at every step
    identical (the chosen experts), every parameter tensor of the final checkpoint within 1e-5
    relative in norm (AdamW's m and v within 1e-4); says which runs are bit-identical;
  - R = 1 under mpiexec: the checkpoint is byte-identical to the one-process trainer's;
  - a batch where some rank of -ep 4 receives no token at all (the test asserts it happened);
  - checkpoints written under R ranks resume under R ranks bit for bit, and load in (and resume)
    the one-process trainer; the same run twice gives the same bits (no dependence on timing);
  - bad input (-ep not dividing E or R, -b not divisible by R, -rl across processes, a truncated
    checkpoint): a non-zero exit of every rank with an error naming the flag or file, never a hang.

  python3 scripts/test_dist.py --mpiexec .venv/bin/mpiexec --trainer ./train_moe --mpi-trainer ./train_moe_mpi
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

NAMES = ["wte", "attn_norm", "wq", "wk", "wv", "wo", "moe_norm", "wr", "w1", "w3", "w2", "final_norm", "lm_head"]
TOL = 1e-5
failures = []


def check(ok, what):
    print(("  ok    " if ok else "  FAIL  ") + what)
    if not ok:
        failures.append(what)


def tensor_sizes(h):
    V, L, C, H, Hkv, E, F = h[2], h[4], h[5], h[6], h[7], h[8], h[10]
    D = C // H
    return [V * C, L * C, L * H * D * C, L * Hkv * D * C, L * Hkv * D * C, L * C * H * D, L * C, L * E * C,
            L * E * F * C, L * E * F * C, L * E * C * F, C, V * C]


def read_ckpt(path):
    raw = open(path, "rb").read()
    h = np.frombuffer(raw[:1024], dtype=np.int32)
    body = np.frombuffer(raw[1024:], dtype=np.float32)
    sizes = tensor_sizes(h)
    n = sum(sizes)
    blocks = [body[i * n:(i + 1) * n] for i in range(len(body) // n)]  # params, m, v
    out = {}
    for bname, blk in zip(["param", "m", "v"], blocks):
        off = 0
        for name, sz in zip(NAMES, sizes):
            out["%s %s" % (bname, name)] = blk[off:off + sz].astype(np.float64)
            off += sz
    return h, out


def read_log(path):
    """step -> (loss, ce, aux, z) and (step, layer) -> loads, from log.txt"""
    losses, loads = {}, {}
    for line in open(path):
        m = re.match(r"step (\d+) loss (\S+) ce (\S+) aux (\S+) z (\S+) ", line)
        if m:
            losses[int(m.group(1))] = tuple(float(x) for x in m.groups()[1:])
        m = re.match(r"step (\d+) router layer (\d+) load ((?:\d+ )+)entropy", line)
        if m:
            loads[(int(m.group(1)), int(m.group(2)))] = [int(x) for x in m.group(3).split()]
    return losses, loads


class Runner:
    def __init__(self, args, tmp):
        self.a, self.tmp = args, tmp
        self.env = dict(os.environ, OMP_NUM_THREADS="1",
                        # more ranks than cores: MPICH's progress loop sleeps instead of spinning
                        MPIR_CVAR_CH4_PROGRESS_THROTTLE="1", MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT="1")

    def run(self, name, flags, ranks=0, ep=1, timeout=300):
        """ranks 0: the one-process trainer; else mpiexec -n ranks of the MPI build"""
        out = os.path.join(self.tmp, name)
        cmd = [self.a.trainer] if ranks == 0 else [self.a.mpiexec, "-n", str(ranks), self.a.mpi_trainer]
        cmd += flags + (["-ep", str(ep)] if ep > 1 else []) + ["-o", out]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", str(e.stdout or "") + str(e.stderr or "")
        return out, rc, text, time.time() - t0


def compare_runs(label, ref_dir, dir_, steps):
    rl, rloads = read_log(os.path.join(ref_dir, "log.txt"))
    dl, dloads = read_log(os.path.join(dir_, "log.txt"))
    worst = 0.0
    for s in range(1, steps + 1):
        if s not in rl or s not in dl:
            check(False, "%s: step %d missing from a log" % (label, s))
            return
        for a, b in zip(rl[s], dl[s]):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    check(worst <= TOL, "%s: loss, ce, aux, z of all %d steps within %.0e relative (worst %.2e)" % (label, steps, TOL, worst))
    same = len(rloads) > 0 and rloads.keys() == dloads.keys() and all(rloads[k] == dloads[k] for k in rloads)
    check(same, "%s: per-expert loads of every layer at every step identical (%d step-layers)" % (label, len(rloads)))
    ck = "model_%08d.bin" % steps
    rh, rt = read_ckpt(os.path.join(ref_dir, ck))
    dh, dt = read_ckpt(os.path.join(dir_, ck))
    check(np.array_equal(rh, dh), "%s: checkpoint headers identical (shape, step, data position, RNG)" % label)
    bits = open(os.path.join(ref_dir, ck), "rb").read() == open(os.path.join(dir_, ck), "rb").read()
    # the parameters at the test's tolerance; AdamW's m and v (whose small entries the different
    # summation order moves most, relatively) at 10x it
    for block, tol in [("param", TOL), ("m", 10 * TOL), ("v", 10 * TOL)]:
        rel, absd, where = 0.0, 0.0, ""
        for k in (k for k in rt if k.startswith(block + " ")):
            d = np.linalg.norm(rt[k] - dt[k]) / max(np.linalg.norm(rt[k]), 1e-30)
            if d > rel:
                rel, where = d, k.split()[1]
            absd = max(absd, float(np.max(np.abs(rt[k] - dt[k]))))
        check(rel <= tol, "%s: every %s tensor within %.0e relative in norm (worst %.2e in %s, max abs %.2e)%s"
              % (label, "parameter" if block == "param" else "AdamW " + block, tol, rel, where, absd,
                 ("; bit-identical" if bits else "; not bit-identical") if block == "param" else ""))


def empty_rank_seen(dir_, E, ep):
    _, loads = read_log(os.path.join(dir_, "log.txt"))
    El = E // ep
    seen = [(s, l, r) for (s, l), c in loads.items() for r in range(ep) if sum(c[r * El:(r + 1) * El]) == 0]
    return seen, len(loads)


def expect_error(runner, label, flags, ranks, ep, pattern, timeout=60):
    _, rc, text, secs = runner.run("bad_%d" % len(failures) + label.replace(" ", "_")[:20], flags, ranks, ep, timeout)
    ok = rc not in (0, "timeout") and re.search(pattern, text) is not None
    first = next((l for l in text.splitlines() if "Error" in l), text.strip().splitlines()[-1] if text.strip() else "")
    check(ok, "%s: exit %s in %.1f s, '%s'" % (label, rc, secs, first.strip()[:150]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--trainer", default="./train_moe")
    ap.add_argument("--mpi-trainer", default="./train_moe_mpi")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    args = ap.parse_args()
    for exe in (args.mpiexec, args.trainer, args.mpi_trainer):
        if not os.access(exe, os.X_OK):
            sys.exit("test_dist: %s is missing or not executable" % exe)
    tmp = tempfile.mkdtemp(prefix="test_dist_")
    r = Runner(args, tmp)
    steps, E = 10, 8
    base = ["-i", "data/default/train_*.bin", "-j", "data/default/val_*.bin", "-nl", "2", "-nc", "32", "-nh", "2",
            "-ne", str(E), "-nk", "2", "-nf", "32", "-t", "16", "-x", str(steps), "-v", "1", "-m", "1", "-s", "0",
            "-u", "2", "-l", "3e-3", "-sd", "7"]
    flags = base + ["-b", "12"]

    print("one process (the reference):")
    ref, rc, text, secs = r.run("ref", flags)
    check(rc == 0, "./train_moe %d steps: exit %s (%.1f s)" % (steps, rc, secs))
    if rc != 0:
        print(text[-2000:])
        sys.exit(1)

    print("R = 1 under mpiexec:")
    d, rc, _, secs = r.run("r1", flags, ranks=1)
    same = rc == 0 and open(os.path.join(d, "model_%08d.bin" % steps), "rb").read() == \
        open(os.path.join(ref, "model_%08d.bin" % steps), "rb").read()
    check(same, "mpiexec -n 1: checkpoint byte-identical to the one-process trainer's (%.1f s)" % secs)

    for ranks, ep, what in [(2, 1, "data parallel"), (3, 1, "data parallel"), (2, 2, "expert parallel"),
                            (4, 4, "expert parallel"), (4, 2, "data x expert parallel 2 x 2")]:
        label = "R=%d -ep %d (%s)" % (ranks, ep, what)
        print(label + ":")
        d, rc, text, secs = r.run("r%d_ep%d" % (ranks, ep), flags, ranks, ep)
        check(rc == 0, "%s: exit %s (%.1f s)" % (label, rc, secs))
        if rc != 0:
            print(text[-2000:])
            continue
        compare_runs(label, ref, d, steps)

    print("a rank that receives no token (-ep 4, B=4, T=1: one token per rank):")
    tiny = [x if x != "16" else "1" for x in base] + ["-b", "4"]
    ref1, rc1, _, _ = r.run("tiny_ref", tiny)
    d, rc, text, secs = r.run("tiny_ep4", tiny, 4, 4)
    check(rc == 0 and rc1 == 0, "B=4 T=1 runs: exit %s (one process), %s (R=4, %.1f s)" % (rc1, rc, secs))
    if rc == 0 and rc1 == 0:
        seen, total = empty_rank_seen(d, E, 4)
        check(len(seen) > 0, "some rank's experts got no token: %d of %d step-layers x 4 ranks (first: step %s layer %s rank %s)"
              % (len(seen), total, *(seen[0] if seen else ("-", "-", "-"))))
        compare_runs("R=4 -ep 4, B=4 T=1", ref1, d, steps)

    print("checkpoints across processes:")
    for ranks, ep in [(2, 2), (3, 1)]:
        label = "R=%d -ep %d" % (ranks, ep)
        ck = base + ["-b", "12", "-n", "5"]
        full, rc, _, _ = r.run("ck_full_r%d_ep%d" % (ranks, ep), ck, ranks, ep)
        part = os.path.join(tmp, "ck_resume_r%d_ep%d" % (ranks, ep))
        os.makedirs(part)
        shutil.copy(os.path.join(full, "model_00000005.bin"), part)
        _, rc2, text, _ = r.run("ck_resume_r%d_ep%d" % (ranks, ep), ck + ["-y", "1"], ranks, ep)
        a = open(os.path.join(full, "model_%08d.bin" % steps), "rb").read() if rc == 0 else b"x"
        b = open(os.path.join(part, "model_%08d.bin" % steps), "rb").read() if rc2 == 0 else b"y"
        check(a == b, "%s: resumed at step 5 under %d ranks, step %d's checkpoint bit-identical to the straight run's"
              % (label, ranks, steps))
    # the R-rank step-5 checkpoint in the one-process trainer: it resumes and ends where the reference does
    one = os.path.join(tmp, "ck_one")
    os.makedirs(one)
    shutil.copy(os.path.join(tmp, "ck_full_r2_ep2", "model_00000005.bin"), one)
    _, rc, _, _ = r.run("ck_one", base + ["-b", "12", "-y", "1"])
    check(rc == 0, "the one-process trainer resumes from a checkpoint written under R=2 -ep 2: exit %s" % rc)
    if rc == 0:
        _, rt = read_ckpt(os.path.join(ref, "model_%08d.bin" % steps))
        _, ot = read_ckpt(os.path.join(one, "model_%08d.bin" % steps))
        worst = max(np.linalg.norm(rt[k] - ot[k]) / max(np.linalg.norm(rt[k]), 1e-30) for k in rt)
        check(worst <= TOL, "  ... and ends within %.0e of the one-process run (worst %.2e)" % (TOL, worst))
    again, rc, _, _ = r.run("r3_ep1_again", flags, 3, 1)
    a = open(os.path.join(tmp, "r3_ep1", "model_%08d.bin" % steps), "rb").read()
    b = open(os.path.join(again, "model_%08d.bin" % steps), "rb").read() if rc == 0 else b""
    check(a == b, "R=3 twice: bit-identical checkpoints (the reductions do not depend on timing)")

    print("bad input:")
    expect_error(r, "-ep 3 on E=8", flags, 3, 3, r"Error: -ep 3 does not divide E=8")
    expect_error(r, "-ep 2 on R=3", flags, 3, 2, r"Error: -ep 2 does not divide the 3 processes")
    expect_error(r, "-b 10 on R=4", base + ["-b", "10"], 4, 1, r"Error: -b 10 .*not divisible by the 4 processes")
    expect_error(r, "-ep 2 without MPI", flags, 0, 2, r"Error: -ep needs the MPI build")
    expect_error(r, "-rl on R=2", flags + ["-rl", "x.bin", "-e", os.path.join(ref, "model_%08d.bin" % steps)], 2, 1, r"Error: -rl \(GRPO\) runs in one process")
    trunc = os.path.join(tmp, "trunc")
    os.makedirs(trunc)
    with open(os.path.join(ref, "model_%08d.bin" % steps), "rb") as f:
        open(os.path.join(trunc, "model_00000010.bin"), "wb").write(f.read()[:5000])
    _, rc, text, secs = r.run("trunc", flags + ["-y", "1", "-x", "20"], 2, 2, timeout=60)
    check(rc not in (0, "timeout") and "truncated or corrupt" in text,
          "a truncated checkpoint under R=2: exit %s in %.1f s, the error names the file" % (rc, secs))
    check(os.path.getsize(os.path.join(trunc, "model_00000010.bin")) == 5000, "  ... and the file is left as it was")

    if not args.keep:
        shutil.rmtree(tmp)
    else:
        print("run directories kept in", tmp)
    if failures:
        print("test_dist: %d FAILED" % len(failures))
        sys.exit(1)
    print("test_dist: all passed")


if __name__ == "__main__":
    main()
