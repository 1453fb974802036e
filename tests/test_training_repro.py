"""The committed training log is reproducible: rerunning the Mixtral training script from the committed seed gives the
first steps' losses bit for bit (the log records them with ``repr``), on the same corpus, with the logged thread
count, MKL code path and torch kernel level (the script runs in a fresh process, since MKL reads ``MKL_CBWR`` when it initialises)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "training" / "logs" / "mixtral_tiny.log"
_EXACT = re.compile(r"exact step (\d+) loss (\S+) ce (\S+)")
_ENV = re.compile(r" threads (\d+) MKL_CBWR (\S+) aten (\S+)")


def _exact_steps(text: str) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = {}
    for m in _EXACT.finditer(text):
        out.setdefault(int(m.group(1)), (m.group(2), m.group(3)))  # the first run's, not a resumed stage's
    return out


def _logged_corpus(text: str) -> dict:
    line = next(ln for ln in text.splitlines() if " corpus {" in ln)
    return json.loads(line.split(" corpus ", 1)[1])


@pytest.mark.slow
def test_first_steps_reproduce_bit_for_bit(tmp_path):
    text = LOG.read_text(encoding="utf-8")
    logged = _exact_steps(text)
    assert len(logged) >= 3
    args = json.loads(next(ln for ln in text.splitlines() if " args {" in ln).split(" args ", 1)[1])
    from mcmoe_vl.data.corpus import build_corpus

    corpus = ROOT / ".cache" / "corpus"
    manifest = json.loads((corpus / "manifest.json").read_text()) if (corpus / "manifest.json").exists() \
        else build_corpus(corpus)
    if manifest["splits"]["train"]["sha256"] != _logged_corpus(text)["splits"]["train"]["sha256"]:
        pytest.skip("this environment's packages give another corpus than the logged one (not the locked set)")
    env_line = _ENV.search(text)
    assert env_line, "the log records the thread count and MKL code path"
    threads, cbwr, aten = env_line.groups()
    import torch

    here = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]  # torch's x86 dispatch levels; ATEN_CPU_CAPABILITY can lower, not raise
    if here != aten and not (here in order and aten in order and order.index(aten) < order.index(here)):
        pytest.skip(f"torch dispatches {here} kernels here, the log {aten}")
    log = tmp_path / "repro.log"
    cmd = [sys.executable, str(ROOT / "training" / "train_mixtral_tiny.py"), "--corpus", str(corpus),
           "--checkpoint", str(tmp_path / "state.pt"), "--out", str(tmp_path / "out"), "--log", str(log),
           "--steps", str(args["steps"]), "--batch", str(args["batch"]), "--seq-len", str(args["seq_len"]),
           "--lr", str(args["lr"]), "--warmup", str(args["warmup"]), "--aux-coef", str(args["aux_coef"]),
           "--seed", str(args["seed"]), "--stop-step", "3", "--exact-steps", "3"]
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_CBWR=cbwr, ATEN_CPU_CAPABILITY=aten.lower())
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=900)
    rerun = _exact_steps(log.read_text(encoding="utf-8"))
    assert rerun == {k: logged[k] for k in (1, 2, 3)}, (rerun, logged)
    assert (tmp_path / "state.pt").exists() and not (tmp_path / "out").exists()  # a stage stop saves no model
