#!/usr/bin/env python3
r"""Build data/study3/: the data of the sparsity study's third design (scripts/sweep_configs/study3.json,
scripts/sweep_results/study_v3/), a miniature of "Optimal Sparsity of Mixture-of-Experts Language
Models for Reasoning Tasks" (arXiv 2508.18672) in which the facts exceed what the dense model can
store and every run reads about 30M tokens once. data/build_study.py (data/study/) is the second
design and stays as it is: the committed v2 results depend on its bytes.

The study has its own vocabulary (tokenizer.bin, built from the corpus): every word is one token,
every digit one token (" 7" with its space, or "7"), every punctuation mark one token; the invented
names and the fact values are single tokens too. About 1,000 tokens instead of 4,096, so the
classifier (V x C) is a fifth of a step's FLOPs at C=64 instead of a half.

Memorization: --people invented people, each with --attributes attributes (city, job, pet, sport,
    drink, tool; the first N) whose values are drawn uniformly from --values value words shared by all
    attributes. A fact is (person, attribute) -> value: log2(--values) bits, so the fact set holds
    people x attributes x log2(values) bits (the manifest's fact_bits).
  * A name is two tokens, a first name and a surname (--first-names x --surnames invented words,
    disjoint, none of them a reasoning word); the people are distinct pairs.
  * A value is one token whose bytes end in a newline: " faton\n". So the value ends the line, and
    the trainer's short-answer eval (which stops after a token holding a newline) scores it alone.
  * Compact form, one document per person per chunk of facts:
        <eot> Tove Mepu city faton
         pet zorb
         job kelp
    that is [eot, first, surname] + [attribute, value] per fact: 3.5 tokens per fact mention.
  * Every fact is stated exactly --mentions (80) times: in each of --mentions rounds a person's shuffled
    attributes are cut into documents of 1 to --max-chunk (3) facts. The validation documents are further mentions
    of training facts, drawn the same way.
  * The first half of the people of a build with --people 2N are the people of a build with
    --people N (names and values alike), so the gate's half-set data nests in the full set.
  * facts_all.bin (kind 1, not given to the trainer's -ev): every fact, in a seeded random order,
    prompt [eot, first, surname, attribute], answer [value]. scripts/sweep.py's fact_bits stage
    reads the model's log-probabilities of every answer (the trainer's -fi/-fo forward), which
    gives the bits stored: sum over facts of log2(values) + log2 p(value), p normalised over the
    value tokens (0 for a model that knows nothing, log2(values) per fact it knows for sure).
  * facts_eval.bin (kind 1): the first --fact-eval facts of facts_all.bin's order (a uniform
    sample), for the trainer's greedy accuracy.

Reasoning: the worked word problems of data/build_study.py (build_tasks.STRUCTURES in their
training wordings, column steps for +/- results >= --column-steps, every operation checked), one per
document, as a stream that never repeats a question, until the train shards hold --total-tokens.
  * Each number tuple is in one pool by a hash (build_arith.pool_of): training 80%, RL 10%, eval 10%.
  * reason_id_eval.bin: --reason-eval eval-pool problems in the training wordings (kind 2).
  * reason_shift_eval.bin: --reason-eval eval-pool problems with one irrelevant sentence before
    the question proper (build_study.distract, GSM-IC's shift), kind 2.
  * reason_rl.bin: --reason-rl RL-pool prompts (kind 2), for GRPO.
  * Validation problems come from the training stream (so never a training question).

Files (out dir, default data/study3/):
    tokenizer.bin              llm.c's decode layout (magic 20240328, version 2, V, eot = V - 1)
    study3_train_NNN.bin       uint16 shards of at most --shard-tokens tokens, the two corpora mixed
    study3_val_000.bin         --val-tokens tokens in the same proportions
    facts_all.bin, facts_eval.bin, reason_id_eval.bin, reason_shift_eval.bin, reason_rl.bin
    manifest.json              arguments, counts, V, shares, the sha256 of every file
Eval files use data/tasks/README.md's layout, with this vocabulary's V and eot in slots 6 and 7.

Checks at every build: from the written shards, every fact is stated exactly --mentions times with
its own value and no other value, every validation fact line states a training fact, every document
decodes and encodes back to the same tokens, no training question repeats, no eval, RL or validation
question is a training question, the pools' tuples are disjoint, every token of an eval or RL file
occurs in training, and every eval file reads back as written.

Bad input is refused before anything is built: more people than distinct names (--first-names x
--surnames), more values than value words, a vocabulary that does not fit uint16 shards, a fact set
whose mentions alone exceed --total-tokens.

    python3 data/build_study3.py                      # data/study3 (~3 minutes, standard library)
    python3 data/build_study3.py --people 6000 --out data/study3_half   # the gate's half fact set
    python3 data/build_study3.py --check [--out DIR]  # rebuild with DIR's manifest, compare bytes

Deterministic: the same arguments give byte-identical files.
"""
import argparse
import json
import math
import os
import random
import re
import struct
import sys
from array import array
from collections import Counter

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build_tasks  # noqa: E402
from build_tasks import KIND_SHORT, KIND_NUMBER, FEMALE, MALE, qa_text, read_eval, stable_hash  # noqa: E402
from build_study import (render, training_sources, TRAIN_POOL, RL_POOL, EVAL_POOL,  # noqa: E402
                         ONSETS, VOWELS, CODAS, Bad, chunks, cut, draw, invented, memorization_val,
                         problem_stream, rebuild_and_compare, take, write_manifest)

