#!/usr/bin/env python3
"""Build the small default dataset and tokenizer bundled in data/default/.

Source text (public domain, read offline from two Debian packages):
  * Jane Austen's six novels    -- Debian package r-cran-janeaustenr (CRAN janeaustenr 1.0.0)
  * Herman Melville, Moby Dick  -- Debian package r-cran-tokenizers  (CRAN tokenizers 0.3.0,
                                   dataset `mobydick`, Project Gutenberg EBook #2701)

Install the source packages once (Debian 12 "bookworm"; ~12 small packages incl. r-base-core):

    apt-get install --no-install-recommends r-cran-janeaustenr r-cran-tokenizers

R itself is never run: this script reads the packages' lazy-load data files
(<lib>/<pkg>/data/Rdata.rdx, Rdata.rdb) with a small R-serialization reader written here.
Without installing R, unpack the two .deb files instead and point --rlib at them:

    apt-get download r-cran-janeaustenr r-cran-tokenizers
    for f in r-cran-*.deb; do dpkg -x "$f" /tmp/rpkgs; done
    python3 data/build_default.py --rlib /tmp/rpkgs/usr/lib/R/site-library

Then (from the repository root, Python 3 standard library only, ~1-2 minutes):

    python3 data/build_default.py            # writes data/default/*
    python3 data/build_default.py --check    # re-reads the written files and checks them

Outputs (formats: README.md "File formats", llm.c-compatible):
  data/default/tokenizer.bin    llm.c decode layout (magic 20240328, version 2, V, eot)
  data/default/tokenizer.json   the encoder (HF `tokenizers` JSON format: byte-level BPE)
  data/default/train_00N.bin    uint16 token shards (magic 20240520, version 1)
  data/default/val_000.bin
Each document (one chapter) begins with the end-of-text token.

The build is deterministic: same packages + same script => byte-identical outputs.

Reuse the tokenizer from other scripts:

    import sys; sys.path.insert(0, "data")
    from build_default import encode, decode       # uses data/default/tokenizer.json
    ids = encode("In 1984, 37 people")              # list[int]; no eot added
    text = decode(ids)
"""
import argparse
import gzip
import hashlib
import heapq
import json
import lzma
import bz2
import os
import random
import re
import struct
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "default")
RLIB_CANDIDATES = ["/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library"]

VOCAB_SIZE = 4096           # 256 byte tokens + 3839 merges + 1 end-of-text token
EOT_STR = "<|endoftext|>"
VAL_EVERY = 25              # every 25th chapter (global index % 25 == VAL_PHASE) goes to val: 4%
VAL_PHASE = 12
N_TRAIN_SHARDS = 2
SHUFFLE_SEED = 1337         # order of train documents across/within shards

# Pre-tokenization (GPT-2's pattern with two changes): every decimal digit is a piece of its
# own, so no BPE merge can contain a digit ("1984" -> 1 9 8 4); '_' counts as punctuation.
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+|\d| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
PAT_RE = re.compile(PAT)

# (package, dataset name, title, author) in publication order
SOURCES = [
    ("janeaustenr", "sensesensibility", "Sense and Sensibility", "Jane Austen"),
    ("janeaustenr", "prideprejudice", "Pride and Prejudice", "Jane Austen"),
    ("janeaustenr", "mansfieldpark", "Mansfield Park", "Jane Austen"),
    ("janeaustenr", "emma", "Emma", "Jane Austen"),
    ("janeaustenr", "northangerabbey", "Northanger Abbey", "Jane Austen"),
    ("janeaustenr", "persuasion", "Persuasion", "Jane Austen"),
    ("tokenizers", "mobydick", "Moby Dick; or The Whale", "Herman Melville"),
]

# ----------------------------------------------------------------------------------------
# Minimal reader for R's serialization format (XDR, versions 2 and 3), enough for the
# character vectors that R packages store in their lazy-load data base.


