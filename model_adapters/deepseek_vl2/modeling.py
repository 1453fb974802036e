"""DeepSeek-VL2 on transformers 5: SigLIP tower, ``downsample_mlp_gelu`` projector, tiled image embeddings, MoE LM.

The computation follows the official ``DeepseekVLV2ForCausalLM`` (deepseek-ai/DeepSeek-VL2):

1. Vision: every tile (a global view and the local crops of each image) goes through a SigLIP ViT; the output is
   the token grid after the final layer norm (no pooling head), ``(N_tiles, g*g, C)`` with g = 27 at 384 px.
2. Projector ``downsample_mlp_gelu``: the grid is zero-padded to even (27 -> 28), 2x2 neighbourhoods are
   concatenated in the channel-major order of ``F.unfold`` (feature ``c*4 + 2*dy + dx``), then
   ``Linear(4C -> D*r), GELU, ..., Linear(D*r -> D)``: ``(N_tiles, (g/2)^2, D)``.
3. Layout per image (``tile_tag: 2D``): the global view's h x w grid with an ``image_newline`` embedding after each
   row, then ``view_seperator``, then the local tiles stitched into one (th*h) x (tw*w) grid, again with a newline
   after each row (``global_view_pos: head``; ``tail`` puts the global view last). The image embeddings of a
   sequence replace, in order, the positions where ``images_seq_mask`` is true.
4. Language model: a DeepSeek MoE decoder built from transformers' DeepseekV2 / DeepseekV3 pieces (see
   :func:`~.language_model.build_language_model`, in :mod:`.language_model`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SiglipVisionModel

from mcmoe_vl.compat import cache_kwargs, pop_cache

from .configuration import DeepseekVL2Config, ProjectorConfig, VisionConfig
from .language_model import build_language_model

log = logging.getLogger(__name__)


# -- projector --------------------------------------------------------------------------------------------------------


class DeepseekVL2Projector(nn.Module):
    """``downsample_mlp_gelu``: pad to even, 2x2 unfold merge, MLP with GELU. Keys ``projector.layers.{0,2,..}``."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.ratio = cfg.downsample_ratio
        hidden = cfg.n_embed * cfg.mlp_ratio
        mods: list[nn.Module] = [nn.Linear(cfg.input_dim * self.ratio * self.ratio, hidden)]
        for _ in range(1, cfg.depth - 1):
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        if cfg.depth > 1:
            mods += [nn.GELU(), nn.Linear(hidden, cfg.n_embed)]
        self.layers = nn.Sequential(*mods)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(N, g*g, C) -> (N, ceil(g/r)^2, C*r*r), features in unfold's channel-major order."""
        n, hw, c = x.shape
        g = int(round(hw**0.5))
        if g * g != hw:
            raise ValueError(f"projector input has {hw} tokens per tile, not a square grid")
        pad = (-g) % self.ratio
        x = x.reshape(n, g, g, c)
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))  # zero rows/columns at the bottom/right
        x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=self.ratio, stride=self.ratio)  # (N, C*r*r, L)
        return x.permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, g*g, C) -> (N, L, D)
        return self.layers(self.merge(x))


