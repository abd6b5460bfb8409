"""The CLI's input boundary (conceptsmith.validate), bounded YAML, checked edit files and the error mapping."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conceptsmith import validate
from conceptsmith.cli import app
from conceptsmith.cli.errors import describe
from conceptsmith.config import ConfigError, read_yaml
from conceptsmith.edits import Edit, EditError, applied_edits, base_fingerprint
from conceptsmith.validate import InputError

runner = CliRunner()
TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (no pixel data): PIL reads the size without decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _edit(pipe, seed: int = 0, scale: float = 0.1) -> Edit:
    generator = torch.Generator().manual_seed(seed)
    up, down = torch.randn(64, 2, generator=generator) * scale, torch.randn(2, 32, generator=generator) * scale
    return Edit.from_weight_deltas("test", ["cat"], {}, base_fingerprint(pipe), "sd1", {TO_K: (up, down)})


# -- paths -----------------------------------------------------------------------------------------------


def test_inputs_must_be_regular_files_and_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="named pipe"):
        validate.input_file(fifo, "--edit")  # opening it would block: the test would hang
    with pytest.raises(InputError, match="is a folder"):
        validate.input_file(tmp_path, "--edit")
    with pytest.raises(InputError, match="'nope.txt' does not exist"):
        validate.input_file("nope.txt", "Prompts file")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(InputError, match="at most 0.0009"):
        validate.input_file(big, "Prompts file", max_bytes=1000)
    with pytest.raises(InputError, match="named pipe"):
        validate.model_spec(str(fifo))
    assert validate.model_spec("builtin:shapes") == "builtin:shapes" and validate.model_spec("org/model") == "org/model"


def test_outputs_are_never_an_input_never_a_folder_and_replaced_only_with_overwrite(tmp_path):
    source = tmp_path / "edit.safetensors"
    source.write_bytes(b"x")
    link = tmp_path / "link.safetensors"
    os.link(source, link)
    for out in (source, link, tmp_path / "sub" / ".." / "edit.safetensors"):
        with pytest.raises(InputError, match="also an input"):
            validate.output_path(out, "--out", [source], overwrite=True)
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        validate.output_path(link, "--out", [])
    assert validate.output_path(link, "--out", [], overwrite=True) == link
    with pytest.raises(InputError, match="is a folder"):
        validate.output_path(tmp_path, "--out", [], overwrite=True)
    with pytest.raises(InputError, match="must end in .safetensors"):
        validate.output_path(tmp_path / "x.bin", "--out", suffix=".safetensors")
    with pytest.raises(InputError, match="is not a folder"):
        validate.output_path(source / "x.safetensors", "--out")
    assert validate.output_path(tmp_path / "new" / "deeper" / "x.safetensors", "--out") is not None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.png").write_bytes(b"")
    assert validate.output_path(tmp_path / "run", "--out", folder=True) == tmp_path / "run"  # a run folder resumes
    with pytest.raises(InputError, match="not a folder"):
        validate.output_path(source, "--out", folder=True)


# -- numbers and seeds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), "got nan"), (float("inf"), "got inf"), (-1.0, "got -1"), (100.5, "got 100.5")],
)
def test_numbers_are_finite_and_in_range_and_the_message_states_the_range(value, message):
    with pytest.raises(InputError, match=f"--guidance must be a finite number from 0 to 100, {message}"):
        validate.number(value, "--guidance", 0.0, 100.0)


def test_image_sides_are_multiples_of_8():
    with pytest.raises(InputError, match="--height must be an integer from 8 to 8192, got 0"):
        validate.generation_options(None, None, 0, None, None)
    with pytest.raises(InputError, match="multiple of 8, got 100; e.g. 96"):
        validate.generation_options(None, None, 100, None, None)
    validate.generation_options(None, None, None, None, None)
    validate.generation_options(30, 7.5, 512, 768, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5-2", "runs backwards; write it ascending, e.g. --seeds 2-5"),
        ("a", "Seed 'a' is not an integer"),
        ("-3", "Seed '-3' is not an integer"),
        ("0,,1", "empty item"),
        ("0,", "empty item"),
        ("", "No seeds given"),
        ("0,0", "Seed 0 is listed twice"),
        ("0-5,3", r"Seed 3 is listed twice \('0-5' and '3'\)"),
        ("0-99999999999999", "names 100000000000000 seeds; a run takes at most 10000: split it into runs"),
        ("99999999999999999999", "not an integer"),
        ("9223372036854775808", "exceeds the largest seed"),
    ],
)
def test_seed_grammar_refuses_what_it_cannot_parse(text, message):
    with pytest.raises(InputError, match=message):
        validate.parse_seeds(text)


def test_seed_grammar_parses_lists_and_ranges_in_order():
    assert validate.parse_seeds(" 9, 0,3,5-8 ") == [9, 0, 3, 5, 6, 7, 8]
    assert validate.format_seeds([9, 0, 3, 5, 6, 7, 8]) == "9,0,3,5-8"
    assert validate.parse_seeds(f"0-{validate.MAX_SEEDS - 1}")[-1] == validate.MAX_SEEDS - 1


# -- templates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{0.__class__}", r"field \{0.__class__\}"),
        ("{x}", r"field \{x\}"),
        ("a {} {}", r"exactly once each \(\{\} appears 2 times\)"),
        ("a photo", r"\{\} appears 0 times"),
        ("{[0]}", r"field \{\[0\]\}"),
        ("{!r}", r"field \{!r\}"),
        ("{:>10}", r"field \{:>10\}"),
        ("a {", "literal braces"),
        ("a }", "literal braces"),
    ],
)
def test_templates_hold_exactly_the_fields_they_need(template, message):
    with pytest.raises(InputError, match=message):
        validate.check_template(template)


def test_templates_in_configs_are_checked_by_key_and_every_shipped_config_passes():
    from conceptsmith.resources import configs_root

    validate.check_template("a {{literal}} {}")
    validate.check_template("{a} next to {b}", {"a", "b"})
    with pytest.raises(InputError, match=r"key 'tasks.0.params.templates'"):
        validate.check_templates({"tasks": [{"params": {"templates": ["{}", "{x}"]}}]}, "bench.yaml")
    with pytest.raises(InputError, match=r"key 'composition_prompts'.*\{b\} appears 0 times"):
        validate.check_templates({"composition_prompts": ["{a} alone"]}, "bench.yaml")
    validate.check_templates({"templates": "object", "phrase": "{token} {class_word}", "neutral_prompts": ["{x}"]}, "c")
    shipped = sorted(configs_root().rglob("*.yaml"))
    assert len(shipped) > 20
    for path in shipped:
        validate.check_templates(read_yaml(path), str(path))


# -- images ------------------------------------------------------------------------------------------------


def test_images_are_bounded_from_their_header_before_decoding(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(20000, 20000))  # 400 MP: PIL's own bomb bound raises in Image.open
    with pytest.raises(InputError, match="larger than PIL's decompression-bomb bound; images may be at most 8192x8192"):
        validate.check_image(huge)
    wide = tmp_path / "wide.png"
    wide.write_bytes(png_header(9000, 10))
    with pytest.raises(InputError, match="is 9000x10 px; images may be at most 8192x8192 px and 64 MP"):
        validate.check_image(wide)
    many = tmp_path / "many.png"
    many.write_bytes(png_header(8192, 8000))  # 65.5 MP: under PIL's warning bound, over ours
    with pytest.raises(InputError, match="8192x8000"):
        validate.check_image(many)
    deep = tmp_path / "deep.png"
    Image.new("I;16", (8, 8)).save(deep)
    with pytest.raises(InputError, match="pixel mode I;16"):
        validate.check_image(deep)
    good = tmp_path / "good.png"
    Image.new("RGB", (12, 10), "red").save(good)
    assert validate.check_image(good) == (12, 10)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(InputError, match="cannot be read as an image"):
        validate.check_image(truncated)
    os.mkfifo(tmp_path / "fifo.png")
    assert validate.check_images([tmp_path / "good.png"]) == [good]
    with pytest.raises(InputError, match="named pipe"):
        validate.check_images([tmp_path / "fifo.png"])


# -- YAML --------------------------------------------------------------------------------------------------

BILLION_LAUGHS = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_yaml_alias_bomb_duplicate_keys_size_and_recursion_are_refused_fast(tmp_path):
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 700
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than 100000 nodes"):
        read_yaml(bomb)
    assert time.perf_counter() - started < 1.0
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("method: uce\nparams: {}\nmethod: esd\n")
    with pytest.raises(ConfigError, match=r"line 3, column 1: duplicate key 'method' \(first at line 1\)"):
        read_yaml(duplicate)
    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &base {lr: 1, steps: 2}\nrun:\n  <<: *base\n  lr: 3\n")
    assert read_yaml(merged)["run"] == {"lr": 3, "steps": 2}  # a merge key's override is not a duplicate
    shared = tmp_path / "shared.yaml"
    shared.write_text("a: &x [1, 2]\nb: *x\nc: *x\n")
    assert read_yaml(shared) == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "y" * (2**20 + 1))
    with pytest.raises(ConfigError, match="MiB is read"):
        read_yaml(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply|invalid YAML"):
        read_yaml(deep)
    recursive = tmp_path / "rec.yaml"
    recursive.write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match="recursive"):
        read_yaml(recursive)
    (tmp_path / "latin1.yaml").write_bytes(b"a: \xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml(tmp_path / "latin1.yaml")


def test_cli_refuses_the_billion_laughs_config_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    result = runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "-c", "cat", "--config", str(bomb),
                                 "-o", str(tmp_path / "e.safetensors")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "alias bomb" in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- edits -------------------------------------------------------------------------------------------------


def _rewrite(path, tmp_path, name, tensors=None, header=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = tensors if tensors is not None else load_file(str(path))
    if header is not None:
        metadata = {**metadata, "conceptsmith": header}
    save_file(tensors, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


def test_load_refuses_non_finite_tensors_and_oversized_or_deep_metadata(tiny_pipe, tmp_path, monkeypatch):
    from conceptsmith import edits

    pipe, _ = tiny_pipe
    path = _edit(pipe).save(tmp_path / "e.safetensors")
    tensors = load_file(str(path))
    tensors[f"{TO_K}.up"][0, 0] = float("nan")
    with pytest.raises(EditError, match=rf"tensor '{TO_K}.up' holds NaN or infinite values"):
        Edit.load(_rewrite(path, tmp_path, "nan.safetensors", tensors=tensors))
    for depth in (65, 200_000):  # the second one is deeper than json's recursion limit
        deep = _rewrite(path, tmp_path, f"deep{depth}.safetensors", header="[" * depth + "]" * depth)
        with pytest.raises(EditError, match="nested more than 64 levels"):
            Edit.load(deep)
    assert Edit.load(_rewrite(path, tmp_path, "same.safetensors")).method == "test"  # the rewrite itself is fine
    monkeypatch.setattr(edits, "MAX_METADATA_BYTES", 100)
    with pytest.raises(EditError, match="MiB of JSON, more than"):
        Edit.load(path)


def test_apply_refuses_absurd_magnitudes_relative_to_the_weights(tiny_pipe):
    pipe, _ = tiny_pipe
    edit = _edit(pipe, scale=1.0)
    weight = pipe.unet.get_submodule(TO_K.removeprefix("unet.")).weight.detach()
    change = float((edit.tensors[f"{TO_K}.up"] @ edit.tensors[f"{TO_K}.down"]).norm())
    limit = 100 * float(weight.norm()) / change
    with pytest.raises(EditError, match=r"more than 100x the norm of its weights"):
        edit.apply(pipe, scale=limit * 1.01)
    assert applied_edits(pipe) == []
    edit.apply(pipe, scale=limit * 0.99)
    edit.revert(pipe)
    broken = Edit.from_weight_deltas("test", ["cat"], {}, base_fingerprint(pipe), "sd1",
                                     {TO_K: torch.full((64, 32), float("inf"))})
    with pytest.raises(EditError, match="NaN or infinite"):
        broken.apply(pipe)


def test_the_same_edit_twice_is_refused_unless_repeat_ok(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    before = pipe.unet.get_submodule(TO_K.removeprefix("unet.")).weight.detach().clone()
    path = _edit(pipe).save(tmp_path / "e.safetensors")
    first, second = Edit.load(path), Edit.load(path)
    first.apply(pipe)
    with pytest.raises(EditError, match="same content .* as an edit already applied.*repeat_ok=True"):
        second.apply(pipe)
    second.apply(pipe, repeat_ok=True)
    assert applied_edits(pipe) == [first, second]
    first.revert(pipe)
    second.revert(pipe)
    assert torch.equal(pipe.unet.get_submodule(TO_K.removeprefix("unet.")).weight, before)
    _edit(pipe, seed=1).apply(pipe)  # another edit is fine


def test_cli_refuses_an_edit_twice_and_merging_an_edit_with_itself(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    path = _edit(pipe).save(tmp_path / "e.safetensors")
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    twice = runner.invoke(app, ["generate", "-m", "builtin:tiny-test", "-p", "x", "-e", str(path), "-e", str(copy),
                                "-o", str(tmp_path / "gen")])
    assert twice.exit_code == 2 and "is the same edit as" in twice.output and "FILE:2" in twice.output
    assert not (tmp_path / "gen").exists()
    merged = runner.invoke(app, ["merge", str(path), str(copy), "--method", "lora-sum", "-o", str(tmp_path / "m.safetensors")])
    assert merged.exit_code == 2 and "merging an edit with itself" in merged.output


@pytest.mark.parametrize(
    "args",
    [
        ["export", "-m", "builtin:tiny-test", "-e", "{e}", "-o", "{e}", "--overwrite"],
        ["to-lora", "{e}", "-o", "{e}", "--overwrite"],
        ["export-lora", "{e}", "-o", "{e}"],
        ["merge", "{e}", "{f}", "--method", "lora-sum", "-o", "{e}", "--overwrite"],
    ],
)
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tiny_pipe, tmp_path, args):
    pipe, _ = tiny_pipe
    e = _edit(pipe).save(tmp_path / "e.safetensors")
    f = _edit(pipe, seed=1).save(tmp_path / "f.safetensors")
    data = e.read_bytes()
    result = runner.invoke(app, [arg.format(e=e, f=f) for arg in args])
    assert result.exit_code == 2, result.output
    assert "is also an input of this command" in result.output
    assert e.read_bytes() == data


# -- error mapping -----------------------------------------------------------------------------------------


def test_every_exception_maps_to_one_line_and_unexpected_ones_to_a_crash_report(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path / "cache"))
    assert describe(ValueError("bad")) == (2, "bad")
    several = ConfigError("c.yaml: invalid EditConfig:\n  key 'parms': unknown key\n  key 'x': bad")
    assert describe(several) == (2, "c.yaml: invalid EditConfig: key 'parms': unknown key; key 'x': bad")
    assert describe(KeyError("Unknown method 'x'")) == (2, "Unknown method 'x'")
    code, message = describe(PermissionError(13, "Permission denied", "/root/x"))
    assert code == 2 and message == "Permission denied: '/root/x'; check the permissions, or choose another path."
    assert describe(OSError(28, "No space left on device", "out.png"))[1].endswith("free some disk space, or write somewhere else.")
    assert describe(torch.OutOfMemoryError("CUDA out of memory"))[0] == 2
    assert describe(Image.DecompressionBombError("too big"))[0] == 2
    code, message = describe(RuntimeError("boom\nsecond line"))
    assert code == 1 and message.startswith("unexpected RuntimeError: boom (a bug in conceptsmith")
    crash = next((tmp_path / "cache").glob("crash-*.txt"))
    assert str(crash) in message and "RuntimeError: boom" in crash.read_text()


def test_an_unexpected_exception_in_a_command_prints_one_line_and_exits_1(tmp_path, monkeypatch):
    from conceptsmith import models

    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(ZeroDivisionError("x")))
    result = runner.invoke(app, ["inspect", "builtin:tiny-test"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected ZeroDivisionError: x") and "crash-" in lines[0]


def test_world_commands_check_their_numbers_and_answer_in_one_line(tmp_path):
    from conceptsmith.cli.world import app as world_app

    for args, message in ((["train", "-o", str(tmp_path / "w"), "--unet-lr", "nan"], "--unet-lr must be a finite number"),
                          (["train", "-o", str(tmp_path / "w"), "--jobs", "0"], "--jobs must be an integer from 1 to 64"),
                          (["train", "-o", str(tmp_path / "w"), "--stages", "nope"], "unknown stage(s) ['nope']"),
                          (["check", "--seeds", "0"], "--seeds must be an integer from 1 to 1000"),
                          (["check", "--grid", str(tmp_path)], "must end in .png")):
        result = runner.invoke(world_app, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], args
    assert not (tmp_path / "w").exists()


def test_parser_errors_are_one_line_too():
    result = runner.invoke(app, ["generate", "--steps", "abc"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Invalid value for '--steps'")
    assert runner.invoke(app, []).exit_code == 2  # no arguments: the help text
