"""The ``conceptsmith`` app and its main commands (typer). Each command is a thin layer over the library."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from conceptsmith import validate
from conceptsmith.cli.errors import OneLineErrors, user_errors
from conceptsmith.cli.files import register as _register_file_commands
from conceptsmith.cli.options import DeviceOption, DtypeOption
from conceptsmith.cli.world import app as world_app
from conceptsmith.io import save_image

app = typer.Typer(
    cls=OneLineErrors,
    name="conceptsmith",
    help="Erase, compose and benchmark concepts in diffusers text-to-image pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="hub id, local dir, .safetensors file, builtin:<name> "
                                           "or a model config (configs/models/NAME.yaml, or NAME)")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="replace an existing output file")]

EDIT_HELP = "edit to apply, FILE or FILE:SCALE (e.g. no-skull.safetensors:0.5; repeatable, in order)"


def _load(model: str, dtype: str | None = "float32", device: str | None = "cpu"):
    """The pipeline and its ModelInfo; ``None`` takes the model config's dtype / device, else the defaults."""
    from conceptsmith.models import load_pipeline

    pipe, info = load_pipeline(model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, info


def _check_edits(specs: list[str]) -> list[tuple[Path, float]]:
    """``(path, scale)`` of each ``--edit FILE[:SCALE]``: regular files, scales in range (nothing is loaded)."""
    checked = []
    for spec in specs:
        path, scale = validate.parse_edit_spec(spec)
        validate.input_file(path, "--edit")
        validate.number(scale, f"The scale of --edit '{spec}'", *validate.EDIT_SCALE)
        checked.append((path, scale))
    return checked


def _load_edits(checked: list[tuple[Path, float]]) -> list[tuple[Path, Any, float]]:
    """``(path, Edit, scale)`` of each :func:`_check_edits` pair; no edit twice."""
    from conceptsmith.edits import Edit

    loaded = [(path, Edit.load(path), scale) for path, scale in checked]
    validate.distinct_edits([(str(path), edit) for path, edit, _ in loaded])
    return loaded


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:limit] or "prompt"


