"""One small registry class, one instance per extension point.

Model adapters (keyed by the Hugging Face ``model_type``), allocators, routers and evaluation backends are all
registered in a :class:`Registry`. Registering a name twice raises; looking up a missing name raises with the
registered names and the closest matches. Third parties register through a Python entry-point group::

    # pyproject.toml of a plugin package
    [project.entry-points."mcmoe_vl.adapters"]
    my_moe = "my_package.adapter:MyMoEAdapter"

Example::

    ALLOCATORS = Registry("allocator")

    @ALLOCATORS.register("uniform")
    def uniform(...): ...

    ALLOCATORS.get("uniform")
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryError(KeyError):
    """A name is missing from, or already present in, a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name -> object map that refuses duplicates and explains misses.

    ``kind`` names the extension point in messages ("model adapter", "allocator", ...). ``entry_point_group``,
    when given, is loaded lazily on the first lookup so that installed plugins appear without an import.
    ``how_to_add`` is appended to miss messages.
    """

    def __init__(self, kind: str, *, entry_point_group: str | None = None, how_to_add: str = "") -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.how_to_add = how_to_add
        self._items: dict[str, T] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def _add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered ({self._items[name]!r}); "
                    f"pick another name or unregister the existing one first"
                )
            self._items[name] = o
            return o

        return _add if obj is None else _add(obj)

    def unregister(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._items:
            raise self._miss(name)
        return self._items.pop(name)

    def get(self, name: str) -> T:
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            raise self._miss(name) from None

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load_entry_points()
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, T]]:
        self._load_entry_points()
        return sorted(self._items.items())

    def _miss(self, name: str) -> RegistryError:
        known = sorted(self._items)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        msg = f"unknown {self.kind} {name!r}; registered: {', '.join(known) or '(none)'}"
        if close:
            msg += f". Did you mean {' or '.join(repr(c) for c in close)}?"
        if self.how_to_add:
            msg += f" {self.how_to_add}"
        return RegistryError(msg)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group or ""):
            if ep.name in self._items:
                continue  # an in-tree registration of the same object wins; a conflicting one raised already
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not hide the others; say which one and why
                log.warning("could not load %s plugin %r from %s: %s", self.kind, ep.name, ep.value, exc)
                continue
            self.register(ep.name, obj)
