"""Whether a file nfknock reads could have been written by someone else.

A config or users file decides who may open the protected ports, so it is only as
safe as the least protected step on its way from ``/``: the file itself, every
directory above it (whoever can write a directory can rename the file away and put
their own in its place -- the issue 15 A.5 attack: an unprivileged user swapped in
their own 0600 ``users.toml``) and every symbolic link on the way.  The rules
(the same as OpenSSH's ``StrictModes`` and sudo's for sudoers):

* every entry on the path -- directory, link, the file -- is owned by root or by
  the user running nfknock (the daemon runs as root; a dedicated account may own
  its own files);
* no directory on the path is writable by group or others, unless it has the
  sticky bit (like ``/tmp``): there only an entry's owner may rename or delete it,
  and the entries below are owned by root or us (checked above);
* the file is not writable by group or others; a secrets file is not readable by
  them either.

Both the path as given and its resolved form are checked, so a link and the place
it points to must both be safe.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path


class UntrustedFile(Exception):
    """A file or a directory on its path that someone else could change."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _running_user() -> str:
    euid = os.geteuid()
    return "root" if euid == 0 else _owner(euid)


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def check_trusted(path: Path, *, secret: bool) -> None:
    """Raise :class:`UntrustedFile` unless only root (or the running user) can
    have written ``path``; ``secret``: others must not read it either.  A missing
    or unreadable file is not this check's business: its reader says why."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return
    # Not os.path.abspath: it drops "link/.." lexically, skipping the link.
    absolute = path.absolute()
    real = Path(os.path.realpath(path))
    try:
        entries = _entries(absolute, real)
    except OSError as exc:
        raise UntrustedFile(path, f"cannot be checked: {exc}") from None
    for entry, lst in entries:
        itself = entry in (absolute, real)
        if not _trusted(lst.st_uid):
            where = "" if itself else f"{entry}: a directory above it is "
            raise UntrustedFile(
                path,
                f"{where}owned by {_owner(lst.st_uid)}, not by root or the user "
                f"running nfknock ({_running_user()}); whoever owns it decides who "
                f"may knock. Fix: chown root {entry} (and find out who changed it)",
            )
        if itself or stat.S_ISLNK(lst.st_mode):
            continue
        if lst.st_mode & 0o022 and not lst.st_mode & stat.S_ISVTX:
            raise UntrustedFile(
                path,
                f"{entry}: a directory above it is writable by group or others "
                f"(mode {stat.S_IMODE(lst.st_mode):04o}, owner {_owner(lst.st_uid)}): "
                f"whoever can write it can replace {path.name}. Fix: chmod go-w {entry}",
            )
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedFile(path, "is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if secret and mode & 0o066:
        raise UntrustedFile(
            path,
            f"holds secrets but has mode {mode:04o}; it must not be readable or writable "
            f"by group or others. Fix: chmod 600 {path}",
        )
    if mode & 0o022:
        raise UntrustedFile(
            path,
            f"writable by group or others (mode {mode:04o}): anyone who can write it "
            f"decides who may knock. Fix: chmod go-w {path}",
        )


def _entries(absolute: Path, real: Path) -> list[tuple[Path, os.stat_result]]:
    """(entry, lstat) for the file and every directory above it, on the path as
    given and on its resolved form, the file first.  Entries that are not links
    are directories here (the parents of a file), so lstat tells their mode."""
    seen: dict[Path, os.stat_result] = {}
    for p in (absolute, *absolute.parents, real, *real.parents):
        if p not in seen:
            seen[p] = p.lstat()
    return list(seen.items())
