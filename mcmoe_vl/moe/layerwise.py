"""Run a model's decoder layers one at a time over cached inputs, with memory bounded by one layer's activations.

The calibration pass, the eps table and GPTQ all walk the model layer by layer: the inputs of decoder layer 0 are
captured once for every calibration batch (the model's own forward builds the embeddings, image features, masks
and position embeddings, then stops), and each layer's outputs become the next layer's inputs. Only one layer's
inputs are held at a time (the reference MC-MoE code kept every layer's, about 137 GB for Mixtral-8x7B).

Example::

    for step in iterate_layers(model, batches, adapter=adapter):   # batches: dicts of model inputs
        handle = ...                                      # observe / quantize step.layer here
        step.run()                                        # forward of this layer on every cached input
        handle.remove()
    # (iteration itself propagates the outputs of ``step.run()`` to the next layer)

If the caller does not call ``step.run()``, the iterator runs the layer itself before moving on.

Every cached input carries its batch's valid-token mask (``attention_mask``; padding is never a real token) and,
when the batch has one, its image-token mask (``image_token_mask``, not a model input: removed before the call). A
consumer that needs a MoE layer's tokens asks the step for them::

    for step in iterate_layers(model, batches, adapter=adapter):
        captured = step.capture(iface)   # CapturedLayer: block inputs, routing, image flags of the real tokens

The calibration pass, OTP, ODP and the quantization engine all read MoE tokens this way, so they agree on which
tokens count.

Some forwards add to the hidden states between decoder layers, outside any layer (Qwen3-VL-MoE adds its vision
encoder's "deepstack" features after its first decoder layers). The adapter describes such additions as a
:class:`LayerAdditions` (``adapter.layer_additions(model)``; None, the default, adds nothing): the capture records
its per-batch state from the keyword arguments of one module's forward (``source``, e.g. the language model) and
each step applies ``after_layer`` to the layer's outputs, so the replay passes on what the model's forward passes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compat import pop_cache
from .routing import Routing, RoutingEvent

if TYPE_CHECKING:
    from .interface import ExpertInterface

log = logging.getLogger(__name__)

IMAGE_MASK_KEY = "image_token_mask"  # (B, S) bool: image tokens of a batch (not a model input)


class _StopForward(Exception):
    pass


class LayerAdditions(Protocol):
    """What a model's forward adds to the hidden states after a decoder layer, outside the layer itself.

    ``record`` runs once per calibration batch, on the arguments of ``source``'s forward (a module whose forward
    runs before decoder layer 0, e.g. the language model), and returns that batch's state (None: nothing to add);
    ``after_layer`` returns the hidden states (B, S, H) the model passes on after decoder layer ``index``.
    """

    source: nn.Module

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...

    def after_layer(self, index: int, hidden: torch.Tensor, state: Any) -> torch.Tensor: ...


@dataclass
class LayerInput:
    """What one decoder layer receives for one batch."""

    hidden: torch.Tensor  # (B, S, H)
    kwargs: dict[str, Any]  # attention mask, position embeddings, ... exactly as the model passed them
    extras: dict[str, Any] = field(default_factory=dict)  # per-batch side data under a caller's extras_key
    valid: torch.Tensor | None = None  # (B, S) bool: real tokens (the batch's attention_mask); None = all real
    image: torch.Tensor | None = None  # (B, S) bool: image tokens (the batch's image_token_mask); None = none given
    added: Any = None  # this batch's state of the model's between-layer additions (LayerAdditions.record)

    def valid_rows(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """``x`` (..., C) of this batch flattened to (T, C) with the padding rows removed."""
        x = x.reshape(-1, x.shape[-1])
        if self.valid is None:
            return x
        keep = self.valid.reshape(-1).to(x.device)
        if keep.numel() != x.shape[0]:
            raise ValueError(f"{where}: attention_mask has {keep.numel()} positions but the module saw "
                             f"{x.shape[0]} tokens")
        return x[keep]


def _keep_and_stop(captured: list[LayerInput]):
    """A forward pre-hook that keeps the inputs of the layer it is installed on and stops the model's forward."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = dict(kwargs)
        kw.pop("hidden_states", None)
        # No cache across the layer-by-layer pass: each layer runs each batch exactly once.
        pop_cache(kw)
        kw["use_cache"] = False
        captured.append(LayerInput(hidden.detach(), kw))
        raise _StopForward

    return pre_hook


