"""Offline data: the standard-library text corpus, its byte tokenizer, rendered / real image questions, task files.

- :mod:`.corpus`: the language model's corpus, Python sources of the standard library and installed packages, with
  held-out files and out-of-domain prose; :mod:`.text`: stdlib docstrings split by module (the text
  multiple-choice tasks' source).
- :mod:`.tokenizer`: the byte-level Hugging Face tokenizer of the embedded language model.
- :mod:`.images`: scikit-learn digits and Pillow-rendered scenes with questions (colour, shape, count, position,
  digit, reading).
- :mod:`.lm_tasks` / :mod:`.vqa_tasks`: the shipped lm-eval / lmms-eval task data; :mod:`.tasks`: where the task
  suites live; :mod:`.embedded`: loaders of the committed tiny models.
"""

from __future__ import annotations

import torch

__all__ = ["EMBEDDED_SPLITS", "calibration_token_ids", "embedded_texts"]


EMBEDDED_SPLITS = ("train", "heldout", "ood", "source", "source-heldout", "prose", "docstrings-train",
                   "docstrings-heldout", "code")


def embedded_texts(name: str = "train") -> list[str]:
    """The documents of the embedded corpus split ``name``.

    The language model's own corpus (:mod:`.corpus`, Python sources; the shipped samples in ``tasks/lm_eval/data``):
    ``train`` (alias ``source``): a sample of its training files; ``heldout`` (``source-heldout``): the held-out
    files; ``ood`` (``prose``): the out-of-domain package READMEs. The standard-library docstring corpus the text
    multiple-choice tasks come from (:mod:`.text`, rebuilt from the interpreter): ``docstrings-train``,
    ``docstrings-heldout`` and ``code`` (the held-out modules' docstring-free source)."""
    shipped = {"train": "source_train_sample.jsonl", "heldout": "source_heldout.jsonl", "ood": "prose_ood.jsonl"}
    aliases = {"source": "train", "source-heldout": "heldout", "prose": "ood"}
    if name not in EMBEDDED_SPLITS:
        raise ValueError(f"unknown embedded split {name!r}; valid: {', '.join(EMBEDDED_SPLITS)}")
    name = aliases.get(name, name)
    if name in shipped:
        import json

        from .tasks import LM_EVAL_TASKS_DIR

        path = LM_EVAL_TASKS_DIR / "data" / shipped[name]
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from .text import stdlib_splits

    splits = stdlib_splits()
    return {"docstrings-train": [d.docstrings for d in splits.train],
            "docstrings-heldout": [d.docstrings for d in splits.heldout],
            "code": [d.code for d in splits.heldout if d.code]}[name]


def calibration_token_ids(name: str = "train") -> torch.Tensor:
    """Byte token ids (N,) of the embedded corpus split ``name`` (:func:`embedded_texts`), documents separated by
    the end-of-text token, as the embedded language model was trained."""
    from .tokenizer import EOS_ID

    out: list[int] = []
    for d in embedded_texts(name):
        out.extend(d.encode("utf-8"))
        out.append(EOS_ID)
    return torch.tensor(out, dtype=torch.int64)
