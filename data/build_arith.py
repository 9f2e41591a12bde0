#!/usr/bin/env python3
"""Build data/arith/: the smallest reasoning task on which a ~1M-parameter model trained for a few
minutes on 2 cores is right some of the time (the state GRPO post-training starts from).

Every problem is one addition or subtraction of a 2-digit number to or from a 2- or 3-digit one:

    Q: 478 + 36 = ?
    A: The answer is 514.

a is in 10..999, b in 10..99, the operator + or -, and a - b >= 0 (digits are single tokens, so the
answer is written most significant digit first, carries included). The answer check is the task
eval's reasoning rule (the number after the last "The answer is"), so the eval files are kind 2 like
data/tasks/reason_eval.bin.

Half of the pre-training documents (--checked-frac) end in that form; the other half state the same
number as "A: So it is 514." which the checker does not read. A pre-trained model therefore answers
in either form, and only its "The answer is" answers can score: this is the gap between what a
model can compute and what it is rewarded for that GRPO closes first, and so it is visible within
minutes on 2 cores. The eval and RL files give only the checked form as their answer. (A two-step chain with a worked solution, "47 + 26 = 73. 73 - 38 = 35.",
was tried first: a small model's chains are often wrong in the first step and right at the end, so
an answer-only reward reinforced wrong arithmetic, and GRPO did not raise held-out accuracy.)

Each problem (a, op, b) goes to one of three disjoint pools by a hash of the tuple, so no eval
problem is ever a pre-training document or an RL prompt:
    pre-training  80%   arith_train_000.bin / arith_val_000.bin (shards, one problem per document)
    RL prompts    10%   arith_rl.bin    (eval layout: prompt tokens, reference answer)
    held out      10%   arith_eval.bin  (the accuracy eval, never trained on in either stage)

    python3 data/build_arith.py            # writes data/arith/* (standard library only, seconds)
    python3 data/build_arith.py --check    # rebuilds in memory and compares byte for byte
"""
import argparse
import hashlib
import json
import os
import random
import sys

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from build_default import encode, write_shard  # noqa: E402
from build_tasks import EOT, KIND_NUMBER, make_item, write_eval, read_eval  # noqa: E402

OUT = os.path.join(HERE, "arith")


def pool_of(tup, seed):
    """0: pre-training, 1: RL prompts, 2: held out (80/10/10 by a hash of the problem)."""
    h = int.from_bytes(hashlib.sha256(repr((seed, tup)).encode()).digest()[:8], "little") % 10
    return 0 if h < 8 else (1 if h == 8 else 2)


def all_problems():
    """Every (a, op, b) with a in 10..999, b in 10..99 and a non-negative result, in a fixed order."""
    return [(a, op, b) for a in range(10, 1000) for b in range(10, 100) for op in "+-" if op == "+" or a >= b]


def texts(tup, checked=True):
    """Prompt, answer and reference; checked=False: the answer in the form the checker does not read."""
    a, op, b = tup
    r = a + b if op == "+" else a - b
    answer = (" The answer is %d.\n" if checked else " So it is %d.\n") % r
    return "Q: %d %s %d = ?\nA:" % (a, op, b), answer, str(r)


def build(args):
    rng = random.Random(args.seed)
    pools = [[], [], []]
    for tup in all_problems():
        pools[pool_of(tup, args.seed)].append(tup)
    for p in pools:
        rng.shuffle(p)
    train_pool, rl_pool, eval_pool = pools
    docs = train_pool[:args.train + args.val]
    shards = {}
    for name, part in (("arith_train_000.bin", docs[:args.train]), ("arith_val_000.bin", docs[args.train:])):
        toks = []
        for tup in part:
            prompt, answer, _ = texts(tup, rng.random() < args.checked_frac)
            toks += [EOT] + encode(prompt + answer)
        shards[name] = toks
    evals = {}
    for name, part, n in (("arith_rl", rl_pool, args.rl), ("arith_eval", eval_pool, args.eval)):
        evals[name] = [make_item(*texts(tup)) for tup in part[:n]]
    return shards, evals, dict(pools=[len(p) for p in pools])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--seed", type=int, default=20251201)
    ap.add_argument("--train", type=int, default=100000, help="pre-training problems")
    ap.add_argument("--val", type=int, default=2000, help="validation problems (same pool)")
    ap.add_argument("--rl", type=int, default=4000, help="RL prompts")
    ap.add_argument("--eval", type=int, default=1000, help="held-out eval problems")
    ap.add_argument("--checked-frac", type=float, default=0.5,
                    help="share of pre-training answers in the checked form 'The answer is N.'")
    ap.add_argument("--check", action="store_true", help="rebuild and compare with --out")
    args = ap.parse_args()
    shards, evals, info = build(args)
    out = args.out
    if args.check:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            for name, toks in shards.items():
                write_shard(os.path.join(tmp, name), toks)
            for name, items in evals.items():
                write_eval(os.path.join(tmp, name + ".bin"), name, KIND_NUMBER, items, args.seed)
            bad = [n for n in sorted(os.listdir(tmp))
                   if open(os.path.join(tmp, n), "rb").read() != open(os.path.join(out, n), "rb").read()]
        print("check: %s" % ("all files identical" if not bad else "DIFFERENT: " + ", ".join(bad)))
        sys.exit(1 if bad else 0)
    os.makedirs(out, exist_ok=True)
    manifest = dict(args={k: v for k, v in vars(args).items() if k not in ("out", "check")},
                    pools=info["pools"], files={})
    for name, toks in shards.items():
        write_shard(os.path.join(out, name), toks)
        manifest["files"][name] = dict(tokens=len(toks))
    for name, items in evals.items():
        path = os.path.join(out, name + ".bin")
        write_eval(path, name, KIND_NUMBER, items, args.seed)
        hd, _ = read_eval(path)  # the independent reader accepts what was written
        manifest["files"][name + ".bin"] = dict(items=hd["n"], max_prompt=hd["max_prompt"],
                                                max_answer=hd["max_answer"])
    for name in manifest["files"]:
        manifest["files"][name]["sha256"] = hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(manifest, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