def _r_decompress(blob):
    n = struct.unpack(">I", blob[:4])[0]
    kind = blob[4:5]
    if kind == b"Z" or kind == b"2" or kind == b"X" or kind == b"0":
        body = blob[5:]
        out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
               b"0": lambda d: d}[kind](body)
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != n:
        raise ValueError("bad R lazy-load blob")
    return out


class _RVec(list):
    """An R vector with attributes (e.g. names)."""

    def __init__(self, v, attrs):
        super().__init__(v)
        self.attrs = attrs


class _RReader:
    def __init__(self, b):
        self.b, self.p, self.refs = b, 0, []

    def _int(self):
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def _len(self):
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def _raw(self, n):
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def read(self):
        if self._raw(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            self._raw(self._int())   # native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):     # NULL, environments, markers
            return None
        if t == 255:                                     # reference to a symbol read before
            idx = flags >> 8
            return self.refs[(idx or self._int()) - 1]
        if t == 1:                                       # symbol
            s = ("sym", self._item())
            self.refs.append(s)
            return s
        if t in (2, 239):                                # pairlist -> [(tag, value)]
            out = []
            while True:
                if has_attr:
                    self._item()
                tag = self._item() if has_tag else None
                out.append((tag[1] if tag else None, self._item()))
                flags = self._int()
                t = flags & 0xFF
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
                if t == 254:
                    return out
                if t not in (2, 239):
                    raise ValueError("unsupported pairlist tail %d" % t)
        if t == 9:                                       # CHARSXP
            n = self._int()
            return None if n == -1 else self._raw(n).decode("utf-8")
        if t in (10, 13):                                # logical, integer
            n = self._len()
            v = list(struct.unpack(">%di" % n, self._raw(4 * n)))
        elif t == 14:                                    # double
            n = self._len()
            v = list(struct.unpack(">%dd" % n, self._raw(8 * n)))
        elif t in (16, 19, 20):                          # character vector, list
            n = self._len()
            v = [self._item() for _ in range(n)]
        else:
            raise ValueError("unsupported R type %d" % t)
        if has_attr:
            return _RVec(v, dict(self._item()))
        return v


def load_r_dataset(rlib, package, name):
    """Reads data set `name` of installed R package `package` (lazy-load data base)."""
    d = os.path.join(rlib, package, "data")
    with open(os.path.join(d, "Rdata.rdx"), "rb") as f:
        index = _RReader(gzip.decompress(f.read())).read()
    variables = index[0]
    names = variables.attrs["names"]
    off, length = variables[names.index(name)]
    with open(os.path.join(d, "Rdata.rdb"), "rb") as f:
        f.seek(off)
        blob = f.read(length)
    return _RReader(_r_decompress(blob)).read()


def find_rlib(package):
    for d in RLIB_CANDIDATES:
        if os.path.isfile(os.path.join(d, package, "data", "Rdata.rdb")):
            return d
    sys.exit("R package '%s' not found in %s; install it with\n"
             "  apt-get install --no-install-recommends r-cran-janeaustenr r-cran-tokenizers\n"
             "or pass --rlib DIR" % (package, RLIB_CANDIDATES))

# ----------------------------------------------------------------------------------------
# Cleaning and splitting into documents (one document per chapter)


HEADING_RE = re.compile(r"^(?:CHAPTER|Chapter) [0-9IVXLC]+\b")
VOLUME_RE = re.compile(r"^VOLUME [IVX]+$")


def raw_book_text(rlib, package, name):
    v = load_r_dataset(rlib, package, name)
    text = "\n".join(s if s is not None else "" for s in v)
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


def strip_boilerplate(name, text):
    """Removes Project Gutenberg headers/licence and editorial (non-author) notes."""
    if name == "mobydick":
        start = text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")
        text = text[text.index("\n", start) + 1:]
        text = text[:text.index("End of Project Gutenberg's Moby Dick")]
        text = text.replace("Produced by Daniel Lazarus and Jonesey\n", "")
        a = text.index("Original Transcriber's Notes:")
        b = text.index("ETYMOLOGY.")
        text = text[:a] + text[b:]
    if name == "northangerabbey":   # modern edition note at the end, not Austen's text
        text = text[:text.index("A NOTE ON THE TEXT")]
    if "Gutenberg" in text or "gutenberg" in text:
        raise ValueError("leftover Project Gutenberg text in %s" % name)
    return text


def normalise(text):
    """Unwraps paragraphs (blank-line separated) into single lines; keeps the line breaks
    of indented blocks (verse, letters' headings); drops Gutenberg _italic_ marks; collapses
    runs of spaces. Paragraphs are separated by one blank line."""
    text = re.sub(r"_([^_\n]+(?:\n[^_\n]+)*)_", r"\1", text)
    text = text.replace("\t", " ")
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        indented = sum(1 for ln in lines if ln.startswith("  ")) * 2 > len(lines)
        if indented and len(lines) > 1:
            p = "\n".join(re.sub(r" {2,}", " ", ln.strip()) for ln in lines)
        else:
            p = re.sub(r" {2,}", " ", " ".join(ln.strip() for ln in lines))
        paras.append(p)
    return paras


def split_chapters(paras):
    """Groups paragraphs into chapters. Front matter (title, author, volume line, preface)
    goes with the first chapter; a VOLUME line goes with the chapter that follows it."""
    docs, cur = [], []
    for p in paras:
        if HEADING_RE.match(p) or VOLUME_RE.match(p):
            only_headings = all(HEADING_RE.match(q) or VOLUME_RE.match(q) for q in cur)
            has_chapter = any(HEADING_RE.match(q) for q in cur)
            if cur and has_chapter and not only_headings:
                docs.append(cur)
                cur = []
        cur.append(p)
    if cur:
        docs.append(cur)
    return ["\n\n".join(d) + "\n" for d in docs]


def load_documents(rlib_arg=None):
    """Returns [(book_name, chapter_index, text)] in a fixed order."""
    out = []
    for package, name, _title, _author in SOURCES:
        rlib = rlib_arg or find_rlib(package)
        text = strip_boilerplate(name, raw_book_text(rlib, package, name))
        for i, d in enumerate(split_chapters(normalise(text))):
            out.append((name, i, d))
    return out

# ----------------------------------------------------------------------------------------
# Byte-level BPE


def bytes_to_unicode():
    """GPT-2's map byte -> printable unicode char (used only for the HF tokenizer.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def pretokenize(text):
    return PAT_RE.findall(text)


def train_bpe(texts, vocab_size):
    """Deterministic byte-level BPE. Token ids 0..255 are the raw bytes, merges get ids
    256.., the end-of-text token is vocab_size-1. Ties between equally frequent pairs go to
    the pair with the smaller (left id, right id)."""
    n_merges = vocab_size - 256 - 1
    counts = {}
    for t in texts:
        for piece in pretokenize(t):
            counts[piece] = counts.get(piece, 0) + 1
    words = [list(p.encode("utf-8")) for p in sorted(counts)]
    freqs = [counts[p] for p in sorted(counts)]
    pair_count, where = {}, {}
    for wi, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] = pair_count.get((a, b), 0) + freqs[wi]
            where.setdefault((a, b), set()).add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        negc, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negc or negc == 0:
            continue          # stale heap entry
        new_id = 256 + len(merges)
        merges.append(pair)
        changed = {}
        for wi in sorted(where.pop(pair)):
            w, f = words[wi], freqs[wi]
            for a, b in zip(w, w[1:]):
                pair_count[(a, b)] -= f
                changed[(a, b)] = True
            nw, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == pair[0] and w[i + 1] == pair[1]:
                    nw.append(new_id)
                    i += 2
                else:
                    nw.append(w[i])
                    i += 1
            words[wi] = nw
            for a, b in zip(nw, nw[1:]):
                pair_count[(a, b)] = pair_count.get((a, b), 0) + f
                where.setdefault((a, b), set()).add(wi)
                changed[(a, b)] = True
        pair_count.pop(pair, None)
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p))
    if len(merges) != n_merges:
        raise ValueError("corpus too small for %d merges" % n_merges)
    return merges


class Tokenizer:
    def __init__(self, merges, vocab_size):
        self.merges = [tuple(m) for m in merges]
        self.V = vocab_size
        self.eot = vocab_size - 1
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.token_bytes = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self.token_bytes.append(EOT_STR.encode("utf-8"))
        assert len(self.token_bytes) == vocab_size
        self._cache = {}

    def _encode_piece(self, piece):
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        ids = list(piece.encode("utf-8"))
        while len(ids) > 1:
            best, bi = None, -1
            for i in range(len(ids) - 1):
                r = self.ranks.get((ids[i], ids[i + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, i
            if best is None:
                break
            ids = ids[:bi] + [256 + best] + ids[bi + 2:]
        if len(self._cache) < 1_000_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text):
        """Text -> token ids (no end-of-text token added; the text "<|endoftext|>" is not
        special here: it is encoded as ordinary characters)."""
        out = []
        for piece in pretokenize(text):
            out.extend(self._encode_piece(piece))
        return out

    def decode(self, ids):
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    # -- files -----------------------------------------------------------------------
    def write_bin(self, path):
        """llm.c's decode-only tokenizer layout."""
        header = [0] * 256
        header[0:4] = [20240328, 2, self.V, self.eot]
        with open(path, "wb") as f:
            f.write(struct.pack("<256I", *header))
            for b in self.token_bytes:
                assert 0 < len(b) < 256
                f.write(struct.pack("<B", len(b)))
                f.write(b)

    def to_hf_json(self):
        """Hugging Face `tokenizers` JSON (byte-level BPE), so both this module and
        tokenizers.Tokenizer.from_file() can encode with it."""
        b2u = bytes_to_unicode()

        def s(i):
            return "".join(b2u[x] for x in self.token_bytes[i])
        vocab = {s(i): i for i in range(self.V - 1)}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": self.eot, "content": EOT_STR, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False,
                              "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PAT}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                 "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                        "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab,
                      "merges": [[s(a), s(b)] for a, b in self.merges]},
        }

    def write_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_hf_json(), f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            j = json.load(f)
        if j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] != PAT:
            raise ValueError("tokenizer.json was built with another pre-tokenizer pattern")
        vocab = j["model"]["vocab"]
        merges = [(vocab[a], vocab[b]) for a, b in j["model"]["merges"]]
        return cls(merges, len(vocab) + len(j["added_tokens"]))


