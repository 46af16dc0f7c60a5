"""requirements.lock: what scripts/setup.sh installs, so every fresh machine runs the suite in the
same environment; pyproject.toml's ranges must admit it."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import lockfile  # noqa: E402  (scripts/lockfile.py: standard library only)

LOCK = ROOT / "requirements.lock"


def test_every_direct_dependency_is_locked_at_a_version_its_range_admits():
    pins = lockfile.read_lock(LOCK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    build = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]]
    for requirement in requirements + build:
        name = lockfile.normalize(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK.name}"
        assert requirement.specifier.contains(pins[name]), \
            f"{LOCK.name} pins {name}=={pins[name]}, outside {requirement}"
    assert "+" not in pins["torch"], "torch without its local label: `pip install torch==X` takes this disk's CPU wheel"
    assert not {"pip", "harness"} & set(pins)


def test_the_suite_runs_in_the_locked_environment():
    check = subprocess.run([sys.executable, str(ROOT / "scripts/lockfile.py"), "check", str(LOCK)],
                           capture_output=True, text=True)
    assert check.returncode == 0, f"{check.stderr} -- run bash scripts/setup.sh (the README's test command does)"


def test_the_check_names_each_package_that_differs(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# a comment\ntorch==0.0.1\nno-such-package==1.0\n")
    check = subprocess.run([sys.executable, str(ROOT / "scripts/lockfile.py"), "check", str(lock)],
                           capture_output=True, text=True)
    assert check.returncode == 1
    assert "2 package(s) differ" in check.stderr and "(lock: 0.0.1)" in check.stderr
    assert "no-such-package missing (lock: 1.0)" in check.stderr
    lock.write_text("torch>=2\n")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/lockfile.py"), "check", str(lock)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and f"{lock}:1: expected NAME==VERSION, got 'torch>=2'" in bad.stderr
