"""The paths nfknock is configured with: checked before use, created with exact modes.

``path_problem`` says what is wrong with a configured path before the daemon trips
over it at run time (issue 15 C: a NUL byte or a too-long control socket passed
``check`` and crashed ``run``).  ``make_dirs`` creates missing directories with the
mode asked for whatever the process umask is (issue 15 A.5: under ``umask 000``
``mkdir -p`` semantics gave 0777 directories).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

# Linux limits (limits.h, un.h): a path component, a whole path, and the path of a
# Unix socket (sun_path is 108 bytes including the terminating NUL).
NAME_MAX = 255
PATH_MAX = 4095
SUN_PATH_MAX = 107
# Kernel pseudo-filesystems and device nodes: nothing nfknock keeps belongs there.
PSEUDO_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))

PathKind = Literal["file", "state", "socket"]


def path_problem(text: str, resolved: Path, kind: PathKind) -> str | None:
    """What makes ``resolved`` (the configured ``text``, made absolute) unusable
    as a file to read (``file``), a file to replace (``state``) or a Unix socket
    to bind (``socket``); None when it is usable so far as can be told now."""
    if "\0" in text:
        return "contains a NUL byte"
    if not text:
        return "is empty"
    try:
        raw = os.fsencode(resolved)
    except UnicodeError:
        return "cannot be encoded for the filesystem"
    if len(raw) > PATH_MAX:
        return f"is {len(raw)} bytes long, more than the {PATH_MAX} a path may have"
    long = [p for p in resolved.parts if len(os.fsencode(p)) > NAME_MAX]
    if long:
        return f"has a component longer than {NAME_MAX} bytes ({long[0][:40]}...)"
    if kind == "socket" and len(raw) > SUN_PATH_MAX:
        return (
            f"is {len(raw)} bytes long; a Unix socket path must fit in 108 bytes "
            f"(at most {SUN_PATH_MAX} plus the terminating NUL)"
        )
    real = Path(os.path.realpath(resolved))
    for root in PSEUDO_ROOTS:
        if real == root or root in real.parents:
            return f"lies in {root}, a kernel pseudo-filesystem or device directory"
    parent = _parent_problem(resolved)
    if parent:
        return parent
    return _existing_problem(resolved, kind)


def _parent_problem(path: Path) -> str | None:
    """The nearest existing ancestor must be a directory (``/etc/passwd/x``)."""
    for ancestor in path.parents:
        try:
            st = ancestor.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue  # missing: a further ancestor decides
        except OSError:
            return None  # e.g. not searchable by this user: not ours to judge
        if stat.S_ISDIR(st.st_mode):
            return None
        return f"{ancestor} is not a directory"
    return None


def _existing_problem(path: Path, kind: PathKind) -> str | None:
    try:
        st = path.lstat() if kind == "socket" else path.stat()
    except OSError:
        return None  # absent (or unreadable): the file's own reader reports it
    if kind == "socket" and not stat.S_ISSOCK(st.st_mode):
        return "exists and is not a socket (the daemon replaces only an old socket of its own)"
    if kind != "socket" and stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if kind != "socket" and not stat.S_ISREG(st.st_mode):
        return "exists and is not a regular file"
    return None


def make_dirs(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` and its missing parents with exactly ``mode``.

    Existing directories are left as they are (the admin's choice; the trust check
    judges them when a file in them is read).  ``mkdir`` applies the umask, which
    can only remove bits, so the ``chmod`` that follows only ever widens a new
    directory up to ``mode``, never beyond it: there is no window in which it is
    more open than asked."""
    missing = []
    for p in (path, *path.parents):
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            if not p.is_dir():
                raise
            continue  # created by someone else meanwhile: not ours to chmod
        os.chmod(p, mode)
