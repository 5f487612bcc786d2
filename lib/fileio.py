"""Atomic file writes: a temporary file in the target folder, then a rename over the target.

A run killed half-way leaves either the previous file or the new one, never a truncated file.
``file_write_problem`` and ``folder_write_problem`` check a location before a long run writes there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union


def write_text_atomic(path: Union[str, os.PathLike], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        # mkstemp creates the file readable by its owner only; give it the usual umask mode.
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _read_umask() -> int:
    # os.umask can only be read by setting it. Reading it once, at import, keeps the moment when it
    # is 0 away from threads that create files later (a TensorBoard writer, for example).
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def default_file_mode() -> int:
    """Return the mode that ``open()`` gives a new file: 0666 masked by the umask at import."""
    return 0o666 & ~_UMASK


def _nearest_existing_folder_problem(path: Path) -> Optional[str]:
    """Return why the missing folders above ``path`` cannot be created, or None if they can."""
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not os.path.isdir(ancestor):
        return f"{ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"folder {ancestor} is not writable"
    return None


def file_write_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """Return why ``write_text_atomic(path, ...)`` would fail, or None if it can write there.

    Creates nothing. ``path`` must not be a folder, and its folder must be writable or creatable
    in the nearest existing folder above it.
    """
    path = Path(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a folder, not a file"
    return _nearest_existing_folder_problem(path)


def output_folder_problem(flag: str, value: Optional[str]) -> Optional[str]:
    """Return the error message for an output-folder flag that cannot be used, or None if it can.

    ``value`` None means the flag was not given. Creates nothing.
    """
    if value is None:
        return None
    if not str(value).strip():
        return f"{flag} is empty; pass the folder to write to"
    problem = folder_write_problem(value)
    if problem:
        return f"{flag} {value} cannot be used: {problem}; pass a folder you can write to"
    return None


def folder_write_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """Return why files cannot be created in folder ``path``, or None if they can.

    Creates nothing. ``path`` must be a writable folder, or be creatable in the nearest existing
    folder above it.
    """
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        if not os.path.isdir(path):
            return "it is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return "it is not writable"
        return None
    return _nearest_existing_folder_problem(path)