OUT = os.path.join(HERE, "study3")
TOKENIZER_MAGIC = 20240328
SHARD_MAGIC = 20240520
EOT_BYTES = b"<|endoftext|>"
EOT_PIECE = EOT_BYTES.decode()  # eot in a document of pieces
# one token per word (a value word with its line's newline), per digit, per punctuation mark
PIECE = re.compile(r" ?[A-Za-z]+\n?| ?[0-9]| ?[^A-Za-z0-9\s]|\n|\s")
ATTRIBUTES = [" city", " job", " pet", " sport", " drink", " tool"]


def pieces(text):
    p = PIECE.findall(text)
    assert "".join(p) == text, text
    return p


class Vocab:
    """The study's tokenizer: a list of pieces (token bytes); eot is the last id."""

    def __init__(self, pieces_list):
        self.pieces = list(pieces_list)
        self.eot = len(self.pieces)
        self.V = self.eot + 1
        self.id = {p: i for i, p in enumerate(self.pieces)}

    def encode(self, text):
        return self.ids(pieces(text))

    def ids(self, piece_list):
        """The ids of a list of pieces; ValueError for a piece not in the vocabulary."""
        try:
            return [self.id[p] for p in piece_list]
        except KeyError as e:
            raise ValueError("piece %r is not in the study's vocabulary" % e.args[0])

    def decode(self, ids):
        return "".join("<|endoftext|>" if i == self.eot else self.pieces[i] for i in ids)

    def write_bin(self, path):
        header = [0] * 256
        header[0:4] = [TOKENIZER_MAGIC, 2, self.V, self.eot]
        with open(path, "wb") as f:
            f.write(struct.pack("<256I", *header))
            for p in self.pieces + [None]:
                b = EOT_BYTES if p is None else p.encode("utf-8")
                assert 0 < len(b) < 256
                f.write(struct.pack("<B", len(b)) + b)


def read_vocab(path):
    """The Vocab of a tokenizer.bin written by this script."""
    with open(path, "rb") as f:
        data = f.read()
    h = struct.unpack_from("<256I", data)
    if h[0] != TOKENIZER_MAGIC or h[1] != 2 or h[3] != h[2] - 1:
        raise ValueError("%s: not a study3 tokenizer (magic %d version %d V %d eot %d)"
                         % (path, h[0], h[1], h[2], h[3]))
    p, out = 1024, []
    for _ in range(h[2]):
        n = data[p]
        out.append(data[p + 1:p + 1 + n].decode("utf-8"))
        p += 1 + n
    if p != len(data) or out[-1] != EOT_BYTES.decode():
        raise ValueError("%s: trailing bytes or no eot token last" % path)
    return Vocab(out[:-1])


