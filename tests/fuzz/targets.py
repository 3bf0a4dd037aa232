"""The input files the fuzzing tier damages, and how each is read.

Hook for more files: append a :class:`FileTarget` to ``FILE_TARGETS``.  ``prepare``
writes a complete valid set-up into an empty directory and returns the file to
damage; ``read`` reads the set-up back the way nfknock does and returns an exit
code.  Every mutant must give one of ``exit_codes``, never an exception.  The state
file is meant to come next (its store is being replaced): prepare a config whose
``[state] path`` is in the directory plus a saved state, and read it with the new
store's loader, mapping its error type to exit 2.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nfknock.cli import main as nfknock_main
from nfknock.sequence import format_base32

SECRET = format_base32(bytes(range(32)))

CONFIG = """\
[queue]
number = 0
max_len = 8192
[knock]
scheme = "v1"
port_min = 1024
port_max = 33791
length = 32
step_seconds = 30
skew_steps = 1
realm = "fuzz"
sequence_timeout = 10.0
reorder_window = 4
stray_budget = 32
exclude = [8080]
[door]
open_seconds = 30
max_connections = 1
[[protect]]
port = 22
[[protect]]
port = 2222
address = "198.51.100.20"
[[allow]]
network = "203.0.113.0/24"
ports = [22]
[limits]
max_sources = 65536
max_grants = 65536
[spa]
ports = [62201]
[state]
path = "{dir}/state.json"
[users]
file = "users.toml"
[control]
socket = "{dir}/ctl.sock"
[log]
level = "info"
format = "json"
"""

USERS = f"""\
[users.alice]
secret = "{SECRET}"
ports = [22]
enabled = true
[users.rs]
scheme = "totp-knockd-rs"
secret_utf8 = "correct horse battery staple"
port_min = 2000
port_max = 2999
length = 8
[users.hotp]
scheme = "kommen"
secret = "DefaultSecretKey"
counter = 1
[users.old]
scheme = "livingstone"
secret = "GEZDGNBVGY3TQOJQ"
enabled = false
"""


def write_setup(tmp: Path) -> Path:
    """A valid config and users file in ``tmp``; returns the config."""
    users = tmp / "users.toml"
    users.write_text(USERS)
    users.chmod(0o600)
    config = tmp / "nfknock.toml"
    config.write_text(CONFIG.format(dir=tmp))
    config.chmod(0o600)
    return config


def run_quietly(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr).  argparse's exit is
    an exit code; any other exception propagates (that is a traceback)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def check(tmp: Path) -> int:
    return run_quietly(nfknock_main, ["check", "--config", str(tmp / "nfknock.toml")])[0]


@dataclass(frozen=True)
class FileTarget:
    name: str
    prepare: Callable[[Path], Path]
    read: Callable[[Path], int]
    exit_codes: frozenset[int] = frozenset({0, 2})


FILE_TARGETS = [
    FileTarget("config", write_setup, check),
    FileTarget("users", lambda tmp: write_setup(tmp).with_name("users.toml"), check),
]
