"""Data-parallel suite runs: processes started by ``accelerate launch`` / ``torchrun`` split the (model, seed,
recipe) grid, and rank 0 gathers every process's :class:`RunSummary` and writes the report."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .schema import ModelSpec


@dataclass
class RunSummary:
    run_dir: Path
    report: Path | None
    results: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)  # recipes whose stage was unavailable
    kept_report: Path | None = None  # an existing report left in place because the run was incomplete
    reused: dict[str, int] = field(default_factory=dict)  # stage -> cache hits
    computed: dict[str, int] = field(default_factory=dict)  # stage -> runs




@dataclass
class Distributed:
    """Processes started by ``accelerate launch`` / ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment)
    split the suite's (model, seed, recipe) grid; rank 0 gathers every result and writes the report."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        d = cls(rank=int(os.environ.get("RANK", "0")), world_size=world,
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1:
            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group(backend="gloo", timeout=_dt.timedelta(hours=72))
        return d

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td

            td.barrier()

    def place(self, spec: ModelSpec) -> ModelSpec:
        """Devices of this process: ``cuda`` becomes ``cuda:<local rank>``; a sharded model (``device_map``) gets an
        equal share of the node's GPUs (GPUs ``local_rank * n .. local_rank * n + n - 1`` with n = GPUs / processes
        per node) through ``max_memory``, unless the suite sets ``max_memory`` itself."""
        if self.world_size <= 1 or not spec.device.startswith("cuda"):
            return spec
        if spec.device_map is None:
            return spec.model_copy(update={"device": f"cuda:{self.local_rank}"})
        if spec.max_memory:
            return spec
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        n = torch.cuda.device_count() // max(1, local_world)
        if n < 1:
            raise ValueError(f"{local_world} processes per node but {torch.cuda.device_count()} GPUs: a sharded "
                             f"model needs at least one GPU per process")
        gpus = range(self.local_rank * n, (self.local_rank + 1) * n)
        mem = {str(i): f"{int(torch.cuda.get_device_properties(i).total_memory * 0.9) >> 20}MiB" for i in gpus}
        return spec.model_copy(update={"max_memory": mem, "device": f"cuda:{gpus[0]}"})

    def gather_summaries(self, mine: RunSummary) -> RunSummary:
        import torch.distributed as td

        parts: list[Any] = [None] * self.world_size
        td.all_gather_object(parts, mine)
        out = RunSummary(run_dir=mine.run_dir, report=None)
        for p in parts:
            out.results += p.results
            out.notes += p.notes
            out.failed += p.failed
            out.not_run += p.not_run
            for mine_d, theirs in ((out.reused, p.reused), (out.computed, p.computed)):
                for k, v in theirs.items():
                    mine_d[k] = mine_d.get(k, 0) + v
        return out
