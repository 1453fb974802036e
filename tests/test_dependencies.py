"""The installed environment is the locked one, and lmms-eval's deliberate gaps are exactly the ones named.

``scripts/setup.sh`` installs ``requirements/lock.txt`` and records its hash in ``<venv>/.installed-from-lock``.
The version check runs only in such an environment (elsewhere, e.g. ``make test-latest``, it is skipped with the
reason); the lmms-eval import check runs everywhere lmms-eval is installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
MARKER = Path(sys.prefix) / ".installed-from-lock"
sys.path.insert(0, str(ROOT / "scripts"))
import pip_check  # noqa: E402


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            pins[_norm(m[1])] = m[2]
    return pins


def _torch_version_in_setup() -> str:
    text = (ROOT / "scripts" / "setup.sh").read_text()
    return re.search(r'^TORCH_VERSION="\$\{TORCH_VERSION:-(.+)\}"$', text, re.M)[1]


def _require_lock_env() -> None:
    if not MARKER.exists():
        pytest.skip(f"this environment ({sys.prefix}) was not installed from the lock (no {MARKER.name}); "
                    "scripts/setup.sh writes it")


def test_lock_is_complete_and_hashed():
    pins = locked_versions()
    assert len(pins) > 50, "the lock should pin the whole dependency set"
    for name in ("transformers", "lm-eval", "lmms-eval", "datasets", "huggingface-hub", "filelock", "accelerate"):
        assert name in pins, f"{name} is not pinned in {LOCK}"
    blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text()) if re.match(r"[A-Za-z0-9]", b)]
    assert all("--hash=sha256:" in b for b in blocks), "every locked package carries its hashes"
    assert "torch" not in pins and not any(n.startswith("nvidia-") for n in pins), \
        "torch and CUDA libraries are installed apart (TORCH_INDEX_URL), never from the lock"
    assert "torchvision" not in pins


def test_installed_versions_equal_the_lock():
    _require_lock_env()
    recorded = MARKER.read_text().split()[0]
    current = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    differ = []
    for name, version in sorted(locked_versions().items()):
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            differ.append(f"{name}: locked {version}, not installed")
            continue
        if installed != version:
            differ.append(f"{name}: locked {version}, installed {installed}")
    torch_version = md.version("torch").split("+")[0]
    if torch_version != _torch_version_in_setup():
        differ.append(f"torch: setup.sh installs {_torch_version_in_setup()}, installed {torch_version}")
    hint = "" if recorded == current else " (the lock changed since this environment was installed: run make setup)"
    assert not differ, "installed versions differ from requirements/lock.txt" + hint + ":\n  " + "\n  ".join(differ)


def test_pip_check_lists_only_the_named_exceptions():
    _require_lock_env()
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "pip_check.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_pip_check_filter_refuses_anything_unnamed():
    absent = {"torchvision", "openai"}
    report = "\n".join([
        "lmms-eval 0.7.3 requires torchvision, which is not installed.",
        "lmms-eval 0.7.3 requires openai, which is not installed.",
        "lmms-eval 0.7.3 requires loguru, which is not installed.",
        "lm-eval 0.4.13 requires torchvision, which is not installed.",
        "transformers 5.24.0 has requirement tokenizers<0.24, but you have tokenizers 0.25.0.",
    ])
    assert pip_check.unexpected(report, absent) == report.splitlines()[2:]
    assert pip_check.unexpected("No broken requirements found.", absent) == []


def _lmms_eval_requirements() -> set[str]:
    reqs = set()
    for r in md.requires("lmms-eval") or []:
        if "extra ==" in r:
            continue
        reqs.add(_norm(re.match(r"[A-Za-z0-9_.\-]+", r)[0]))
    return reqs


_PROBE = """
import importlib.metadata as md, json, sys
before = set(sys.modules)
from lmms_eval import evaluator
from lmms_eval.api.model import lmms
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.tasks import TaskManager
import lmms_eval.evaluator as ev
ev._enable_reentrant_filelocks()
tm = TaskManager(include_path=sys.argv[1])
tm.load_task_or_group(["mcmoe_vqa_colour", "mcmoe_vqa_colour_mc"])
dists = md.packages_distributions()
loaded = {d for m in set(sys.modules) - before for d in dists.get(m.split(".")[0], [])}
print(json.dumps(sorted(loaded)))
"""


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed")
def test_lmms_eval_code_paths_import_exactly_the_declared_packages():
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT / "tasks" / "lmms_eval")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = {_norm(d) for d in json.loads(out.stdout.strip().splitlines()[-1])}
    absent = pip_check.deliberately_absent()
    assert not loaded & absent, f"imported but declared absent in scripts/lmms-eval-absent.txt: {loaded & absent}"
    declared = {_norm(line.split("#")[0].strip()) for line in (ROOT / "scripts" / "lmms-eval-deps.txt").read_text()
                .splitlines() if line.split("#")[0].strip()}
    assert declared <= loaded, f"scripts/lmms-eval-deps.txt lists packages these paths never import: {declared - loaded}"
    # Every lmms-eval requirement is either absent on purpose or installed (declared here or a dependency of ours).
    undecided = {r for r in _lmms_eval_requirements() - absent if importlib.util.find_spec(r.replace("-", "_")) is None
                 and not _installed(r)}
    assert not undecided, f"lmms-eval requirements neither installed nor named absent: {undecided}"


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False