def write_shard(path, docs):
    n = sum(len(d) for d in docs)
    header = [0] * 256
    header[0:3] = [SHARD_MAGIC, 1, n]
    buf = array("H")
    for d in docs:
        buf.extend(d)
    assert len(buf) == n and sys.byteorder == "little"
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        buf.tofile(f)


def read_shard(path):
    with open(path, "rb") as f:
        h = struct.unpack("<256i", f.read(1024))
        if h[0] != SHARD_MAGIC or h[1] != 1:
            raise ValueError("%s: bad shard header" % path)
        buf = array("H")
        buf.frombytes(f.read())
    if len(buf) != h[2]:
        raise ValueError("%s: %d tokens, the header says %d" % (path, len(buf), h[2]))
    return buf


def split_docs(tokens, eot):
    """Documents (each starting with eot) of a token array."""
    starts = [i for i, t in enumerate(tokens) if t == eot]
    assert starts and starts[0] == 0
    return [tokens[a:b] for a, b in zip(starts, starts[1:] + [len(tokens)])]

# ----------------------------------------------------------------------------------------
# Memorization


def word_list(rng, n, make, taken):
    out = []
    while len(out) < n:
        w = make(rng)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def reserved_words():
    """Every word a reasoning problem can hold (the names, the wordings' words, the samplers' items and
    the distractor sentences), from a fixed sample: the same set for every build, so that the invented
    words, which avoid it, do not depend on the flags (and --people N nests in --people 2N)."""
    words = set(FEMALE) | set(MALE) | {"Q", "A"}
    rng = random.Random(stable_hash("study3-reserved"))
    for structure, wis in training_sources():
        for wi in wis:
            for _ in range(200):
                q, sol, _ans = render(rng, structure, wi, structure[1](rng), 10, True)
                words.update(re.findall(r"[A-Za-z]+", q + sol))
    return words


def make_people(a, reserved):
    """(first names, surnames, values, people): people[i] = (first index, surname index,
    [value index per attribute]). The first k people of any build with the same seed and name
    lists are the same."""
    rng = random.Random(stable_hash("study3-words", a.seed))
    taken = set(w.strip().lower() for w in reserved)
    first = word_list(rng, a.first_names, lambda r: invented(r, 2, 0.3).capitalize(), taken)
    sur = word_list(rng, a.surnames, lambda r: invented(r, 2, 0.6).capitalize(), taken)
    values = word_list(rng, a.values, lambda r: invented(r, r.choice([1, 2]), 0.7), taken)
    pairs = [(f, s) for f in range(a.first_names) for s in range(a.surnames)]
    random.Random(stable_hash("study3-pairs", a.seed)).shuffle(pairs)
    vrng = random.Random(stable_hash("study3-values", a.seed))
    people = [(f, s, [vrng.randrange(a.values) for _ in range(a.attributes)])
              for f, s in pairs[:a.people]]
    return first, sur, values, people


def fact_doc(ids, person, attrs):
    f, s, vals = person
    return [ids["eot"], ids["first"][f], ids["sur"][s]] + [t for at in attrs for t in
                                                          (ids["attr"][at], ids["value"][vals[at]])]


def memorization_schedule(rng, n_people, n_attrs, mentions, most=3):
    """[(person, attributes)] of every training document: see the docstring's rounds."""
    docs = []
    for k in range(n_people):
        for _ in range(mentions):
            order = list(range(n_attrs))
            rng.shuffle(order)
            docs += [(k, tuple(part)) for part in chunks(rng, order, most)]
    return docs

# ----------------------------------------------------------------------------------------
# Reasoning (build_study's problems, counted in this vocabulary's tokens)


def piece_doc(question, solution):
    """A problem's training document as pieces, EOT_PIECE first: the vocabulary is made of the
    training problems' pieces, after they are drawn. The prompt's pieces then the answer's are the
    text's (the prompt ends in a lone ":"); interned, as the train set holds millions."""
    prompt, answer = qa_text(question, solution)
    return [EOT_PIECE] + [sys.intern(p) for p in pieces(prompt) + pieces(answer)]


