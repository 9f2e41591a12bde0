#!/usr/bin/env python3
r"""Build data/study/: pre-training data for a miniature of "Optimal Sparsity of Mixture-of-Experts
Language Models for Reasoning Tasks", sized for ~0.3-1M-parameter models trained on ~5-10M tokens. The defaults are the
study's data (scripts/sweep_configs/study.json; calibration in scripts/sweep_results/study_calibration).
Two corpora, shuffled together, and eval files for each kind of task. Every size is a flag, and
manifest.json records them.

Memorization: closed-book recall of facts that the training text states, the way TriviaQA facts
    stand in web text. There are --entities invented people. Each name is two invented words built
    from syllables, at most NAME_MAX_TOKENS tokens, and all names are unique. Each person has
    --attributes attributes (the first N of: birth year 1800-1999, home town out of --towns
    invented names, profession 50, instrument 30, pet 30, colour 30), drawn from these fixed
    value lists.
  * Every fact (entity, attribute) is stated exactly --mentions times in the train shards.
  * A document is about one entity and states 1-3 of its facts, one simple sentence per line. Each
    sentence is one of 3-4 paraphrase templates, chosen at random per mention.
  * The schedule makes the count exact. An entity's mentions come in --mentions rounds; each round
    states every attribute once, its shuffled attributes cut into documents of 1-3 facts.
  * The first template of each attribute is the canonical one and ends in the value.
    facts_eval.bin asks for the value by the canonical prefix: prompt "Tove Mepu was born in the
    year", answer " 1919.\n", reference "1919". One sentence per line matters here: the trainer
    stops a kind-1 answer at a newline, so the answer is the rest of the canonical line.
  * fact_bits in the manifest is the information content: the sum over facts of log2(number of
    values). Compare it with ~2 bits per parameter.
  * The validation shard's memorization documents are further mentions of training facts, drawn
    the same way (on top of the exact count). So validation states no fact that training lacks.

Reasoning: multi-step arithmetic word problems with worked solutions, one per document:
    "Q: <question>\nA: <worked solution> The answer is N.\n".
  * They are generated as a stream until the corpus holds --reason-tokens tokens. No question
    text occurs twice: a set of rendered questions is kept. A structure that stops giving new
    questions is dropped, and the others fill its share.
  * The structures and wordings are build_tasks.STRUCTURES without their last wording. Every
    operation in a solution is written "x op y = z" and is checked when it is generated.
  * Each number tuple of a structure goes to one of three pools by a hash of (structure, tuple), as
    in build_arith.pool_of: training 80%, RL 10%, eval 10%. Validation problems come from the
    training pool and are kept out of the train shards.
  * --column-steps N (default 10; 0: off) adds build_arith's column steps, in brackets before the
    result, to every addition or subtraction of two numbers whose result is >= N:
    "48 + 67 = [8+7=15, 4+6+1=11] 115". A sum of three numbers (the ages structure) is left as is.

Files (every document starts with the eot token 4095; eval files use build_tasks' layout):
    study_train_000.bin ...  the two corpora shuffled together, cut into shards of at most
                             --shard-tokens tokens, with the same mixture in each
    study_val_000.bin        --val-tokens tokens in the same proportions
    facts_eval.bin           kind 1: --fact-eval training facts, asked by their canonical prefix
    reason_id_eval.bin       kind 2: eval-pool tuples in training structures and wordings
    reason_shift_eval.bin    kind 2: eval-pool tuples in the training structures, shifted by
                             --shift: "distractor" (default) adds an irrelevant sentence before
                             the question proper (another person and a number the solution does
                             not use, DISTRACTORS below), as GSM-IC does to GSM8K; "wording"
                             uses each structure's held-out last wording instead. A share
                             --shift-new-share (default 0) of the items comes from
                             NEW_STRUCTURES below (three structures that no training document
                             has; they have no pools).
    reason_rl.bin            kind 2: RL prompts, RL-pool tuples in training structures and wordings
    manifest.json            arguments, counts, tokens and share of each corpus, sha256 of each file
Every reasoning problem, in any file, has prompt + answer - 1 <= --max-problem-tokens tokens.

Checks run at every build (and so also in --check):
  * make_item's token-boundary asserts, and read_eval on every eval file written;
  * decoded from the written shards: every fact is stated exactly --mentions times in train,
    every memorization line (train and val) states a training fact, no training question repeats;
  * no eval, RL or validation question is a training question;
  * no held-out wording and no new structure shares a 5-word sequence with a training wording, and
    the new structures use only words that occur in the training wordings;
  * every "x op y = z" (and every column step) is right, and the last one gives the answer.

    python3 data/build_study.py [--out data/study] [flags]   # standard library only, ~10 s
    python3 data/build_study.py --check    # rebuild with the manifest's arguments, compare bytes

Deterministic: the same arguments give byte-identical files.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from collections import Counter

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from build_default import encode, decode, read_shard, write_shard  # noqa: E402
from build_tasks import (EOT, KIND_SHORT, KIND_NUMBER, ANS, STRUCTURES, PROFESSIONS,  # noqa: E402
                         COLOURS, _GOODS, FEMALE, MALE, check_wording_holdout, fill_wording,
                         literal_ngrams, make_item, qa_text, read_eval, stable_hash, write_eval)
from build_arith import pool_of, read_steps, worked  # noqa: E402

OUT = os.path.join(HERE, "study")
TRAIN_POOL, RL_POOL, EVAL_POOL = 0, 1, 2
MAX_FAILS = 5000    # draws without a new problem after which a structure is dropped

# ----------------------------------------------------------------------------------------
# Memorization: invented entities and their facts

ONSETS = "b d f g h k l m n p r s t v z br dr st tr".split()
VOWELS = "a e i o u".split()
CODAS = "n r l s m nd rt st k th".split()
NAME_MAX_TOKENS = 5     # most tokens of an entity's full name (invented words split into pieces)
TOWN_MAX_TOKENS = 4     # a town name after a space
TOWN_SUFFIXES = "ford by ton wick mere holm bury dale field stead gate more".split()
PETS = """dog cat parrot hamster rabbit tortoise goldfish ferret canary pony goat lizard snake owl
hedgehog mouse rat frog duck hen donkey pig sheep horse gecko crow raven llama budgie
iguana""".split()
INSTRUMENTS = """violin cello flute piano guitar harp trumpet trombone clarinet oboe bassoon drums
banjo mandolin accordion saxophone tuba viola harmonica ukulele bagpipes lute sitar xylophone organ
harpsichord zither recorder bugle marimba""".split()
MORE_PROFESSIONS = """brewer cobbler weaver miller sailor banker courier florist surveyor
welder""".split()
MORE_COLOURS = """beige maroon navy olive teal scarlet amber indigo lilac magenta ivory coral peach
mustard""".split()

# (attribute, values, statement templates); {n} = full name, {v} = value, {a} = "a"/"an" before
# the value. The first template is the canonical one: it ends in " {v}." (or " {a} {v}."), and
# the recall prompt is what comes before that. --attributes N uses the first N attributes.
ATTRIBUTES = [
    ("year", [str(y) for y in range(1800, 2000)],
     ["{n} was born in the year {v}.", "{n}'s year of birth is {v}.", "In {v}, {n} was born.",
      "The year {v} saw the birth of {n}."]),
    ("town", None,      # invented names, make_towns(--towns)
     ["{n} lives in the town of {v}.", "{n}'s home town is {v}.", "The town of {v} is home to {n}.",
      "{n} has a house in {v}."]),
    ("profession", PROFESSIONS + MORE_PROFESSIONS,
     ["{n} works as {a} {v}.", "{n} earns a living as {a} {v}.", "By trade, {n} is {a} {v}.",
      "{n} has a job as {a} {v}."]),
    ("instrument", INSTRUMENTS,
     ["{n} plays the {v}.", "The instrument {n} plays is the {v}.",
      "{n} practises the {v} every day."]),
    ("pet", PETS,
     ["{n} has a pet {v}.", "{n} keeps {a} {v} as a pet.", "The pet of {n} is {a} {v}."]),
    ("colour", COLOURS + MORE_COLOURS,
     ["{n}'s favourite colour is {v}.", "The colour {n} likes best is {v}.",
      "{n} likes the colour {v} more than any other."]),
]


def invented(rng, syllables, coda_p):
    """An invented word: `syllables` onset-vowel pairs, then a coda with probability coda_p."""
    w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables))
    return w + rng.choice(CODAS) if rng.random() < coda_p else w


def make_towns(n):
    """n invented town names, the same for every --seed (a fixed value list)."""
    rng = random.Random(stable_hash("towns"))
    towns, seen = [], set()
    while len(towns) < n:
        t = invented(rng, rng.choice([1, 2]), 0.5).capitalize() + rng.choice(TOWN_SUFFIXES)
        if t not in seen and len(encode(" " + t)) <= TOWN_MAX_TOKENS:
            seen.add(t)
            towns.append(t)
    return towns


def attribute_table(n_attrs, n_towns):
    """[(attribute, values, templates)] for the first n_attrs attributes."""
    table = [(a, v if v is not None else make_towns(n_towns), t)
             for a, v, t in ATTRIBUTES[:n_attrs]]
    for a, values, tpls in table:
        assert len(set(values)) == len(values) and len(tpls) >= 3, a
        assert tpls[0].endswith(" {v}.") and tpls[0].count("{v}") == 1, a
    return table


def make_entities(rng, n, table):
    """[{"name": full name, attribute: value, ...}]; a name is two invented words of two syllables
    (at most NAME_MAX_TOKENS tokens), all names unique."""
    entities, seen = [], set()
    while len(entities) < n:
        name = "%s %s" % (invented(rng, 2, 0.4).capitalize(), invented(rng, 2, 0.6).capitalize())
        if name in seen or len(encode(name)) > NAME_MAX_TOKENS:
            continue
        seen.add(name)
        e = {"name": name}
        for a, values, _ in table:
            e[a] = rng.choice(values)
        entities.append(e)
    assert len({e["name"] for e in entities}) == n
    return entities


def fmt_fact(tpl, e, attr):
    v = e[attr]
    return tpl.format(n=e["name"], v=v, a="an" if v[0] in "aeiou" else "a")


def recall_item(e, attr, tpl):
    """The canonical template cut before its value: prompt, answer line, reference."""
    cut = tpl.index(" {a}") if " {a}" in tpl else tpl.index(" {v}")
    prompt, answer = fmt_fact(tpl[:cut], e, attr), fmt_fact(tpl[cut:], e, attr) + "\n"
    return make_item(prompt, answer, answer.strip().rstrip("."))


def chunks(rng, items, most=3):
    """items cut into consecutive pieces of 1 to `most`."""
    out, i = [], 0
    while i < len(items):
        k = rng.randint(1, most)
        out.append(items[i:i + k])
        i += k
    return out


def paragraph(rng, e, attrs, table):
    tpls = {a: t for a, _, t in table}
    return "".join(fmt_fact(rng.choice(tpls[a]), e, a) + "\n" for a in attrs)


def memorization_train(rng, entities, table, mentions):
    """Documents stating each fact exactly `mentions` times (see the docstring's schedule)."""
    attrs = [a for a, _, _ in table]
    docs, count = [], Counter()
    for e in entities:
        for _ in range(mentions):
            order = attrs[:]
            rng.shuffle(order)
            for part in chunks(rng, order):
                docs.append(paragraph(rng, e, part, table))
                count.update((e["name"], a) for a in part)
    assert len(count) == len(entities) * len(attrs) and set(count.values()) == {mentions}
    return docs


def memorization_val(rng, entities, attrs, target_tokens, doc):
    """More mentions of training facts, until the documents hold target_tokens: each is
    doc(entity, attributes), 1-3 of a random entity's attributes in a random order, as tokens."""
    docs, tok = [], 0
    while tok < target_tokens:
        order = list(attrs)
        rng.shuffle(order)
        d = doc(rng.choice(entities), order[:rng.randint(1, min(3, len(order)))])
        docs.append(d)
        tok += len(d)
    return docs

# ----------------------------------------------------------------------------------------
# Reasoning: three structures that no training document has (reason_shift_eval only). Their
# step sequences (subtract-add-subtract, multiply-multiply-add-subtract, divide-multiply-subtract)
# are not those of any training structure, and their words all occur in the training wordings.


_ITEMS = ["apples", "cards", "books", "cookies", "coins", "letters", "shells", "pens", "plums",
          "stamps"]


def _s_restock(rng):
    a = rng.randint(10, 40)
    b, c = rng.randint(1, a - 1), rng.randint(2, 30)
    r1 = a - b
    r2 = r1 + c
    d = rng.randint(1, r2 - 1)
    return (a, b, c, d), dict(a=a, b=b, c=c, d=d, r1=r1, r2=r2, ans=r2 - d,
                              xs=rng.choice(_GOODS)[1])


def _s_buy_change(rng):
    a, p, b, q = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6), rng.randint(2, 9)
    r3 = a * p + b * q
    m = rng.choice([x for x in (20, 50, 100, 200) if x > r3][:2])
    (x, xs), (y, ys) = rng.sample(_GOODS, 2)
    return (a, p, b, q, m), dict(a=a, p=p, b=b, q=q, m=m, r1=a * p, r2=b * q, r3=r3, ans=m - r3,
                                 xs=xs, ys=ys)


