"""``conceptsmith import`` and ``conceptsmith export-lora`` (alias ``to-lora``): users' own files in, every edit out.

:func:`register` adds them to the main app (:mod:`conceptsmith.cli.commands`); each command is a thin layer over
:func:`conceptsmith.imports.import_file` and :meth:`conceptsmith.edits.Edit.to_lora`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from conceptsmith import validate
from conceptsmith.lora_layouts import LAYOUTS

OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="replace existing output files")]


def register(app: typer.Typer, user_errors: Callable[..., Any], load: Callable[[str], tuple[Any, Any]]) -> None:
    """Add the commands to ``app``; ``user_errors`` is the CLI's error decorator, ``load(model) -> (pipe, info)``."""
    app.command("import")(user_errors(_bind(import_command, load)))
    export = user_errors(_bind(export_lora, load))
    app.command("export-lora")(export)
    app.command("to-lora", help="Alias of export-lora (diffusers format by default).")(export)


def _bind(command: Callable[..., None], load: Callable[[str], tuple[Any, Any]]) -> Callable[..., None]:
    """``command`` with its ``load`` argument filled in, keeping the signature typer reads the options from."""
    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        command(load=load, **kwargs)

    signature = inspect.signature(command, eval_str=True)
    run.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "load"])
    return run


def import_command(
    load: Callable[[str], tuple[Any, Any]],
    file: Annotated[Path, typer.Argument(help="LoRA (kohya / diffusers / peft) or embedding (diffusers / A1111) file or folder")],
    model: Annotated[str, typer.Option("--model", "-m", help="the base model the file was made for (hub id, dir, file, builtin:<name>)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="edit file to write (.safetensors)")],
    token: Annotated[str | None, typer.Option(help="token of an embedding (default: the file's own, else its name)")] = None,
    concept: Annotated[list[str], typer.Option("--concept", "-c", help="what it is about / its trigger phrase (repeatable)")] = [],  # noqa: B006
    overwrite: OverwriteOption = False,
) -> None:
    """Import a LoRA or textual-inversion file as an Edit of MODEL (merge, generate, evaluate and bench take it)."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out '{out}' must end in .safetensors (edits are saved as safetensors).")
    validate.input_path(file, "FILE")
    validate.model_spec(model)
    validate.output_path(out, "--out", validate.local_inputs(file, model), overwrite)
    from conceptsmith.imports import import_file

    pipe, info = load(model)
    edit = import_file(file, pipe, token=token, concepts=concept or None)
    edit.save(out)
    source = f"{edit.params['format']} {'embedding' if edit.kind == 'hook' else 'LoRA'} '{edit.params['source']}'"
    if edit.kind == "hook":
        what = f"token {', '.join(edit.params['tokens'])} ({', '.join(sorted({k.partition('.')[0] for k in edit.tensors}))})"
    else:
        shapes = edit.module_shapes
        per_component = {c: sum(m.startswith(f"{c}.") for m in shapes) for c in dict.fromkeys(m.partition(".")[0] for m in shapes)}
        what = f"{len(shapes)} modules (" + ", ".join(f"{c} {n}" for c, n in per_component.items()) + ")"
    typer.echo(f"imported {source}: {what} for {info.spec} [{info.fingerprint}] -> {out}")


def export_lora(
    load: Callable[[str], tuple[Any, Any]],
    edit: Annotated[Path, typer.Argument(help="edit file (.safetensors): weights, LoRA, Custom Diffusion, textual inversion")],
    layout: Annotated[str, typer.Option("--format", help="diffusers (pipe.load_lora_weights) | kohya (sd-scripts, WebUI, ComfyUI)")] = "diffusers",
    rank: Annotated[int | None, typer.Option(help="truncate to this rank (default: exact)")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="the edit's base model (kohya SDXL numbers the UNet's blocks by it; default: SDXL base)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="LoRA file to write (.safetensors); learned tokens go beside it")] = Path("lora.safetensors"),
    overwrite: OverwriteOption = False,
) -> None:
    """Write an edit as a LoRA file (diffusers or kohya format); learned tokens as embedding files beside it."""
    validate.number(rank, "--rank", *validate.RANK, integer=True)
    validate.model_spec(model or "")
    inputs = validate.local_inputs(edit, model)
    validate.output_path(out, "--out", inputs, overwrite, suffix=".safetensors")
    validate.input_file(edit, "EDIT")
    if layout not in LAYOUTS:
        raise validate.InputError(f"Unknown LoRA format '{layout}'; choose one of {', '.join(LAYOUTS)} (--format).")
    from conceptsmith.edits import Edit
    from conceptsmith.lora_formats import edit_tokens, token_files

    loaded = Edit.load(edit)
    tokens = [token for token, _ in edit_tokens(loaded)]
    for path in token_files(out, tokens, layout).values():
        validate.output_path(path, "token file", inputs, overwrite)
    unet_shapes = None
    if model is not None:
        pipe, _ = load(model)
        unet_shapes = {key: tuple(value.shape) for key, value in pipe.unet.state_dict().items()}
    errors = loaded.to_lora(out, rank=rank, layout=layout, unet_shapes=unet_shapes)
    if errors:
        typer.echo(f"wrote {out}: {len(errors)} modules, max relative truncation error {max(errors.values()):.2e}")
    loader = "pipe.load_textual_inversion" if layout == "diffusers" else "WebUI embeddings/, trigger word = file name"
    for token, path in token_files(out, tokens, layout).items():
        typer.echo(f"wrote {path}: token {token} ({loader})")

