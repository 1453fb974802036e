"""The one place that knows how installed third-party releases differ.

transformers 5.24 renamed the key/value cache argument of every model and layer ``forward`` from
``past_key_values`` to ``cache`` (the old name is accepted with a deprecation warning until 5.40) and the output
field with it. Code that passes a cache, or clears one from captured layer kwargs, asks here which name the
installed release uses instead of naming either.
"""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaDecoderLayer

_CACHE_NAMES = ("cache", "past_key_values")


def _cache_kwarg() -> str:
    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


CACHE_KWARG: str = _cache_kwarg()
"""The cache argument's name in the installed transformers (``"cache"`` from 5.24, ``"past_key_values"`` before)."""


def cache_kwargs(cache: object) -> dict[str, object]:
    """``{name: cache}`` under the installed release's argument name."""
    return {CACHE_KWARG: cache}


def pop_cache(kwargs: dict) -> object:
    """Remove the cache argument from ``kwargs`` under either name and return it (None when absent)."""
    found = None
    for name in _CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def output_cache(output: object) -> object:
    """The cache a model returned, from its output's ``cache`` field (5.24+) or ``past_key_values`` (before)."""
    return getattr(output, CACHE_KWARG)