def reasoning_sets(a, train_tokens, val_tokens):
    """build_study's problems (build_study.new_problem's tuples, documents as pieces): validation
    and train from one stream, so they never share a question (no problem for no tokens); id and
    shift (a distractor sentence) from the eval pool; rl from the RL pool."""
    stream = problem_stream(random.Random(stable_hash("study3-reason", a.seed)), training_sources(),
                            TRAIN_POOL, a, set(), piece_doc)
    sets = {k: take(stream, tokens=t) if t > 0 else []
            for k, t in (("val", val_tokens), ("train", train_tokens))}
    sets["id"] = draw(a, "study3-reason-id", training_sources(), EVAL_POOL, a.reason_eval, piece_doc)
    sets["shift"] = draw(a, "study3-reason-shift", [s + (True,) for s in training_sources()],
                         EVAL_POOL, a.reason_eval, piece_doc)
    sets["rl"] = draw(a, "study3-reason-rl", training_sources(), RL_POOL, a.reason_rl, piece_doc)
    tuples = {k: {(p[0], p[1]) for p in v} for k, v in sets.items()}
    assert not tuples["train"] & (tuples["id"] | tuples["rl"] | tuples["shift"])
    assert not tuples["rl"] & (tuples["id"] | tuples["shift"])
    return sets

# ----------------------------------------------------------------------------------------
# Eval files


def write_eval(path, name, kind, items, seed, vocab):
    """build_tasks.write_eval (data/tasks/README.md's layout) with this vocabulary's V and eot;
    items (prompt ids, answer ids, ref); read back to check."""
    build_tasks.write_eval(path, name, kind, [{"prompt": p, "answer": x, "ref": r} for p, x, r in items],
                           seed, vocab=vocab.V, eot=vocab.eot)
    hd, back = read_eval(path)
    assert back == [(list(p), list(x), r) for p, x, r in items] and hd["vocab"] == vocab.V
    assert hd["eot"] == vocab.eot and hd["kind"] == kind


def qa_item(vocab, prompt, answer, ref, kind):
    p, x = vocab.encode(prompt), vocab.encode(answer)
    assert vocab.encode(prompt + answer) == p + x, (prompt, answer)
    assert answer.startswith(" ") and answer.endswith("\n") and "\n" not in answer[:-1]
    if kind == KIND_NUMBER:
        assert re.findall(r"The answer is (\d+)\.", answer)[-1] == ref
    else:
        assert answer.strip(" \n").lower() == ref.lower() and "\n" not in prompt
    return [vocab.eot] + p, x, ref

# ----------------------------------------------------------------------------------------
# Build


def check_args(a):
    if not 1 <= a.attributes <= len(ATTRIBUTES):
        raise Bad("--attributes must be 1..%d (%s)" % (len(ATTRIBUTES), ",".join(ATTRIBUTES)))
    if a.people < 1 or a.mentions < 1 or a.values < 2 or a.max_chunk < 1:
        raise Bad("--people, --mentions and --max-chunk must be >= 1 and --values >= 2")
    if a.people > a.first_names * a.surnames:
        raise Bad("the fact set does not fit the vocabulary: --people %d needs %d distinct names, "
                  "but --first-names %d x --surnames %d give %d" % (
                      a.people, a.people, a.first_names, a.surnames, a.first_names * a.surnames))
    words = len(ONSETS) * len(VOWELS) * (1 + len(CODAS))
    if a.values > words:
        raise Bad("the fact set does not fit the vocabulary: --values %d is more than the %d value "
                  "words of one syllable and a coda" % (a.values, words))
    # the reasoning part needs about 600 tokens; shards are uint16
    if a.first_names + a.surnames + a.values + a.attributes + 1000 > 65535:
        raise Bad("the fact set does not fit the vocabulary: %d names and %d values make V larger "
                  "than uint16 shards hold (65535)" % (a.first_names + a.surnames, a.values))
    mem = a.people * a.mentions * (2 * a.attributes + 3 * a.attributes / (1 + min(a.max_chunk, a.attributes)) * 2)
    if mem > a.total_tokens:
        raise Bad("the fact set does not fit --total-tokens %d: %d people x %d attributes x %d "
                  "mentions take about %.0f tokens" % (a.total_tokens, a.people, a.attributes,
                                                       a.mentions, mem))
    if a.fact_eval > a.people * a.attributes:
        raise Bad("--fact-eval %d is more than the %d facts" % (a.fact_eval, a.people * a.attributes))


