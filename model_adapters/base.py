"""The adapter base: a small typed description of a MoE model family plus a few hooks.

An adapter tells the rest of the package where a model's decoder layers and MoE blocks are and how its router
scores experts; :meth:`MoEAdapter.moe_layers` turns that into :class:`mcmoe_vl.moe.MoELayer` views. Families built
the transformers-5 way (a router module ``gate`` returning ``(logits, topk_weights, topk_indices)``, experts in
fused 3-D tensors ``experts.gate_up_proj`` / ``experts.down_proj``, optional ``shared_experts``) need only the
class attributes; others override the hooks. See ``docs/adapters.md`` for a worked example.

The adapter also owns its family's modality: a pipeline asks it to load the model and its processor, to turn
image+text samples into calibration batches, for the image-token mask of a batch and for the lmms-eval model, and
never names a family itself (:attr:`MoEAdapter.modality`, the hooks under "what a pipeline asks of a family").
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mcmoe_vl.moe.layer import MoELayer
from mcmoe_vl.moe.routing import Routing, RoutingSpec, Scoring, scores_from_logits
from mcmoe_vl.moe.storage import ExpertStorage, FusedExpertStorage, ModuleListExpertStorage

if TYPE_CHECKING:
    from mcmoe_vl.moe.layerwise import LayerAdditions


class Modality(str, enum.Enum):
    TEXT = "text"  # a language model: token windows calibrate it, lm-eval evaluates it
    VISION_LANGUAGE = "vision-language"  # image+text samples calibrate it, lmms-eval evaluates it


class MoEAdapter:
    """Describe one model family. Subclass, set the class attributes, register under the HF ``model_type``.

    Class attributes:
        name: the Hugging Face ``model_type`` this adapter serves (also its registry key).
        family: a human-readable family name.
        moe_block_classes: class names of the MoE blocks (a layer whose ``mlp_attr`` module has one of these
            names is a MoE layer; other layers are dense).
        mlp_attr / attention_attr: attribute names of the feed-forward block and the self-attention in a decoder
            layer.
        router_attr / experts_attr / shared_experts_attr: attribute names inside the MoE block
            (``shared_experts_attr = None`` when the family has none).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    moe_block_classes: ClassVar[tuple[str, ...]] = ()
    mlp_attr: ClassVar[str] = "mlp"
    attention_attr: ClassVar[str] = "self_attn"
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    shared_experts_attr: ClassVar[str | None] = None
    modality: ClassVar[Modality] = Modality.TEXT
    # transformers' AutoModelForCausalLM loads the family from a directory or the Hub (and shards it with
    # device_map); False: a port that loads local files on one device (a Hub id is first downloaded)
    hub_loadable: ClassVar[bool] = True
    # how the family's hub checkpoints (and serving engines' loaders) name tensors, for exports: substring renames
    # applied to every module name, and the names of a routed expert's (gate, up, down) projections
    hub_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    hub_expert_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")

    # -- where things are --------------------------------------------------------------------------------------
    def text_config(self, model: nn.Module) -> Any:
        """The language model's config (for VLMs, the text part)."""
        cfg = model.config
        return getattr(cfg, "text_config", None) or cfg

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (the module holding ``layers``, the embeddings and the final norm)."""
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
        if hasattr(model, "layers"):
            return model
        raise TypeError(f"{type(model).__name__}: cannot find the decoder layers; override language_model()")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def lm_head(self, model: nn.Module) -> nn.Module | None:
        return getattr(model, "lm_head", None)

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        block = getattr(layer, self.mlp_attr, None)
        return block if block is not None and type(block).__name__ in self.moe_block_classes else None

    def attention(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, self.attention_attr, None)

    # -- how the router and experts work -----------------------------------------------------------------------
    def routing_spec(self, config: Any, block: nn.Module) -> RoutingSpec:
        raise NotImplementedError(f"{type(self).__name__} must implement routing_spec()")

    def router(self, block: nn.Module, spec: RoutingSpec):
        """A function (T, H) -> :class:`Routing` computing exactly what the model computes.

        The default calls the block's own router module, which returns ``(logits, topk_weights, topk_indices)``,
        and derives the probabilities from the logits with the spec's scoring.
        """
        gate = getattr(block, self.router_attr)

        def route(x: torch.Tensor) -> Routing:
            logits, weights, idx = gate(x)
            return Routing(probs=scores_from_logits(logits, spec.scoring), topk_idx=idx, topk_weight=weights)

        return route

    def expert_storage(self, block: nn.Module) -> ExpertStorage:
        experts = getattr(block, self.experts_attr)
        # An experts module that knows its own storage (e.g. a quantized one) describes itself.
        provider = getattr(experts, "as_expert_storage", None)
        if callable(provider):
            return provider()
        if isinstance(experts, nn.ModuleList):
            return ModuleListExpertStorage(experts)
        return FusedExpertStorage(experts)

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.shared_experts_attr) if self.shared_experts_attr else None

    # -- the views ---------------------------------------------------------------------------------------------
    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """One :class:`MoELayer` per MoE block, in layer order."""
        config = self.text_config(model)
        prefix = self._layers_path(model)
        out: list[MoELayer] = []
        for i, layer in enumerate(self.decoder_layers(model)):
            block = self.moe_block(layer)
            if block is None:
                continue
            spec = self.routing_spec(config, block)
            out.append(
                MoELayer(
                    index=i,
                    path=f"{prefix}.{i}.{self.mlp_attr}",
                    block=block,
                    spec=spec,
                    router=self.router(block, spec),
                    storage=self.expert_storage(block),
                    shared_experts=self.shared_experts(block),
                    attention=self.attention(layer),
                )
            )
        return out

    def _layers_path(self, model: nn.Module) -> str:
        layers = self.decoder_layers(model)
        for name, mod in model.named_modules():
            if mod is layers:
                return name
        return "layers"

    def describe(self) -> str:
        return f"{self.name}: {self.family}" if self.family else self.name

    # -- what a pipeline asks of a family ----------------------------------------------------------------------
    @property
    def is_vision_language(self) -> bool:
        return self.modality is Modality.VISION_LANGUAGE

    def load_model(self, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> nn.Module:
        """The model of a local directory in eval mode. A directory missing weights of the architecture is refused
        (transformers would leave them randomly initialised)."""
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
        if any(problems.values()):
            shown = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:5]))}"
                              + (f" (+{len(v) - 5} more)" if len(v) > 5 else "") for k, v in problems.items() if v)
            raise ValueError(f"{path} does not hold every weight of its {self.name} architecture ({shown}); it is "
                             "not an intact checkpoint (a quantized checkpoint loads with mcmoe_vl.quant.checkpoint."
                             "load_quantized)")
        return model.to(device).eval()

    def load_compressed(self, path: str | os.PathLike[str], *, runtime: str = "packed", apply_pruning: bool = True,
                        device: str | torch.device = "cpu") -> nn.Module:
        """The model of a compressed checkpoint directory (:mod:`mcmoe_vl.quant.checkpoint`) in eval mode:
        ``runtime`` ``packed`` or ``fake`` (:class:`mcmoe_vl.quant.qlinear.Runtime`), the directory's pruning
        settings installed unless ``apply_pruning=False`` (``model.mcmoe_pruning``: the rule, or None). The
        default builds the transformers class the manifest names, empty, and loads it strictly
        (:func:`~mcmoe_vl.quant.checkpoint.load_quantized`); a family with its own port overrides it."""
        from mcmoe_vl.hf.quantizer import apply_saved_pruning
        from mcmoe_vl.quant.checkpoint import PRUNING_FILE, load_quantized
        from mcmoe_vl.quant.qlinear import Runtime

        model = load_quantized(path, runtime=Runtime(runtime), adapter=self).to(device)
        model.mcmoe_pruning = apply_saved_pruning(model, Path(path) / PRUNING_FILE) if apply_pruning else None
        return model.eval()

    def hub_name(self, name: str) -> str:
        """A module or tensor name of the loaded model as the family's hub checkpoints spell it (``hub_renames``)."""
        for old, new in self.hub_renames:
            name = name.replace(old, new)
        return name

    def hub_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's 16-bit tensors outside its quantized linears and expert modules (embeddings, norms, a vision
        encoder, ...), by their names in the loaded model, under the names and shapes of the family's hub
        checkpoints, for exports; the default renames each with :meth:`hub_name`."""
        return {self.hub_name(k): v for k, v in tensors.items()}

    def meta_model(self, path: str | os.PathLike[str]) -> nn.Module:
        """The architecture of a local directory built on the meta device from its config alone (no weights)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(Path(path))))

    def load_processor(self, tokenizer: Any, model: nn.Module) -> Any:
        """What turns text (and images) into model inputs; a text family's processor is its tokenizer."""
        return tokenizer

    def calibration_batches(self, processor: Any, samples: Sequence[Any], batch_size: int = 1
                            ) -> list[dict[str, Any]]:
        """Model-input batches of image+text samples (:class:`mcmoe_vl.calibration.image_text.ImageTextSample`)
        with ``attention_mask`` and an image-token mask (:meth:`image_token_mask`); vision-language families only."""
        raise NotImplementedError(f"{self.name} is a text model: image+text samples are for vision-language "
                                  "models; calibrate it on text")

    def image_token_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """(B, S) bool: the image tokens of a batch of model inputs (``image_token_mask``); None when unknown."""
        return batch.get("image_token_mask")

    def check_layerwise(self, model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> None:
        """Raise when running ``model``'s decoder layer by layer from captured inputs (calibration, GPTQ, ODP,
        OTP, pmq+) would not reproduce its own forward on ``batches``; the default: it always does."""

    def layer_additions(self, model: nn.Module) -> LayerAdditions | None:
        """What ``model``'s forward adds to the hidden states between decoder layers, outside the layers, for the
        layer-by-layer pass to replay (:class:`mcmoe_vl.moe.layerwise.LayerAdditions`); the default: None, the
        forward only chains the layers."""
        return None

    def lmms_model(self, model: nn.Module, processor: Any, *, batch_size: int = 1, max_new_tokens: int = 32) -> Any:
        """The lmms-eval model around an in-memory model (imports lmms-eval); vision-language families only."""
        raise NotImplementedError(f"{self.name} is a text model: it has no lmms-eval model; evaluate it with lm-eval")


def check_scoring(value: str, *, where: str) -> Scoring:
    try:
        return Scoring(value)
    except ValueError:
        raise ValueError(f"{where}: unsupported scoring function {value!r}; valid: softmax, sigmoid") from None
