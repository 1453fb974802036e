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
    """Byte token ids (N,) of the embedded corpus split ``name``, documents separated by the end-of-text token, as
    the embedded language model was trained.

    ``train`` / ``heldout`` / ``ood``: the standard-library docstring corpus (:mod:`.text`, rebuilt from the
    interpreter); ``source`` / ``source-heldout`` / ``prose``: the shipped samples of the source-code corpus
    (:mod:`.corpus`): a training-file sample, the held-out files and the out-of-domain READMEs."""
    from .text import stdlib_splits
    from .tokenizer import EOS_ID

    shipped = {"source": "source_train_sample.jsonl", "source-heldout": "source_heldout.jsonl",
               "prose": "prose_ood.jsonl"}
    valid = ["train", "heldout", "ood", *shipped]
    if name not in valid:
        raise ValueError(f"unknown embedded split {name!r}; valid: {', '.join(valid)}")
    if name in shipped:
        import json

        from .tasks import LM_EVAL_TASKS_DIR

        path = LM_EVAL_TASKS_DIR / "data" / shipped[name]
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        splits = stdlib_splits()
        texts = {"train": [d.docstrings for d in splits.train], "heldout": [d.docstrings for d in splits.heldout],
                 "ood": [d.code for d in splits.heldout if d.code]}[name]
    out: list[int] = []
    for d in texts:
        out.extend(d.encode("utf-8"))
        out.append(EOS_ID)
    return torch.tensor(out, dtype=torch.int64)