def check_shards(out, names, vocab, ids, people, a, sets):
    """The written shards, decoded: see the docstring's checks. Returns the train token count."""
    first = {t: i for i, t in enumerate(ids["first"])}
    sur = {t: i for i, t in enumerate(ids["sur"])}
    attr = {t: i for i, t in enumerate(ids["attr"])}
    value = {t: i for i, t in enumerate(ids["value"])}
    person_of = {(f, s): k for k, (f, s, _v) in enumerate(people)}

    def facts(doc):
        assert len(doc) >= 5 and len(doc) % 2 == 1, doc
        k = person_of[(first[doc[1]], sur[doc[2]])]
        out = []
        for t_a, t_v in zip(doc[3::2], doc[4::2]):
            at, v = attr[t_a], value[t_v]
            assert people[k][2][at] == v, "a fact line states a wrong value"
            out.append((k, at))
        assert len(set(out)) == len(out)
        return out

    count, questions, total = Counter(), [], 0
    for name in names:
        toks = read_shard(os.path.join(out, name))
        total += len(toks)
        for doc in split_docs(toks, vocab.eot):
            doc = list(doc)
            assert vocab.encode(vocab.decode(doc[1:])) == doc[1:]
            if doc[1] in first:
                count.update(facts(doc))
            else:
                text = vocab.decode(doc[1:])
                assert text.startswith("Q: ") and text.endswith(".\n"), text
                questions.append(text[3:text.index("\nA:")])
    assert len(count) == len(people) * a.attributes and set(count.values()) == {a.mentions}
    qs = set(questions)
    assert len(qs) == len(questions) == len(sets["train"])
    val_q = []
    for doc in split_docs(read_shard(os.path.join(out, "study3_val_000.bin")), vocab.eot):
        doc = list(doc)
        assert vocab.encode(vocab.decode(doc[1:])) == doc[1:]
        if doc[1] in first:
            facts(doc)
        else:
            text = vocab.decode(doc[1:])
            val_q.append(text[3:text.index("\nA:")])
    held = {p[2] for k in ("id", "shift", "rl") for p in sets[k]}
    assert not qs & set(val_q) and not qs & held
    return total


