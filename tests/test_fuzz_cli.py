"""Fuzzing the command line's input boundary with hypothesis, through typer's CliRunner.

Every run must end with exit code 0 or 2, never a traceback, with exactly one ``error: ...`` line on a refusal,
and a refusal must leave the files as they were (no partial output, inputs untouched). The generated arguments
are refused before any model loads, which keeps the whole file fast; each test also states which answer is the
right one (the validator's own verdict, or a bound checked independently), so a wrong acceptance fails too.
Property tests of the core: the seed grammar round-trips, apply/revert is bit-exact in any order, and
``Edit.to_lora`` is exact at any rank at least the edit's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import string
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conceptsmith import validate
from conceptsmith.cli import app
from conceptsmith.edits import Edit, applied_edits, base_fingerprint
from conceptsmith.validate import InputError

runner = CliRunner()
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TO_V = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"
TE_K = "text_encoder.encoder.layers.0.self_attn.k_proj"


@pytest.fixture(autouse=True)
def no_hang():
    """A FIFO opened for reading would block forever: fail the test after 90 s instead."""
    def expire(signum, frame):
        raise TimeoutError("the command blocked (did it open a FIFO?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(90)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def pipe():
    from conftest import build_tiny_pipe

    return build_tiny_pipe()


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    """Valid edit files, a folder, a FIFO, a text file and a missing path."""
    root = tmp_path_factory.mktemp("fuzz")
    for name, seed in (("e", 0), ("f", 1)):
        _low_rank_edit(pipe, seed).save(root / f"{name}.safetensors")
    (root / "folder").mkdir()
    os.mkfifo(root / "fifo.safetensors")
    (root / "notes.txt").write_text("not an edit\n")
    return root


def _low_rank_edit(pipe, seed: int, modules=(TO_K,), rank: int = 2, dense: bool = False) -> Edit:
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for module in modules:
        component, _, name = module.partition(".")
        d_out, d_in = getattr(pipe, component).get_submodule(name).weight.shape
        up = torch.randn(d_out, rank, generator=generator) * 0.1
        down = torch.randn(rank, d_in, generator=generator) * 0.1
        deltas[module] = up @ down if dense else (up, down)
    return Edit.from_weight_deltas("fuzz", ["cat"], {}, base_fingerprint(pipe), "sd1", deltas)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _invoke(args: list[str], sandbox: Path | None = None):
    """Run the CLI and check the invariants every run must keep; returns (result, error line or None)."""
    before = _listing(sandbox) if sandbox is not None else None
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    error = None
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, result.output
        error = errors[0]
        if sandbox is not None:
            assert _listing(sandbox) == before, "a refused command changed files"
    return result, error


def _expected(check, *args) -> str | None:
    """The validator's own error message for ``args``, or None when they pass."""
    try:
        check(*args)
    except InputError as err:
        return str(err)
    return None


# -- seeds -------------------------------------------------------------------------------------------------


@FUZZ
@given(st.text(alphabet="0123456789,- x", max_size=14))
def test_generate_seeds_are_parsed_by_one_grammar(files, seeds):
    result, error = _invoke(["generate", "-m", "builtin:tiny-test", "-p", "x", f"--seeds={seeds}",
                             "-e", files / "missing.safetensors", "-o", files / "gen-out"])
    assert result.exit_code == 2
    expected = _expected(validate.parse_seeds, seeds)
    assert error == f"error: {expected}" if expected else "missing.safetensors' does not exist" in error
    assert not (files / "gen-out").exists()


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, validate.MAX_SEED), min_size=1, max_size=30, unique=True))
def test_seed_lists_round_trip_through_their_canonical_text(seeds):
    text = validate.format_seeds(seeds)
    assert validate.parse_seeds(text) == seeds
    assert validate.format_seeds(validate.parse_seeds(text)) == text


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 4), st.booleans()), min_size=1, max_size=8))
def test_format_of_parse_is_the_canonical_form(items):
    text = ",".join(f"{low}-{low + width}" if as_range else str(low) for low, width, as_range in items)
    try:
        seeds = validate.parse_seeds(text)
    except InputError as err:
        assert "listed twice" in str(err)  # the only way these items can fail
        return
    canonical = validate.format_seeds(seeds)
    assert validate.format_seeds(validate.parse_seeds(canonical)) == canonical
    assert validate.parse_seeds(canonical) == seeds


