"""The calibration statistics file: expert significance, Hessian traces, ODP ratio quantiles and the eps table.

Written by :func:`mcmoe_vl.calibration.calibrate`, read by the allocator, the pruning stage and the report. It is
plain JSON (one record per MoE layer, in layer order) so that a person can open it and two runs diff cleanly.
This module only defines the schema and its derived quantities; it does not import torch.

Per MoE layer, over the N calibration tokens (padding excluded), for each expert i (METHOD.md section 1):

- ``counts[i]``: how many tokens had expert i in their top-k (so ``sum(counts) == top_k * N``); ``phi_i =
  counts[i] / N``.
- ``weight_sum[i]``: the sum of expert i's routing probability *before* top-k renormalisation (softmax or sigmoid
  score) over the tokens that selected it; ``w_i = weight_sum[i] / N``.
- ``weight_sum_renorm[i]``: the same with the probability renormalised over the token's top-k (sums to N over the
  experts); ``weight_sum_applied[i]``: the weight the model really applies (its own renormalisation and scaling).

The same counts split by image and text tokens are kept for vision-language models. ``eps[j][i]`` is paper Eq. 3
(METHOD.md section 2); ``hawq[j][i]`` the HAWQ-v2 sensitivity ``Tr(H)/d * ||W - Q_j(W)||^2`` summed over the
expert's three matrices.

Integrity: the file records the fingerprint of the model it was measured on (``model_fingerprint``: the checkpoint's
file hashes, or a hash of the weights in memory) and of the data (``data_fingerprint``), and a ``checksum`` over
everything else (:func:`save_stats`). A resumed calibration refuses a file whose checksum does not match (edited or
corrupted) or that comes from other weights, data or settings. Every number is checked to be finite and
non-negative when the file is read, naming the layer, the table and the expert.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mcmoe_vl.io import read_json, write_json_atomic

FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenGroupStats(_Strict):
    """Routing statistics over one group of tokens (all, image or text)."""

    num_tokens: int = 0
    counts: list[int]
    weight_sum: list[float]
    weight_sum_renorm: list[float]
    weight_sum_applied: list[float]

    @classmethod
    def empty(cls, n: int) -> TokenGroupStats:
        return cls(counts=[0] * n, weight_sum=[0.0] * n, weight_sum_renorm=[0.0] * n, weight_sum_applied=[0.0] * n)

    @property
    def phi(self) -> list[float]:
        """Access frequency ``counts / N`` (0 when the group is empty)."""
        n = self.num_tokens
        return [c / n if n else 0.0 for c in self.counts]

    @property
    def w(self) -> list[float]:
        """Activation weight ``sum of pre-renormalisation probability / N``."""
        n = self.num_tokens
        return [s / n if n else 0.0 for s in self.weight_sum]

    @property
    def w_renorm(self) -> list[float]:
        n = self.num_tokens
        return [s / n if n else 0.0 for s in self.weight_sum_renorm]


class RatioQuantiles(_Strict):
    """Distribution of ``w_e / w_top1`` over the selected non-top-1 (token, expert) pairs (ODP's statistic).

    For top-2 routers this is ``w1 / w0``; ODP's threshold ``mu`` is its median (METHOD.md section 6).
    """

    count: int
    mean: float
    quantiles: dict[str, float]  # "0.50" -> value

    def quantile(self, q: float) -> float:
        key = f"{q:.2f}"
        if key not in self.quantiles:
            raise KeyError(f"quantile {q} not stored; stored: {sorted(self.quantiles)}")
        return self.quantiles[key]

    @property
    def median(self) -> float:
        return self.quantile(0.5)


class LayerStats(_Strict):
    """Everything measured for one MoE layer."""

    index: int  # decoder layer index
    path: str
    num_experts: int
    top_k: int
    scoring: str
    all: TokenGroupStats
    image: TokenGroupStats | None = None
    text: TokenGroupStats | None = None
    hessian_trace_in: list[float]  # 2 * sum ||x||^2 over the expert's tokens (gate / up input)
    hessian_trace_mid: list[float]  # 2 * sum ||act(gate x) * up x||^2 (down input)
    odp_ratio: RatioQuantiles | None = None
    eps: dict[str, list[float]] = Field(default_factory=dict)  # width -> (n,)
    hawq: dict[str, list[float]] = Field(default_factory=dict)  # width -> (n,)
    weight_error: dict[str, list[float]] = Field(default_factory=dict)  # width -> ||W - Q(W)||_F^2 (n,)
    starved: list[int] = Field(default_factory=list)  # experts below the configured minimum of tokens

    @model_validator(mode="after")
    def _check(self) -> LayerStats:
        n = self.num_experts
        for g in (self.all, self.image, self.text):
            if g is not None and any(len(v) != n for v in (g.counts, g.weight_sum, g.weight_sum_renorm,
                                                            g.weight_sum_applied)):
                raise ValueError(f"layer {self.index}: per-expert lists must have {n} entries")
        for table in (self.eps, self.hawq, self.weight_error):
            for k, v in table.items():
                if len(v) != n:
                    raise ValueError(f"layer {self.index}: {k}-bit entry must have {n} entries, has {len(v)}")
        self._check_values()
        return self

    def _check_values(self) -> None:
        """Every count, weight, trace and error is a finite number >= 0 (a negative eps would silently turn the
        program's minimisation around); the error names the layer, the table and the expert."""
        named: list[tuple[str, list[float] | list[int]]] = [
            ("hessian_trace_in", self.hessian_trace_in), ("hessian_trace_mid", self.hessian_trace_mid)]
        for group, g in (("all", self.all), ("image", self.image), ("text", self.text)):
            if g is not None:
                named += [(f"{group}.{f}", getattr(g, f)) for f in ("counts", "weight_sum", "weight_sum_renorm",
                                                                   "weight_sum_applied")]
        for table_name, table in (("eps", self.eps), ("hawq", self.hawq), ("weight_error", self.weight_error)):
            named += [(f"{table_name}[{k}-bit]", v) for k, v in sorted(table.items())]
        for what, values in named:
            for i, v in enumerate(values):
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"layer {self.index} ({self.path}): {what} of expert {i} is {v!r}; valid: a "
                                     f"finite number >= 0 (the file is corrupted, hand-edited, or the model has "
                                     f"non-finite weights)")

    def starved_experts(self, min_tokens: int) -> list[int]:
        """Experts that received fewer than ``min_tokens`` calibration tokens."""
        return [i for i, c in enumerate(self.all.counts) if c < min_tokens]

    def eps_bits(self) -> list[int]:
        return sorted(int(k) for k in self.eps)


class CalibrationStats(_Strict):
    """The whole calibration artifact (see the module docstring)."""

    format_version: int = FORMAT_VERSION
    model_type: str
    model_name: str | None = None
    num_decoder_layers: int
    moe_layer_indices: list[int]  # every MoE layer of the model, finished or not
    num_sequences: int = 0
    data_fingerprint: str | None = None  # sha256 of the calibration token ids (resume refuses other data)
    model_fingerprint: Any = None  # checkpoint file hashes, or a hash of the weights (resume refuses other weights)
    config: dict = Field(default_factory=dict)  # the CalibrationConfig used
    layers: list[LayerStats] = Field(default_factory=list)  # finished layers, in layer order

    @property
    def complete(self) -> bool:
        return [la.index for la in self.layers] == self.moe_layer_indices

    def layer(self, index: int) -> LayerStats:
        for la in self.layers:
            if la.index == index:
                return la
        raise KeyError(f"no statistics for decoder layer {index}; have {[la.index for la in self.layers]}")

    @property
    def num_tokens(self) -> int:
        return self.layers[0].all.num_tokens if self.layers else 0


def content_checksum(data: dict[str, Any]) -> str:
    """SHA-256 of the file's content without its ``checksum`` key (canonical JSON: sorted keys)."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def save_stats(stats: CalibrationStats, path: str | os.PathLike[str]) -> None:
    """Write ``stats`` atomically with its content checksum."""
    data = stats.model_dump(mode="json")
    data["checksum"] = content_checksum(data)
    write_json_atomic(path, data)


class StatsIntegrityError(ValueError):
    """A statistics file whose content does not match its checksum (edited or corrupted since it was written)."""


def load_stats(path: str | os.PathLike[str], *, verify: bool = False) -> CalibrationStats:
    """Read and validate a calibration statistics file; with ``verify``, also its checksum (a file without one,
    or whose content changed since :func:`save_stats` wrote it, is a :class:`StatsIntegrityError`)."""
    data = read_json(path, what="calibration statistics")
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a calibration statistics file of format version {FORMAT_VERSION}")
    recorded = data.pop("checksum", None)  # a property of the file, not of the statistics
    intact = recorded == content_checksum(data)
    stats = CalibrationStats.model_validate(data)  # invalid values are named first, whatever the checksum says
    if verify and not intact:
        what = "has no checksum" if recorded is None else "does not match its checksum"
        raise StatsIntegrityError(f"{path} {what}: it was edited or corrupted after it was written; "
                                  "re-run mcmoe-vl calibrate to measure it again")
    return stats
