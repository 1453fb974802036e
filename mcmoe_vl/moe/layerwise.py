"""Run a model's decoder layers one at a time over cached inputs, with memory bounded by one layer's activations.

The calibration pass, the eps table and GPTQ all walk the model layer by layer: the inputs of decoder layer 0 are
captured once for every calibration batch (the model's own forward builds the embeddings, image features, masks
and position embeddings, then stops), and each layer's outputs become the next layer's inputs. Only one layer's
inputs are held at a time (the reference MC-MoE code kept every layer's, about 137 GB for Mixtral-8x7B).

Example::

    for step in iterate_layers(model, batches):           # batches: dicts of model inputs
        handle = ...                                      # observe / quantize step.layer here
        step.run()                                        # forward of this layer on every cached input
        handle.remove()
    # (iteration itself propagates the outputs of ``step.run()`` to the next layer)

If the caller does not call ``step.run()``, the iterator runs the layer itself before moving on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compat import pop_cache

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class LayerInput:
    """What one decoder layer receives for one batch."""

    hidden: torch.Tensor  # (B, S, H)
    kwargs: dict[str, Any]  # attention mask, position embeddings, ... exactly as the model passed them
    extras: dict[str, Any] = field(default_factory=dict)  # per-batch side data (e.g. an image-token mask)


def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Iterable[Mapping[str, Any]],
    *,
    extras_key: str | None = None,
) -> list[LayerInput]:
    """Run ``model(**batch)`` up to decoder layer 0 for every batch and keep that layer's inputs.

    ``extras_key``: a key of each batch that is not a model input (e.g. ``"image_token_mask"``); it is removed from
    the call and attached to the :class:`LayerInput`.
    """
    captured: list[LayerInput] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = dict(kwargs)
        kw.pop("hidden_states", None)
        # No cache across the layer-by-layer pass: each layer runs each batch exactly once.
        pop_cache(kw)
        kw["use_cache"] = False
        captured.append(LayerInput(hidden.detach(), kw))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                batch = dict(batch)
                extra = batch.pop(extras_key, None) if extras_key else None
                batch.setdefault("use_cache", False)
                n_before = len(captured)
                try:
                    model(**batch)
                except _StopForward:
                    pass
                if len(captured) != n_before + 1:
                    raise RuntimeError("the model's forward did not reach decoder layer 0 exactly once")
                if extras_key:
                    captured[-1].extras[extras_key] = extra
    finally:
        handle.remove()
    if not captured:
        raise ValueError("no calibration batches were given")
    return captured


def with_valid_masks(batches: Iterable[Mapping[str, Any]], key: str, *, drop: str | None = None
                     ) -> list[dict[str, Any]]:
    """Each batch with its padding mask (``attention_mask`` as bool; None when absent: every token is real) under
    ``key``, for ``iterate_layers(..., extras_key=key)``: the mask then rides along with every cached layer input
    (``LayerInput.extras[key]``), so collectors leave padding out. ``drop``: a batch key to remove as well."""
    out = []
    for b in batches:
        b = {k: v for k, v in b.items() if k != drop}
        am = b.get("attention_mask")
        b[key] = None if am is None else torch.as_tensor(am).bool()
        out.append(b)
    if not out:
        raise ValueError("no calibration batches were given")
    return out


def run_layer(layer: nn.Module, inp: LayerInput) -> torch.Tensor:
    """Forward of one decoder layer on a cached input; returns the hidden states (B, S, H)."""
    out = layer(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class LayerStep:
    """One decoder layer and the cached inputs of every batch."""

    index: int
    layer: nn.Module
    inputs: list[LayerInput]
    outputs: list[torch.Tensor] | None = None

    def run(self) -> list[torch.Tensor]:
        """Forward this layer on every cached input (with whatever was installed on it) and keep the outputs."""
        with torch.no_grad():
            self.outputs = [run_layer(self.layer, inp) for inp in self.inputs]
        return self.outputs


def iterate_layers(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    layers: nn.ModuleList | None = None,
    adapter: Any | None = None,
    extras_key: str | None = None,
    progress: bool | str = True,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[LayerStep]:
    """Yield a :class:`LayerStep` per decoder layer; the outputs of one step are the inputs of the next.

    ``start`` / ``stop`` restrict which steps are yielded (earlier layers are still run to produce the inputs,
    which is how a resumed run catches up). The iterator re-runs the layer after the caller's body only when the
    caller did not call ``step.run()`` itself.
    """
    if layers is None:
        if adapter is None:
            from model_adapters import get_adapter

            adapter = get_adapter(model)
        layers = adapter.decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, batches, extras_key=extras_key)
    n = len(layers)
    stop = n if stop is None else min(stop, n)
    desc = progress if isinstance(progress, str) else "layers"
    bar = tqdm(range(stop), desc=desc, disable=not progress, leave=False)
    for i in bar:
        step = LayerStep(i, layers[i], inputs)
        if i >= start:
            yield step
        outputs = step.outputs if step.outputs is not None else step.run()
        inputs = [LayerInput(h, inp.kwargs, inp.extras) for h, inp in zip(outputs, inputs, strict=True)]
    bar.close()
