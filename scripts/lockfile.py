"""The dependency lock (requirements.lock): check a venv against it, or write it from a venv.

    python scripts/lockfile.py check requirements.lock [--quiet-if-empty]
                                                           # exit 0: every locked package installed at its version
    python scripts/lockfile.py write requirements.lock     # from this interpreter's `pip freeze`

Standard library only: it runs in a venv that has nothing installed yet. Used by scripts/setup.sh
(check) and scripts/lock.sh (write).
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
# Every package of the environment the test suite last passed with: scripts/setup.sh installs exactly
# these into .venv (then the harness itself, editable, without dependencies), so the README's two
# commands give the same environment on every fresh machine. `pip install -e .` into your own
# environment uses pyproject.toml's ranges instead.
# Refresh (newest releases the ranges allow, resolved in a scratch venv): bash scripts/lock.sh
# then rerun the suite (bash scripts/test.sh) before committing the new lock.
# Written for Python {python} on {machine}. torch is the CPU build (its local label is left out,
# so `pip install torch==X` takes the wheel this machine keeps on disk).
"""
# Never locked: the installer itself, and the project (installed editable from the checkout).
UNLOCKED = {"pip", "harness"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise SystemExit(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
        pins[normalize(match[1])] = match[2]
    return pins


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def without_local_label(version: str) -> str:
    return version.split("+", 1)[0]


def check(path: Path, quiet_if_empty: bool = False) -> int:
    """0 when every locked package is installed at its locked version (a local label such as
    +cpu is allowed); otherwise 1, listing what differs (nothing for a venv that has none of them
    yet, with ``quiet_if_empty``)."""
    pins, have = read_lock(path), installed()
    wrong = [f"{name} {have.get(name, 'missing')} (lock: {version})" for name, version in sorted(pins.items())
             if without_local_label(have.get(name, "")) != version]
    if wrong and quiet_if_empty and not set(pins) & set(have) - {"setuptools"}:
        return 1
    if wrong:
        print(f"{path}: {len(wrong)} package(s) differ from the lock: " + ", ".join(wrong[:8])
              + (f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""), file=sys.stderr)
        return 1
    return 0


def write(path: Path) -> int:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout
    lines = []
    for line in frozen.splitlines():
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
        if not match:
            raise SystemExit(f"pip freeze gave {line!r}: only NAME==VERSION can be locked (a package installed "
                             "from a folder or a URL?)")
        if normalize(match[1]) in UNLOCKED:
            continue
        lines.append(f"{match[1]}=={without_local_label(match[2])}")
    old = read_lock(path) if path.is_file() else {}
    path.write_text(HEADER.format(python=platform.python_version(), machine=f"{sys.platform} {platform.machine()}")
                    + "\n".join(sorted(lines, key=str.lower)) + "\n")
    new = read_lock(path)
    changed = [f"{n} {old.get(n, '(new)')} -> {v}" for n, v in sorted(new.items()) if old.get(n) != v]
    changed += [f"{n} {v} -> (gone)" for n, v in sorted(old.items()) if n not in new]
    summary = "a new lock" if not old else f"{len(changed)} changed: " + ", ".join(changed) if changed else "unchanged"
    print(f"{path}: {len(new)} packages; {summary}")
    return 0


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--quiet-if-empty"]
    if len(arguments) != 2 or arguments[0] not in ("check", "write"):
        raise SystemExit(__doc__)
    if arguments[0] == "check":
        sys.exit(check(Path(arguments[1]), quiet_if_empty="--quiet-if-empty" in sys.argv))
    sys.exit(write(Path(arguments[1])))
