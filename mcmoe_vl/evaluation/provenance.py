"""Where a results file came from: the dependency lock, the hardware, the seeds and the command.

::

    provenance(command="mcmoe-vl run", seeds=[0, 1, 2])
    # {"lock": {"path": "requirements/lock.txt", "sha256": "..."} or None, "cpu": "AMD EPYC ...", "gpu": None,
    #  "python": "3.11.7", "platform": "Linux-...", "seeds": [0, 1, 2], "command": "mcmoe-vl run"}

The lock is the first file found, in the project root (the directory above the package), among
:data:`LOCK_CANDIDATES`; none found is recorded as ``None``, not guessed. The torch and harness versions are in the
results file's ``software`` block.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

# In order of preference: an exact lock before a loose requirements file.
LOCK_CANDIDATES = ("requirements/lock.txt", "requirements.lock", "requirements-lock.txt", "uv.lock", "poetry.lock",
                   "pdm.lock", "requirements/requirements.txt", "requirements.txt")


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def lock_fingerprint(root: str | os.PathLike[str] | None = None) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of the project's dependency lock, or None when there is none."""
    base = Path(root) if root is not None else project_root()
    for rel in LOCK_CANDIDATES:
        p = base / rel
        if p.is_file():
            return {"path": rel, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}))
    except Exception:  # noqa: BLE001 - a broken driver must not stop an evaluation from being recorded
        return None
    return None


def provenance(*, command: str | None, seeds: list[int], root: str | os.PathLike[str] | None = None
               ) -> dict[str, Any]:
    """The provenance block of a results file (see the module docstring)."""
    return {"lock": lock_fingerprint(root), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": gpu_model(),
            "python": platform.python_version(), "platform": platform.platform(), "seeds": list(seeds),
            "command": command if command is not None else " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