# -- numbers -----------------------------------------------------------------------------------------------

NUMBER_TEXT = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "-0", "0", "8", "4096", "8192", "8200", "1000", "1001", "abc", ""]),
)


@FUZZ
@given(st.sampled_from(["--steps", "--guidance", "--height", "--width", "--batch-size"]), NUMBER_TEXT)
def test_generate_numbers_are_finite_and_in_range(files, option, text):
    result, error = _invoke(["generate", "-m", "builtin:tiny-test", "-p", "x", f"{option}={text}",
                             "-e", files / "missing.safetensors", "-o", files / "gen-out"])
    assert result.exit_code == 2
    if "missing.safetensors" in error:  # accepted: it must be a valid value
        value = float(text)
        if option != "--guidance":
            assert value.is_integer()
            value = int(value)
        keyword = option.removeprefix("--").replace("-", "_")
        options = dict.fromkeys(("steps", "guidance", "height", "width", "batch_size"))
        validate.generation_options(**{**options, keyword: value})
    else:
        assert option in error


@FUZZ
@given(st.lists(NUMBER_TEXT, min_size=2, max_size=2), st.sampled_from([None, "0", "1", "3", "5000", "-1", "x"]))
def test_merge_weights_and_rank_are_checked_before_merging(files, weights, rank):
    sandbox = Path(tempfile.mkdtemp(dir=files))
    out = sandbox / "merged.safetensors"
    args = ["merge", files / "e.safetensors", files / "f.safetensors", "--method", "lora-sum", "-o", out]
    args += [f"--weight={w}" for w in weights] + ([f"--rank={rank}"] if rank is not None else [])
    result, error = _invoke(args, sandbox)
    numbers_ok = all(_float(w) is not None and abs(_float(w)) <= 10 for w in weights)
    rank_ok = rank is None or (rank.isdigit() and 1 <= int(rank) <= 4096)
    if not (numbers_ok and rank_ok):
        assert result.exit_code == 2 and ("--weight" in error or "--rank" in error), result.output
    if result.exit_code == 0:
        assert Edit.load(out).kind in ("weights", "lora")
    shutil.rmtree(sandbox)


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


@FUZZ
@given(NUMBER_TEXT)
def test_edit_scales_are_finite_and_bounded(files, scale):
    result, error = _invoke(["generate", "-m", "builtin:tiny-test", "-p", "x", "-e", f"{files / 'e.safetensors'}:{scale}",
                             "-e", files / "missing.safetensors", "-o", files / "gen-out"])
    assert result.exit_code == 2
    value = _float(scale)
    if value is not None and abs(value) <= 100:
        assert "missing.safetensors" in error
    elif value is None:  # not a number (then FILE:TEXT is a path) or not finite
        assert "must be a finite number" in error or f"e.safetensors:{scale}' does not exist" in error
    else:
        assert "The scale of --edit" in error and "from -100 to 100" in error


# -- paths -------------------------------------------------------------------------------------------------

INPUTS = ["e", "f", "missing", "folder", "fifo", "notes"]
OUTPUTS = ["new", "nested-new", "existing", "same-as-first", "hard-link-to-first", "folder", "fifo", "under-a-file",
           "dotdot-to-first"]


def _input_path(root: Path, kind: str) -> Path:
    return {"e": root / "e.safetensors", "f": root / "f.safetensors", "missing": root / "missing.safetensors",
            "folder": root / "folder", "fifo": root / "fifo.safetensors", "notes": root / "notes.txt"}[kind]