def build(a, out):
    check_args(a)
    os.makedirs(out, exist_ok=True)
    # the facts' schedule sets the reasoning tokens; the reasoning pieces are the vocabulary's
    # words, which the invented words then avoid
    schedule = memorization_schedule(random.Random(stable_hash("study3-mem", a.seed)), a.people,
                                     a.attributes, a.mentions, a.max_chunk)
    mem_tok = sum(3 + 2 * len(at) for _k, at in schedule)
    if mem_tok > a.total_tokens:
        raise Bad("the facts' %d tokens exceed --total-tokens %d" % (mem_tok, a.total_tokens))
    frac_mem = mem_tok / a.total_tokens
    sets = reasoning_sets(a, a.total_tokens - mem_tok, a.val_tokens * (1 - frac_mem))
    train_pieces = Counter()
    for p in sets["train"]:
        train_pieces.update(p[5][1:])
    assert not any(x.endswith("\n") and x != "\n" for x in train_pieces)
    reserved = reserved_words()
    missing = {x.strip() for x in train_pieces if x.strip().isalpha()} - reserved
    assert not missing, "reasoning words outside reserved_words(): %s" % sorted(missing)
    for at in ATTRIBUTES:
        assert at not in train_pieces, "attribute %r is a reasoning word" % at
    first, sur, values, people = make_people(a, reserved)
    fact_pieces = ([" " + w for w in first] + [" " + w for w in sur] + ATTRIBUTES[:a.attributes]
                   + [" " + w + "\n" for w in values])
    assert not set(fact_pieces) & set(train_pieces)
    vocab = Vocab(sorted(train_pieces) + fact_pieces)
    if vocab.V > 65535:
        raise Bad("the fact set does not fit the vocabulary: V=%d, more than uint16 shards hold"
                  % vocab.V)
    ids = {"eot": vocab.eot, "first": [vocab.id[" " + w] for w in first],
           "sur": [vocab.id[" " + w] for w in sur],
           "attr": [vocab.id[x] for x in ATTRIBUTES[:a.attributes]],
           "value": [vocab.id[" " + w + "\n"] for w in values]}

    mem_train = [fact_doc(ids, people[k], at) for k, at in schedule]
    del schedule
    assert sum(map(len, mem_train)) == mem_tok
    reason_train = [[vocab.eot] + vocab.ids(p[5][1:]) for p in sets["train"]]
    reason_tok = sum(map(len, reason_train))
    mem_val = memorization_val(random.Random(stable_hash("study3-mem-val", a.seed)), people,
                               range(a.attributes), a.val_tokens * frac_mem,
                               lambda person, attrs: fact_doc(ids, person, attrs))
    reason_val = [[vocab.eot] + vocab.ids(p[5][1:]) for p in sets["val"]]

    # the facts evals: every fact in one seeded order; facts_eval is its prefix
    order = [(k, at) for k in range(len(people)) for at in range(a.attributes)]
    random.Random(stable_hash("study3-facts-order", a.seed)).shuffle(order)
    fact_items = []
    for k, at in order:
        f, s, vals = people[k]
        prompt = " %s %s%s" % (first[f], sur[s], ATTRIBUTES[at])
        fact_items.append(qa_item(vocab, prompt, " %s\n" % values[vals[at]], values[vals[at]],
                                  KIND_SHORT))
    # every eval/RL token occurs in training (the facts' tokens all do: every fact is stated)
    unseen = {x for k in ("id", "shift", "rl") for p in sets[k] for x in p[5][1:]}
    unseen -= set(train_pieces)
    if unseen:
        raise Bad("the eval or RL problems use words that no training problem has (%s): the reasoning "
                  "part is too small; raise --total-tokens" % ", ".join(sorted(map(repr, unseen))[:8]))
    reason_items = {k: [qa_item(vocab, *qa_text(p[2], p[3]), p[4], KIND_NUMBER) for p in sets[k]]
                    for k in ("id", "shift", "rl")}

    for f in os.listdir(out):
        if re.fullmatch(r"study3_(train|val)_\d+\.bin", f):
            os.remove(os.path.join(out, f))
    train_docs = mem_train + reason_train
    random.Random(stable_hash("study3-mix", a.seed)).shuffle(train_docs)
    val_docs = mem_val + reason_val
    random.Random(stable_hash("study3-mix-val", a.seed)).shuffle(val_docs)
    shards = cut(train_docs, a.shard_tokens)
    names = ["study3_train_%03d.bin" % i for i in range(len(shards))]
    for name, part in zip(names + ["study3_val_000.bin"], shards + [val_docs]):
        write_shard(os.path.join(out, name), part)
    del train_docs, shards
    vocab.write_bin(os.path.join(out, "tokenizer.bin"))
    assert read_vocab(os.path.join(out, "tokenizer.bin")).pieces == vocab.pieces
    evals = [("facts_all", KIND_SHORT, fact_items),
             ("facts_eval", KIND_SHORT, fact_items[:a.fact_eval]),
             ("reason_id_eval", KIND_NUMBER, reason_items["id"]),
             ("reason_shift_eval", KIND_NUMBER, reason_items["shift"]),
             ("reason_rl", KIND_NUMBER, reason_items["rl"])]
    for name, kind, items in evals:
        write_eval(os.path.join(out, name + ".bin"), name.replace("_eval", ""), kind, items, a.seed,
                   vocab)
    total = check_shards(out, names, vocab, ids, people, a, sets)
    assert total == mem_tok + reason_tok

    n_facts = len(people) * a.attributes
    return {
        "vocabulary": {"V": vocab.V, "eot": vocab.eot, "reasoning_pieces": len(train_pieces),
                       "first_names": a.first_names, "surnames": a.surnames,
                       "attributes": a.attributes, "values": a.values},
        "memorization": {
            "people": len(people), "attributes": [x.strip() for x in ATTRIBUTES[:a.attributes]],
            "values_per_attribute": a.values, "facts": n_facts, "mentions_per_fact": a.mentions,
            "fact_bits": round(n_facts * math.log2(a.values), 1),
            "train_documents": len(mem_train), "train_tokens": mem_tok,
            "tokens_per_fact_mention": round(mem_tok / (n_facts * a.mentions), 3),
            "val_documents": len(mem_val), "val_tokens": sum(map(len, mem_val)),
            "facts_all": len(fact_items), "facts_eval": a.fact_eval},
        "reasoning": {
            "train_problems": len(sets["train"]), "train_tokens": reason_tok,
            "tokens_per_problem": round(reason_tok / len(sets["train"]), 2),
            "val_problems": len(sets["val"]), "val_tokens": sum(map(len, reason_val)),
            "train_per_structure": dict(sorted(Counter(p[0] for p in sets["train"]).items())),
            "distinct_train_tuples_per_structure": dict(sorted(Counter(
                s for s, _t in {(p[0], p[1]) for p in sets["train"]}).items())),
            "id_eval": len(reason_items["id"]), "shift_eval": len(reason_items["shift"]),
            "rl_prompts": len(reason_items["rl"])},
        "mixture": {"train_tokens": total, "shards": len(names),
                    "memorization_share": round(mem_tok / total, 4),
                    "reasoning_share": round(reason_tok / total, 4),
                    "val_tokens": sum(map(len, val_docs))},
    }


