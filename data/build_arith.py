#!/usr/bin/env python3
"""Build data/arith/: the smallest reasoning task on which GRPO post-training of a ~1M-parameter model,
pre-trained for a few minutes on 2 cores, has something to find.

Every problem is one addition or subtraction of a 2-digit number to or from a 2- or 3-digit one
(a in 10..max_a, b in 10..max_b, a - b >= 0). A pre-training document answers it in one of two ways:

    worked (--worked-frac, 15%)               direct (the rest)
    Q: 478 + 36 = ?                           Q: 478 + 36 = ?
    A: 8+6=14, 7+3+1=11, 4+0+1=5. The answer is 514.     A: The answer is 514.

The worked solution goes column by column from the units: each step is a one-digit fact (with the
carry or the borrow shown), and the answer is the steps' last digits read backwards. A small model
learns those steps well, but writing a 3-digit sum most significant digit first with no steps is
beyond it after minutes of training. Both forms end in "The answer is N.", which is what the task
eval's reasoning check reads (kind 2 eval files, like data/tasks/reason_eval.bin), so both can
score. Greedy decoding follows the majority form, direct, and is mostly wrong; sampling at
temperature 1 writes the steps in about one sample in six (the demo's start) and is then mostly
right. GRPO's reward sees only the final answer, and so it should learn to show its work: the way RL
on a pre-trained model elicits chain-of-thought, in miniature. The eval and RL files give the worked
form as the answer (the task loss measures it), and only the number is the reference.

(Two earlier versions gave GRPO too little to find. In the first, a two-step chain "47 + 26 = 73.
73 - 38 = 35." whose first step a small model often got wrong and whose end it still got right, so
the answer-only reward reinforced wrong arithmetic. In the second, half the answers were "So it is
N." which the checker does not read; GRPO then learnt the checked form, but it could only raise
accuracy to what the model computed directly, about 12%.)

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


def all_problems(max_a, max_b):
    """Every (a, op, b) with a in 10..max_a, b in 10..max_b and a non-negative result, in a fixed order."""
    return [(a, op, b) for a in range(10, max_a + 1) for b in range(10, max_b + 1) for op in "+-"
            if op == "+" or a >= b]


def worked(a, op, b):
    """The column-by-column solution, least significant column first: one step per digit of a, b's
    missing digits written as 0; addition shows the carry as "+1", subtraction takes the borrow from
    the top digit and adds 10 when it is needed. The answer's digits are the last digits of the steps
    read backwards (the last step whole, for a final carry), leading zeros dropped."""
    da, db = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")
    steps, carry = [], 0
    for x, y in zip((int(c) for c in da), (int(c) for c in db)):
        if op == "+":
            s = x + y + carry
            steps.append("%d+%d%s=%d" % (x, y, "+1" if carry else "", s))
            carry = s // 10
        else:
            top = x - carry
            carry = 1 if top < y else 0
            top += 10 * carry
            steps.append("%d-%d=%d" % (top, y, top - y))
    return ", ".join(steps) + "."


def read_steps(steps):
    """The answer a worked solution spells: the last step's result, then the other steps' last digits
    from the last to the first (what a reader of the steps does; build() checks it on every problem)."""
    results = [st.split("=")[1] for st in steps.rstrip(".").split(", ")]
    return str(int(results[-1] + "".join(r[-1] for r in reversed(results[:-1]))))


def texts(tup, style="worked"):
    """Prompt, answer and reference. style "worked": the column steps, then "The answer is N.";
    "direct": "The answer is N." alone."""
    a, op, b = tup
    r = a + b if op == "+" else a - b
    answer = (" %s The answer is %d.\n" % (worked(a, op, b), r)) if style == "worked" else " The answer is %d.\n" % r
    return "Q: %d %s %d = ?\nA:" % (a, op, b), answer, str(r)


def build(args):
    rng = random.Random(args.seed)
    pools = [[], [], []]
    for tup in all_problems(args.max_a, args.max_b):
        a, op, b = tup
        assert read_steps(worked(*tup)) == str(a + b if op == "+" else a - b), tup
        pools[pool_of(tup, args.seed)].append(tup)
    for p in pools:
        rng.shuffle(p)
    train_pool, rl_pool, eval_pool = pools
    n = args.train + args.val
    # a pool smaller than the documents asked for is sampled with replacement (each problem then
    # appears several times, in either answer form)
    docs = train_pool[:n] if len(train_pool) >= n else [rng.choice(train_pool) for _ in range(n)]
    shards = {}
    for name, part in (("arith_train_000.bin", docs[:args.train]), ("arith_val_000.bin", docs[args.train:])):
        toks = []
        for tup in part:
            prompt, answer, _ = texts(tup, "worked" if rng.random() < args.worked_frac else "direct")
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
    ap.add_argument("--max-a", type=int, default=999, help="largest first operand")
    ap.add_argument("--max-b", type=int, default=99, help="largest second operand")
    ap.add_argument("--train", type=int, default=100000, help="pre-training problems")
    ap.add_argument("--val", type=int, default=2000, help="validation problems (same pool)")
    ap.add_argument("--rl", type=int, default=4000, help="RL prompts")
    ap.add_argument("--eval", type=int, default=1000, help="held-out eval problems")
    ap.add_argument("--worked-frac", type=float, default=0.15,
                    help="share of pre-training answers with the worked column steps (the rest answer directly)")
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