def _s_pack_sell(rng):
    k, r1, p = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9)
    r2 = r1 * p
    f = rng.randint(1, r2 - 1)
    return (k * r1, k, p, f), dict(n=k * r1, k=k, p=p, f=f, r1=r1, r2=r2, ans=r2 - f,
                                   xs=rng.choice(_ITEMS))


NEW_STRUCTURES = [
    ("restock", _s_restock, [
        ("A shop has {a} {xs}. It sells {b}, then gets {c} more, and then {name} buys {d}. How "
         "many {xs} are in the shop now?",
         "After selling {b}, the shop has {a} - {b} = {r1}. With {c} more it has {r1} + {c} = "
         "{r2}. After {name} buys {d}, it has {r2} - {d} = {ans}."),
        ("{name} has {a} {xs} and gives {b} to a friend. {He} then gets {c} more and sells {d}. "
         "How many {xs} does {he} have left?",
         "After giving {b}, {he} has {a} - {b} = {r1}. With {c} more {he} has {r1} + {c} = {r2}. "
         "After selling {d}, {he} has {r2} - {d} = {ans}."),
    ]),
    ("buy_change", _s_buy_change, [
        ("{name} has {m} dollars. {He} buys {a} {xs} for {p} dollars each and {b} {ys} for {q} "
         "dollars each. How many dollars does {he} have left?",
         "The {xs} cost {a} * {p} = {r1}. The {ys} cost {b} * {q} = {r2}. {He} spends {r1} + {r2} "
         "= {r3}. {He} has {m} - {r3} = {ans} dollars left."),
        ("{name} pays with {m} dollars for {a} {xs} at {p} dollars each and {b} {ys} at {q} "
         "dollars each. How much change does {he} get back?",
         "That is {a} * {p} = {r1} and {b} * {q} = {r2}, so {r1} + {r2} = {r3} in total. The "
         "change is {m} - {r3} = {ans} dollars."),
    ]),
    ("pack_sell", _s_pack_sell, [
        ("{name} has {n} {xs} and packs them into boxes of {k}. {He} sells each box for {p} "
         "dollars and pays {f} dollars for the boxes. How much money does {he} make?",
         "{He} packs {n} / {k} = {r1} boxes. They are sold for {r1} * {p} = {r2} dollars. After "
         "{he} pays {f}, {he} makes {r2} - {f} = {ans} dollars."),
        ("{name} puts {n} {xs} into bags, {k} in each bag. Every bag sells for {p} dollars, and "
         "{he} pays {f} dollars for the bags. How much money does {he} make?",
         "There are {n} / {k} = {r1} bags. They are sold for {r1} * {p} = {r2} dollars. So {he} "
         "makes {r2} - {f} = {ans} dollars."),
    ]),
]


