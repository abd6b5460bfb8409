"""``conceptsmith world``: train ShapesWorld and check it against its bars."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import typer

from conceptsmith import validate
from conceptsmith.cli.errors import OneLineErrors, user_errors
from conceptsmith.cli.options import DeviceOption, DtypeOption
from conceptsmith.io import atomic_directory, write_json
from conceptsmith.world.bars import GEN_METRICS
from conceptsmith.world.shipped import PIPE_DIR, refuse_shipped

app = typer.Typer(help="ShapesWorld: the built-in micro text-to-image world (train, check).", no_args_is_help=True,
                  cls=OneLineErrors)

STAGES = ("data", "text-tower", "vae", "unet", "evaluator")
#: Written into every ``world train --out`` folder: a later run may resume there without --overwrite.
MARKER = "world-train.json"
#: What the UNet stage reads from the generator folder; taken from the shipped pipeline when an earlier stage
#: did not write it.
UNET_INPUTS = ("tokenizer", "text_encoder", "vae")


@app.command()
@user_errors
def train(
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the trained weights: shapes-sd/ (generator "
                             "pipeline) and shapes-clip/ (evaluator). Never the shipped weights; an existing non-empty "
                             "folder only if an earlier `world train` made it (resume) or with --overwrite."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing non-empty --out folder."),
    stages: str = typer.Option(",".join(STAGES), help=f"Comma-separated stages to run, in order: {', '.join(STAGES)}."),
    seed: int = typer.Option(0, help="Seed of the generator's data pool, VAE and UNet."),
    unet_steps: int | None = typer.Option(None, help="UNet optimizer steps (schedule length). "
                                          "Default: the shipped recipe's."),
    unet_batch: int | None = typer.Option(None, help="UNet batch size. Default: the shipped recipe's."),
    text_tower_stop: int | None = typer.Option(None, help="Freeze the text tower after this many steps of its schedule."),
    unet_lr: float | None = typer.Option(None, help="UNet peak learning rate (warmup + cosine). "
                                         "Default: the shipped recipe's."),
    unet_init: Path | None = typer.Option(None, help="Start the UNet from this diffusers UNet dir instead of random weights "
                                          "(fine-tune onto a new text encoder, or grow a UNet with fewer attention "
                                          "blocks: its layers are loaded, new blocks start as the identity)."),
    unet_two_object_share: float | None = typer.Option(None, help="Share of every UNet batch drawn from two-object "
                                                       "scenes. Default: the shipped recipe's."),
    unet_offset_noise: float | None = typer.Option(None, help="Offset noise of the UNet's training noise (0 = plain "
                                                   "Gaussian). Default: the shipped recipe's."),
    unet_attention_16: bool | None = typer.Option(None, "--unet-attention-16/--no-unet-attention-16",
                                                  help="Cross-attention also at the 16x16 latent level (10 attn2 "
                                                  "layers; off: the 7-layer UNet). Default: on (the shipped recipe)."),
    time_budget: float = typer.Option(0.0, help="Stop the UNet stage after this many seconds (checkpointed; rerun to resume)."),
    budget_hours: float = typer.Option(2.5, help="Fit the whole training into this many hours of wall time, summed "
                                       "over resumed runs as the training clock counts them: on a machine too slow "
                                       "for the recipe, the UNet's schedule (at most --unet-steps) is shortened to end "
                                       "in time, re-planned every 50 steps from the measured speed; the model card "
                                       "records the steps planned. 0: the fixed recipe, however long it takes."),
    resume: bool = typer.Option(True, help="Resume every stage from its checkpoint in ~/.cache/conceptsmith/world "
                                "(--no-resume also resets the training clock)."),
    jobs: int = typer.Option(2, help="Processes: with 2, the evaluator (independent of the generator) trains in a "
                             "second process beside the generator's stages, and the UNet takes its core when it is done."),
    threads: int = typer.Option(0, help="Torch threads per process (0: the machine's cores divided among the jobs)."),
) -> None:
    """Train every stage: render pool -> contrastive text tower -> VAE -> UNet -> evaluator.

    UNet options left unset take the shipped recipe's values (``unet_train.UNetTrainConfig``). Every stage is
    seeded, checkpoints to ~/.cache/conceptsmith/world (or $CONCEPTSMITH_CACHE/world) and resumes; the generator is
    written to OUT/shapes-sd (save_pretrained), the evaluator to OUT/shapes-clip, each part replaced whole when it
    is written; the shipped weights are only read (the UNet stage takes the tokenizer, text encoder and VAE from
    them when no earlier stage wrote OUT's). Wall time per stage is summed over resumed runs and printed at the end;
    the log is world/train.log in the cache."""
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise typer.BadParameter(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    _check_numbers(seed=seed, unet_steps=unet_steps, unet_batch=unet_batch, text_tower_stop=text_tower_stop,
                   unet_lr=unet_lr, unet_two_object_share=unet_two_object_share, unet_offset_noise=unet_offset_noise,
                   time_budget=time_budget, budget_hours=budget_hours, jobs=jobs, threads=threads)
    if unet_init is not None:
        validate.input_path(unet_init, "--unet-init")
    if budget_hours and "unet" in chosen and "evaluator" in chosen and jobs < 2:
        raise typer.BadParameter("--budget-hours fits the UNet's schedule to the budget, so the evaluator must not "
                                 "train after it: use --jobs 2 (the default) or train the evaluator separately")
    pipe_dir = prepare_out(out, overwrite) / "shapes-sd"
    from conceptsmith.world import stage_clock, unet_train, vae_train

    if not resume:
        stage_clock.reset()
    logfile = vae_train.cache_dir() / "train.log"
    log = lambda message: vae_train.log(message, logfile)  # noqa: E731
    log(f"writing to {out}")
    cores = os.cpu_count() or 1
    sibling = _start_evaluator_process(resume, log, out) if jobs > 1 and "evaluator" in chosen and len(chosen) > 1 else None
    if sibling:
        chosen.remove("evaluator")
    per_process = threads or (max(1, cores // 2) if sibling else cores)
    overrides = dict(steps=unet_steps, batch_size=unet_batch, lr=unet_lr, two_object_share=unet_two_object_share,
                     offset_noise=unet_offset_noise, attention_16=unet_attention_16)
    unet_cfg = unet_train.UNetTrainConfig(seed=seed, threads=per_process, time_budget_s=time_budget,
                                          init_from=str(unet_init) if unet_init else "",
                                          **{key: value for key, value in overrides.items() if value is not None})
    with stage_clock.timed(stage_clock.WALL):
        if "data" in chosen:
            log("stage data: render pool")
            with stage_clock.timed("data"):
                vae_train.render_pool(unet_cfg.pool_size, seed, logfile=logfile)
        if "text-tower" in chosen:
            log("stage text-tower: contrastive text tower (frozen afterwards)")
            from conceptsmith.world import clip_train

            kwargs = {"stop_at": text_tower_stop} if text_tower_stop else {}
            with stage_clock.timed("text-tower"):
                clip_train.train_text_tower(out_dir=pipe_dir, resume=resume, threads=per_process, **kwargs)
        if "vae" in chosen:
            log("stage vae: autoencoder")
            with stage_clock.timed("vae"):
                vae_train.train_vae(vae_train.VAETrainConfig(seed=seed, threads=per_process), pipe_dir / "vae",
                                    resume=resume, logfile=logfile)
                vae_train.finetune_decoder(pipe_dir / "vae", seed=seed, threads=per_process, resume=resume,
                                           logfile=logfile)
        if "unet" in chosen:
            log("stage unet: denoiser")
            _inputs_from_shipped(pipe_dir, log)
            # once the evaluator's process is done, its core goes to the UNet
            threads_now = (lambda: per_process if sibling.is_alive() else (threads or cores)) if sibling else None
            deadline = None
            if budget_hours:  # the budget left, as the training clock counts it (this run's span included)
                left = budget_hours * 3600 - stage_clock.totals().get(stage_clock.WALL, 0.0)
                deadline = time.time() + left
                log(f"UNet: {left / 60:.1f} min of the {budget_hours:g} h budget left; the schedule ends by then "
                    f"(at most {unet_cfg.steps} steps; --budget-hours 0 runs them all)")
            with stage_clock.timed("unet"):
                unet_train.train_unet(unet_cfg, pipe_dir=pipe_dir, resume=resume, logfile=logfile, threads_now=threads_now,
                                      deadline=deadline)
        if "evaluator" in chosen:
            log("stage evaluator: open_clip shapes-clip")
            _evaluator_stage(resume, per_process, out)
        if sibling:
            log("waiting for the evaluator's process")
            sibling.join()
            if sibling.exitcode != 0:
                typer.echo(f"the evaluator's process failed (exit code {sibling.exitcode}); see "
                           f"{vae_train.cache_dir() / 'evaluator.log'}", err=True)
                raise typer.Exit(1)
    typer.echo("training clock (summed over resumed runs):\n" + stage_clock.report(budget_hours or 2.5))
    typer.echo(f"done: {out}. Measure the generator with: conceptsmith world check --model {pipe_dir}")


#: Ranges of ``world train``'s numeric options: (low, high, integer).
TRAIN_RANGES = {
    "seed": (0, validate.MAX_SEED, True),
    "unet_steps": (1, 10_000_000, True),
    "unet_batch": (1, 4096, True),
    "text_tower_stop": (1, 10_000_000, True),
    "unet_lr": (1e-8, 1.0, False),
    "unet_two_object_share": (0.0, 1.0, False),
    "unet_offset_noise": (0.0, 1.0, False),
    "time_budget": (0.0, 1e7, False),
    "budget_hours": (0.0, 1000.0, False),
    "jobs": (1, 64, True),
    "threads": (0, 1024, True),
}


def _check_numbers(**values: float | None) -> None:
    """Each option unset (``None``) or finite and in its :data:`TRAIN_RANGES` range."""
    for name, value in values.items():
        low, high, integer = TRAIN_RANGES[name]
        validate.number(value, "--" + name.replace("_", "-"), low, high, integer=integer)


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Check ``world train --out`` and mark it as a training folder: never the shipped weights; an existing
    non-empty folder only when an earlier ``world train`` made it (a resumed run) or with ``overwrite``."""
    refuse_shipped(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out '{out}' is a file: pass a folder (a new one, e.g. out/shapes-world).")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise ValueError(f"--out '{out}' is a non-empty folder that `world train` did not make: pass a new or empty "
                         "folder, or add --overwrite to write the trained weights into it.")
    if not (out / MARKER).is_file():
        write_json(out / MARKER, {"written_by": "conceptsmith world train", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "layout": {"shapes-sd": "generator pipeline", "shapes-clip": "evaluator"}})
    return out


def _inputs_from_shipped(pipe_dir: Path, log) -> None:
    """Copy the parts the UNet stage reads that no earlier stage wrote into ``pipe_dir`` from the shipped pipeline."""
    for part in UNET_INPUTS:
        if not (pipe_dir / part).is_dir():
            log(f"stage unet: no {part} in {pipe_dir}; using the shipped one ({PIPE_DIR / part})")
            with atomic_directory(pipe_dir / part) as temporary:
                shutil.copytree(PIPE_DIR / part, temporary, dirs_exist_ok=True)


def _start_evaluator_process(resume: bool, log, out: Path) -> multiprocessing.Process:
    """The evaluator stage in a spawned child process with one thread; its output goes to world/evaluator.log."""
    from conceptsmith.world import vae_train

    logfile = vae_train.cache_dir() / "evaluator.log"
    log(f"stage evaluator: in a second process, output in {logfile}")
    process = multiprocessing.get_context("spawn").Process(target=_evaluator_job, args=(resume, str(logfile), out, os.getpid()),
                                                            name="shapes-clip")
    process.start()
    return process


def exit_with_parent(parent: int, every: float = 1.0) -> threading.Thread:
    """Watch the process ``parent`` from a daemon thread and end this process once it is gone: a child that outlives
    a killed ``world train`` (SIGKILL runs no cleanup) would otherwise keep training on a core for an hour."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    watcher = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    watcher.start()
    return watcher


def _evaluator_job(resume: bool, logfile: str, out: Path, parent: int) -> None:
    exit_with_parent(parent)
    with open(logfile, "a") as log:  # an append-only log: what a killed run printed stays
        sys.stdout = sys.stderr = log
        _evaluator_stage(resume, 1, out)


def _evaluator_stage(resume: bool, threads: int, out: Path) -> None:
    """The evaluator stage, timed; in ``world train``'s own process or in the second one."""
    from conceptsmith.world import clip_train, stage_clock

    with stage_clock.timed("evaluator"):
        clip_train.train_evaluator(out, resume=resume, threads=threads)


@app.command()
@user_errors
def check(
    json_only: bool = typer.Option(False, "--json", help="Print only the JSON object."),
    seeds: int = typer.Option(8, help="Seeds per prompt (>= 8 for the published numbers)."),
    only: str | None = typer.Option(None, help="Comma-separated subset of generator metrics: "
                                       "shape,color,artist,restricted_indirect,two_object,watermark,speed."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the evaluator's accuracy on renders."),
    grid: Path = typer.Option(Path("out/world_check_grid.png"), help="Where to write the sample grid."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --grid file."),
    model_card: bool = typer.Option(False, "--model-card", help="Also write the numbers into MODEL_CARD.md."),
    strict: bool = typer.Option(False, help="Exit with code 1 if a bar is missed."),
    model: str = typer.Option("builtin:shapes", help="Generator to measure, e.g. a candidate pipeline directory "
                                       "(sampled with the shipped defaults unless its loader sets its own)."),
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Measure the evaluator on renders and the generator on held-out prompts; last line is JSON."""
    if model_card and model != "builtin:shapes":
        raise typer.BadParameter("--model-card describes the shipped builtin:shapes; drop it or --model")
    validate.number(seeds, "--seeds", 1, 1000, integer=True)
    validate.model_spec(model)
    if not json_only:
        validate.output_path(grid, "--grid", validate.local_inputs(model), overwrite, suffix=".png")
    metrics = GEN_METRICS if not only else tuple(m.strip() for m in only.split(",") if m.strip())
    bad = [m for m in metrics if m not in GEN_METRICS]
    if bad:
        raise typer.BadParameter(f"unknown metric(s) {bad}; choose from {', '.join(GEN_METRICS)}")
    from conceptsmith.models import resolve_model
    from conceptsmith.world.check import all_pass, format_report, load_generator, run_check

    say = (lambda message: None) if json_only else typer.echo
    target = resolve_model(model, dtype, device)
    pipe = load_generator(model).to(target.device, target.dtype)
    results = run_check(seeds=seeds, metrics=metrics, include_eval=not no_eval, pipe=pipe,
                        grid_path=None if json_only else grid, progress=not json_only, log=say)
    if model_card:
        from conceptsmith.world.card import write_model_card

        path = write_model_card(results)
        say(f"model card: {path}")
    if not json_only:
        typer.echo(format_report(results))
    typer.echo(json.dumps(results))
    if strict and not all_pass(results):
        raise typer.Exit(1)
