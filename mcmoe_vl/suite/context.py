"""One model of a suite for one seed: the pristine model, its adapter, tokenizer and processor, and the data every
stage reads (calibration batches, pmq+'s selection split, the timed workload), each loaded on first use."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from mcmoe_vl.io import checkpoint_fingerprint
from model_adapters import get_adapter

from . import stages
from .load import is_image_source
from .schema import ModelSpec, Suite

log = logging.getLogger(__name__)

# Models with more parameter bytes than this are reloaded for each recipe instead of copied in memory.
COPY_LIMIT_BYTES = 4 << 30


class ModelContext:
    """One model of the suite for one seed: the pristine model, tokenizer and data, loaded on first use."""

    def __init__(self, suite: Suite, base_dir: Path, spec: ModelSpec, location: str, is_local: bool, seed: int
                 ) -> None:
        self.suite, self.base_dir = suite, base_dir
        self.spec, self.location, self.is_local, self.seed = spec, location, is_local, seed
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._calib: list[dict[str, torch.Tensor]] | None = None
        self._work: list[dict[str, torch.Tensor]] | None = None
        self._counts: tuple[dict[int, int], int] | None = None
        self.fingerprint = (checkpoint_fingerprint(Path(location)) if is_local
                            else {"hub": location, "revision": spec.revision})
        self.adapter = get_adapter(spec.adapter)  # resolved once; every stage asks it, none names a family

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            log.info("loading %s from %s", self.spec.name, self.location)
            self._model = stages.load_model(self.spec, self.location, self.is_local, self.adapter)
        return self._model

    def fresh_model(self) -> torch.nn.Module:
        """A copy of the original model that a stage may modify."""
        base = self.model
        nbytes = sum(p.numel() * p.element_size() for p in base.parameters())
        if self.spec.device_map is None and nbytes <= COPY_LIMIT_BYTES:
            return copy.deepcopy(base)
        return stages.load_model(self.spec, self.location, self.is_local, self.adapter)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = stages.load_tokenizer(self.spec, self.location, self.adapter)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return stages.model_device(self.model)

    @property
    def calibration_source(self) -> str:
        return self.spec.calibration_data or self.suite.calibration.data

    def processor(self) -> Any:
        return self.adapter.load_processor(self.tokenizer, self.model)

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._calib is None:
            c = self.suite.calibration
            if is_image_source(self.calibration_source):
                samples = stages.vlm_samples(self.calibration_source, split="train", num=c.num_sequences,
                                             seed=self.seed, base=self.base_dir)
                self._calib = stages.vlm_batches(self.adapter, self.processor(), samples, c.batch_size, self.device)
            else:
                text = stages.source_text(self.calibration_source, base=self.base_dir,
                                          text_field=c.text_field)
                ids = stages.token_windows(self.tokenizer, text, seq_len=c.seq_len, num=c.num_sequences,
                                           seed=self.seed)
                self._calib = stages.batches(ids, c.batch_size, self.device)
        return self._calib

    def selection_batches(self) -> list[dict[str, torch.Tensor]]:
        """pmq+'s selection split: other windows of the calibration text (seed 20000 + seed), never evaluation data."""
        c = self.suite.calibration
        if is_image_source(self.calibration_source):
            raise ValueError(f"{self.spec.name}: pmq+ in suites needs a text calibration source for its selection "
                             f"split, got {self.calibration_source!r}; use allocate_plus from Python for images")
        text = stages.source_text(self.calibration_source, base=self.base_dir, text_field=c.text_field)
        ids = stages.token_windows(self.tokenizer, text, seq_len=c.seq_len, num=max(8, c.num_sequences // 2),
                                   seed=20_000 + self.seed)
        return stages.batches(ids, c.batch_size, self.device)

    def counts(self) -> tuple[dict[int, int], int]:
        """Parameter counts of the original model (activated parameters are counted in original weights)."""
        if self._counts is None:
            self._counts = stages.original_counts(self.model, self.adapter)
        return self._counts

    def workload(self) -> list[dict[str, torch.Tensor]]:
        """The fixed prefill workload timed for the speed-up (held-out text or image questions)."""
        if self._work is None:
            c, ev = self.suite.calibration, self.suite.evaluation
            if is_image_source(self.calibration_source):
                n = max(1, ev.speed_tokens // ev.speed_seq_len)
                samples = stages.vlm_samples(self.calibration_source, split="heldout", num=n, seed=10_000 + self.seed,
                                             base=self.base_dir)
                self._work = stages.vlm_batches(self.adapter, self.processor(), samples, ev.batch_size, self.device)
            else:
                text = stages.source_text(stages.heldout_source(self.calibration_source), base=self.base_dir,
                                          text_field=c.text_field)
                n = max(1, -(-ev.speed_tokens // ev.speed_seq_len))
                ids = stages.token_windows(self.tokenizer, text, seq_len=ev.speed_seq_len, num=n,
                                           seed=10_000 + self.seed)
                self._work = stages.batches(ids, ev.batch_size, self.device)
        return self._work