def _read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    collected = [*prompts, *validate.read_lines(prompts_file, "Prompts file")]
    if not collected or not all(p.strip() for p in collected):
        raise ValueError("No prompts given (or an empty prompt): pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    return collected


@app.command()
@user_errors
def generate(
    model: ModelOption = "builtin:shapes",
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt (repeatable)")] = [],  # noqa: B006
    prompts_file: Annotated[Path | None, typer.Option(help="text file, one prompt per line")] = None,
    seeds: Annotated[str, typer.Option(help="seeds, e.g. 0,1,2 or 0-7")] = "0",
    edit: Annotated[list[str], typer.Option("--edit", "-e", help=EDIT_HELP)] = [],  # noqa: B006
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None,
    guidance: Annotated[float | None, typer.Option(help="classifier-free guidance scale")] = None,
    height: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per forward pass")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path("out/generate"),
) -> None:
    """Generate prompts x seeds: one PNG per image, a grid.png and a manifest.json.

    Each image is written as soon as it is made and the manifest after every batch; a rerun with the same
    arguments into the same --out keeps the images already there (checked by their SHA-256) and makes the rest."""
    validate.model_spec(model)
    validate.generation_options(steps, guidance, height, width, batch_size)
    validate.output_path(out, "--out", folder=True)
    prompts = _read_prompts(prompt, prompts_file)
    seed_list = validate.parse_seeds(seeds)
    checked = _check_edits(edit)
    from conceptsmith.edits import content_digest
    from conceptsmith.generation import default_settings, generate_to_folder
    from conceptsmith.grids import image_grid

    edits = _load_edits(checked)
    pipe, info = _load(model, dtype, device)
    for _, loaded, scale in edits:
        loaded.apply(pipe, scale=scale)
    settings = default_settings(pipe, num_inference_steps=steps, guidance_scale=guidance, height=height,
                                width=width, batch_size=batch_size)
    header = {
        "model": info.spec,
        "family": info.family,
        "base_fingerprint": info.fingerprint,
        "edits": [{"file": str(path), "scale": scale, "method": e.method, "concepts": e.concepts,
                   "digest": content_digest(e, scale)} for path, e, scale in edits],
        "settings": settings.pipeline_kwargs(),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "generator": "torch.Generator('cpu').manual_seed(seed), one per image",
    }
    jobs = [(text, seed, f"{index:03d}_{_slug(text)}_s{seed}.png") for index, text in enumerate(prompts) for seed in seed_list]
    run = generate_to_folder(pipe, jobs, out, header, settings)
    records = run.records
    grid = image_grid([image for _, _, image in run.images], columns=len(seed_list),
                      labels=[f"{text} | {seed}" for text, seed, _ in run.images])
    save_image(out / "grid.png", grid)
    if run.reused:
        typer.echo(f"kept {run.reused} images already in {out} (same arguments)")
    typer.echo(f"wrote {len(records)} images, grid.png and manifest.json to {out}")


@app.command()
@user_errors
def methods() -> None:
    """List the registered editors, attacks, metrics and builtin models."""
    from conceptsmith.models import list_builtins
    from conceptsmith.registry import list_attacks, list_editors, list_metrics

    tables = (("editors", list_editors()), ("attacks", list_attacks()), ("metrics", list_metrics()), ("models", list_builtins()))
    for title, table in tables:
        typer.echo(f"{title}:")
        prefix = "builtin:" if title == "models" else ""
        for name, description in table.items():
            typer.echo(f"  {prefix + name:<24} {description}")
        if not table:
            typer.echo("  (none)")


@app.command()
@user_errors
def inspect(
    model: Annotated[str, typer.Argument(help="hub id, local dir, .safetensors file or builtin:<name>")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show a model's family, cross-attention layers, dimensions and base fingerprint."""
    validate.model_spec(model)
    from conceptsmith.attention import find_cross_attention

    pipe, info = _load(model)
    layers = find_cross_attention(pipe.unet)
    report = {
        "spec": info.spec,
        "family": info.family,
        "text_embed_dim": info.text_embed_dim,
        "cross_attention_layers": info.cross_attention_layers,
        "kv_matrices": 2 * len(layers),
        "fingerprint": info.fingerprint,
        "layers": [{"name": layer.name, "d_in": layer.d_in, "d_out": layer.d_out} for layer in layers],
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key in ("spec", "family", "text_embed_dim", "cross_attention_layers", "kv_matrices", "fingerprint"):
        typer.echo(f"{key:<24} {report[key]}")
    for layer in report["layers"]:
        typer.echo(f"  {layer['name']:<64} {layer['d_in']:>5} -> {layer['d_out']}")


def _editor_from_options(method: str | None, config: Path | None):
    """The editor named by --method, with hyper-parameters from --config (whose method must agree)."""
    from conceptsmith.config import EditConfig, load_config
    from conceptsmith.registry import get_editor

    params: dict[str, Any] = {}
    if config is not None:
        loaded = load_config(config, EditConfig)
        validate.check_templates(loaded.params, str(config), "params")
        if method is not None and method != loaded.method:
            raise ValueError(f"--method {method} disagrees with '{config}', which configures '{loaded.method}'.")
        method, params = loaded.method, loaded.params
    if method is None:
        raise ValueError("Name a method: --method NAME (see `conceptsmith methods`) or --config FILE.")
    editor_cls = get_editor(method)
    try:
        return editor_cls(params)
    except ValueError as err:
        raise ValueError(f"{config or 'defaults'}: invalid parameters for '{method}': {err}") from None


@app.command()
@user_errors
def erase(
    model: ModelOption = "builtin:shapes",
    method: Annotated[str | None, typer.Option(help="erasure method (see `conceptsmith methods`)")] = None,
    concept: Annotated[list[str], typer.Option("--concept", "-c", help="concept to erase (repeatable)")] = [],  # noqa: B006
    concepts_file: Annotated[Path | None, typer.Option(help="text file, one concept per line")] = None,
    guide: Annotated[str | None, typer.Option(help="what the concept becomes ('' = nothing; default: the method's)")] = None,
    preserve: Annotated[list[str], typer.Option("--preserve", help="concept to keep intact (repeatable)")] = [],  # noqa: B006
    preserve_file: Annotated[Path | None, typer.Option(help="text file, one preserved concept per line")] = None,
    images: Annotated[list[Path], typer.Option(
        "--images", help="images of the concept (folder or file; one per concept) for methods that learn from them")] = [],  # noqa: B006
    config: Annotated[Path | None, typer.Option(help="YAML with `method:` and `params:` (configs/erase/*.yaml)")] = None,
    seed: Annotated[int, typer.Option(help="seed for any random choice of the method")] = 0,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="edit file to write (.safetensors)")] = Path("edit.safetensors"),
    overwrite: OverwriteOption = False,
) -> None:
    """Erase concepts: fit an erasure method and write the Edit (the model itself is never modified)."""
    from conceptsmith.registry import EditRequest

    if out.suffix != ".safetensors":
        raise ValueError(f"--out '{out}' must end in .safetensors (edits are saved as safetensors).")
    validate.model_spec(model)
    validate.seed(seed)
    concepts = concept + validate.read_lines(concepts_file, "Concepts file")
    if not concepts:
        raise ValueError("No concept given: pass --concept TEXT (repeatable) or --concepts-file FILE.")
    preserved = preserve + validate.read_lines(preserve_file, "Preserve file")
    validate.check_images(images)
    validate.output_path(out, "--out", validate.local_inputs(model, config, concepts_file, preserve_file, *images),
                         overwrite)
    editor = _editor_from_options(method, config)
    pipe, info = _load(model, dtype, device)
    request = EditRequest(concepts=concepts, guide=guide, preserve=preserved, images=list(images), seed=seed)
    started = time.perf_counter()
    result = editor.fit(pipe, request)
    seconds = time.perf_counter() - started
    result.save(out)
    typer.echo(f"{editor.name}: erased {len(concepts)} concept(s) from {info.spec} [{info.fingerprint}] "
               f"in {seconds:.2f} s -> {out}")
    for line in _metadata_lines(result.metadata):
        typer.echo(f"  {line}")


def _metadata_lines(metadata: dict, prefix: str = "") -> list[str]:
    """Scalar metadata as ``key: value`` lines, one level of nesting as ``outer.key`` (the solver's condition
    number, rank and worst residuals); per-projection tables stay in the file (``conceptsmith inspect``)."""
    lines = []
    for key, value in sorted(metadata.items()):
        if key in {"created", "conceptsmith_version"}:
            continue
        if isinstance(value, float):
            lines.append(f"{prefix}{key}: {value:.4g}")
        elif isinstance(value, (int, str)):
            lines.append(f"{prefix}{key}: {value}")
        elif isinstance(value, dict) and not prefix:
            lines.extend(_metadata_lines(value, f"{key}."))
    return lines


@app.command()
@user_errors
def customize(
    model: ModelOption = "builtin:shapes",
    method: Annotated[str | None, typer.Option(help="custom-diffusion | lora | textual-inversion | ...")] = None,
    token: Annotated[list[str], typer.Option("--token", "-t", help="new token, e.g. '<mascot>' (repeatable)")] = [],  # noqa: B006
    class_word: Annotated[list[str], typer.Option("--class-word", help="class of each token, e.g. 'toy'")] = [],  # noqa: B006
    images: Annotated[list[Path], typer.Option("--images", help="reference image folder, one per token")] = [],  # noqa: B006
    config: Annotated[Path | None, typer.Option(help="YAML with `method:` and `params:` (configs/customize/*.yaml)")] = None,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="edit file to write (.safetensors)")] = Path("custom.safetensors"),
    overwrite: OverwriteOption = False,
) -> None:
    """Teach the model new concepts from reference images and write the Edit."""
    from conceptsmith.registry import EditRequest

    if out.suffix != ".safetensors":
        raise ValueError(f"--out '{out}' must end in .safetensors (edits are saved as safetensors).")
    if not token:
        raise ValueError("No token given: pass --token '<name>' (and --images DIR with its reference images).")
    if len(images) != len(token):
        raise ValueError(f"Pass one --images folder per --token: got {len(token)} token(s) and {len(images)} folder(s).")
    validate.model_spec(model)
    validate.seed(seed)
    validate.check_images(images)
    validate.output_path(out, "--out", validate.local_inputs(model, config, *images), overwrite)
    editor = _editor_from_options(method, config)
    pipe, info = _load(model, dtype, device)
    result = editor.fit(pipe, EditRequest(concepts=[], tokens=token, class_words=class_word, images=images, seed=seed))
    result.save(out)
    typer.echo(f"{editor.name}: learned {', '.join(token)} on {info.spec} [{info.fingerprint}] -> {out}")
    typer.echo("  prompt with: " + ", ".join(f'"{phrase}"' for phrase in result.concepts) + " (the phrases it trained on)")


