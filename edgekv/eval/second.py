"""Task `second`: two facts in one document; the first is asked and answered, the second is asked as a
follow-up turn in the same conversation and only that answer is scored (issue 20).

The document is the header, real filler and two needles of two different formats (pass key, secret
word, key-value record: distinct keys by construction), the scored one at the sample's depth and the
other half the context away. The first question is the sample's `question` (its tail is the observation
window of the question-after regime); the second is `followup`. Both are completion style, as the other
needle tasks (edgekv/eval/tasks.py), so the base model answers them without a chat template.

The conversation, on one Session, is the eval's own lower-level path: prefix + document + first question,
compaction (regime `after`: with the first question's window; `before`: before it, generic probe),
greedy first answer (its tokens stay in the cache), the follow-up question prefilled after it with its
queries captured (so a runtime with a recall store can choose the cells again), greedy second answer.
The full-cache reference runs the same two turns with nothing compacted.
"""
from __future__ import annotations

import random

from edgekv.eval import scoring
from edgekv.eval.tasks import (KV_QUESTION, KV_RECORD, PASSKEY_NEEDLE, PASSKEY_QUESTION, WORD_NEEDLE, WORD_QUESTION,
                               WORDS, Haystack, Sample, TaskSpec, Tokenizer, bos_tokens, kv_key, sample_rng, two_needles,
                               filler_for)

SECOND_HEADER = ("There are two important facts hidden inside a lot of irrelevant text. "
                 "Find them and memorize them. I will quiz you about them.\n\n")
FORMATS = ("passkey", "word", "kv")
FIRST_OFFSET = 0.5   # the first (asked, not scored) fact sits this far from the scored one, wrapping


def _fact(fmt: str, rng: random.Random) -> tuple[str, str, str]:
    """(needle text, question text, answer) of one fact of format `fmt`."""
    if fmt == "passkey":
        key = str(rng.randint(10000, 99999))
        return PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION, key
    if fmt == "word":
        word = rng.choice(WORDS)
        return WORD_NEEDLE.format(word=word), WORD_QUESTION, word
    key, value = kv_key(rng), str(rng.randint(100000, 999999))
    return KV_RECORD.format(key=key, value=value), KV_QUESTION.format(key=key), value


def second_sample(tok: Tokenizer, hay: Haystack, spec: TaskSpec, length: int, depth: float,
                  index: int) -> Sample:
    """`depth`: where the scored (second) fact sits; the first one is FIRST_OFFSET away. `length` counts
    the first turn's prompt (prefix + document + first question), as for the other tasks."""
    rng = sample_rng(spec, "second", length, depth, index)
    first_fmt, second_fmt = rng.sample(FORMATS, 2)   # two formats: the two questions cannot be confused
    n1_text, q1_text, a1 = _fact(first_fmt, rng)
    n2_text, q2_text, a2 = _fact(second_fmt, rng)
    first_depth = (depth + FIRST_OFFSET) % 1.0
    prefix = bos_tokens(tok) + tok.encode(SECOND_HEADER)
    question = tok.encode(q1_text)
    followup = tok.encode(q2_text)
    n1 = tok.encode(n1_text) + hay.sep
    n2 = tok.encode(n2_text) + hay.sep
    context, starts = two_needles(hay, rng, length, len(prefix) + len(question), (first_depth, n1), (depth, n2),
                                  "second")
    return Sample("second", length, index, depth, tuple(prefix), tuple(context), tuple(question),
                  answer=a2, source=filler_for(index), followup=tuple(followup),
                  meta={"needle_at": starts[1], "needle_len": len(n2), "format": second_fmt,
                        "first_at": starts[0], "first_len": len(n1), "first_format": first_fmt,
                        "first_depth": first_depth, "first_answer": a1})


def answer_second(engine, sample: Sample, max_new_tokens: int) -> dict:
    """After the engine's compact(): the first answer, the follow-up question as the next turn, the
    second answer. The record's score is the second answer's hit; the first one is kept for reading."""
    first = engine.generate(max_new_tokens)
    engine.ask(sample.followup)
    text = engine.generate(max_new_tokens)
    a1 = sample.meta["first_answer"]
    return {"score": float(scoring.retrieval_hit(text, sample.answer)), "generated": text,
            "answer": sample.answer, "first_generated": first, "first_answer": a1,
            "first_score": float(scoring.retrieval_hit(first, a1)), **engine.followup_info()}


def summary_rows(records: list[dict]) -> list[dict]:
    """Per (method, budget) of the `second` records: the second answer's accuracy and its ratio to the full
    cache on the same samples, and the same for the first answer (asked, not scored)."""
    recs = [r for r in records if r.get("task") == "second" and "error" not in r]
    full = {r["sample"]: r for r in recs if r["method"] == "full"}
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    rows = []
    for (method, budget), rs in groups.items():
        row = {"method": method, "budget": budget, "n": len(rs), "recall": sorted({r.get("recall", "off") for r in rs})}
        for name, key in (("second", "score"), ("first", "first_score")):
            own = sum(r[key] for r in rs)
            ref = sum(full[r["sample"]][key] for r in rs if r["sample"] in full)
            row[name] = own / len(rs)
            row[f"{name}_relative"] = own / ref if ref else None
        rows.append(row)
    rows.sort(key=lambda r: (r["method"] != "full", r["method"], -r["budget"]))
    return rows


def markdown_table(records: list[dict]) -> str:
    rows = summary_rows(records)

    from edgekv.eval.report import wilson

    def cell(r, name):
        rel = r[f"{name}_relative"]
        lo, hi = wilson(r[name] * r["n"], r["n"])
        return f"{r[name]:.2f} [{lo:.2f}, {hi:.2f}] ({'–' if rel is None else format(rel, '.2f')})"

    out = ["| method | budget | recall | second question: accuracy [95 % Wilson] (relative to full) | first question | n |",
           "|---|---|---|---|---|---|"]
    out += [f"| {r['method']} | {r['budget']:g} | {', '.join(r['recall'])} | {cell(r, 'second')} | "
            f"{cell(r, 'first')} | {r['n']} |" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":   # python -m edgekv.eval.second OUT...: the table of each eval folder
    import sys

    from edgekv.eval.runner import load_records

    for d in sys.argv[1:]:
        print(f"{d}\n\n{markdown_table(load_records(d))}\n")
