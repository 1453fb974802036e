"""Shared fixtures of the bad-input battery: tiny models, written to disk once per module where a case needs a
checkpoint directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))  # tiny_models, test_suite_run helpers
sys.path.insert(0, str(TESTS / "quant"))  # tiny (tiny_mixtral_q)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # battery_helpers

from battery_helpers import save_tiny_mixtral  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("model") / "tiny")
