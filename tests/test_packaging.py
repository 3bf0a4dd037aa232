"""An installed wheel, not the checkout (issue 15 D): build it, install it into a
fresh virtualenv and run the commands an admin runs first.

pip builds the wheel (its build isolation and cache; no other tool) and installs it
into a venv created without pip of its own (``pip --python``), which keeps this test
to a few seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# Not copied: what a checkout accumulates (git, venv, caches, build output).
LOCAL = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def source_copy(dest: Path) -> Path:
    """The checkout's sources: building in place would leave build/ and egg-info
    behind in the worktree.  (No git needed: a fresh Debian has none.)"""
    shutil.copytree(ROOT, dest, ignore=LOCAL)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh venv holding only the built wheel and its
    dependencies."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_copy(tmp / "src")
    pip = [sys.executable, "-m", "pip"]
    run(*pip, "wheel", "--no-deps", "-q", "-w", tmp / "dist", src, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("nfknock-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", tmp / "venv", cwd=tmp)
    venv_python = tmp / "venv" / "bin" / "python"
    run(*pip, "--python", venv_python, "install", "-q", wheel, cwd=tmp)
    return tmp / "venv" / "bin"


def test_installed_wheel_has_both_commands_with_versions(installed: Path, tmp_path: Path) -> None:
    from nfknock import __version__

    assert run(installed / "nfknock", "--version", cwd=tmp_path).stdout.strip() == (
        f"nfknock {__version__}"
    )
    out = run(installed / "nfknock-client", "--version", cwd=tmp_path).stdout.strip()
    assert out == f"nfknock-client {__version__}"


def checkout_packages() -> list[str]:
    """Every package of the checkout (a directory with ``__init__.py``), dotted."""
    found = []
    for top in (ROOT, ROOT / "client"):
        for init in top.glob("nfknock*/**/__init__.py"):
            found.append(".".join(init.parent.relative_to(top).parts))
    return sorted(found)


def test_installed_wheel_holds_every_subpackage(installed: Path, tmp_path: Path) -> None:
    packages = checkout_packages()
    assert {"nfknock.netlab", "nfknock.spa", "nfknock.store", "nfknock_client"} <= set(packages)
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print(importlib.import_module(name).__file__)\n"
    )
    files = run(installed / "python", "-c", code, *packages, cwd=tmp_path).stdout.split()
    assert len(files) == len(packages)
    venv = installed.parent
    assert all(Path(f).is_relative_to(venv) for f in files), files  # not the checkout


def test_installed_wheel_initialises_and_checks_a_config(installed: Path, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "nfknock.toml"
    init: list[str | Path] = [installed / "nfknock", "init", "--config", config]
    run(*init, "--state", tmp_path / "state.json", "--socket", tmp_path / "c.sock", cwd=tmp_path)
    assert "OK" in run(installed / "nfknock", "check", "--config", config, cwd=tmp_path).stdout
