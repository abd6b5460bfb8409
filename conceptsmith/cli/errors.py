"""How the command line reports a failure: one ``error: ...`` line on stderr and an exit code.

Exit codes:

* ``2``: a problem the user can fix: every ``ValueError`` / ``LookupError`` of the library (its user-facing errors,
  :class:`conceptsmith.validate.InputError` among them), an ``OSError`` (a missing file, no permission, a full
  disk), an image over PIL's decompression-bomb bound, running out of memory, and the parser's usage errors
  (an unknown option, ``--steps abc``);
* ``1``: an unexpected exception, i.e. a bug: one line naming it and the file that holds the full traceback,
  ``crash-<time>-<pid>.txt`` under ``$CONCEPTSMITH_CACHE`` (default ``~/.cache/conceptsmith``), else under the
  system's temporary folder;
* ``130``: interrupted (Ctrl-C).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from conceptsmith import __version__

#: The parser's own error class (click's, or the copy of click that typer ships).
CLICK_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_PASS_THROUGH = (typer.Exit, typer.Abort, CLICK_ERROR)

_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.ENOSPC: "free some disk space, or write somewhere else",
    errno.EDQUOT: "free some disk space, or write somewhere else",
    errno.EISDIR: "pass a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENAMETOOLONG: "use a shorter path",
}


def _os_message(err: OSError) -> str:
    if err.filename is None or not err.strerror:
        return str(err)
    fix = _OS_FIXES.get(err.errno or 0, "check the path")
    return f"{err.strerror}: '{err.filename}'; {fix}."


def _is_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))


def _is_decompression_bomb(err: BaseException) -> bool:
    image = sys.modules.get("PIL.Image")
    return image is not None and isinstance(err, image.DecompressionBombError)


def one_line(message: str) -> str:
    """A message of several lines (e.g. a config with one problem per line) as one line: ``first; second``."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else ""
    return f"{lines[0]} {'; '.join(lines[1:])}"


def describe(err: Exception) -> tuple[int, str]:
    """``(exit code, one-line message)`` of an exception that reached a command (see the module docstring)."""
    code, message = _describe(err)
    return code, one_line(message)


def _describe(err: Exception) -> tuple[int, str]:
    if _is_out_of_memory(err):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return 2, (f"out of memory ({first}); lower --batch-size or the image size, use --dtype float16, "
                   "or run on a device with more memory.")
    if _is_decompression_bomb(err):
        return 2, f"{err}; downscale the image."
    if isinstance(err, KeyError):
        return 2, str(err.args[0]) if err.args else "unknown key"
    if isinstance(err, OSError):
        return 2, _os_message(err)
    if isinstance(err, (ValueError, LookupError)):
        return 2, str(err) or type(err).__name__
    path = write_crash_report(err)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    where = f"the full traceback is in {path}" if path else "the traceback could not be written to a file"
    return 1, (f"unexpected {type(err).__name__}{': ' + first if first else ''} (a bug in conceptsmith, not in "
               f"your input; {where}: please include it in a bug report).")


def crash_dirs() -> list[Path]:
    """Where crash reports go, in order of preference."""
    cache = os.environ.get("CONCEPTSMITH_CACHE") or Path.home() / ".cache" / "conceptsmith"
    return [Path(cache), Path(tempfile.gettempdir())]


def write_crash_report(err: BaseException) -> Path | None:
    """Write the command line, versions and the full traceback of ``err``; ``None`` when nowhere is writable."""
    text = (f"conceptsmith {__version__}, python {sys.version.split()[0]}\n"
            f"command: {' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(err)))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in crash_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / name, "w", encoding="utf-8") as handle:
                handle.write(text)
            return folder / name
        except OSError:
            continue
    return None


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``command``; any exception becomes one red ``error: ...`` line on stderr and its exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except Exception as err:  # noqa: BLE001  (every exception is mapped; unexpected ones to a crash report)
            code, message = describe(err)
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=code) from None

    return run


class OneLineErrors(TyperGroup):
    """A command group whose parser errors (unknown option, ``--steps abc``) are one ``error: ...`` line too."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK_ERROR as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # no arguments: the help text, as the parser shows it
                err.show()
                sys.exit(err.exit_code)
            context = getattr(err, "ctx", None)
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            typer.secho(f"error: {err.format_message()}{hint}", fg=typer.colors.RED, err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)