class UnusedAttentionPool(nn.Module):
    """The SigLIP ``map`` pooling head stored in official checkpoints (``vision.attn_pool.*``).

    DeepSeek-VL2 builds it but never runs it (``ignore_head``); it is kept only so that checkpoints load strictly
    and are written back complete. ``forward`` is deliberately absent.
    """

    def __init__(self, vis: VisionConfig) -> None:
        super().__init__()
        c, i = vis.width, vis.intermediate_size
        self.latent = nn.Parameter(torch.zeros(1, 1, c))
        self.q = nn.Linear(c, c)
        self.kv = nn.Linear(c, 2 * c)
        self.proj = nn.Linear(c, c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(c, i)
        self.mlp.fc2 = nn.Linear(i, c)
        self.requires_grad_(False)


# -- the VLM ----------------------------------------------------------------------------------------------------------


class DeepseekVL2PreTrainedModel(PreTrainedModel):
    config: DeepseekVL2Config
    config_class = DeepseekVL2Config
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["SiglipEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Submodels (SigLIP, the language model) initialise themselves; here only the VLM's own parts.
        if isinstance(module, DeepseekVL2Projector):
            for lin in module.layers:
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, std=0.02)
                    nn.init.zeros_(lin.bias)
        elif isinstance(module, UnusedAttentionPool):
            nn.init.normal_(module.latent, std=module.latent.shape[-1] ** -0.5)
        elif isinstance(module, DeepseekVL2ForCausalLM):
            std = module.image_newline.shape[0] ** -0.5  # the official embed_std = 1/sqrt(n_embed)
            nn.init.normal_(module.image_newline, std=std)
            nn.init.normal_(module.view_seperator, std=std)


class DeepseekVL2ForCausalLM(DeepseekVL2PreTrainedModel):
    """DeepSeek-VL2. Module names follow the official checkpoint where it can (``projector``, ``image_newline``,
    ``view_seperator``, ``language``); the vision tower is transformers' ``SiglipVisionModel`` (``vision``).

    Build with :func:`model_adapters.deepseek_vl2.loading.model_from_config` (random init) or
    :func:`~model_adapters.deepseek_vl2.loading.load_official` (a checkpoint directory).
    """

    def __init__(self, config: DeepseekVL2Config) -> None:
        super().__init__(config)
        off = config.official
        self.vision = SiglipVisionModel(config.vision_config)
        self.vision_attn_pool = UnusedAttentionPool(off.vision) if off.vision.global_pool == "map" else None
        self.projector = DeepseekVL2Projector(off.projector)
        d = off.projector.n_embed
        self.image_newline = nn.Parameter(torch.zeros(d))
        self.view_seperator = nn.Parameter(torch.zeros(d))  # (sic) the official name
        self.language = build_language_model(config.text_config)
        self.global_view_pos = off.global_view_pos
        self.post_init()

    # -- parts ----------------------------------------------------------------------------------------------------
    @property
    def lm_head(self) -> nn.Module:
        return self.language.lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.language.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language.lm_head

    def vision_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised tiles -> (N, g*g, C): SigLIP after the final layer norm."""
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        return self.vision(pixel_values=tiles.to(dtype)).last_hidden_state

    def image_tile_embeddings(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, h*w, D) projected tile embeddings."""
        return self.projector(self.vision_features(tiles))

    # -- image embedding placement --------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor, images_spatial_crop: torch.Tensor) -> list[torch.Tensor]:
        """Per sequence, the image embeddings in sequence order, ``[(n_b, D)]``.

        ``images`` (B, max_tiles, 3, S, S); ``images_spatial_crop`` (B, max_images, 2) holds (width tiles, height
        tiles) per image, zero rows after the last image. Tile order per image: global view, then the local tiles
        row-major.
        """
        crops = images_spatial_crop.tolist()
        counts = []
        for row in crops:
            n = 0
            for tw, th in row:
                if tw == 0 or th == 0:
                    break
                n += 1 + tw * th
            counts.append(n)
        tiles = [images[b, :n] for b, n in enumerate(counts) if n]
        if not tiles:
            return [images.new_zeros(0, self.image_newline.shape[0]) for _ in crops]
        emb = self.image_tile_embeddings(torch.cat(tiles))  # (N, h*w, D)
        emb = emb.to(self.image_newline.dtype)
        n_tiles, hw, d = emb.shape
        h = w = int(round(hw**0.5))
        newline = self.image_newline
        out: list[torch.Tensor] = []
        t = 0
        for row in crops:
            parts = []
            for tw, th in row:
                if tw == 0 or th == 0:
                    break
                glob = emb[t].view(h, w, d)
                local = emb[t + 1 : t + 1 + tw * th].view(th, tw, h, w, d)
                t += 1 + tw * th
                glob = torch.cat([glob, newline.expand(h, 1, d)], dim=1).reshape(-1, d)  # (h*(w+1), D)
                local = local.permute(0, 2, 1, 3, 4).reshape(th * h, tw * w, d)  # tiles stitched row-major
                local = torch.cat([local, newline.expand(th * h, 1, d)], dim=1).reshape(-1, d)
                sep = self.view_seperator[None]
                parts.append(torch.cat([glob, sep, local] if self.global_view_pos == "head" else [local, sep, glob]))
            out.append(torch.cat(parts) if parts else emb.new_zeros(0, d))
        return out

    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image embeddings written where ``images_seq_mask`` is true."""
        embeds = self.get_input_embeddings()(input_ids)  # (B, S, D)
        if images is None or images_spatial_crop is None or int(images_spatial_crop.sum()) == 0:
            return embeds
        if images_seq_mask is None:
            raise ValueError("images were given without images_seq_mask")
        per_seq = self.image_embeddings(images, images_spatial_crop)
        rows = []
        for b, img in enumerate(per_seq):
            mask = images_seq_mask[b].bool()
            n = int(mask.sum())
            if n != img.shape[0]:
                raise ValueError(
                    f"sequence {b}: images_seq_mask has {n} image positions but the images give {img.shape[0]} "
                    "embeddings; the processor's token layout and the model's config disagree"
                )
            row = embeds[b]
            if n:
                row = row.masked_scatter(mask[:, None], img.to(row.dtype))
            rows.append(row)
        return torch.stack(rows)

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """Logits (B, S, V) of the language model over the text with images placed (see the module docstring).

        A key/value cache is passed as ``cache`` or ``past_key_values``, whichever the installed transformers uses."""
        cache = pop_cache(kwargs)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        if position_ids is None and attention_mask is not None:
            # Left padding: positions count the real tokens (all-ones mask: 0..S-1, as the official forward).
            pos = attention_mask.long().cumsum(-1) - 1
            position_ids = pos.masked_fill(attention_mask == 0, 1)[:, -inputs_embeds.shape[1] :]
        return self.language(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **cache_kwargs(cache),
            **kwargs,
        )