# every flag but --out and --check is a whole number: (flag, default, help), in --help's order;
# the fact set's flags
FACT_FLAGS = [
    ("--seed", 20260301, None),
    ("--people", 12000, "invented people"),
    ("--attributes", 6, "attributes per person, 1-%d" % len(ATTRIBUTES)),
    ("--values", 256, "value words, shared by the attributes"),
    ("--first-names", 128, "first-name tokens"),
    ("--surnames", 128, "surname tokens"),
    ("--mentions", 80, "statements of each fact in train"),
    ("--max-chunk", 3, "most facts per training document (a round's facts are cut into 1..N)"),
]
# the sizes of the eval files and of the mixture, the reasoning problems' form, the shards
DATA_FLAGS = [
    ("--fact-eval", 2000, "facts in facts_eval.bin"),
    ("--total-tokens", 30_200_000, "train tokens: the facts' mentions, and reasoning problems up to this"),
    ("--reason-eval", 1000, "items in reason_id_eval.bin and in reason_shift_eval.bin"),
    ("--reason-rl", 4000, "RL prompts in reason_rl.bin"),
    ("--max-problem-tokens", 128, "longest reasoning problem, prompt + answer - 1 tokens"),
    ("--column-steps", 10, "N: column steps in brackets for +/- results >= N (0: none)"),
    ("--val-tokens", 200_000, "validation shard tokens"),
    ("--shard-tokens", 10_000_000, "most tokens per train shard"),
]


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT)
    for flag, default, what in FACT_FLAGS + DATA_FLAGS:
        ap.add_argument(flag, type=int, default=default, help=what)
    ap.add_argument("--check", action="store_true",
                    help="rebuild with --out's manifest arguments and compare byte for byte")
    return ap


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        if a.check:
            return rebuild_and_compare(a, build)
        manifest = write_manifest(a, a.out, build(a, a.out))
    except Bad as e:
        print("build_study3: error: %s" % e, file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("vocabulary", "memorization", "mixture")}, indent=1))
    r = manifest["reasoning"]
    print("reasoning: %d train problems (%d tokens, %.1f per problem), %d val; per structure %s" % (
        r["train_problems"], r["train_tokens"], r["tokens_per_problem"], r["val_problems"],
        r["train_per_structure"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
