"""Evaluation samples built from real text: passkey retrieval, key-value lookup, continuation.

Every sample is three token pieces fed in order: `prefix` (BOS and a short instruction, protected),
`context` (the long span that gets compressed, like an image span) and `question` (protected; its last
W tokens are the observation window of query-aware methods). Retrieval samples are scored on the
greedy continuation of the question containing `answer`; continuation samples on the teacher-forced
logits of `target` (the real next tokens of the same text) against the full cache.

Phrasing is completion style ("... The pass key is"): the evaluation model (Gemma 3 270M) is a base
model with no chat template. Samples are deterministic given (seed, tokenizer).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from edgekv.errors import EdgeKVError
from edgekv.eval import corpus

TASKS = ("passkey", "kv", "continuation", "word", "pair", "second")
DEFAULT_TASKS = ("passkey", "kv", "continuation")   # `word`, `pair` and `second` on request (--tasks)
RETRIEVAL = ("passkey", "kv", "word", "pair")
# Filler sources for haystacks; sample i uses FILLERS[i % len(FILLERS)], so --samples 2 covers both.
FILLERS = ("docs", "license")


class Tokenizer(Protocol):
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Plain text to ids: no BOS, special tokens not parsed."""

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Sample:
    task: str
    length: int                 # prompt tokens: prefix + context + question
    index: int
    depth: float | None         # where the needle sits in the context (0 = start, 1 = end)
    prefix: tuple[int, ...]
    context: tuple[int, ...]
    question: tuple[int, ...]
    answer: str = ""            # retrieval: the greedy continuation must contain it
    target: tuple[int, ...] = ()  # continuation: the real next tokens (teacher forced)
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    followup: tuple[int, ...] = ()  # task `second`: the follow-up question, asked after the first answer

    @property
    def key(self) -> str:
        d = "-" if self.depth is None else f"{self.depth:g}"
        return f"{self.task}/L{self.length}/d{d}/i{self.index}"

    @property
    def digest(self) -> str:
        """Short hash of the sample's tokens and answer: a resumed run re-does records whose sample
        changed (another corpus, tokenizer or phrasing) under the same key."""
        h = hashlib.sha1()
        for part in (self.prefix, self.context, self.question, self.target):
            h.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
        if self.followup:  # only then: the digests of the other tasks stay as they were
            h.update(np.asarray(self.followup, dtype=np.int64).tobytes() + b"|")
        h.update(self.answer.encode())
        return h.hexdigest()[:12]

    @property
    def n_prompt(self) -> int:
        return len(self.prefix) + len(self.context) + len(self.question)