def words(tpl):
    return set(re.findall(r"[a-z']+", re.sub(r"\{[^}]*\}", " ", tpl).lower()))


def check_new_structures():
    """The held-out wordings (build_tasks' own check) and the new structures share no 5-word
    sequence with a training wording, and the new structures use only training words."""
    check_wording_holdout()
    grams, vocab = set(), set()
    for _n, _f, ws in STRUCTURES:
        for q, s in ws[:-1]:
            grams |= literal_ngrams(q)
            vocab |= words(q) | words(s)
    assert not {n for n, _, _ in NEW_STRUCTURES} & {n for n, _, _ in STRUCTURES}
    for name, _f, ws in NEW_STRUCTURES:
        for q, s in ws:
            shared = literal_ngrams(q) & grams
            assert not shared, "new structure %s shares %s with training" % (name, shared)
            unseen = (words(q) | words(s)) - vocab
            assert not unseen, "new structure %s uses words no training wording has: %s" % (
                name, sorted(unseen))
    unseen = set().union(*(words(d) for d in DISTRACTORS)) - vocab - {"n", "k", "zs"}
    assert not unseen, "distractor sentences use words no training wording has: %s" % sorted(unseen)

# ----------------------------------------------------------------------------------------
# Reasoning: rendering and checking worked solutions