def _output_path(sandbox: Path, kind: str, first: Path) -> Path:
    if kind == "existing":
        (sandbox / "old.safetensors").write_bytes(b"old")
        return sandbox / "old.safetensors"
    if kind == "hard-link-to-first" and first.is_file() and not first.is_fifo():
        os.link(first, sandbox / "link.safetensors")
        return sandbox / "link.safetensors"
    if kind == "folder":
        (sandbox / "dir").mkdir()
        return sandbox / "dir"
    if kind == "fifo":
        os.mkfifo(sandbox / "out.safetensors")
        return sandbox / "out.safetensors"
    if kind == "under-a-file":
        (sandbox / "file").write_bytes(b"x")
        return sandbox / "file" / "out.safetensors"
    if kind in ("same-as-first", "dotdot-to-first"):
        return first if kind == "same-as-first" else sandbox / "nowhere" / ".." / ".." / first.name
    return sandbox / ("a/b/out.safetensors" if kind == "nested-new" else "out.safetensors")


@FUZZ
@given(st.sampled_from(["to-lora", "export-lora", "merge"]), st.sampled_from(INPUTS), st.sampled_from(INPUTS),
       st.sampled_from(OUTPUTS), st.booleans())
def test_paths_inputs_and_outputs(files, command, first_kind, second_kind, out_kind, overwrite):
    _check_paths(files, command, first_kind, second_kind, out_kind, overwrite)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("out_kind", OUTPUTS)
@pytest.mark.parametrize("command", ["to-lora", "merge"])
def test_every_kind_of_output_path(files, command, out_kind, overwrite):
    _check_paths(files, command, "e", "f", out_kind, overwrite)


@pytest.mark.parametrize("kind", INPUTS[2:])
@pytest.mark.parametrize("command", ["export-lora", "merge"])
def test_every_kind_of_bad_input_path(files, command, kind):
    _check_paths(files, command, kind, "f", "new", False)
    _check_paths(files, command, "e", kind, "new", False)


def _check_paths(files: Path, command: str, first_kind: str, second_kind: str, out_kind: str, overwrite: bool) -> None:
    work = Path(tempfile.mkdtemp(dir=files))
    for name in ("e.safetensors", "f.safetensors", "notes.txt"):
        shutil.copy(files / name, work / name)
    (work / "folder").mkdir()
    os.mkfifo(work / "fifo.safetensors")
    sandbox = work / "out"
    sandbox.mkdir()
    first, second = _input_path(work, first_kind), _input_path(work, second_kind)
    out = _output_path(sandbox, out_kind, first)
    inputs = [first, second] if command == "merge" else [first]
    args = [command, *inputs, "-o", out] + (["--method", "stack"] if command == "merge" else [])
    args += ["--overwrite"] if overwrite else []
    saved = {p: p.read_bytes() for p in inputs if p.is_file() and not p.is_fifo()}
    result, error = _invoke(args, work)
    used = [first_kind, second_kind] if command == "merge" else [first_kind]
    bad_input = any(kind not in ("e", "f") for kind in used)
    same = out_kind in ("same-as-first", "dotdot-to-first") or (out_kind == "hard-link-to-first" and out.name == "link.safetensors")
    must_fail = (bad_input or same or out_kind in ("folder", "fifo", "under-a-file")
                 or (out_kind == "existing" and not overwrite) or (command == "merge" and first_kind == second_kind))
    if must_fail:
        assert result.exit_code == 2, (args, result.output)
    else:
        assert result.exit_code == 0, (args, result.output)
    if result.exit_code == 0:
        with safe_open(str(out), framework="pt") as handle:
            assert list(handle.keys())
    assert all(p.read_bytes() == data for p, data in saved.items()), "an input was changed"
    shutil.rmtree(work)


# -- templates and YAML ------------------------------------------------------------------------------------


