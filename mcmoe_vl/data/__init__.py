"""Offline data: the standard-library text corpus, its byte tokenizer, rendered / real image questions, task files.

- :mod:`.text`: stdlib docstrings split by module (in-domain) and docstring-free source (out-of-domain).
- :mod:`.tokenizer`: the byte-level Hugging Face tokenizer of the embedded language model.
- :mod:`.images`: scikit-learn digits and Pillow-rendered scenes with questions (colour, shape, count, position,
  digit, reading).
- :mod:`.lm_tasks` / :mod:`.vqa_tasks`: the shipped lm-eval / lmms-eval task data; :mod:`.tasks`: where the task
  suites live; :mod:`.embedded`: loaders of the committed tiny models.
"""

from __future__ import annotations

import torch

__all__ = ["calibration_token_ids"]


def calibration_token_ids(name: str = "train") -> torch.Tensor:
    """Byte token ids (N,) of the embedded corpus split ``name`` (train, heldout or ood), documents separated by
    the end-of-text token, as the embedded language model was trained."""
    from .text import stdlib_splits
    from .tokenizer import EOS_ID

    splits = stdlib_splits()
    docs = {"train": [d.docstrings for d in splits.train], "heldout": [d.docstrings for d in splits.heldout],
            "ood": [d.code for d in splits.heldout if d.code]}
    if name not in docs:
        raise ValueError(f"unknown embedded split {name!r}; valid: {', '.join(docs)}")
    out: list[int] = []
    for d in docs[name]:
        out.extend(d.encode("utf-8"))
        out.append(EOS_ID)
    return torch.tensor(out, dtype=torch.int64)