_default_tok = None


def get_tokenizer(path=None):
    global _default_tok
    if path is not None:
        return Tokenizer.from_json(path)
    if _default_tok is None:
        _default_tok = Tokenizer.from_json(os.path.join(DEFAULT_OUT, "tokenizer.json"))
    return _default_tok


def encode(text):
    """Encodes with data/default/tokenizer.json. No end-of-text token is added."""
    return get_tokenizer().encode(text)


def decode(ids):
    return get_tokenizer().decode(ids)

# ----------------------------------------------------------------------------------------
# Shards


def write_shard(path, tokens):
    header = [0] * 256
    header[0:3] = [20240520, 1, len(tokens)]
    assert all(0 <= t < 65536 for t in tokens)
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack("<%dH" % len(tokens), *tokens))


def read_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    h = struct.unpack_from("<256i", data)
    if h[0] != 20240520 or h[1] != 1:
        raise ValueError("%s: bad shard header" % path)
    n = h[2]
    if len(data) != 1024 + 2 * n:
        raise ValueError("%s: size %d != 1024 + 2*%d" % (path, len(data), n))
    return list(struct.unpack_from("<%dH" % n, data, 1024))


def read_tokenizer_bin(path):
    with open(path, "rb") as f:
        data = f.read()
    h = struct.unpack_from("<256I", data)
    if h[0] != 20240328 or h[1] != 2:
        raise ValueError("%s: bad tokenizer header" % path)
    V, eot, p, toks = h[2], h[3], 1024, []
    for _ in range(V):
        n = data[p]
        toks.append(data[p + 1:p + 1 + n])
        p += 1 + n
    if p != len(data):
        raise ValueError("%s: trailing bytes" % path)
    return V, eot, toks


