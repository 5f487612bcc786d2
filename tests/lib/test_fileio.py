"""Atomic text writes and the argparse converters."""

import argparse
import os
import stat

import pytest

from lib import fileio
from lib.argtypes import non_negative_float, non_negative_int, positive_int, probability


def test_write_text_atomic_creates_folder(tmp_path):
    path = fileio.write_text_atomic(tmp_path / "a" / "b.txt", "hello\n")
    assert path.read_text() == "hello\n"
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]


def test_write_text_atomic_uses_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        path = fileio.write_text_atomic(tmp_path / "shared.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_text("old")

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize(
    "convert,text,message",
    [
        (positive_int, "0", "must be at least 1, got 0"),
        (non_negative_int, "-1", "must be 0 or more, got -1"),
        (non_negative_float, "-0.5", "must be 0 or more, got -0.5"),
        (probability, "1.5", "must be between 0 and 1, got 1.5"),
    ],
)
def test_converters_reject_out_of_range(convert, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        convert(text)


def test_converters_accept_bounds():
    assert positive_int("1") == 1
    assert non_negative_int("0") == 0
    assert non_negative_float("0") == 0.0
    assert probability("0") == 0.0
    assert probability("1") == 1.0
