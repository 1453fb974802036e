"""The typed inputs of each stage of a suite run: one object per stage that is both hashed for the stage's cache key
and passed to the stage, so the two cannot diverge.

A stage's inputs hold every setting the stage reads; an upstream stage's inputs are held whole (the quantize stage
reads the group size through ``inputs.allocate.allocation``) and are hashed as their key, which hashes them
in turn::

    plan = RecipeInputs.build(suite, ctx, recipe, version="0.1.0")
    plan.quantize.key                                   # stage_key("quantize", plan.quantize.hashed())
    stages.quantize(model, plan_path, batches, plan.quantize.gptq, ...)   # the recipe's QuantizeConfig as is
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from mcmoe_vl.allocation.config import AllocationConfig
from mcmoe_vl.allocation.plus import PlusConfig
from mcmoe_vl.pruning.otp import OTPConfig
from mcmoe_vl.quant.checkpoint import FORMAT_VERSION
from mcmoe_vl.quant.model import QuantizeConfig

from .cache import stage_key
from .recipe import PruneConfig
from .schema import CalibrationSpec, EvaluationSpec, ModelSpec, RecipeSpec, TaskSpec

DEFAULT_GROUP_SIZE = 128  # the calibration's eps group size when a recipe does not quantize
CHECKPOINT_FORMAT = FORMAT_VERSION  # a checkpoint cached in an older format is rewritten, not reloaded


class StageInputs(BaseModel):
    """Base of the stage inputs: frozen, no unknown fields; :attr:`key` hashes :meth:`hashed`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stage: ClassVar[str] = ""

    def hashed(self) -> dict[str, Any]:
        """What the cache key covers (JSON values); upstream inputs appear as their keys."""
        return self.model_dump(mode="json")

    @property
    def key(self) -> str:
        return stage_key(self.stage, self.hashed())


class CalibrateInputs(StageInputs):
    stage: ClassVar[str] = "calibrate"

    version: str  # of mcmoe_vl
    model: dict[str, Any]  # checkpoint fingerprint (file hashes, or the Hub id and revision)
    dtype: str
    calibration: CalibrationSpec
    data: str  # the calibration source of this model
    seed: int
    group_size: int  # of the eps quantizer


class AllocateInputs(StageInputs):
    """The recipe's allocation config with the run's seed, and its pmq+ settings (GPTQ settings do not change the
    plan: a recipe that differs only in them reuses the allocation)."""

    stage: ClassVar[str] = "allocate"

    calibrate: CalibrateInputs
    allocation: AllocationConfig
    plus: PlusConfig | None
    version: str

    def hashed(self) -> dict[str, Any]:
        return {"calibrate": self.calibrate.key, "allocation": self.allocation.model_dump(mode="json"),
                "plus": self.plus.model_dump(mode="json") if self.plus is not None else None,
                "version": self.version}


class QuantizeInputs(StageInputs):
    stage: ClassVar[str] = "quantize"

    allocate: AllocateInputs
    gptq: QuantizeConfig
    version: str
    checkpoint_format: int  # a checkpoint cached in an older format is rewritten, not reloaded

    def hashed(self) -> dict[str, Any]:
        # progress bars do not change the checkpoint
        return {"allocate": self.allocate.key, "calibrate": self.allocate.calibrate.key,
                "gptq": self.gptq.model_dump(mode="json", exclude={"progress"}), "version": self.version,
                "checkpoint_format": self.checkpoint_format}


class PruneInputs(StageInputs):
    """The recipe's ODP or OTP config (OTP with the run's seed) and the model it is fitted on."""

    stage: ClassVar[str] = "prune"

    base: QuantizeInputs | None  # the quantized model pruning is fitted on; None: the original
    model: dict[str, Any]  # checkpoint fingerprint of the original
    calibrate: CalibrateInputs
    prune: PruneConfig
    version: str

    def hashed(self) -> dict[str, Any]:
        return {"base": self.base.key if self.base is not None else self.model, "calibrate": self.calibrate.key,
                "prune": self.prune.model_dump(mode="json"), "version": self.version}


class EvaluateInputs(StageInputs):
    stage: ClassVar[str] = "evaluate"

    model: dict[str, Any]
    model_spec: ModelSpec
    recipe: RecipeSpec
    quantize: QuantizeInputs | None
    prune: PruneInputs | None
    tasks: list[TaskSpec]
    evaluation: EvaluationSpec
    seed: int
    software: dict[str, str]

    def hashed(self) -> dict[str, Any]:
        ev = self.evaluation.model_dump(mode="json")
        if self.recipe.quant is None:
            ev.pop("runtime")  # the 16-bit model has no quantized runtime
        return {"model": self.model, "model_spec": self.model_spec.model_dump(mode="json"),
                "recipe": self.recipe.model_dump(mode="json"),
                "quantize": self.quantize.key if self.quantize is not None else None,
                "prune": self.prune.key if self.prune is not None else None,
                "tasks": [t.model_dump(mode="json") for t in self.tasks], "evaluation": ev, "seed": self.seed,
                "software": self.software}


class RecipeInputs(BaseModel):
    """The inputs of every stage one (model, recipe, seed) runs, in pipeline order (None: the stage is skipped)."""

    model_config = ConfigDict(frozen=True)

    calibrate: CalibrateInputs | None
    allocate: AllocateInputs | None
    quantize: QuantizeInputs | None
    prune: PruneInputs | None
    evaluate: EvaluateInputs

    @classmethod
    def build(cls, suite: Any, ctx: Any, recipe: RecipeSpec, *, version: str, software: dict[str, str],
              checkpoint_format: int) -> RecipeInputs:
        """Every stage's inputs of ``recipe`` on the model and seed of ``ctx`` (no stage is run)."""
        q, p = recipe.quant, recipe.prune
        cal = alloc = quant = prune = None
        if q is not None or p is not None:
            cal = CalibrateInputs(version=version, model=ctx.fingerprint, dtype=ctx.spec.dtype,
                                  calibration=suite.calibration, data=ctx.calibration_source, seed=ctx.seed,
                                  group_size=q.allocation.group_size if q is not None else DEFAULT_GROUP_SIZE)
        if q is not None:
            alloc = AllocateInputs(calibrate=cal, allocation=q.allocation.model_copy(update={"seed": ctx.seed}),
                                   plus=q.plus, version=version)
            quant = QuantizeInputs(allocate=alloc, gptq=q.gptq, version=version, checkpoint_format=checkpoint_format)
        if p is not None:
            if isinstance(p, OTPConfig):
                p = p.model_copy(update={"seed": ctx.seed})
            prune = PruneInputs(base=quant, model=ctx.fingerprint, calibrate=cal, prune=p, version=version)
        ev = EvaluateInputs(model=ctx.fingerprint, model_spec=ctx.spec, recipe=recipe, quantize=quant, prune=prune,
                            tasks=suite.tasks_for(ctx.spec), evaluation=suite.evaluation, seed=ctx.seed,
                            software=software)
        return cls(calibrate=cal, allocate=alloc, quantize=quant, prune=prune, evaluate=ev)

    def keys(self) -> dict[str, str | None]:
        """Stage -> cache key (None: not run), as recorded in the results file's ``config.stage_keys``."""
        return {name: (getattr(self, name).key if getattr(self, name) is not None else None)
                for name in ("calibrate", "allocate", "quantize", "prune", "evaluate")}