def build(out_dir, rlib, vocab_size):
    os.makedirs(out_dir, exist_ok=True)
    docs = load_documents(rlib)
    val = [d for gi, d in enumerate(docs) if gi % VAL_EVERY == VAL_PHASE]
    train = [d for gi, d in enumerate(docs) if gi % VAL_EVERY != VAL_PHASE]
    print("documents: %d (train %d, val %d), %d chars" %
          (len(docs), len(train), len(val), sum(len(d[2]) for d in docs)))
    merges = train_bpe([d[2] for d in train], vocab_size)
    tok = Tokenizer(merges, vocab_size)
    tok.write_bin(os.path.join(out_dir, "tokenizer.bin"))
    tok.write_json(os.path.join(out_dir, "tokenizer.json"))

    def tokens_of(ds):
        out = []
        for d in ds:
            out.append(tok.eot)
            out.extend(tok.encode(d[2]))
        return out

    order = list(range(len(train)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    train = [train[i] for i in order]
    total = sum(len(d[2]) for d in train)
    shards, cur, acc = [], [], 0
    for d in train:
        cur.append(d)
        acc += len(d[2])
        if len(shards) < N_TRAIN_SHARDS - 1 and acc >= total * (len(shards) + 1) / N_TRAIN_SHARDS:
            shards.append(cur)
            cur = []
    shards.append(cur)
    for i, s in enumerate(shards):
        t = tokens_of(s)
        write_shard(os.path.join(out_dir, "train_%03d.bin" % i), t)
        print("train_%03d.bin: %d documents, %d tokens" % (i, len(s), len(t)))
    t = tokens_of(val)
    write_shard(os.path.join(out_dir, "val_000.bin"), t)
    print("val_000.bin: %d documents, %d tokens (%s)" %
          (len(val), len(t), ", ".join("%s#%d" % (d[0], d[1]) for d in val)))


def check(out_dir):
    """Re-reads the files with an independent decoder and checks the format rules."""
    V, eot, toks = read_tokenizer_bin(os.path.join(out_dir, "tokenizer.bin"))
    tok = get_tokenizer(os.path.join(out_dir, "tokenizer.json"))
    assert (V, eot) == (tok.V, tok.eot) and toks == tok.token_bytes
    digits = [d for d in range(V) if any(c in b"0123456789" for c in toks[d])]
    assert digits == list(range(ord("0"), ord("9") + 1)), digits   # only the 10 byte tokens
    total_bytes = total_tok = 0
    for fn in sorted(os.listdir(out_dir)):
        if not fn.endswith(".bin") or fn == "tokenizer.bin":
            continue
        t = read_shard(os.path.join(out_dir, fn))
        assert t[0] == eot and max(t) < V
        text = b"".join(toks[i] for i in t if i != eot)
        total_bytes += len(text)
        total_tok += len(t)
        ndoc = t.count(eot)
        sha = hashlib.sha256(open(os.path.join(out_dir, fn), "rb").read()).hexdigest()[:16]
        print("%-14s %9d tokens %4d docs %6.3f bytes/token sha256:%s" %
              (fn, len(t), ndoc, len(text) / (len(t) - ndoc), sha, ))
    print("V=%d eot=%d; all shards: %d tokens, %.3f bytes/token (eot included)" %
          (V, eot, total_tok, total_bytes / total_tok))
    ids = tok.encode("In 1984, 37 people")
    print("encode('In 1984, 37 people') =", ids, [toks[i].decode() for i in ids])
    assert tok.decode(ids) == "In 1984, 37 people"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--rlib", default=None, help="R site-library holding janeaustenr and "
                    "tokenizers (default: search %s)" % RLIB_CANDIDATES)
    ap.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    ap.add_argument("--check", action="store_true", help="only check the written files")
    a = ap.parse_args()
    if not a.check:
        build(a.out, a.rlib, a.vocab)
    check(a.out)


if __name__ == "__main__":
    main()