@dataclass(frozen=True)
class TaskSpec:
    """What to build: which tasks, lengths, depths and how many samples of each."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)   # passkey and kv
    samples: int = 1                              # per (task, length, depth); continuation: per length
    continuation_samples: int = 2
    target_tokens: int = 32                       # continuation tokens scored
    window: int = 32                              # continuation: protected tail = observation window
    seed: int = 0


# --- phrasing (completion style, measured to be solved by the full cache; see results/) --------
PASSKEY_HEADER = ("There is an important pass key hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about the pass key.\n\n")
# Measured on Gemma 3 270M (full cache, 1k and 8k, 3 depths): "...? The pass key is" without the colon
# makes the base model ramble ("a special key that ..."); with the colon it copies the key 6/6.
PASSKEY_NEEDLE = "The pass key is: {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is:"

KV_HEADER = ("The text below hides several records, each giving the value of a key. "
             "Memorize them. I will ask for the value of one key.\n\n")
KV_RECORD = 'The value of key "{key}" is "{value}".'
KV_QUESTION = '\n\nWhat is the value of key "{key}"? The value of key "{key}" is "'
KV_TOKENS_PER_PAIR = 256  # one record per this many context tokens (4 at 1k ... 32 at 8k)

WORD_NEEDLE = "The secret word is: {word}. Remember it. {word} is the secret word."
WORD_QUESTION = "\n\nWhat is the secret word? The secret word is:"
# Concrete, unrelated to the filler, mostly 2-3 Gemma tokens each.
WORDS = ("pineapple", "lighthouse", "volcano", "saxophone", "cucumber", "kangaroo", "umbrella", "glacier",
         "trombone", "avocado", "parachute", "cathedral", "walrus", "hammock", "lantern", "porcupine",
         "tornado", "marshmallow", "flamingo", "telescope", "canyon", "harmonica", "jellyfish", "windmill")

PAIR_NEEDLE = "The pass key of the {color} door is: {key}."
PAIR_QUESTION = "\n\nWhat is the pass key of the {color} door? The pass key of the {color} door is:"
COLORS = ("red", "blue", "green", "yellow", "white", "black")

_HEX = "0123456789abcdef"


def sample_rng(spec: TaskSpec, *parts) -> random.Random:
    return random.Random("/".join(map(str, (spec.seed, *parts))))  # str seeds hash stably (sha512)


class Haystack:
    """Filler token streams cut from real paragraphs, joined by blank lines, tokenized lazily."""

    def __init__(self, tok: Tokenizer, paragraphs: Sequence[str] | None = None):
        self.tok = tok
        self.paragraphs = tuple(paragraphs if paragraphs is not None else corpus.filler_paragraphs())
        if not self.paragraphs:
            raise EdgeKVError("no filler text found (pydoc_data is missing from this Python)")
        self._ids: dict[int, list[int]] = {}
        self.sep = list(tok.encode("\n\n"))

    def ids(self, i: int) -> list[int]:
        i %= len(self.paragraphs)
        if i not in self._ids:
            self._ids[i] = list(self.tok.encode(self.paragraphs[i]))
        return self._ids[i]

    def take(self, n_tokens: int, start: int) -> list[list[int]]:
        """Whole paragraphs from `start` on (wrapping), the last one cut, `n_tokens` in all with the
        separators: returns the pieces, each piece ending with a separator except the last."""
        pieces: list[list[int]] = []
        total, i = 0, start
        while total < n_tokens:
            p = self.ids(i) + self.sep
            p = p[: n_tokens - total]
            pieces.append(p)
            total += len(p)
            i += 1
            if i - start > 100 * len(self.paragraphs):  # pragma: no cover - empty tokenizer output
                raise EdgeKVError("filler paragraphs tokenize to nothing")
        return pieces


def _insert(pieces: list[list[int]], inserts: Sequence[tuple[float, list[int]]]) -> tuple[list[int], list[int]]:
    """Join filler pieces, placing each insert at the piece boundary nearest its depth.
    Returns (ids, start offset of each insert)."""
    bounds = [0]
    for p in pieces:
        bounds.append(bounds[-1] + len(p))
    total = bounds[-1]
    at: dict[int, list[int]] = {}  # boundary index -> inserts in order
    for j, (depth, _) in enumerate(inserts):
        b = min(range(len(bounds)), key=lambda k: abs(bounds[k] - depth * total))
        at.setdefault(b, []).append(j)
    out: list[int] = []
    starts = [0] * len(inserts)
    for k in range(len(pieces) + 1):
        for j in at.get(k, ()):
            starts[j] = len(out)
            out.extend(inserts[j][1])
        if k < len(pieces):
            out.extend(pieces[k])
    return out, starts


def two_needles(hay: "Haystack", rng: random.Random, length: int, used: int, first: tuple[float, list[int]],
                second: tuple[float, list[int]], task: str) -> tuple[list[int], list[int]]:
    """Filler for a `length`-token sample of which `used` tokens are prompt, with two needles (depth,
    tokens) inserted."""
    n_fill = length - used - len(first[1]) - len(second[1])
    if n_fill < 16:
        raise EdgeKVError(f"length {length} is too short for the {task} task")
    pieces = hay.take(n_fill, rng.randrange(len(hay.paragraphs)))
    return _insert(pieces, [first, second])


def filler_for(index: int) -> str:
    return FILLERS[index % len(FILLERS)]


class Haystacks:
    """One lazily built Haystack per filler source."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._by: dict[str, Haystack] = {}

    def __call__(self, source: str) -> Haystack:
        if source not in self._by:
            paras = corpus.filler_paragraphs() if source == "docs" else corpus.license_paragraphs()
            self._by[source] = Haystack(self.tok, paras)
        return self._by[source]


