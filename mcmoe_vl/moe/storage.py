"""How a MoE layer stores its routed experts: 2-D views of gate / up / down and a dense module per expert.

Two layouts cover the supported families: transformers 5's fused 3-D tensors (:class:`FusedExpertStorage`) and a
list of expert modules with ``nn.Linear`` projections (:class:`ModuleListExpertStorage`). Above the storage every
expert looks the same (:class:`ExpertWeights`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ExpertWeights:
    """One routed expert's weights as 2-D views: y = down(act(gate x) * up x)."""

    gate: torch.Tensor  # (I, H)
    up: torch.Tensor  # (I, H)
    down: torch.Tensor  # (H, I)


class ExpertStorage:
    """How a layer stores its routed experts. Subclasses give 2-D views and a dense expert module."""

    num_experts: int
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    def weights(self, i: int) -> ExpertWeights:
        raise NotImplementedError

    def dense_expert(self, i: int) -> nn.Module:
        """The unquantized expert i as a module mapping (t, H) -> (t, H), computing exactly like the model."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        """The parameters holding the routed experts (for freeing dense weights once replaced)."""
        raise NotImplementedError


class FusedExpertStorage(ExpertStorage):
    """transformers 5 layout: ``gate_up_proj`` (E, 2I, H) with the gate rows first, ``down_proj`` (E, H, I)."""

    def __init__(self, experts: nn.Module, act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        for name in ("gate_up_proj", "down_proj"):
            if not isinstance(getattr(experts, name, None), torch.Tensor):
                raise TypeError(f"{type(experts).__name__} has no 3-D {name!r}; not a fused experts module")
        self.module = experts
        self.num_experts = experts.gate_up_proj.shape[0]
        self.act_fn = act_fn or experts.act_fn

    @property
    def intermediate_size(self) -> int:
        return self.module.gate_up_proj.shape[1] // 2

    def weights(self, i: int) -> ExpertWeights:
        gu = self.module.gate_up_proj[i]  # (2I, H)
        n = self.intermediate_size
        return ExpertWeights(gate=gu[:n], up=gu[n:], down=self.module.down_proj[i])

    def dense_expert(self, i: int) -> nn.Module:
        return _FusedDenseExpert(self, i)

    def parameters(self) -> list[nn.Parameter]:
        return [self.module.gate_up_proj, self.module.down_proj]


class _FusedDenseExpert(nn.Module):
    # Not registered anywhere: reads the storage at call time, so in-place weight edits are seen.
    def __init__(self, storage: FusedExpertStorage, i: int) -> None:
        super().__init__()
        self._storage = [storage]  # list: keep the storage out of the module tree
        self.i = i

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (t, H) -> (t, H)
        st = self._storage[0]
        gate, up = F.linear(x, st.module.gate_up_proj[self.i]).chunk(2, dim=-1)  # (t, I) each
        return F.linear(st.act_fn(gate) * up, st.module.down_proj[self.i])


class ModuleListExpertStorage(ExpertStorage):
    """A list of expert modules, each with gate / up / down ``nn.Linear`` (attribute names configurable)."""

    def __init__(
        self,
        experts: nn.ModuleList,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        gate: str = "gate_proj",
        up: str = "up_proj",
        down: str = "down_proj",
    ) -> None:
        self.module = experts
        self.names = (gate, up, down)
        self.num_experts = len(experts)
        first = experts[0]
        for n in self.names:
            if not isinstance(getattr(first, n, None), nn.Linear):
                raise TypeError(f"expert module {type(first).__name__} has no nn.Linear {n!r}")
        self.act_fn = act_fn or first.act_fn

    def weights(self, i: int) -> ExpertWeights:
        e = self.module[i]
        g, u, d = (getattr(e, n).weight for n in self.names)
        return ExpertWeights(gate=g, up=u, down=d)

    def dense_expert(self, i: int) -> nn.Module:
        return self.module[i]

    def parameters(self) -> list[nn.Parameter]:
        return [p for e in self.module for p in e.parameters()]
