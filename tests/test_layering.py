"""Dependencies point one way: the expert-interface primitives (``mcmoe_vl/moe``) and the algorithms never import
the model adapters; the caller resolves the adapter once and passes it (or an ``ExpertInterface``) in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mcmoe_vl"

# Algorithm modules: every module of the algorithm packages except their workflows. They receive an interface or
# an adapter from their caller (quantize_model and save_quantized require one); the workflow modules
# (pruning/workflow.py, allocation/workflow.py, quant/workflow.py), api.py, calibration/, suite/, hf/, export/ and
# evaluation/ may resolve it.
ALGORITHM_PACKAGES = ("pruning", "allocation", "quant")
ALGORITHM_MODULES = sorted(str(p.relative_to(PACKAGE)) for pkg in ALGORITHM_PACKAGES for p in (PACKAGE / pkg).glob("*.py")
                           if p.name != "workflow.py")


def adapter_imports(tree: ast.AST) -> list[int]:
    """Line numbers where ``tree`` imports ``model_adapters``, at any depth (module level, functions,
    ``TYPE_CHECKING`` blocks) and by ``importlib.import_module`` / ``__import__`` with a literal name."""
    lines = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        if any(n == "model_adapters" or n.startswith("model_adapters.") for n in names):
            lines.append(node.lineno)
    return lines


def _moe_modules() -> list[Path]:
    return sorted(PACKAGE.joinpath("moe").rglob("*.py"))


@pytest.mark.parametrize("snippet, found", [
    ("import model_adapters", [1]),
    ("def f():\n    from model_adapters import get_adapter\n    return get_adapter", [2]),
    ("if TYPE_CHECKING:\n    from model_adapters.base import MoEAdapter", [2]),
    ("import importlib\nm = importlib.import_module('model_adapters.mixtral')", [2]),
    ("from mcmoe_vl.moe import ExpertInterface\nimport model_adaptersx\n'model_adapters'", []),
])
def test_the_scan_finds_adapter_imports_wherever_they_are(snippet, found):
    assert adapter_imports(ast.parse(snippet)) == found


def test_the_scanned_modules_exist():
    moe = {p.name for p in _moe_modules()}
    assert {"interface.py", "layer.py", "routing.py", "storage.py", "layerwise.py"} <= moe
    assert {"quant/model.py", "quant/saving.py", "quant/loading.py", "pruning/odp.py", "allocation/plus.py"} <= \
        set(ALGORITHM_MODULES)
    missing = [m for m in ALGORITHM_MODULES if not (PACKAGE / m).is_file()]
    assert not missing, f"listed algorithm modules not found: {missing}"


@pytest.mark.parametrize("path", _moe_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_the_expert_interface_never_imports_the_adapters(path):
    lines = adapter_imports(ast.parse(path.read_text(encoding="utf-8")))
    assert not lines, f"{path.relative_to(ROOT)} imports model_adapters at line(s) {lines}; take the adapter as an " \
                      "argument instead"


@pytest.mark.parametrize("module", ALGORITHM_MODULES)
def test_algorithms_take_the_adapter_from_their_caller(module):
    path = PACKAGE / module
    lines = adapter_imports(ast.parse(path.read_text(encoding="utf-8")))
    assert not lines, f"mcmoe_vl/{module} imports model_adapters at line(s) {lines}; take an ExpertInterface or " \
                      "the adapter as an argument instead"


def test_importing_the_interface_and_the_algorithms_loads_no_adapter():
    # the transitive check: an import chain through another module would escape the per-file scan
    mods = ["mcmoe_vl.moe", "mcmoe_vl.moe.layerwise", "mcmoe_vl.moe.fused", "mcmoe_vl.moe.checks"]
    mods += ["mcmoe_vl." + m[:-3].replace("/", ".").removesuffix(".__init__") for m in ALGORITHM_MODULES]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'model_adapters'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