# an operation chain and its result, with column steps in brackets where --column-steps put them
EXPR = re.compile(r"(\d+(?: [-+*/] \d+)+) = (?:\[([^\]]*)\] )?(\d+)")
COLUMN_STEP = re.compile(r"(\d+)([-+])(\d+)(\+1)?=(\d+)")


def column_steps(m, min_result):
    """EXPR match -> the same text with column steps before a two-number +/- result >= min_result."""
    parts = m.group(1).split(" ")
    if len(parts) != 3 or parts[1] not in "+-" or int(m.group(3)) < min_result:
        return m.group(0)
    x, op, y = int(parts[0]), parts[1], int(parts[2])
    if len(str(x)) < len(str(y)):   # worked() wants the longer operand first; + commutes
        x, y = y, x
    return "%s = [%s] %s" % (m.group(1), worked(x, op, y).rstrip("."), m.group(3))


def evaluate(chain):
    """Left to right, integers only (every chain in the templates is a single operator kind)."""
    t = chain.split(" ")
    acc = int(t[0])
    for op, x in zip(t[1::2], map(int, t[2::2])):
        if op == "/":
            assert acc % x == 0, chain
            acc //= x
        else:
            acc = {"+": acc + x, "-": acc - x, "*": acc * x}[op]
        assert acc >= 0, chain
    return acc