def _erase_with_config(files: Path, document: str, name: str = "cfg.yaml"):
    sandbox = Path(tempfile.mkdtemp(dir=files))
    config = sandbox / name
    config.write_text(document, encoding="utf-8")
    result, error = _invoke(["erase", "-m", "builtin:tiny-test", "-c", "cat", "--config", config,
                             "-o", sandbox / "edit.safetensors"], sandbox)
    shutil.rmtree(sandbox)
    return result, error


@FUZZ
@given(st.text(alphabet="{}ab0._[]!:x ", max_size=10))
def test_config_templates_hold_only_their_field(files, template):
    result, error = _erase_with_config(files, f"method: no-such-method\nparams:\n  templates: [{json.dumps(template)}]\n")
    assert result.exit_code == 2
    expected = _expected(validate.check_template, template)
    if expected is not None:
        assert error.endswith(expected) and "key 'params.templates'" in error
    else:
        assert "no-such-method" in error


YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(string.printable, max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=6), children, max_size=4)),
    max_leaves=12,
)


@FUZZ
@given(YAML_VALUES, st.sampled_from(["plain", "duplicate", "garbage", "tab"]))
def test_yaml_documents_fail_cleanly(files, value, mutation):
    document = yaml.safe_dump({"method": "no-such-method", "params": {"p": value}})
    if mutation == "duplicate":
        document += "method: again\n"
    elif mutation == "garbage":
        document = document[: len(document) // 2] + ": - [ {\n"
    elif mutation == "tab":
        document = "\t" + document
    result, error = _erase_with_config(files, document)
    assert result.exit_code == 2
    if mutation == "duplicate":
        assert "duplicate key 'method'" in error
    elif mutation == "plain":
        assert "no-such-method" in error


@FUZZ
@given(st.integers(2, 10), st.integers(1, 9))
def test_alias_bombs_are_refused_fast(files, width, depth):
    import time

    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth + 1)]
    document = "method: no-such-method\nparams:\n" + "".join(f"  {line}\n" for line in lines)
    started = time.perf_counter()
    result, error = _erase_with_config(files, document)
    assert time.perf_counter() - started < 5
    expanded = sum(width ** (level + 1) for level in range(depth + 1))  # every level's nodes, expanded
    if expanded > 200_000:
        assert "alias bomb" in error
    elif expanded < 50_000:
        assert "no-such-method" in error


# -- images ------------------------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    from test_validate import png_header

    return png_header(width, height)


@FUZZ
@given(st.sampled_from(["header", "real", "truncated", "mode", "fifo", "folder-of-them"]),
       st.integers(1, 30000), st.integers(1, 30000), st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "F", "I"]))
def test_images_are_checked_before_any_model_loads(files, kind, width, height, mode):
    sandbox = Path(tempfile.mkdtemp(dir=files))
    image = sandbox / "ref.png"
    if kind == "header":
        image.write_bytes(_png_header(width, height))
    elif kind in ("real", "truncated", "mode", "folder-of-them"):
        image_mode = mode if kind == "mode" else "RGB"
        image = image.with_suffix(".tiff") if image_mode == "F" else image  # PNG holds no float pixels
        Image.new(image_mode, (1 + width % 40, 1 + height % 40)).save(image)
        if kind == "truncated":
            image.write_bytes(image.read_bytes()[: 20 + width % 30])
    else:
        os.mkfifo(image)
    source = sandbox if kind == "folder-of-them" else image
    result, error = _invoke(["erase", "-m", "builtin:tiny-test", "-c", "cat", "--images", source,
                             "--method", "no-such-method", "-o", sandbox / "edit.safetensors"], sandbox)
    assert result.exit_code == 2
    if kind == "header" and (width > 8192 or height > 8192 or width * height > 64_000_000):
        assert "8192x8192" in error
    elif kind in ("truncated", "fifo") or (kind == "mode" and mode in ("I;16", "F", "I")):
        assert "--images" in error
    elif kind in ("real", "folder-of-them") or (kind == "mode" and mode in validate.IMAGE_MODES):
        assert "no-such-method" in error
    shutil.rmtree(sandbox)