def bos_tokens(tok: Tokenizer) -> list[int]:
    return [] if tok.bos_id is None else [tok.bos_id]


def _one_needle(tok: Tokenizer, hay: Haystack, task: str, length: int, depth: float, index: int,
                rng: random.Random, header: str, needle_text: str, question_text: str, answer: str) -> Sample:
    """header + filler with one needle at `depth` + question: the passkey and word tasks' shared layout."""
    prefix = bos_tokens(tok) + tok.encode(header)
    question = tok.encode(question_text)
    needle = tok.encode(needle_text) + hay.sep
    n_fill = length - len(prefix) - len(question) - len(needle)
    if n_fill < 16:
        raise EdgeKVError(f"length {length} is too short for the {task} task")
    pieces = hay.take(n_fill, rng.randrange(len(hay.paragraphs)))
    context, starts = _insert(pieces, [(depth, needle)])
    return Sample(task, length, index, depth, tuple(prefix), tuple(context), tuple(question),
                  answer=answer, source=filler_for(index),
                  meta={"needle_at": starts[0], "needle_len": len(needle)})


def passkey_sample(tok: Tokenizer, hay: Haystack, spec: TaskSpec, length: int, depth: float,
                   index: int) -> Sample:
    rng = sample_rng(spec, "passkey", length, depth, index)
    key = str(rng.randint(10000, 99999))
    return _one_needle(tok, hay, "passkey", length, depth, index, rng, PASSKEY_HEADER,
                       PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION, key)


def kv_key(rng: random.Random) -> str:
    return "".join(rng.choice(_HEX) for _ in range(8))


