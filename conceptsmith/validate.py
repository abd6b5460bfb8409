"""The command line's input boundary: every check a command runs on its arguments before any expensive work.

Each function returns the checked value or raises :class:`InputError` (a ``ValueError``, so the CLI shows it as
one ``error: ...`` line with exit code 2) naming the argument, the problem and the fix:

* paths: inputs exist and are regular files (a FIFO, a device or a folder given as a file is refused from its
  ``stat``, never opened); outputs are writable, not folders, never one of the command's inputs (``samefile``),
  and an existing output is replaced only with ``--overwrite``;
* numbers: finite and inside a stated range (:func:`number`);
* seeds: one grammar, ``0,3,5-9`` (:func:`parse_seeds` / :func:`format_seeds`), at most :data:`MAX_SEEDS` per run;
* templates: ``str.format`` fields limited to the ones a template needs (:func:`check_template`), so that no
  template reads an attribute or an item of its argument (``{0.__class__}``);
* images: size and mode read from the header before any decoding (:func:`check_image`);
* edits: ``--edit FILE[:SCALE]`` (:func:`parse_edit_spec`); the same edit (by
  :func:`conceptsmith.edits.content_digest`) is not listed twice (:func:`distinct_edits`).
"""

from __future__ import annotations

import math
import numbers
import os
import re
import stat
import string
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conceptsmith.errors import EditError
from conceptsmith.images import find_images

#: Most seeds one run takes; a longer list is split into several runs.
MAX_SEEDS = 10_000
#: Largest seed (a signed 64-bit integer, what ``torch.Generator.manual_seed`` and numpy take).
MAX_SEED = 2**63 - 1
#: Largest side and pixel count of an input image, read from its header before it is decoded.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 64_000_000
#: Image modes read as 8-bit colour (16-bit and float modes would be clipped by ``convert("RGB")``).
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
#: Largest text file of prompts or concepts.
MAX_TEXT_BYTES = 10 * 2**20
#: Ranges of the numeric options, ``(low, high)`` (generated images: ``height``/``width`` multiples of 8).
STEPS = (1, 1000)  # a scheduler's training timesteps
GUIDANCE = (0.0, 100.0)
IMAGE_SIDE = (8, MAX_IMAGE_SIDE)
BATCH_SIZE = (1, 256)
EDIT_SCALE = (-100.0, 100.0)
MERGE_WEIGHT = (-10.0, 10.0)
RANK = (1, 4096)
#: Template fields by config key: (fields each template must hold exactly once, fields it may hold).
TEMPLATE_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "templates": (frozenset({""}), frozenset({""})),
    "eval_templates": (frozenset({""}), frozenset({""})),
    "prompts": (frozenset({""}), frozenset({""})),
    "composition_prompts": (frozenset({"a", "b"}), frozenset({"a", "b"})),
    "phrase": (frozenset({"token"}), frozenset({"token", "class_word"})),
}

_SEED_ITEM = re.compile(r"(\d{1,19})(?:-(\d{1,19}))?")


class InputError(ValueError):
    """A command-line argument that cannot be used; the message names it, the problem and the fix."""


