"""Run ``pip check`` in this interpreter's environment and fail on anything but the deliberate exceptions.

The exceptions are lmms-eval's declared dependencies listed in ``scripts/lmms-eval-absent.txt`` (lmms-eval is
installed without dependencies; that file says why each one is left out). Exit 0 when clean apart from those,
1 otherwise, naming each unexpected line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ABSENT_FILE = Path(__file__).with_name("lmms-eval-absent.txt")
_MISSING = re.compile(r"^(?P<pkg>\S+) \S+ requires (?P<req>[A-Za-z0-9_.\-]+), which is not installed\.$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def deliberately_absent() -> set[str]:
    names = set()
    for line in ABSENT_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_norm(line))
    return names


def unexpected(report: str, absent: set[str]) -> list[str]:
    """Lines of a ``pip check`` report that are not a deliberately absent lmms-eval dependency."""
    bad = []
    for line in report.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        m = _MISSING.match(line)
        if m and _norm(m["pkg"]) == "lmms-eval" and _norm(m["req"]) in absent:
            continue
        bad.append(line)
    return bad


def main() -> int:
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    bad = unexpected(out.stdout + out.stderr, deliberately_absent())
    if bad:
        print("pip check: unexpected problems (not in scripts/lmms-eval-absent.txt):", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"pip check: clean apart from {len(deliberately_absent())} deliberately absent lmms-eval dependencies "
          "(scripts/lmms-eval-absent.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
