"""Offline lm-eval task data built from the held-out standard-library text (shipped under ``tasks/lm_eval/data``).

Files (JSON lines, one document per line), all from the *held-out* modules of :func:`.text.stdlib_splits`:

* ``docstrings_heldout.jsonl``: ``{"module", "text"}``, the held-out docstrings cut at paragraph boundaries into
  pieces of at most ``max_doc_bytes`` (in-domain perplexity).
* ``code_heldout.jsonl``: the same modules' source with docstrings stripped, cut the same way, the first
  ``max_code_bytes / modules`` of each module (out-of-domain).
* ``cloze.jsonl``: ``{"context", "choices", "label"}``: a passage prefix; the true next word against three words of
  the same length class drawn from other held-out documents.
* ``ending.jsonl``: a passage prefix stopping inside a word; its true continuation (about ``segment_bytes``, cut at
  a space) against three continuations cut inside words of other documents (no delimiter).
* ``word_order.jsonl``: a paragraph prefix; the true next sentence (4 to 20 words) against three copies with two
  words swapped; every held-out paragraph with two sentences or more is a source (400 items).

Everything is drawn with ``random.Random(seed)`` in document order, so a rebuild on the same Python gives the same
files; ``manifest.json`` records the Python version and the sha256 of each file. Distractors never come from the
same document as the answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from mcmoe_vl.io import write_json_atomic

from .text import TextSplits, stdlib_splits
from .tokenizer import VOCAB_SIZE

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z]{3,}")


def chunk_paragraphs(text: str, max_bytes: int) -> list[str]:
    """``text`` cut at blank lines into pieces of at most ``max_bytes`` UTF-8 bytes (long paragraphs cut at lines,
    then hard-cut)."""
    pieces: list[str] = []
    cur = ""
    units: list[str] = []
    for para in text.split("\n\n"):
        if len(para.encode()) <= max_bytes:
            units.append(para)
            continue
        for line in para.split("\n"):
            while len(line.encode()) > max_bytes:
                units.append(line[: max_bytes // 4])
                line = line[max_bytes // 4 :]
            units.append(line)
    for u in units:
        cand = f"{cur}\n\n{u}" if cur else u
        if len(cand.encode()) <= max_bytes:
            cur = cand
        else:
            if cur.strip():
                pieces.append(cur)
            cur = u
    if cur.strip():
        pieces.append(cur)
    return pieces


def _passages(splits: TextSplits, context_bytes: int, min_bytes: int | None = None) -> list[tuple[int, str]]:
    """(document index, text) for every held-out docstring paragraph of at least ``min_bytes`` (default: long
    enough for a context and a target)."""
    out = []
    floor = context_bytes + 48 if min_bytes is None else min_bytes
    for i, d in enumerate(splits.heldout):
        for para in d.docstrings.split("\n\n"):
            para = " ".join(para.split())  # one line, single spaces
            if len(para) >= floor and para.isascii():
                out.append((i, para))
    return out


def _passage_stream(passages: list[tuple[int, str]], rng: random.Random, rounds: int = 4):
    """The passages in ``rounds`` successive seeded orders (one passage gives several items, cut differently)."""
    for _ in range(rounds):
        yield from rng.sample(passages, len(passages))


def _cut_at_space(text: str, pos: int) -> int:
    """The index of the first space at or after ``pos`` (or -1)."""
    return text.find(" ", pos)


def build_cloze(passages: list[tuple[int, str]], rng: random.Random, n: int, context_bytes: int) -> list[dict]:
    """Next-word cloze: the true word against three same-length-class words from other documents."""
    words_by_doc: dict[int, list[str]] = {}
    for i, p in passages:
        words_by_doc.setdefault(i, []).extend(_WORD.findall(p))
    all_words = [(i, w) for i, ws in words_by_doc.items() for w in ws]
    out: list[dict] = []
    seen: set[str] = set()
    for i, p in _passage_stream(passages, rng):
        cut = _cut_at_space(p, rng.randint(context_bytes // 2, context_bytes))
        if cut < 0:
            continue
        m = re.match(r"([A-Za-z]{3,})\b", p[cut + 1 :])
        if not m:
            continue
        word = m.group(1)
        pool = [w for j, w in all_words if j != i and w != word and abs(len(w) - len(word)) <= 1]
        if len(set(pool)) < 3:
            continue
        distract = rng.sample(sorted(set(pool)), 3)
        choices = distract + [word]
        rng.shuffle(choices)
        if p[:cut] in seen:
            continue
        seen.add(p[:cut])
        out.append({"context": p[:cut], "choices": choices, "label": choices.index(word)})
        if len(out) == n:
            break
    return out


def _mid_word(text: str, lo: int, hi: int, rng: random.Random) -> int:
    """A random position in [lo, hi) inside a word (letters on both sides), or -1."""
    cands = [i for i in range(max(1, lo), min(hi, len(text) - 1)) if text[i - 1].isalpha() and text[i].isalpha()]
    return rng.choice(cands) if cands else -1


def build_ending(passages: list[tuple[int, str]], rng: random.Random, n: int, context_bytes: int,
                 segment_bytes: int) -> list[dict]:
    """Passage ending: the context stops inside a word; the true continuation (the rest of that word and about
    ``segment_bytes`` more, cut at a space) against three continuations cut inside words of other documents.
    The choices follow the context with no delimiter."""
    def segment(p: str, start: int) -> str | None:
        end = _cut_at_space(p, start + segment_bytes)
        seg = p[start:end] if end > 0 else p[start:]
        return seg if len(seg) >= segment_bytes // 2 else None

    out: list[dict] = []
    seen: set[str] = set()
    for i, p in _passage_stream(passages, rng):
        cut = _mid_word(p, context_bytes // 2, context_bytes, rng)
        true = segment(p, cut) if cut > 0 else None
        if true is None or p[:cut] in seen:
            continue
        distract: list[str] = []
        for _ in range(100):
            j, q = rng.choice(passages)
            s = _mid_word(q, 0, max(1, len(q) - segment_bytes), rng)
            seg = segment(q, s) if s > 0 else None
            if j != i and seg and seg != true and seg not in distract:
                distract.append(seg)
            if len(distract) == 3:
                break
        if len(distract) < 3:
            continue
        seen.add(p[:cut])
        choices = distract + [true]
        rng.shuffle(choices)
        out.append({"context": p[:cut], "choices": choices, "label": choices.index(true)})
        if len(out) == n:
            break
    return out


def build_word_order(passages: list[tuple[int, str]], rng: random.Random, n: int, context_bytes: int,
                     words: tuple[int, int] = (4, 20)) -> list[dict]:
    """Word order: the true next sentence against three copies with two of its words swapped.

    Every sentence of every passage that follows at least ``context_bytes / 3`` bytes of the same paragraph and has
    ``words`` words is a candidate (each context once); ``n`` of them are drawn in a seeded order."""
    candidates: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _, p in passages:
        sentences = re.split(r"(?<=\.) ", p)
        for k in range(1, len(sentences)):
            ctx = " ".join(sentences[:k])
            if len(ctx) >= context_bytes // 3 and words[0] <= len(sentences[k].split(" ")) <= words[1] \
                    and ctx not in seen:
                seen.add(ctx)
                candidates.append((ctx, sentences[k]))
    out: list[dict] = []
    for ctx, sentence in rng.sample(candidates, len(candidates)):
        w0 = sentence.split(" ")
        variants: list[str] = []
        for _ in range(20):
            a, b = rng.sample(range(len(w0)), 2)
            w = w0[:]
            w[a], w[b] = w[b], w[a]
            v = " ".join(w)
            if v != sentence and v not in variants:
                variants.append(v)
            if len(variants) == 3:
                break
        if len(variants) < 3:
            continue
        choices = variants + [sentence]
        rng.shuffle(choices)
        out.append({"context": ctx[-context_bytes:], "choices": choices, "label": choices.index(sentence)})
        if len(out) == n:
            break
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)
    return hashlib.sha256(data.encode()).hexdigest()


def build_text_task_files(out_dir: str | Path, *, seed: int = 0, max_doc_bytes: int = 1024,
                          max_code_bytes: int = 200_000, n_mc: int = 400, context_bytes: int = 160,
                          segment_bytes: int = 40) -> dict[str, Any]:
    """Write the lm-eval task data files (module docstring) into ``out_dir``; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = stdlib_splits(seed=seed)
    docs = [{"module": d.name, "text": t} for d in splits.heldout for t in chunk_paragraphs(d.docstrings,
                                                                                            max_doc_bytes)]
    code = []
    per_module = max_code_bytes // len(splits.heldout)  # every held-out module contributes the same share
    for d in splits.heldout:
        total = 0
        for t in chunk_paragraphs(d.code, max_doc_bytes):
            if total >= per_module:
                break
            code.append({"module": d.name, "text": t})
            total += len(t.encode())
    rng = random.Random(seed)
    passages = _passages(splits, context_bytes)
    files = {
        "docstrings_heldout.jsonl": docs,
        "code_heldout.jsonl": code,
        "cloze.jsonl": build_cloze(passages, rng, n_mc, context_bytes),
        "ending.jsonl": build_ending(passages, rng, n_mc, context_bytes, segment_bytes),
        # every held-out paragraph with at least two sentences, not only those long enough for the other tasks
        "word_order.jsonl": build_word_order(_passages(splits, context_bytes, min_bytes=context_bytes // 3 + 20),
                                             rng, n_mc, context_bytes),
    }
    manifest: dict[str, Any] = {"python_version": splits.python_version, "seed": seed,
                                "heldout_modules": [d.name for d in splits.heldout], "files": {}}
    for name, rows in files.items():
        manifest["files"][name] = {"rows": len(rows), "sha256": _write_jsonl(out / name, rows)}
        logger.info("%s: %d rows", name, len(rows))
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


UNIGRAM_SOURCE_COUNTS = "unigram_source_counts.json"  # the source corpus's training unigram
SOURCE_SAMPLE_FRACTION = 0.006  # of the training files: the shipped calibration sample (about 1 MB)


def build_corpus_task_files(out_dir: str | Path, *, seed: int = 0, max_doc_bytes: int = 1024) -> dict[str, Any]:
    """Write the task data of the source-code corpus (:mod:`.corpus`) into ``out_dir``; returns its manifest.

    * ``source_heldout.jsonl``: ``{"module", "text"}``, every held-out source file (in-domain perplexity), its first
      ``max_doc_bytes`` cut at blank lines (:func:`chunk_paragraphs`);
    * ``prose_ood.jsonl``: every out-of-domain document (package READMEs), cut the same way;
    * ``source_train_sample.jsonl``: the training files whose seeded path hash falls below
      ``SOURCE_SAMPLE_FRACTION`` (:func:`.text.is_heldout` with seed ``seed + 1``), whole: calibration text from the
      model's training distribution (``embedded:source``).
    """
    from .corpus import DEFAULT_HELDOUT_FRACTION, corpus_splits, manifest_of, train_tokens
    from .text import is_heldout

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_splits(seed=seed)

    def first(docs):
        rows = []
        for d in docs:
            pieces = chunk_paragraphs(d.text, max_doc_bytes)
            if pieces:
                rows.append({"module": d.name, "text": pieces[0]})
        return rows

    files = {
        "source_heldout.jsonl": first(corpus.heldout),
        "prose_ood.jsonl": first(corpus.ood),
        "source_train_sample.jsonl": [{"module": d.name, "text": d.text} for d in corpus.train
                                      if is_heldout(d.name, seed=seed + 1, fraction=SOURCE_SAMPLE_FRACTION)],
    }
    manifest: dict[str, Any] = {"corpus": manifest_of(corpus, seed=seed, heldout_fraction=DEFAULT_HELDOUT_FRACTION),
                                "max_doc_bytes": max_doc_bytes, "files": {}}
    for name, rows in files.items():
        manifest["files"][name] = {"rows": len(rows), "sha256": _write_jsonl(out / name, rows)}
        logger.info("%s: %d rows", name, len(rows))
    counts = np.bincount(train_tokens(corpus.train), minlength=VOCAB_SIZE).tolist()
    write_json_atomic(out / UNIGRAM_SOURCE_COUNTS, {
        "description": "byte-token counts of the source corpus's training split (end-of-text between documents) "
                       "for the unigram baseline", "counts": counts})
    manifest["unigram_counts"] = {"file": UNIGRAM_SOURCE_COUNTS, "tokens": int(sum(counts)),
                                  "sha256": hashlib.sha256((out / UNIGRAM_SOURCE_COUNTS).read_bytes()).hexdigest()}
    write_json_atomic(out / "corpus_manifest.json", manifest)
    return manifest