def kv_sample(tok: Tokenizer, hay: Haystack, spec: TaskSpec, length: int, depth: float,
              index: int) -> Sample:
    """RULER-style key-value retrieval: many random records spread through the real filler,
    the question asks for the record nearest `depth`."""
    rng = sample_rng(spec, "kv", length, depth, index)
    n_pairs = max(4, length // KV_TOKENS_PER_PAIR)
    keys: list[str] = []
    while len(keys) < n_pairs:
        k = kv_key(rng)
        if k not in keys:
            keys.append(k)
    values = [str(rng.randint(100000, 999999)) for _ in keys]
    records = [tok.encode(KV_RECORD.format(key=k, value=v)) + hay.sep for k, v in zip(keys, values)]
    depths = [(j + 0.5) / n_pairs for j in range(n_pairs)]
    target = min(range(n_pairs), key=lambda j: abs(depths[j] - depth))
    prefix = bos_tokens(tok) + tok.encode(KV_HEADER)
    question = tok.encode(KV_QUESTION.format(key=keys[target]))
    n_fill = length - len(prefix) - len(question) - sum(map(len, records))
    if n_fill < 16:
        raise EdgeKVError(f"length {length} is too short for {n_pairs} key-value records")
    pieces = hay.take(n_fill, rng.randrange(len(hay.paragraphs)))
    context, starts = _insert(pieces, list(zip(depths, records)))
    return Sample("kv", length, index, depth, tuple(prefix), tuple(context), tuple(question),
                  answer=values[target], source=filler_for(index),
                  meta={"needle_at": starts[target], "needle_len": len(records[target]),
                        "n_pairs": n_pairs, "key": keys[target]})


class DocumentTokens:
    """Token ids of whole continuation documents, tokenized once per tokenizer."""

    def __init__(self, tok: Tokenizer, documents: Sequence[corpus.Document] | None = None):
        self.tok = tok
        self.documents = list(documents if documents is not None else corpus.continuation_documents())
        self._ids: dict[int, list[int]] = {}

    def ids(self, i: int) -> list[int]:
        if i not in self._ids:
            self._ids[i] = list(self.tok.encode(self.documents[i].text))
        return self._ids[i]


def continuation_sample(tok: Tokenizer, docs: DocumentTokens, spec: TaskSpec, length: int,
                        index: int) -> Sample:
    """Context = `length` real tokens of one document, target = its next `target_tokens` tokens.
    The last `window` context tokens stay protected (the observation window)."""
    prefix = bos_tokens(tok)
    need = length - len(prefix) + spec.target_tokens
    n = len(docs.documents)
    for step in range(n):  # document index cycles with the sample index; skip ones that are too short
        d = (index + step) % n
        ids = docs.ids(d)
        if len(ids) >= need:
            break
    else:
        raise EdgeKVError(f"no continuation document has {need} tokens")
    rng = sample_rng(spec, "continuation", length, index)
    off = rng.randrange(len(ids) - need + 1)
    body = ids[off: off + length - len(prefix)]
    w = min(spec.window, len(body) // 2)
    return Sample("continuation", length, index, None, tuple(prefix), tuple(body[: len(body) - w]),
                  tuple(body[len(body) - w:]),
                  target=tuple(ids[off + len(body): off + len(body) + spec.target_tokens]),
                  source=docs.documents[d].name, meta={"offset": off})


def word_sample(tok: Tokenizer, hay: Haystack, spec: TaskSpec, length: int, depth: float,
                index: int) -> Sample:
    """A secret word (letters, not digits) inside the filler."""
    rng = sample_rng(spec, "word", length, depth, index)
    word = rng.choice(WORDS)
    return _one_needle(tok, hay, "word", length, depth, index, rng,
                       PASSKEY_HEADER.replace("pass key", "secret word"), WORD_NEEDLE.format(word=word),
                       WORD_QUESTION, word)


def pair_sample(tok: Tokenizer, hay: Haystack, spec: TaskSpec, length: int, depth: float,
                index: int) -> Sample:
    """Two competing needles of the same form (two doors, two keys); the question asks for the one at
    `depth`, the other sits 0.4 of the context away. Answering with the other key is a miss."""
    rng = sample_rng(spec, "pair", length, depth, index)
    c1, c2 = rng.sample(COLORS, 2)
    k1, k2 = str(rng.randint(10000, 99999)), str(rng.randint(10000, 99999))
    other = (depth + 0.4) % 1.0
    prefix = bos_tokens(tok) + tok.encode(PASSKEY_HEADER.replace("an important pass key", "two pass keys"))
    question = tok.encode(PAIR_QUESTION.format(color=c1))
    n1 = tok.encode(PAIR_NEEDLE.format(color=c1, key=k1)) + hay.sep
    n2 = tok.encode(PAIR_NEEDLE.format(color=c2, key=k2)) + hay.sep
    context, starts = two_needles(hay, rng, length, len(prefix) + len(question), (depth, n1), (other, n2), "pair")
    return Sample("pair", length, index, depth, tuple(prefix), tuple(context), tuple(question),
                  answer=k1, source=filler_for(index),
                  meta={"needle_at": starts[0], "needle_len": len(n1), "distractor": k2})


def build_samples(tok: Tokenizer, spec: TaskSpec) -> list[Sample]:
    """All samples of `spec`, shortest lengths first (so a partial run covers every task)."""
    unknown = set(spec.tasks) - set(TASKS)
    if unknown:
        raise EdgeKVError(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    hays = Haystacks(tok)
    docs = DocumentTokens(tok) if "continuation" in spec.tasks else None
    out: list[Sample] = []
    for length in sorted(spec.lengths):
        for task in spec.tasks:
            if task == "continuation":
                out += [continuation_sample(tok, docs, spec, length, i) for i in range(spec.continuation_samples)]
                continue
            if task == "second":
                from edgekv.eval.second import second_sample as make
            else:
                make = {"passkey": passkey_sample, "kv": kv_sample, "word": word_sample, "pair": pair_sample}[task]
            for depth in spec.depths:
                out += [make(tok, hays(filler_for(i)), spec, length, depth, i) for i in range(spec.samples)]
    return out
