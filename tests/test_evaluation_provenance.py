"""Peak-memory measurement and the provenance block of results files."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from mcmoe_vl.evaluation.memory import PeakMemory
from mcmoe_vl.evaluation.provenance import lock_fingerprint, provenance


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_sees_a_block_allocation_and_is_reset_between_blocks() -> None:
    with PeakMemory("cpu") as quiet:
        pass
    with PeakMemory("cpu") as busy:
        a = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, written
        a[::4096] = 2
        del a
    with PeakMemory("cpu") as after:
        pass
    assert quiet.bytes is not None and busy.bytes is not None and after.bytes is not None
    assert busy.bytes - quiet.bytes > 48 << 20  # the 64 MiB block shows in the peak
    if after.what == "peak resident set of the process (VmHWM)":  # the reset was allowed
        assert after.bytes < busy.bytes - (32 << 20)


def test_lock_hash_is_recorded_or_null(tmp_path: Path) -> None:
    assert lock_fingerprint(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("torch==2.13.0\n")
    loose = lock_fingerprint(tmp_path)
    assert loose == {"path": "requirements.txt", "sha256": hashlib.sha256(b"torch==2.13.0\n").hexdigest()}
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "lock.txt").write_text("torch==2.13.0 --hash=sha256:abc\n")
    assert lock_fingerprint(tmp_path)["path"] == "requirements/lock.txt"  # the exact lock wins
    p = provenance(command="mcmoe-vl run", seeds=[0, 1, 2], root=tmp_path)
    assert p["lock"]["path"] == "requirements/lock.txt" and p["seeds"] == [0, 1, 2]
    assert p["command"] == "mcmoe-vl run" and p["cpu"] and p["python"].count(".") == 2