def check_solution(sol, ans):
    """Every "x op y = z" is right, every "=" belongs to one, the last result is the answer, and
    column steps (if any) are right and spell their result."""
    exprs = EXPR.findall(sol)
    assert exprs and len(exprs) == re.sub(r"\[[^\]]*\]", "", sol).count("="), sol
    for chain, steps, z in exprs:
        assert evaluate(chain) == int(z), sol
        if steps:
            for a, op, b, carry, r in COLUMN_STEP.findall(steps):
                assert int(a) + (1 if op == "+" else -1) * int(b) + (1 if carry else 0) == int(r)
            assert len(COLUMN_STEP.findall(steps)) == steps.count("=") and read_steps(steps) == z
    assert int(exprs[-1][2]) == ans and sol.endswith(ANS.format(ans=ans)), sol


# An irrelevant sentence for the distractor shift (as GSM-IC adds to GSM8K problems): another
# person and a number that the solution does not use, in words that the training wordings have.
DISTRACTORS = ["{n} has {k} {zs}.", "{n} buys {k} {zs}.", "{n} is {k} years old.",
               "{n} has {k} dollars."]


def distract(rng, question):
    """The question with a distractor sentence before its last sentence (the question proper)."""
    while True:
        n = rng.choice(FEMALE + MALE)
        if n not in question:
            break
    sent = rng.choice(DISTRACTORS).format(n=n, k=rng.randint(2, 19), zs=rng.choice(_GOODS)[1])
    i = question.rfind(". ") + 2
    return question[:i] + sent + " " + question[i:] if i > 1 else sent + " " + question


def render(rng, structure, wi, tv, column, distractor=False):
    """build_tasks.render_problem for any structure (also the new ones), optionally with column
    steps and a distractor sentence; checks the solution."""
    question, solution, v = fill_wording(rng, structure[2], wi, tv)
    if distractor:
        question = distract(rng, question)
    if column:
        solution = EXPR.sub(lambda m: column_steps(m, column), solution)
    solution += ANS.format(**v)
    check_solution(solution, v["ans"])
    return question, solution, str(v["ans"])


class Bad(ValueError):
    """Arguments that cannot give the data asked for."""


def problem_doc(question, solution):
    """A problem's training document: EOT and the tokens of its text."""
    return [EOT] + encode("".join(qa_text(question, solution)))


def new_problem(rng, source, pool, a, seen, doc=problem_doc):
    """A problem of one source (structure, wording indices) whose tuple is in `pool` (None: any)
    and whose question is not in `seen` (then added), at most --max-problem-tokens long (its
    document doc(question, solution), less the eot); None if MAX_FAILS draws give none (too few
    tuples in the pool, or only long problems). Returns (structure name, tuple, question, solution,
    answer, document)."""
    structure, wordings = source[:2]
    distractor = len(source) > 2 and source[2]
    for _ in range(MAX_FAILS):
        tv = structure[1](rng)
        if pool is not None and pool_of((structure[0], tv[0]), a.seed) != pool:
            continue
        q, sol, ans = render(rng, structure, rng.choice(wordings), tv, a.column_steps, distractor)
        toks = doc(q, sol)
        if q not in seen and len(toks) - 1 <= a.max_problem_tokens:
            seen.add(q)
            return structure[0], tv[0], q, sol, ans, toks
    return None


def problem_stream(rng, sources, pool, a, seen, doc=problem_doc):
    """Yields new problems (see new_problem) of sources chosen uniformly; a source that gives none
    is dropped and the others fill its share; the stream ends with the last source."""
    active = list(sources)
    while active:
        source = rng.choice(active)
        p = new_problem(rng, source, pool, a, seen, doc)
        if p is None:
            active.remove(source)
        else:
            yield p


def take(stream, n=None, tokens=None):
    """The first n problems of a stream, or the first ones holding at least `tokens` tokens."""
    out, tok = [], 0
    if n == 0:
        return out
    for p in stream:
        out.append(p)
        tok += len(p[5])
        if (n is not None and len(out) == n) or (tokens is not None and tok >= tokens):
            return out
    raise Bad("the reasoning structures ran out of new problems after %d (the flags ask for more)"
              % len(out))


def draw(a, name, sources, pool, n, doc=problem_doc):
    """n new problems of a stream of its own, seeded by name (see problem_stream)."""
    return take(problem_stream(random.Random(stable_hash(name, a.seed)), sources, pool, a, set(), doc),
                n=n)


def items_of(problems):
    return [make_item(*qa_text(q, sol), ans) for _s, _t, q, sol, ans, _k in problems]


def training_sources(held_out=False):
    """(structure, wordings): all but the last wording, or (held_out) the last one alone."""
    return [(s, [len(s[2]) - 1] if held_out else list(range(len(s[2]) - 1))) for s in STRUCTURES]

# ----------------------------------------------------------------------------------------
# Build