def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Iterable[Mapping[str, Any]],
    *,
    extras_key: str | None = None,
    additions: LayerAdditions | None = None,
) -> list[LayerInput]:
    """Run ``model(**batch)`` up to decoder layer 0 for every batch and keep that layer's inputs.

    ``extras_key``: a key of each batch that is not a model input; it is removed from the call and attached to the
    :class:`LayerInput`. The batch's ``attention_mask`` and ``image_token_mask`` become :attr:`LayerInput.valid`
    and :attr:`LayerInput.image`. ``additions``: the state ``additions.record`` takes from ``additions.source``'s
    forward becomes :attr:`LayerInput.added`.
    """
    captured: list[LayerInput] = []
    recorded: list[Any] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        recorded.append(additions.record(args, kwargs))

    handles = [layers[0].register_forward_pre_hook(_keep_and_stop(captured), with_kwargs=True)]
    if additions is not None:
        handles.append(additions.source.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                batch = dict(batch)
                extra = batch.pop(extras_key, None) if extras_key else None
                image = batch.pop(IMAGE_MASK_KEY, None)
                am = batch.get("attention_mask")
                batch.setdefault("use_cache", False)
                n_before = len(captured)
                try:
                    model(**batch)
                except _StopForward:
                    pass
                if len(captured) != n_before + 1:
                    raise RuntimeError("the model's forward did not reach decoder layer 0 exactly once")
                inp = captured[-1]
                if additions is not None:
                    if len(recorded) != n_before + 1:
                        raise RuntimeError(f"{type(additions.source).__name__} (the source of the model's "
                                           "between-layer additions) did not run exactly once before decoder layer 0")
                    inp.added = recorded[-1]
                if extras_key:
                    inp.extras[extras_key] = extra
                inp.valid = None if am is None else torch.as_tensor(am).bool()
                inp.image = None if image is None else torch.as_tensor(image).bool()
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError("no calibration batches were given")
    return captured


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
    additions: LayerAdditions | None = None  # what the model's forward adds after each layer (None: nothing)

    def run(self) -> list[torch.Tensor]:
        """Forward this layer on every cached input (with whatever was installed on it) and keep the outputs: the
        hidden states the model passes on, its between-layer additions (:class:`LayerAdditions`) applied."""
        with torch.no_grad():
            self.outputs = [run_layer(self.layer, inp) for inp in self.inputs]
            if self.additions is not None:
                self.outputs = [self.additions.after_layer(self.index, h, inp.added)
                                for h, inp in zip(self.outputs, self.inputs, strict=True)]
        return self.outputs

    def capture(self, iface: ExpertInterface) -> CapturedLayer:
        """Run this layer (:meth:`run`) with an observer on its MoE block (``iface`` installed) and return the
        block's inputs, the model's own routing and the image flags of every batch's real tokens."""
        rec = _Capture(self)
        handle = iface.observe(rec, layers=[self.index])
        try:
            self.run()
        finally:
            handle.remove()
        if len(rec.tokens) != len(self.inputs):
            raise RuntimeError(f"{iface.layer(self.index).path}: the MoE block ran {len(rec.tokens)} times for "
                               f"{len(self.inputs)} batches")
        return CapturedLayer(self.index, rec.tokens, rec.routing, [inp.valid for inp in self.inputs], rec.image)


@dataclass
class CapturedLayer:
    """One MoE layer over every calibration batch, real tokens only (padding removed by the valid-token mask).

    Per batch b: ``tokens[b]`` (T_b, H) the block inputs, ``routing[b]`` the model's own routing of those tokens,
    ``valid[b]`` the (B, S) valid-token mask they were selected by (None: every token real), ``image[b]`` (T_b,)
    bool image flags (None: the batch gave no image-token mask).
    """

    index: int  # decoder layer index
    tokens: list[torch.Tensor]
    routing: list[Routing]
    valid: list[torch.Tensor | None]
    image: list[torch.Tensor | None]

    @property
    def num_tokens(self) -> int:
        return sum(int(t.shape[0]) for t in self.tokens)


class _Capture:
    """Observer of one MoE block keeping each batch's block inputs and routing of the real tokens."""

    def __init__(self, step: LayerStep) -> None:
        self.inputs = step.inputs
        self.tokens: list[torch.Tensor] = []
        self.routing: list[Routing] = []
        self.image: list[torch.Tensor | None] = []

    def __call__(self, ev: RoutingEvent) -> None:
        b = len(self.tokens)
        if b >= len(self.inputs):
            raise RuntimeError("the MoE block ran more often than there are calibration batches")
        inp = self.inputs[b]
        T = ev.hidden.shape[0]
        keep = torch.ones(T, dtype=torch.bool) if inp.valid is None else inp.valid.reshape(-1)
        if keep.numel() != T:
            raise ValueError(f"attention_mask has {keep.numel()} positions but the MoE block saw {T} tokens")
        keep = keep.to(ev.hidden.device)
        img = None
        if inp.image is not None:
            img = inp.image.reshape(-1).to(ev.hidden.device)
            if img.numel() != T:
                raise ValueError(f"image_token_mask has {img.numel()} positions but the MoE block saw {T} tokens")
            img = img[keep]
        r = ev.routing
        self.tokens.append(ev.hidden[keep].detach())
        self.routing.append(Routing(probs=r.probs[keep].detach(), topk_idx=r.topk_idx[keep],
                                    topk_weight=r.topk_weight[keep].detach()))
        self.image.append(img)


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

    ``adapter.layer_additions(model)`` says what the model's forward adds between layers (with ``layers`` given and
    no ``adapter``: nothing). ``start`` / ``stop`` restrict which steps are yielded (earlier layers are still run to
    produce the inputs, which is how a resumed run catches up). The iterator re-runs the layer after the caller's
    body only when the caller did not call ``step.run()`` itself.
    """
    if layers is None:
        if adapter is None:
            raise TypeError("iterate_layers needs the decoder layers or the model's adapter "
                            "(adapter=model_adapters.get_adapter(model))")
        layers = adapter.decoder_layers(model)
    additions = None
    if adapter is not None:
        batches = list(batches)
        adapter.check_layerwise(model, batches)  # before any work: a family whose replay would be wrong refuses
        additions = adapter.layer_additions(model)
    inputs = capture_layer_inputs(model, layers, batches, extras_key=extras_key, additions=additions)
    n = len(layers)
    stop = n if stop is None else min(stop, n)
    desc = progress if isinstance(progress, str) else "layers"
    bar = tqdm(range(stop), desc=desc, disable=not progress, leave=False)
    for i in bar:
        step = LayerStep(i, layers[i], inputs, additions=additions)
        if i >= start:
            yield step
        outputs = step.outputs if step.outputs is not None else step.run()
        inputs = [replace(inp, hidden=h) for h, inp in zip(outputs, inputs, strict=True)]
    bar.close()
