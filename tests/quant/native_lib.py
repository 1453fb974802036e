"""The native kernel library for tests: the built one, or one built into a temporary directory (never skipped on
a machine with a C compiler)."""

import shutil

import pytest

from mcmoe_vl.quant import native


@pytest.fixture(scope="session")
def native_lib(tmp_path_factory):
    if native.load() is None:
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            pytest.skip("no C compiler: the native kernels cannot be built here")
        d = tmp_path_factory.mktemp("native")
        native.build(d)
        assert native.use(d) is not None
    return native.load()


def isas(lib) -> list[native.Isa]:
    """Every path this CPU runs, the scalar fallback included."""
    return [i for i in native.Isa if i <= lib.mq_cpu_isa()]
