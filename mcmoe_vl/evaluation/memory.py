"""Peak memory while a block of code runs, measured by the operating system or the device.

::

    with PeakMemory("cpu") as peak:
        evaluate(...)
    peak.bytes, peak.what      # e.g. 912_384_000, "peak resident set of the process (VmHWM)"

CPU (Linux): the kernel's high-water mark of the process's resident set, ``VmHWM`` in ``/proc/self/status``, reset
at entry by writing ``5`` to ``/proc/self/clear_refs``. Where the reset is refused, the peak is the process's peak
since it started (said in ``what``). CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics.
Elsewhere ``bytes`` stays None.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Context manager measuring the peak memory of the block on ``device`` (``cpu``, ``cuda``, ``cuda:1``...)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.bytes: int | None = None
        self.what: str | None = None
        self._reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                _CLEAR_REFS.write_text("5")
                self._reset = True
            except OSError:
                self._reset = False
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.startswith("cuda"):
            import torch

            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.what = f"peak allocated memory on {self.device}"
            return
        self.bytes = _vm_hwm()
        if self.bytes is not None:
            self.what = ("peak resident set of the process (VmHWM)" if self._reset
                         else "peak resident set of the process since it started (VmHWM; reset refused)")