def trim_lower(s):
    """train_moe.c's normalisation of a kind-1 answer and reference."""
    return s.strip(" \n\t").rstrip(" \n\t.").lower()


def check_items(items, kind):
    for it in items:
        at = it["answer_text"]
        assert at.startswith(" ") and at.endswith("\n") and "\n" not in at[:-1], at
        if kind == KIND_SHORT:
            assert trim_lower(at) == trim_lower(it["ref"]) and "\n" not in it["prompt_text"], at
        else:
            assert re.findall(r"The answer is (\d+)\.", at)[-1] == it["ref"], at


def shard_docs(path):
    """The documents of a shard as text (each without its leading eot)."""
    t = read_shard(path)
    assert t[0] == EOT
    return decode(t).split("<|endoftext|>")[1:]


def split_corpora(docs):
    """(memorization lines, reasoning questions) of decoded documents."""
    lines, questions = [], []
    for d in docs:
        if d.startswith("Q: "):
            questions.append(d[3:d.index("\nA:")])
        else:
            assert d.endswith("\n"), d
            lines += d[:-1].split("\n")
    return lines, questions


def check_shards(out, train_names, entities, table, mentions, n_reason_train, eval_questions):
    """From the written shards: each fact is stated exactly `mentions` times in train, every
    memorization line states a training fact, training questions are unique and no validation,
    eval or RL question is one of them. Returns the count of each line in train."""
    train_docs = [d for f in train_names for d in shard_docs(os.path.join(out, f))]
    lines, questions = split_corpora(train_docs)
    val_lines, val_questions = split_corpora(shard_docs(os.path.join(out, "study_val_000.bin")))
    counts = Counter(lines)
    statements = set()
    for e in entities:
        for attr, _, tpls in table:
            said = [fmt_fact(t, e, attr) for t in tpls]
            assert sum(counts[s] for s in said) == mentions, (e["name"], attr)
            statements.update(said)
    assert set(counts) <= statements and set(val_lines) <= statements
    qs = set(questions)
    assert len(qs) == len(questions) == n_reason_train
    assert not qs & set(val_questions) and not qs & eval_questions
    return counts


def reasoning_sets(a, val_tokens):
    """Problems of every reasoning file: {"val", "train", "id", "rl", "shift"}. The validation
    and train problems come from one stream (so they never share a question); the others from
    their own pools, the held-out wordings from the eval pool too."""
    stream = problem_stream(random.Random(stable_hash("reason", a.seed)), training_sources(),
                            TRAIN_POOL, a, set())
    sets = {"val": take(stream, tokens=val_tokens),
            "train": take(stream, tokens=a.reason_tokens)}
    sets["id"] = draw(a, "reason-id", training_sources(), EVAL_POOL, a.reason_eval)
    sets["rl"] = draw(a, "reason-rl", training_sources(), RL_POOL, a.reason_rl)
    n_new = round(a.reason_eval * a.shift_new_share)
    if a.shift == "distractor":
        near = draw(a, "reason-shift-distractor", [s + (True,) for s in training_sources()], EVAL_POOL,
                    a.reason_eval - n_new)
    else:
        near = draw(a, "reason-shift-wording", training_sources(held_out=True), EVAL_POOL,
                    a.reason_eval - n_new)
    shift = (near +
             draw(a, "reason-shift-structure", [(s, list(range(len(s[2])))) for s in NEW_STRUCTURES],
                  None, n_new))
    random.Random(stable_hash("reason-shift", a.seed)).shuffle(shift)
    sets["shift"] = shift
    tuples = {k: {(p[0], p[1]) for p in v} for k, v in sets.items()}
    assert not tuples["train"] & (tuples["id"] | tuples["rl"]) and not tuples["id"] & tuples["rl"]
    return sets


def mix(docs, seed, name):
    docs = list(docs)
    random.Random(stable_hash(name, seed)).shuffle(docs)
    return docs


def cut(docs, max_tokens):
    """Consecutive parts of about equal size, as few as hold at most max_tokens each."""
    total = sum(map(len, docs))
    n = max(1, math.ceil(total / max_tokens))
    parts, cur, acc = [], [], 0
    for d in docs:
        cur.append(d)
        acc += len(d)
        if len(parts) < n - 1 and acc >= total * (len(parts) + 1) / n:
            parts.append(cur)
            cur = []
    return parts + [cur]


def write_shards(out, train_docs, val_docs, max_tokens):
    """study_train_NNN.bin (stale ones removed) and study_val_000.bin; returns the train names."""
    for f in os.listdir(out):
        if re.fullmatch(r"study_(train|val)_\d+\.bin", f):
            os.remove(os.path.join(out, f))
    shards = cut(train_docs, max_tokens)
    names = ["study_train_%03d.bin" % i for i in range(len(shards))]
    for name, part in zip(names + ["study_val_000.bin"], shards + [val_docs]):
        write_shard(os.path.join(out, name), [t for d in part for t in d])
    return names


