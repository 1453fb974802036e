"""Read a suite file (TOML or YAML) and check everything that can be checked before any long work.

::

    loaded = load_suite("suites/default.toml")      # parse + schema (unknown keys fail, naming the key)
    preflight(loaded)                               # checkpoints, adapters, allocators, tasks, calibration data

Both raise :class:`SuiteError` (a ``ValueError``) with the file and the offending entry named.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mcmoe_vl.validation import model_holding

from .schema import Harness, ModelSpec, Suite

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SUITE_SUFFIXES = (".toml", ".yaml", ".yml")


class SuiteError(ValueError):
    """A suite file that cannot run as written; the message names the file and the entry."""


@dataclass(frozen=True)
class LoadedSuite:
    """A validated suite and where it came from (relative paths in it are relative to ``base_dir``)."""

    suite: Suite
    path: Path | None
    base_dir: Path

    def resolve_path(self, p: str) -> Path:
        """A relative path from the suite: next to the suite file if it exists there, else the working directory."""
        q = Path(p).expanduser()
        if q.is_absolute():
            return q
        here = self.base_dir / q
        return here if here.exists() else Path.cwd() / q

    def resolved_config(self) -> dict[str, Any]:
        """The suite as data with defaults filled in (recorded with every run)."""
        return self.suite.model_dump(mode="json")


def _unknown_key(loc: tuple[Any, ...]) -> str:
    table = model_holding(Suite, loc)
    return f"unknown key; valid: {', '.join(table.model_fields)}" if table is not None else "unknown key"


def _format_validation(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: {_unknown_key(tuple(err['loc']))}")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            lines.append(f"  {loc}: {err['msg']}")
    return f"{where} is not a valid suite:\n" + "\n".join(lines)


def parse_suite_text(text: str, *, fmt: str, where: str = "suite") -> Suite:
    """Parse TOML (``fmt="toml"``) or YAML text into a :class:`Suite`."""
    try:
        if fmt == "toml":
            data = tomllib.loads(text)
        elif fmt in ("yaml", "yml"):
            data = yaml.safe_load(text)
        else:
            raise SuiteError(f"{where}: unknown suite format {fmt!r}; use TOML or YAML")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SuiteError(f"{where} cannot be parsed as {fmt.upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: the top level must be a table of keys (name, models, recipes, tasks, ...)")
    try:
        return Suite.model_validate(data)
    except ValidationError as exc:
        raise SuiteError(_format_validation(exc, where)) from None


def load_suite(path: str | os.PathLike[str]) -> LoadedSuite:
    """Read and validate a suite file (no model, data or task is touched)."""
    p = Path(path)
    if not p.is_file():
        raise SuiteError(f"suite file not found: {p}")
    if p.suffix not in SUITE_SUFFIXES:
        raise SuiteError(f"{p}: suite files end in {', '.join(SUITE_SUFFIXES)}")
    suite = parse_suite_text(p.read_text(encoding="utf-8"), fmt=p.suffix[1:], where=str(p))
    return LoadedSuite(suite=suite, path=p.resolve(), base_dir=p.resolve().parent)


# -- preflight -------------------------------------------------------------------------------------------------------
def is_hub_id(s: str) -> bool:
    return bool(_HUB_ID.match(s)) and not s.startswith((".", "/"))


def checkpoint_location(loaded: LoadedSuite, model: ModelSpec) -> tuple[str, bool]:
    """(path or Hub id, is_local). A missing local directory is an error; so is a Hub id when offline."""
    local = loaded.resolve_path(model.checkpoint)
    if local.is_dir():
        return str(local), True
    if is_hub_id(model.checkpoint) and not Path(model.checkpoint).exists():
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
            cached = _hub_cache_has(model.checkpoint)
            if not cached:
                raise SuiteError(f"model {model.name!r}: checkpoint {model.checkpoint!r} is a Hub id, HF_HUB_OFFLINE "
                                 f"is set and it is not in the local Hugging Face cache")
        return model.checkpoint, False
    raise SuiteError(f"model {model.name!r}: checkpoint {model.checkpoint!r} is neither a directory (looked in "
                     f"{loaded.base_dir} and {Path.cwd()}) nor a Hub id of the form owner/name")


def _hub_cache_has(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not known to be cached"
        return False


def _check_local_checkpoint(model: ModelSpec, path: Path) -> None:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise SuiteError(f"model {model.name!r}: checkpoint directory {path} has no config.json")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as exc:
        raise SuiteError(f"model {model.name!r}: {cfg} is not valid JSON ({exc})") from exc
    if model_type != model.adapter:
        raise SuiteError(f"model {model.name!r}: the suite says adapter {model.adapter!r} but {cfg} has model_type "
                         f"{model_type!r}")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")) + \
        list(path.glob("*.bin"))
    if not weights:
        raise SuiteError(f"model {model.name!r}: checkpoint directory {path} has no weights (*.safetensors)")


class _TagIgnoringLoader(yaml.SafeLoader):
    """Reads lm-eval / lmms-eval task YAML, where ``!function`` tags name Python callables."""


_TagIgnoringLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_names_in(dirs: list[Path]) -> dict[str, Path]:
    """Task, group and tag names declared by the YAML files under ``dirs`` (name -> first file declaring it)."""
    out: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.rglob("*.yaml")) + sorted(d.rglob("*.yml")):
            try:
                data = yaml.load(f.read_text(encoding="utf-8"), Loader=_TagIgnoringLoader)  # noqa: S506
            except yaml.YAMLError:
                continue
            if not isinstance(data, dict):
                continue
            for key in ("task", "group", "tag"):
                v = data.get(key)
                for name in (v if isinstance(v, list) else [v]):
                    if isinstance(name, str):
                        out.setdefault(name, f)
    return out


def include_dirs(loaded: LoadedSuite, harness: Harness) -> list[Path]:
    ev = loaded.suite.evaluation
    raw = ev.lm_eval_include if harness is Harness.LM_EVAL else ev.lmms_eval_include
    out = []
    for p in raw:
        d = loaded.resolve_path(p)
        if not d.is_dir():
            raise SuiteError(f"evaluation.{harness.value}_include: task directory {p!r} not found "
                             f"(looked in {loaded.base_dir} and {Path.cwd()})")
        out.append(d)
    return out


def _default_task_names(harness: Harness) -> set[str]:
    if harness is Harness.LM_EVAL:
        from lm_eval.tasks import TaskManager

        return set(TaskManager().all_tasks)
    try:
        from lmms_eval.tasks import TaskManager as LmmsTaskManager  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SuiteError("the suite uses lmms-eval's built-in tasks but lmms-eval is not installed "
                         "(scripts/setup.sh installs it)") from exc
    return set(LmmsTaskManager().all_tasks)


def check_tasks(loaded: LoadedSuite) -> None:
    """Every task name must be declared in an include directory (or, if enabled, be a built-in task)."""
    suite = loaded.suite
    for harness in Harness:
        wanted = [t for t in suite.tasks if t.harness is harness]
        if not wanted:
            continue
        known = set(task_names_in(include_dirs(loaded, harness)))
        missing = [t.name for t in wanted if t.name not in known]
        if missing and suite.evaluation.include_default_tasks:
            known |= _default_task_names(harness)
            missing = [t.name for t in wanted if t.name not in known]
        if missing:
            import difflib

            hints = []
            for m in missing:
                close = difflib.get_close_matches(m, sorted(known), n=2, cutoff=0.6)
                hints.append(f"{m!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
            where = ", ".join(getattr(suite.evaluation, f"{harness.value}_include")) or "(no include directory)"
            extra = "" if suite.evaluation.include_default_tasks else \
                "; built-in tasks are searched only with evaluation.include_default_tasks = true"
            raise SuiteError(f"unknown {harness.value} task(s) {', '.join(hints)}: not declared under {where}{extra}")


def is_image_source(data: str) -> bool:
    """Image+text calibration samples (``embedded:vqa`` or a JSONL file) rather than a text stream."""
    return data == "embedded:vqa" or data.endswith(".jsonl")


def check_calibration_data(loaded: LoadedSuite) -> None:
    """Each model's calibration source exists (text for language models, image+text for vision-language ones)."""
    suite = loaded.suite
    for m in suite.models:
        recipes = suite.recipes_for(m)
        if not any(r.quant is not None or r.prune is not None for r in recipes):
            continue
        data = m.calibration_data or suite.calibration.data
        where = f"model {m.name!r}: calibration data {data!r}"
        if is_image_source(data):
            if not m.is_vlm:
                raise SuiteError(f"{where}: image+text samples are for vision-language models; {m.adapter!r} "
                                 f"calibrates on text")
            if data != "embedded:vqa" and not loaded.resolve_path(data).is_file():
                raise SuiteError(f"{where}: file not found (looked in {loaded.base_dir} and {Path.cwd()})")
            continue
        if data.startswith("embedded"):
            from mcmoe_vl.data import EMBEDDED_SPLITS

            split = data.split(":", 1)[1] if ":" in data else "train"
            if split not in EMBEDDED_SPLITS:
                raise SuiteError(f"{where}: unknown embedded split {split!r}; valid: "
                                 f"{', '.join('embedded:' + s for s in EMBEDDED_SPLITS)}")
            continue
        if data.startswith("hf:"):
            if len(data.split(":")) > 4 or not data[3:]:
                raise SuiteError(f"{where}: use hf:<dataset>[:<config>[:<split>]]")
            continue
        if not loaded.resolve_path(data).is_file():
            raise SuiteError(f"{where}: file not found (looked in {loaded.base_dir} and {Path.cwd()})")