# -- edit files --------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=10,
)


@FUZZ
@given(st.sampled_from(["metadata", "field", "nan", "truncate", "deep"]), JSON_VALUES, st.integers(0, 10**6))
def test_edit_files_with_random_metadata_or_bad_tensors_fail_cleanly(files, mutation, value, position):
    sandbox = Path(tempfile.mkdtemp(dir=files))
    source = files / "e.safetensors"
    edit = sandbox / "edit.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(source))
    header = json.loads(metadata["conceptsmith"])
    if mutation == "metadata":
        metadata["conceptsmith"] = json.dumps(value)
    elif mutation == "field":
        header[sorted(header)[position % len(header)]] = value
        metadata["conceptsmith"] = json.dumps(header)
    elif mutation == "deep":
        metadata["conceptsmith"] = "[" * (65 + position % 5000) + "]" * (65 + position % 5000)
    elif mutation == "nan":
        key = sorted(tensors)[position % len(tensors)]
        tensors[key].view(-1)[position % tensors[key].numel()] = float("nan") if position % 2 else float("inf")
    save_file(tensors, str(edit), metadata=metadata)
    if mutation == "truncate":
        edit.write_bytes(edit.read_bytes()[: position % edit.stat().st_size])
    result, error = _invoke(["to-lora", edit, "-o", sandbox / "lora.safetensors"], sandbox)
    if mutation in ("nan", "deep", "truncate", "metadata"):
        assert result.exit_code == 2
    if mutation == "nan":
        assert "NaN or infinite" in error
    if mutation == "deep":
        assert "nested more than 64 levels" in error
    shutil.rmtree(sandbox)


# -- properties of the core --------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.permutations(range(3)), st.permutations(range(3)), st.lists(st.sampled_from([1.0, 0.5, -2.0]), min_size=3,
                                                                        max_size=3), st.integers(0, 1000))
def test_apply_and_revert_are_bit_exact_in_any_order(pipe, apply_order, revert_order, scales, seed):
    snapshot = {k: v.clone() for component in ("unet", "text_encoder") for k, v in getattr(pipe, component).state_dict().items()}
    edits = [
        _low_rank_edit(pipe, seed, (TO_K, TE_K), rank=2),
        _low_rank_edit(pipe, seed + 1, (TO_K,), rank=3, dense=True),
        _low_rank_edit(pipe, seed + 2, (TO_V, TE_K), rank=1),
    ]
    for index in apply_order:
        edits[index].apply(pipe, scale=scales[index])
    assert applied_edits(pipe) == [edits[i] for i in apply_order]
    for index in revert_order:
        edits[index].revert(pipe)
    now = {k: v for component in ("unet", "text_encoder") for k, v in getattr(pipe, component).state_dict().items()}
    assert all(torch.equal(now[k], snapshot[k]) for k in snapshot)


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 4), st.integers(0, 4), st.booleans(), st.integers(0, 1000))
def test_to_lora_is_exact_at_any_rank_at_least_the_edits(pipe, rank, extra, dense, seed):
    edit = _low_rank_edit(pipe, seed, (TO_K, TE_K), rank=rank, dense=dense)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lora.safetensors"
        errors = edit.to_lora(path, rank=rank + extra)
        assert max(errors.values()) < 1e-6
        stored = load_file(str(path))
    for module in (TO_K, TE_K):
        expected = edit.tensors[f"{module}.up"] @ edit.tensors[f"{module}.down"] if not dense else edit.tensors[f"{module}.delta"]
        key = module if module.startswith("unet") else "text_encoder.text_model." + module.removeprefix("text_encoder.")
        up, down = stored[f"{key}.lora_B.weight"], stored[f"{key}.lora_A.weight"]
        assert up.shape[1] <= rank
        assert torch.allclose(up @ down, expected, rtol=1e-4, atol=1e-6)