# -- paths -----------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def input_file(path: str | Path, what: str, max_bytes: int | None = None) -> Path:
    """``path`` if it is an existing, readable regular file (of at most ``max_bytes``)."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist; check the path.") from None
    except OSError as err:
        raise InputError(f"{what} '{path}' cannot be read ({err.strerror}); check the path and its permissions.") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{what} '{path}' is {_kind(info.st_mode)}; pass a regular file.")
    if max_bytes is not None and info.st_size > max_bytes:
        raise InputError(f"{what} '{path}' is {info.st_size / 2**20:.1f} MiB; at most {max_bytes / 2**20:g} MiB is read: "
                         "shorten it or split it.")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} '{path}' is not readable; check its permissions.")
    return path


def input_path(path: str | Path, what: str) -> Path:
    """``path`` if it is an existing regular file or folder (e.g. an image folder or a model directory)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise InputError(f"{what} '{path}' does not exist; check the path.") from None
    if stat.S_ISDIR(mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise InputError(f"{what} '{path}' is not readable; check its permissions.")
        return path
    return input_file(path, what)


def looks_like_path(spec: str) -> bool:
    """Whether a model ``spec`` that names no file is a missing path: hub ids are ``name`` or ``org/name``."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or spec.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth"))
    )


def missing_model(spec: str) -> str:
    """The message for a model ``spec`` that looks like a path (:func:`looks_like_path`) but names nothing."""
    return f"Model path '{spec}' does not exist. Check the path, or pass a hub id or builtin:<name>."


def model_spec(spec: str) -> str:
    """A ``--model`` that names a local path must be a folder or a regular file (a FIFO would block the loader);
    one that looks like a path (:func:`looks_like_path`) must exist, a model config (``.yaml``) as a regular file."""
    if not spec or spec.startswith("builtin:"):
        return spec
    if os.path.lexists(spec):
        input_path(spec, "--model")
        return spec
    stripped = spec.strip()  # as the loader reads it
    path = Path(stripped).expanduser()
    if path.suffix in (".yaml", ".yml"):
        input_file(path, "Config file")
    elif looks_like_path(stripped) and not path.exists():
        raise InputError(missing_model(stripped))
    return spec


def local_inputs(*candidates: str | Path | None) -> list[Path]:
    """The candidates that are existing local paths (a model spec may be a hub id instead)."""
    return [Path(c) for c in candidates if c and os.path.exists(c)]


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode (hard links), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def output_path(
    path: str | Path,
    what: str,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    suffix: str | None = None,
    folder: bool = False,
) -> Path:
    """``path`` if a command may write it: a file, or (``folder=True``) a folder of results that the command
    writes into (the commands that write folders resume an earlier run there).

    Refused: one of ``inputs`` (with or without ``--overwrite``), a folder given as a file or the other way
    round, an existing file without ``overwrite``, and a parent that cannot be created.
    """
    path = Path(path)
    real = Path(os.path.realpath(path))  # 'missing/../x' is 'x' once the command creates 'missing'
    if suffix is not None and path.suffix != suffix:
        raise InputError(f"{what} '{path}' must end in {suffix}.")
    for source in inputs:
        if os.path.exists(source) and _same_file(real, Path(source)):
            raise InputError(f"{what} '{path}' is also an input of this command ('{source}'); writing it would destroy "
                             f"that input: choose another {what}.")
    if os.path.lexists(real):
        mode = real.stat().st_mode if real.exists() else 0
        if folder:
            if not stat.S_ISDIR(mode):
                raise InputError(f"{what} '{path}' exists and is not a folder; choose a folder path.")
        else:
            if stat.S_ISDIR(mode):
                raise InputError(f"{what} '{path}' is a folder; pass a file path, e.g. '{path / ('out' + (suffix or ''))}'.")
            if not stat.S_ISREG(mode):
                raise InputError(f"{what} '{path}' is {_kind(mode) if mode else 'a broken link'}; pass a regular file path.")
            if not overwrite:
                raise InputError(f"{what} '{path}' already exists; pass --overwrite to replace it, or choose another path.")
    parent = real.parent if not (folder and real.is_dir()) else real
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"Cannot create {what} '{path}': '{parent}' is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write {what} '{path}': no permission to write in '{parent}'; choose another path.")
    return path


def read_lines(path: str | Path | None, what: str) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file (``[]`` for ``None``)."""
    if path is None:
        return []
    path = input_file(path, what, max_bytes=MAX_TEXT_BYTES)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# -- numbers -----------------------------------------------------------------------------------------------


def number(
    value: float | None, option: str, low: float, high: float, integer: bool = False, multiple_of: int | None = None
) -> Any:
    """``value`` (``None`` passes) if it is finite and in ``[low, high]`` (and a multiple of ``multiple_of``)."""
    if value is None:
        return None
    kind = "an integer" if integer else "a finite number"
    bounds = f"from {_show(low)} to {_show(high)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InputError(f"{option} must be {kind} {bounds}, got {value!r}.")
    if not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{option} must be {kind} {bounds}, got {_show(value)}.")
    if multiple_of and value % multiple_of:
        nearest = min(max(multiple_of, round(value / multiple_of) * multiple_of), high)
        raise InputError(f"{option} must be a multiple of {multiple_of}, got {_show(value)}; e.g. {_show(nearest)}.")
    return value


def _show(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def generation_options(steps: int | None, guidance: float | None, height: int | None, width: int | None,
                       batch_size: int | None) -> None:
    """``generate``'s numeric options, each ``None`` (the model's default) or inside its range."""
    number(steps, "--steps", *STEPS, integer=True)
    number(guidance, "--guidance", *GUIDANCE)
    number(height, "--height", *IMAGE_SIDE, integer=True, multiple_of=8)
    number(width, "--width", *IMAGE_SIDE, integer=True, multiple_of=8)
    number(batch_size, "--batch-size", *BATCH_SIZE, integer=True)


def seed(value: int, option: str = "--seed") -> int:
    """A single seed: an integer from 0 to :data:`MAX_SEED`."""
    return number(value, option, 0, MAX_SEED, integer=True)


# -- seeds -------------------------------------------------------------------------------------------------


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``"0,3,5-9"`` -> ``[0, 3, 5, 6, 7, 8, 9]``: comma-separated non-negative integers and ascending ranges
    ``LOW-HIGH`` (both ends included), in the order given. Refused: anything else, an empty item, a seed listed
    twice, a seed above :data:`MAX_SEED` and more than :data:`MAX_SEEDS` seeds (counted before expanding)."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise InputError(f"No seeds given: pass at least one, e.g. {option} 0 or {option} 0-7.")
    spans: list[tuple[str, int, int]] = []
    for item in items:
        match = _SEED_ITEM.fullmatch(item)
        if not item:
            raise InputError(f"{option} '{text}' has an empty item; separate seeds with single commas, e.g. {option} 0,3,5-9.")
        if match is None:
            raise InputError(f"Seed '{item}' is not an integer or a range LOW-HIGH: seeds are non-negative integers, "
                             f"e.g. {option} 0,3,5-9.")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise InputError(f"Seed range '{item}' runs backwards; write it ascending, e.g. {option} {high}-{low}.")
        if high > MAX_SEED:
            raise InputError(f"Seed '{item}' exceeds the largest seed {MAX_SEED} (2^63 - 1); use a smaller one.")
        spans.append((item, low, high))
    count = sum(high - low + 1 for _, low, high in spans)
    if count > MAX_SEEDS:
        raise InputError(f"{option} '{text}' names {count} seeds; a run takes at most {MAX_SEEDS}: split it into runs, "
                         f"e.g. {option} 0-{MAX_SEEDS - 1} then {option} {MAX_SEEDS}-{2 * MAX_SEEDS - 1}.")
    seeds: list[int] = []
    first: dict[int, str] = {}
    for item, low, high in spans:
        for seed in range(low, high + 1):
            if seed in first:
                raise InputError(f"Seed {seed} is listed twice ('{first[seed]}' and '{item}'); list each seed once.")
            first[seed] = item
            seeds.append(seed)
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """The canonical text of ``seeds`` in :func:`parse_seeds`'s grammar: runs of consecutive ascending seeds as
    ``LOW-HIGH``, in order (``format_seeds(parse_seeds(s))`` is the canonical form of ``s``)."""
    parts: list[str] = []
    start = 0
    for index in range(1, len(seeds) + 1):
        if index == len(seeds) or seeds[index] != seeds[index - 1] + 1:
            low, high = seeds[start], seeds[index - 1]
            parts.append(str(low) if low == high else f"{low}-{high}")
            start = index
    return ",".join(parts)


# -- templates ---------------------------------------------------------------------------------------------


def _field_label(name: str) -> str:
    return "{" + name + "}"


def check_template(template: str, required: Iterable[str] = ("",), allowed: Iterable[str] | None = None,
                   where: str = "template") -> str:
    """``template`` if its ``str.format`` fields (``string.Formatter().parse``) are exactly the ``required`` ones,
    each once (plus optional ``allowed`` ones), with no attribute or index access, conversion or format spec."""
    required = frozenset(required)
    allowed = required | frozenset(allowed or ())
    need = ", ".join(_field_label(name) for name in sorted(required))
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise InputError(f"{where} {template!r}: {err}; write '{{{{' and '}}}}' for literal braces.") from None
    counts: dict[str, int] = {}
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            shown = _field_label(name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else ""))
            raise InputError(f"{where} {template!r} has the field {shown}; it may hold only {need} (no attributes, "
                             "indices, conversions or format specs): write literal braces as '{{' and '}}'.")
        counts[name] = counts.get(name, 0) + 1
    wrong = [name for name in sorted(required) if counts.get(name) != 1]
    if wrong:
        raise InputError(f"{where} {template!r} must hold {need} exactly once each "
                         f"({_field_label(wrong[0])} appears {counts.get(wrong[0], 0)} times).")
    return template


def check_templates(tree: Any, source: str, path: str = "") -> None:
    """Check every template in a parsed config (keys of :data:`TEMPLATE_FIELDS`, at any depth)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            where = f"{path}.{key}" if path else str(key)
            fields = TEMPLATE_FIELDS.get(key)
            values = [value] if isinstance(value, str) and key == "phrase" else value
            if fields is not None and isinstance(values, list) and all(isinstance(v, str) for v in values):
                for template in values:
                    check_template(template, fields[0], fields[1], where=f"{source}: key '{where}': template")
            else:
                check_templates(value, source, where)
    elif isinstance(tree, list):
        for index, item in enumerate(tree):
            check_templates(item, source, f"{path}.{index}")


# -- images ------------------------------------------------------------------------------------------------


def check_image(path: str | Path, what: str = "Image") -> tuple[int, int]:
    """``(width, height)`` of an image file whose header shows at most :data:`MAX_IMAGE_SIDE` px a side,
    :data:`MAX_IMAGE_PIXELS` pixels and an 8-bit mode (:data:`IMAGE_MODES`); the pixels are not decoded."""
    from PIL import Image, UnidentifiedImageError

    path = input_file(path, what)
    limit = f"at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} px and {MAX_IMAGE_PIXELS / 1e6:g} MP"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound below is tighter
            with Image.open(path) as image:
                (width, height), mode = image.size, image.mode
                if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
                    raise InputError(f"{what} '{path}' is {width}x{height} px; images may be {limit}: downscale it "
                                     "(e.g. to 1024 px on the long side).")
                if width < 1 or height < 1:
                    raise InputError(f"{what} '{path}' is {width}x{height} px, an empty image; replace it.")
                if mode not in IMAGE_MODES:
                    raise InputError(f"{what} '{path}' has pixel mode {mode}; save it as 8-bit RGB (or grayscale).")
                image.verify()
    except Image.DecompressionBombError:
        raise InputError(f"{what} '{path}' is larger than PIL's decompression-bomb bound; images may be {limit}: "
                         "downscale it.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{what} '{path}' cannot be read as an image ({type(err).__name__}: {err}); replace it.") from None
    return width, height


def check_images(sources: Sequence[str | Path], option: str = "--images") -> list[Path]:
    """Every image file of ``sources`` (folders or files, :func:`conceptsmith.images.find_images`), each checked
    with :func:`check_image`."""
    files: list[Path] = []
    for source in sources:
        input_path(source, option)
        for file in find_images(source):
            check_image(file, f"{option} image")
            files.append(file)
    return files


# -- edits -------------------------------------------------------------------------------------------------


def check_scale(scale: Any, where: str = "") -> float:
    """``scale`` as a float, or an :class:`~conceptsmith.errors.EditError` unless it is a finite real number."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise EditError(f"Edit scale {scale!r}{where} must be a finite number, e.g. 0.5 (half strength) or 1 (as computed).")
    return float(scale)


def parse_edit_spec(spec: str | Path) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE`` (``no-skull.safetensors:0.5``) -> ``(path, scale)``, the CLI's ``--edit`` syntax.

    The text after the last ``:`` is a scale only when it parses as a number, so a path that contains ``:``
    (``C:\\edits\\a.safetensors``) stays a path; ``C:\\edits\\a.safetensors:0.5`` is that path at 0.5.
    """
    text = str(spec)
    head, colon, tail = text.rpartition(":")
    if not colon or not head:
        return Path(text), 1.0
    try:
        scale = float(tail)
    except ValueError:
        return Path(text), 1.0
    return Path(head), check_scale(scale, f" in '{text}'")


def distinct_edits(edits: Sequence[tuple[Any, Any]], option: str = "--edit",
                   fix: str = "list it once, with a scale for more strength (e.g. --edit FILE:2)") -> None:
    """Refuse ``(label, Edit)`` pairs that hold the same edit twice (same content digest, whatever the file)."""
    from conceptsmith.edits import content_digest

    seen: dict[str, Any] = {}
    for label, edit in edits:
        digest = content_digest(edit)
        if digest in seen:
            raise InputError(f"{option} '{label}' is the same edit as '{seen[digest]}' (content digest {digest}): "
                             f"{fix}.")
        seen[digest] = label