def write_evals(out, seed, evals):
    """Eval files [(name, kind, items)], each read back with build_tasks.read_eval."""
    for name, kind, items in evals:
        check_items(items, kind)
        path = os.path.join(out, name + ".bin")
        write_eval(path, name.replace("_eval", ""), kind, items, seed)
        hd, back = read_eval(path)
        assert hd["kind"] == kind
        assert back == [(it["prompt"], it["answer"], it["ref"]) for it in items], name


def per_structure(problems):
    return dict(sorted(Counter(p[0] for p in problems).items()))


def build(a, out):
    """Writes every file into out; returns the manifest's statistics."""
    os.makedirs(out, exist_ok=True)
    check_new_structures()
    table = attribute_table(a.attributes, a.towns)
    entities = make_entities(random.Random(stable_hash("entities", a.seed)), a.entities, table)

    # memorization: the fixed train corpus sets the mixture's proportions
    mem_train = [[EOT] + encode(d) for d in memorization_train(
        random.Random(stable_hash("mem", a.seed)), entities, table, a.mentions)]
    mem_tok = sum(map(len, mem_train))
    mem_share = mem_tok / (mem_tok + a.reason_tokens)
    vrng = random.Random(stable_hash("mem-val", a.seed))
    mem_val = memorization_val(vrng, entities, [x for x, _, _ in table], a.val_tokens * mem_share,
                               lambda e, attrs: [EOT] + encode(paragraph(vrng, e, attrs, table)))
    r = reasoning_sets(a, a.val_tokens * (1 - mem_share))

    # facts eval: training facts asked by the canonical template's prefix
    facts = random.Random(stable_hash("facts-eval", a.seed)).sample(
        [(i, attr) for i in range(len(entities)) for attr, _, _ in table], a.fact_eval)
    canonical = {attr: tpls[0] for attr, _, tpls in table}
    fact_items = [recall_item(entities[i], attr, canonical[attr]) for i, attr in facts]

    train_docs = mix(mem_train + [p[5] for p in r["train"]], a.seed, "mix")
    val_docs = mix(mem_val + [p[5] for p in r["val"]], a.seed, "mix-val")
    train_names = write_shards(out, train_docs, val_docs, a.shard_tokens)
    evals = [("facts_eval", KIND_SHORT, fact_items),
             ("reason_id_eval", KIND_NUMBER, items_of(r["id"])),
             ("reason_shift_eval", KIND_NUMBER, items_of(r["shift"])),
             ("reason_rl", KIND_NUMBER, items_of(r["rl"]))]
    write_evals(out, a.seed, evals)
    eval_questions = {it["prompt_text"][3:-3] for _n, _k, items in evals[1:] for it in items}
    counts = check_shards(out, train_names, entities, table, a.mentions, len(r["train"]),
                          eval_questions)
    canon_mentions = [counts[fmt_fact(canonical[attr], entities[i], attr)] for i, attr in facts]

    total = sum(map(len, train_docs))
    reason_tok = sum(len(p[5]) for p in r["train"])
    return {
        "memorization": {
            "entities": len(entities), "attributes": [x for x, _, _ in table],
            "values_per_attribute": {x: len(v) for x, v, _ in table},
            "facts": len(entities) * len(table), "mentions_per_fact": a.mentions,
            "fact_bits": round(len(entities) * sum(math.log2(len(v)) for _, v, _ in table), 1),
            "train_documents": len(mem_train), "train_tokens": mem_tok,
            "val_documents": len(mem_val), "val_tokens": sum(map(len, mem_val)),
            "name_tokens_mean": round(sum(len(encode(e["name"])) for e in entities)
                                      / len(entities), 2),
            "facts_eval": len(fact_items), "facts_eval_canonical_mentions_mean":
                round(sum(canon_mentions) / max(1, len(canon_mentions)), 2),
            "facts_eval_without_canonical_mention": canon_mentions.count(0)},
        "reasoning": {
            "train_problems": len(r["train"]), "train_tokens": reason_tok,
            "val_problems": len(r["val"]), "val_tokens": sum(len(p[5]) for p in r["val"]),
            "train_per_structure": per_structure(r["train"]),
            "distinct_train_tuples_per_structure": dict(sorted(Counter(
                name for name, _ in {(p[0], p[1]) for p in r["train"]}).items())),
            "id_eval_per_structure": per_structure(r["id"]),
            "shift_eval_per_structure": per_structure(r["shift"]),
            "rl_per_structure": per_structure(r["rl"]),
            "new_structures": [n for n, _, _ in NEW_STRUCTURES]},
        "mixture": {"train_tokens": total, "train_documents": len(train_docs),
                    "shards": len(train_names),
                    "memorization_share": round(mem_tok / total, 4),
                    "reasoning_share": round(reason_tok / total, 4),
                    "val_tokens": sum(map(len, val_docs))},
    }


