"""Calibration text from a Hugging Face dataset: ``hf:<dataset>[:<config>[:<split>]]`` (needs the Hub or its cache)."""

from __future__ import annotations

HF_PREFIX = "hf:"


def parse_hub_spec(data: str) -> tuple[str, str | None, str]:
    """``hf:<dataset>[:<config>[:<split>]]`` -> (dataset, config or None, split; default ``train``)."""
    parts = data[len(HF_PREFIX):].split(":")
    if not data.startswith(HF_PREFIX) or not parts[0] or len(parts) > 3:
        raise ValueError(f"{data!r}: use hf:<dataset>[:<config>[:<split>]], e.g. hf:allenai/c4:en:validation")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    return parts[0], config, parts[2] if len(parts) > 2 and parts[2] else "train"


def hub_text(data: str, *, text_field: str = "text", max_chars: int = 50_000_000) -> str:
    """The first ``max_chars`` characters of a dataset's ``text_field`` column, streamed, rows joined by blank lines."""
    name, config, split = parse_hub_spec(data)
    import datasets

    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    chunks, n = [], 0
    for row in ds:
        if text_field not in row:
            raise ValueError(f"{data}: rows have no {text_field!r} field (fields: {sorted(row)})")
        chunks.append(row[text_field])
        n += len(row[text_field])
        if n >= max_chars:
            break
    return "\n\n".join(chunks)
