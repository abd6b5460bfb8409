"""Atomic file writes: nothing half-written is ever left under the target name.

Every artifact the project writes (edits, exported checkpoints, images, caches, results, trained
weights) goes through :func:`atomic_write` (one file) or :func:`atomic_directory` (a folder such as a
``save_pretrained`` output): the content is written to a temporary name beside the target, flushed to
disk (fsync), then moved onto the target with ``os.replace``, which POSIX and Windows make atomic on
one file system. A reader sees the old file or the new one, never a mix.

* Temporary names are ``.<name>.<pid>-<random>.tmp``; they are removed on every exit path of the writer
  (an exception, ``KeyboardInterrupt``). A process killed outright (SIGKILL, power loss) leaves its
  temporary behind: the next write to the same target removes it once its process is gone or it is
  older than :data:`STALE_AFTER_S`.
* A replaced file keeps its permission bits (not its owner); a new one gets the usual ``0o666`` minus the
  umask. A target that is a symbolic link stays one: the file it points to is replaced.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

#: A temporary whose writing process still runs is left alone until it is this old (seconds).
STALE_AFTER_S = 24 * 3600.0


def _temporary(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on Windows, where signal 0 would end it, always assumed)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it; returns the entries removed or restored.

    A temporary (``.<name>.<pid>-<random>.tmp``, and the ``.<name>.<pid>.tmp`` of earlier versions) is stale
    when process ``pid`` is gone, or is another live one but the file is older than ``older_than_s`` (the pid
    was reused). A folder's backup (``.<name>.<pid>-<random>.old``, see :func:`atomic_directory`) is put back
    when a killed writer left ``path`` missing, and removed otherwise."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)(?:-[0-9a-f]+)?\.tmp|\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.old")
    prefix = f".{path.name}."
    try:
        names = [name for name in os.listdir(path.parent) if name.startswith(prefix)]  # image caches hold thousands
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(path.parent / name, match) for name in names if (match := pattern.fullmatch(name))]
    handled = []
    for entry, match in found:
        pid = int(match.group(1) or match.group(2))
        try:
            age = time.time() - entry.lstat().st_mtime
            if (pid == os.getpid() or _alive(pid)) and age <= older_than_s:
                continue
            if match.group(2) and not os.path.lexists(path):
                os.replace(entry, path)
            else:
                _remove(entry)
        except FileNotFoundError:  # another writer cleaned it up first
            continue
        handled.append(entry)
    return handled


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; folders cannot be opened for that on Windows."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _target(path: str | Path) -> Path:
    """``path``, or where it points when it is a symbolic link (the link itself is kept)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then move the finished file to ``path`` in one step.

    ``write`` must write a file at exactly the path it is given (pass formats explicitly: the temporary's
    name ends in ``.tmp``). On any exception, ``KeyboardInterrupt`` included, ``path`` is untouched and the
    temporary is gone."""
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = _temporary(path)
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode: 0o666 minus the umask
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode if path.exists() else os.stat(temporary).st_mode)
        write(temporary)
        _fsync(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        _fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends normally it replaces ``path`` whole.

    For writers that fill a folder (``save_pretrained``). An existing ``path`` is first renamed to a backup
    (``.<name>.<pid>-<random>.old``), the new folder renamed into place, then the backup deleted; a writer
    killed between the two renames leaves the backup, which the next write to ``path`` puts back. On an
    exception in the block ``path`` is untouched and the temporary folder is removed."""
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = _temporary(path)
    temporary.mkdir()
    try:
        yield temporary
        for folder, _, files in os.walk(temporary):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
        if path.exists():
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
            backup = _temporary(path, "old")
            os.replace(path, backup)
            try:
                os.replace(temporary, path)
            except BaseException:
                os.replace(backup, path)
                raise
            _remove(backup)
        else:
            os.replace(temporary, path)
        _fsync(path.parent)
    finally:
        if temporary.exists():
            _remove(temporary)


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` (contiguous CPU copies) with string ``metadata`` in the header."""
    from safetensors.torch import save_file

    prepared = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(prepared, str(tmp), metadata=dict(metadata or {})))


def save_torch(path: str | Path, obj: Any) -> Path:
    """Atomically ``torch.save`` ``obj`` (tensors and plain containers, loadable with ``weights_only=True``)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_numpy(path: str | Path, array: np.ndarray) -> Path:
    """Atomically write ``array`` in NumPy's ``.npy`` format."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.save would append '.npy' to the name
            np.save(handle, array)

    return atomic_write(path, write)


def save_image(path: str | Path, image: Image.Image, format: str | None = None) -> Path:
    """Atomically save a PIL image; the format is ``format``, else the one the file's suffix names."""
    from PIL import Image

    chosen = format or Image.registered_extensions().get(Path(path).suffix.lower())
    if chosen is None:
        raise ValueError(f"Cannot tell the image format of '{path}': give the file a suffix such as .png or .jpg.")
    return atomic_write(path, lambda tmp: image.save(tmp, format=chosen))


def copy_file(source: str | Path, path: str | Path) -> Path:
    """Atomically copy the bytes of ``source`` to ``path``."""
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """Atomically write pretty-printed JSON (``default`` converts what JSON cannot hold, as in ``json.dumps``)."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=default) + "\n")


def append_jsonl(path: str | Path, record: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """Add one JSON line to ``path`` by rewriting it atomically: a killed run keeps every finished line whole."""
    path = Path(path)
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    return write_text(path, before + json.dumps(record, default=default) + "\n")


def read_jsonl(path: str | Path) -> list[Any]:
    """The records of a JSON-lines file written by :func:`append_jsonl` (none when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
