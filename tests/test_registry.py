"""The registry behind every extension point, the adapter registry, entry-point plugins and the CLI listing."""

from __future__ import annotations

from importlib import metadata

import pytest

from mcmoe_vl.cli import main
from mcmoe_vl.registry import Registry, RegistryError
from model_adapters import ADAPTERS, get_adapter


def test_duplicate_names_raise_and_misses_suggest():
    reg: Registry = Registry("widget")
    reg.register("alpha", 1)
    reg.register("alpha", 1)  # the same object again is harmless
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha", 2)
    with pytest.raises(RegistryError) as exc:
        reg.get("alpah")
    assert "registered: alpha" in str(exc.value) and "Did you mean 'alpha'" in str(exc.value)


def test_unknown_model_type_lists_registered_and_says_how_to_add():
    with pytest.raises(RegistryError) as exc:
        get_adapter("mixtrl")
    msg = str(exc.value)
    for name in ("mixtral", "deepseek_v2", "deepseek_v3", "qwen3_moe"):
        assert name in msg
    assert "Did you mean 'mixtral'" in msg
    assert "MoEAdapter" in msg and "mcmoe_vl.adapters" in msg and "docs/adapters.md" in msg


def test_model_without_model_type_is_a_clear_error():
    class NoConfig:
        pass

    with pytest.raises(ValueError, match="model_type"):
        get_adapter(NoConfig())


def test_entry_point_plugins_are_loaded(monkeypatch):
    class FakeEP:
        name = "toy_moe"
        value = "toy_pkg:ToyAdapter"

        def load(self):
            return "TOY"

    real = metadata.entry_points

    def fake(**kw):
        if kw.get("group") == "toy.group":
            return [FakeEP()]
        return real(**kw)

    monkeypatch.setattr(metadata, "entry_points", fake)
    reg: Registry = Registry("toy", entry_point_group="toy.group")
    assert reg.get("toy_moe") == "TOY"
    assert "toy_moe" in reg.names()


def test_cli_lists_adapters(capsys):
    assert main(["adapters"]) == 0
    out = capsys.readouterr().out
    for name in ADAPTERS.names():
        assert name in out


def test_qwen3_moe_arrives_through_its_entry_point_like_a_plugin():
    eps = {ep.name: ep for ep in metadata.entry_points(group="mcmoe_vl.adapters")}
    assert "qwen3_moe" in eps, "the project's own entry point is not installed (re-run the set-up)"
    assert eps["qwen3_moe"].load() is ADAPTERS.get("qwen3_moe")