@app.command()
@user_errors
def merge(
    edits: Annotated[list[Path], typer.Argument(help="edit files to merge")],
    method: Annotated[str, typer.Option(help="closed-form | lora-sum | svd | cat | ties | ties_svd | linear | stack")] = "closed-form",
    model: Annotated[str | None, typer.Option("--model", "-m", help="base model (needed by closed-form)")] = None,
    weight: Annotated[list[float], typer.Option("--weight", help="weight per edit (LoRA methods)")] = [],  # noqa: B006
    rank: Annotated[int | None, typer.Option(help="target rank (svd)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="merged edit file (.safetensors)")] = Path("merged.safetensors"),
    overwrite: OverwriteOption = False,
) -> None:
    """Merge several edits of one base into one edit."""
    if len(edits) < 2:
        raise ValueError("Merging needs at least two edit files.")
    from conceptsmith.customization.merge_methods import check_method, needs_pipeline

    check_method(method)
    for value in weight:
        validate.number(value, "--weight", *validate.MERGE_WEIGHT)
    validate.number(rank, "--rank", *validate.RANK, integer=True)
    validate.model_spec(model or "")
    validate.output_path(out, "--out", validate.local_inputs(model, *edits), overwrite, suffix=".safetensors")
    paths = [validate.input_file(path, "Edit file") for path in edits]
    if needs_pipeline(method) and model is None:
        raise ValueError(f"--method {method} solves against the base model: pass --model M (the edits' base).")
    from conceptsmith.customization.merge import merge as merge_edits
    from conceptsmith.edits import Edit

    loaded = [Edit.load(path) for path in paths]
    validate.distinct_edits(list(zip(edits, loaded, strict=True)), "merge: edit",
                            "merging an edit with itself counts it twice; pass each edit once (--weight 2 weighs one more)")
    pipe = None
    if needs_pipeline(method):
        pipe, _ = _load(model)
    merged = merge_edits(loaded, method, pipe=pipe, weights=weight or None, rank=rank)
    merged.save(out)
    typer.echo(f"merged {len(loaded)} edits with {method} -> {out}")


@app.command()
@user_errors
def bench(
    config: Annotated[str, typer.Argument(help="configs/bench/NAME.yaml or a bench name such as shapes-objects")],
    methods: Annotated[str | None, typer.Option(help="comma-separated subset of the config's methods")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="override the config's model")] = None,
    evaluator: Annotated[str | None, typer.Option(help="override the config's evaluator")] = None,
    cache: Annotated[str | None, typer.Option(help="image/edit cache directory")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="report directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    report: Annotated[bool, typer.Option(help="write report.md / report.html beside results.json")] = True,
) -> None:
    """Run a benchmark: fit every method, generate, score, write results.json and a report.
    On several GPUs: accelerate launch --multi_gpu --num_processes N -m conceptsmith bench CONFIG."""
    _check_bench(config, model, out, cache)
    from conceptsmith.cli.bench import bench_command

    bench_command(config, out=out, methods=methods, model=model, evaluator=evaluator, cache=cache, as_json=as_json,
                  device=device, dtype=dtype, report=report)


def _check_bench(config: str, model: str | None, out: str | None, cache: str | None) -> None:
    """A benchmark's YAML (bounded, templates checked), ``--model`` and its folders; a run folder is resumed,
    so an existing one is written into (its cache makes a rerun do only what is new)."""
    from conceptsmith.config import read_yaml
    from conceptsmith.evaluation.bench_spec import resolve_bench_path

    path = resolve_bench_path(config)
    validate.check_templates(read_yaml(path), str(path))
    validate.model_spec(model or "")
    for folder, option in ((out, "--out"), (cache, "--cache")):
        if folder:
            validate.output_path(folder, option, folder=True)


@app.command()
@user_errors
def evaluate(
    bench_config: Annotated[str, typer.Option("--bench", help="benchmark config naming prompts, seeds, evaluator")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="override the config's model")] = None,
    edit: Annotated[list[str], typer.Option("--edit", "-e", help="saved edit to score, FILE or FILE:SCALE (repeatable)")] = [],  # noqa: B006
    evaluator: Annotated[str | None, typer.Option(help="override the config's evaluator")] = None,
    cache: Annotated[str | None, typer.Option(help="image cache directory")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="report directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Score the unedited model and each saved edit on a benchmark's prompts."""
    _check_bench(bench_config, model, out, cache)
    checked = _check_edits(edit)
    from conceptsmith.cli.bench import evaluate_command

    _load_edits(checked)
    evaluate_command(bench_config, model=model, edits=edit, out=out, evaluator=evaluator, cache=cache, as_json=as_json,
                     device=device, dtype=dtype)


@app.command()
@user_errors
def export(
    model: ModelOption = "builtin:shapes",
    edit: Annotated[list[str], typer.Option("--edit", "-e", help=EDIT_HELP)] = [],  # noqa: B006
    half: Annotated[bool, typer.Option(help="store weights in float16 (half the size)")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="single-file checkpoint to write (.safetensors)")] = Path(
        "model.safetensors"
    ),
    overwrite: OverwriteOption = False,
) -> None:
    """Bake edits into a single-file checkpoint in the original SD layout (WebUI / from_single_file)."""
    validate.model_spec(model)
    checked = _check_edits(edit)
    validate.output_path(out, "--out", validate.local_inputs(model, *(path for path, _ in checked)), overwrite,
                         suffix=".safetensors")
    import torch

    from conceptsmith.export import export_single_file

    edits = _load_edits(checked)
    pipe, info = _load(model)
    for _, loaded, scale in edits:
        loaded.apply(pipe, scale=scale)
    export_single_file(pipe, out, dtype=torch.float16 if half else None)
    typer.echo(f"wrote {out} ({info.family}, base {info.fingerprint}, {len(edits)} edit(s) baked in)")


_register_file_commands(app, user_errors, _load)  # import, export-lora, to-lora
app.add_typer(world_app, name="world", help="ShapesWorld: train and check the builtin micro world.")


def main() -> None:
    """The ``conceptsmith`` console script (``python -m conceptsmith``, ``python -m conceptsmith.cli``)."""
    app(prog_name="conceptsmith")
