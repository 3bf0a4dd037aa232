"""The log lines of several processes sharing one stdout (a supervisor's workers)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import structlog

from nfknock import logs

WRITER = """
import sys
import structlog
from nfknock import logs
logs.configure("info", "json")
log = structlog.get_logger("nfknock")
for i in range(int(sys.argv[2])):
    log.info("worker_started", worker=int(sys.argv[1]), n=i, pad="x" * 200)
"""


def test_processes_sharing_an_unbuffered_stdout_never_tear_each_others_lines(
    tmp_path: Path,
) -> None:
    # As under the supervisor: one file opened O_APPEND (nfknock.netlab, or the
    # journal's socket), inherited by every worker; PYTHONUNBUFFERED=1 as in many
    # unit files.  print() wrote the message and its newline in two writes, and a
    # sibling's line landed between them.
    path = tmp_path / "daemon.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines = 3000
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(lines)], stdout=fd, env=env)
            for i in range(3)
        ]
        assert [p.wait(60) for p in procs] == [0, 0, 0]
    finally:
        os.close(fd)
    text = path.read_text()
    events = [json.loads(line) for line in text.splitlines()]  # each line one whole object
    assert len(events) == 3 * lines and text.endswith("\n")
    assert sorted({e["worker"] for e in events}) == [0, 1, 2]


def test_a_stream_without_a_file_descriptor_gets_whole_lines() -> None:
    out = io.StringIO()
    before = structlog.get_config()
    logs.configure("debug", "json", stream=out)
    try:
        structlog.get_logger("nfknock").warning("one", src="198.51.100.7")
        structlog.get_logger("nfknock").debug("two")
    finally:
        structlog.configure(**before)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["event"], first["level"], first["src"]) == ("one", "warning", "198.51.100.7")
    assert (second["event"], second["level"]) == ("two", "debug")
