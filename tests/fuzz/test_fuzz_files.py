"""Damaged config and users files: ``nfknock check`` exits 0 or 2, never raises.

Issue 15 C: 103 of 2,000 mutated configs gave a RecursionError traceback.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .conftest import budget
from .mutate import mutated
from .targets import FILE_TARGETS, FileTarget

FUZZ = budget(500)


@pytest.mark.parametrize("target", FILE_TARGETS, ids=lambda t: t.name)
def test_the_seed_of_each_target_is_valid(target: FileTarget, tmp_path: Path) -> None:
    target.prepare(tmp_path)
    assert target.read(tmp_path) == 0  # the mutants start from a file that passes


@pytest.mark.parametrize("target", FILE_TARGETS, ids=lambda t: t.name)
@FUZZ
@given(data=st.data())
def test_a_damaged_file_gets_an_exit_code_not_a_traceback(
    target: FileTarget, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory(prefix="nfknock-fuzz-") as tmp:
        path = target.prepare(Path(tmp))
        path.write_bytes(data.draw(mutated(path.read_bytes()), label=target.name))
        assert target.read(Path(tmp)) in target.exit_codes