def check_components(loaded: LoadedSuite) -> None:
    """Adapters and allocators named by the suite exist."""
    from model_adapters import ADAPTERS

    from mcmoe_vl.registry import RegistryError

    for m in loaded.suite.models:
        try:
            ADAPTERS.get(m.adapter)
        except RegistryError as exc:
            raise SuiteError(f"model {m.name!r}: {exc}") from None
    if any(r.quant is not None for r in loaded.suite.recipes):
        from mcmoe_vl.allocation.allocators import ALLOCATORS

        for r in loaded.suite.recipes:
            if r.quant is not None:
                try:
                    ALLOCATORS.get(r.quant.allocation.method)
                except RegistryError as exc:
                    raise SuiteError(f"recipe {r.name!r}: {exc}") from None


def check_recipes_feasible(loaded: LoadedSuite, locations: dict[str, tuple[str, bool]]) -> None:
    """Every quantized recipe's allocation is feasible for its model's MoE layout (read from the local checkpoint's
    config; Hub models are checked once loaded): no statistics needed."""
    from mcmoe_vl.allocation.allocate import check_feasible
    from mcmoe_vl.allocation.budget import AllocationError
    from mcmoe_vl.calibration.workflow import moe_layout

    for m in loaded.suite.models:
        recipes = [r for r in loaded.suite.recipes_for(m) if r.quant is not None]
        loc, local = locations.get(m.name, (m.checkpoint, False))
        if not recipes:
            continue
        layout = moe_layout(loc) if local else None
        for r in recipes:
            where = f"model {m.name!r}, recipe {r.name!r}"
            try:
                if layout is not None:
                    check_feasible(layout, r.quant.allocation)
            except (AllocationError, ValueError) as exc:
                raise SuiteError(f"{where}: {exc}") from None


def preflight(loaded: LoadedSuite, *, check_checkpoints: bool = True) -> dict[str, tuple[str, bool]]:
    """Check the suite against this installation before any long work.

    Returns model name -> (checkpoint path or Hub id, is_local). Raises :class:`SuiteError` on the first problem.
    """
    check_components(loaded)
    locations: dict[str, tuple[str, bool]] = {}
    for m in loaded.suite.models:
        if check_checkpoints:
            loc, local = checkpoint_location(loaded, m)
            if local:
                _check_local_checkpoint(m, Path(loc))
            locations[m.name] = (loc, local)
        else:
            locations[m.name] = (m.checkpoint, False)
    check_tasks(loaded)
    check_calibration_data(loaded)
    check_recipes_feasible(loaded, locations)
    return locations
