"""Atomic text writes, the checks of write locations, and the argparse converters."""

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


def test_write_text_atomic_uses_umask_mode(tmp_path, monkeypatch):
    # The umask is read once, at import; the test sets the value that it would have read.
    monkeypatch.setattr(fileio, "_UMASK", 0o022)
    path = fileio.write_text_atomic(tmp_path / "shared.txt", "x")
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


def test_write_problem_none_for_writable_locations(tmp_path):
    (tmp_path / "old.json").write_text("old")
    assert fileio.file_write_problem(tmp_path / "new.json") is None
    assert fileio.file_write_problem(tmp_path / "old.json") is None
    assert fileio.file_write_problem(tmp_path / "a" / "b" / "new.json") is None
    assert fileio.folder_write_problem(tmp_path) is None
    assert fileio.folder_write_problem(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == [tmp_path / "old.json"]


def test_write_problem_names_blocking_path(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    assert fileio.file_write_problem(tmp_path / "adir") == "it is a folder, not a file"
    assert fileio.file_write_problem(tmp_path / "afile" / "out.json") == f"{tmp_path / 'afile'} is not a folder"
    assert fileio.file_write_problem(tmp_path / "afile" / "a" / "out.json") == f"{tmp_path / 'afile'} is not a folder"
    assert fileio.folder_write_problem(tmp_path / "afile") == "it is not a folder"
    assert fileio.folder_write_problem(tmp_path / "afile" / "logs") == f"{tmp_path / 'afile'} is not a folder"
    assert (tmp_path / "afile").read_text() == "x"


def test_write_problem_reports_read_only_folder(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    # os.access grants root everything, so a chmod alone would not make the folder read-only there.
    monkeypatch.setattr(fileio.os, "access", lambda path, mode: os.fspath(path) != os.fspath(folder))
    assert fileio.file_write_problem(folder / "out.json") == f"folder {folder} is not writable"
    assert fileio.file_write_problem(folder / "a" / "out.json") == f"folder {folder} is not writable"
    assert fileio.folder_write_problem(folder) == "it is not writable"
    assert fileio.folder_write_problem(tmp_path / "other") is None


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


def test_output_folder_problem_cases(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")

    assert fileio.output_folder_problem("--output_dir", None) is None
    assert fileio.output_folder_problem("--output_dir", str(tmp_path / "new" / "run")) is None
    assert fileio.output_folder_problem("--output_dir", " ") == "--output_dir is empty; pass the folder to write to"
    assert fileio.output_folder_problem("--export-dir", str(blocker)) == (
        f"--export-dir {blocker} cannot be used: it is not a folder; pass a folder you can write to"
    )