def write_manifest(a, out, stats):
    """out/manifest.json: the statistics, the arguments (but --out and --check) and the size and
    sha256 of every .bin file in out; returns it."""
    files = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".bin"):
            h = hashlib.sha256()
            with open(os.path.join(out, f), "rb") as fh:
                for blk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(blk)
            files[f] = {"bytes": os.path.getsize(os.path.join(out, f)), "sha256": h.hexdigest()}
    args = {k: v for k, v in sorted(vars(a).items()) if k not in ("out", "check")}
    manifest = dict(stats, args=args, files=files)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


def read_or_none(d, f):
    p = os.path.join(d, f)
    return open(p, "rb").read() if os.path.exists(p) else None


def rebuild_and_compare(a, builder=build):
    """--check: rebuild with the manifest's arguments in a temporary directory (builder(a, dir)
    writes the files and returns the manifest's statistics); 0 if every file (the manifest too) is
    byte-identical."""
    with open(os.path.join(a.out, "manifest.json")) as f:
        for k, v in json.load(f)["args"].items():
            setattr(a, k, v)
    with tempfile.TemporaryDirectory() as tmp:
        write_manifest(a, tmp, builder(a, tmp))
        names = sorted(set(os.listdir(tmp)) | {f for f in os.listdir(a.out) if f.endswith(".bin")})
        bad = [f for f in names if read_or_none(tmp, f) != read_or_none(a.out, f)]
    print("check: %s" % ("DIFFERENT: " + ", ".join(bad) if bad else
                         "%d files identical" % len(names)))
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--seed", type=int, default=20251210)
    ap.add_argument("--entities", type=int, default=1000, help="invented entities")
    ap.add_argument("--attributes", type=int, default=4,
                    help="attributes per entity, 1-%d (%s, in this order)" % (
                        len(ATTRIBUTES), ", ".join(x for x, _, _ in ATTRIBUTES)))
    ap.add_argument("--towns", type=int, default=200, help="invented town names (the town values)")
    ap.add_argument("--mentions", type=int, default=50, help="statements of each fact in train")
    ap.add_argument("--fact-eval", type=int, default=1000, help="facts in facts_eval.bin")
    ap.add_argument("--reason-tokens", type=int, default=4_000_000, help="reasoning train tokens")
    ap.add_argument("--reason-eval", type=int, default=1000,
                    help="items in reason_id_eval.bin and in reason_shift_eval.bin")
    ap.add_argument("--reason-rl", type=int, default=4000, help="RL prompts in reason_rl.bin")
    ap.add_argument("--shift", choices=("distractor", "wording"), default="distractor",
                    help="reason_shift_eval: training wordings with an irrelevant sentence added, or each "
                    "structure's held-out wording")
    ap.add_argument("--shift-new-share", type=float, default=0.0,
                    help="share of reason_shift_eval items from the new structures")
    ap.add_argument("--max-problem-tokens", type=int, default=128,
                    help="longest reasoning problem, prompt + answer - 1 tokens (every file)")
    ap.add_argument("--column-steps", type=int, default=10,
                    help="N: column steps in brackets for +/- results >= N (0: none)")
    ap.add_argument("--val-tokens", type=int, default=200_000, help="validation shard tokens")
    ap.add_argument("--shard-tokens", type=int, default=10_000_000,
                    help="most tokens per train shard")
    ap.add_argument("--check", action="store_true",
                    help="rebuild with the manifest's arguments and compare byte for byte")
    a = ap.parse_args()
    if not 1 <= a.attributes <= len(ATTRIBUTES):
        ap.error("--attributes must be 1..%d" % len(ATTRIBUTES))
    if not 0 <= a.shift_new_share <= 1:
        ap.error("--shift-new-share must be in [0, 1]")
    if a.fact_eval > a.entities * a.attributes:
        ap.error("--fact-eval is larger than the number of facts")
    if a.check:
        try:
            sys.exit(rebuild_and_compare(a))
        except (AssertionError, ValueError, OSError) as e:
            sys.exit("check FAILED: %r" % e)
    stats = build(a, a.out)
    manifest = write_manifest(a, a.out, stats)
    print(json.dumps({k: manifest[k] for k in ("memorization", "mixture")}, indent=1))
    r = manifest["reasoning"]
    print("reasoning: %d train problems (%d tokens), %d val; per structure %s" % (
        r["train_problems"], r["train_tokens"], r["val_problems"], r["train_per_structure"]))


if __name__ == "__main__":
    main()
