"""Shared CLI pieces: plain-text help with defaults shown, and the context-length clamp."""

from __future__ import annotations

import argparse
import copy
import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(doc: str | None) -> str:
    """A docstring as plain text: Sphinx roles (:func:`x`) and literals (``x``) lose their markup."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", doc or ""))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (examples keep their layout); each option's default appended to its help unless
    the help already states one or there is none to state."""

    @staticmethod
    def _default(action: argparse.Action) -> str | None:
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or not action.option_strings
                or "default" in (action.help or "")):
            return None
        return " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._default(action) is not None:
            action = copy.copy(action)
            action.help = f"(default: {self._default(action).replace('%', '%%')})"  # argparse shows no help line
            # (hence no default) for an option without help
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text, shown = (action.help or "").strip(), self._default(action)
        if shown is None:
            return text
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


def help_style(doc: str | None) -> dict[str, Any]:
    """Keyword arguments for ``add_parser``: the module docstring as plain text, with :class:`HelpFormatter`."""
    return {"description": plain(doc), "formatter_class": HelpFormatter}


def examples(doc: str | None) -> list[str]:
    """The command lines shown in a help text (indented lines starting with ``mcmoe-vl``)."""
    return [ln.strip() for ln in plain(doc).splitlines()
            if ln[:1] in (" ", "\t") and ln.strip().startswith("mcmoe-vl ")]


def seq_len_for(model_dir: str, seq_len: int, data: str | None = None) -> int:
    """``--seq-len`` clamped to the model's maximum (with a warning); a token-ids ``data`` file whose sequences
    exceed the maximum is refused here, before any work."""
    from mcmoe_vl.calibration.limits import check_ids_file, clamp_seq_len

    if data is not None:
        check_ids_file(data, model_dir)
    return clamp_seq_len(model_dir, seq_len)
