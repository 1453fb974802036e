"""Fixtures shared by the quantization tests."""

from native_lib import native_lib  # noqa: F401 - the built (or test-built) native kernel library
