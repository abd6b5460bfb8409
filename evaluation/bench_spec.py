"""What every bench YAML shares: the model and evaluator, device and dtype, seeds, generation settings, the
metrics it reports, and method rows (an editor with its config file and overrides); plus finding the YAML and
the files it names. The two kinds add their own fields (:mod:`evaluation.erasure_spec`,
:mod:`evaluation.custom_spec`); :func:`evaluation.engine.load_bench` reads either by its ``kind``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from conceptsmith.config import (
    DEVICE_PATTERN,
    ConfigError,
    DtypeName,
    EditConfig,
    StrictModel,
    load_config,
    validate,
)
from conceptsmith.registry import RegistryError, get_editor, get_metric
from conceptsmith.resources import configs_root, shipped_config
from conceptsmith.validate import check_templates

__all__ = [
    "BENCH_DIR",
    "BenchBase",
    "GenerationConfig",
    "MethodSpec",
    "method_config",
    "resolve_bench_path",
    "resolve_method",
    "resolve_path",
]

BENCH_DIR = configs_root() / "bench"


class GenerationConfig(StrictModel):
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_size: int = Field(4, ge=1, description="images per pipeline call (fixed batches, shard-independent)")

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline call's settings (``batch_size`` is the engine's, not the pipeline's)."""
        kw: dict[str, Any] = {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}
        kw |= {k: v for k in ("height", "width") if (v := getattr(self, k))}
        return kw


class MethodSpec(StrictModel):
    name: str | None = Field(None, description="row label (default: the method)")
    method: str | None = Field(None, description="registered editor name (default: from `config`)")
    config: str | None = Field(None, description="configs/erase/*.yaml file (relative to the repo or the bench)")
    params: dict[str, Any] = Field(default_factory=dict, description="overrides of the config's params")
    images: Literal["unedited"] | None = Field(
        None, description="unedited: the method learns from the unedited model's images of the erase prompts"
    )
    n_images: int = Field(8, ge=1, description="how many such images (seeds from 1000, apart from the evaluation's)")

    def label(self) -> str:
        return self.name or self.method or Path(self.config or "method").stem


class BenchBase(StrictModel):
    """Fields of every bench; ``metrics`` (registered metric names, :mod:`evaluation.bench_metrics`) defaults to
    the kind's full set."""

    name: str = Field(min_length=1)
    description: str = ""
    model: str = Field(min_length=1)
    evaluator: str = Field(min_length=1)
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="cuda | cuda:N | mps | cpu | auto (default: the model's)")
    dtype: DtypeName | None = Field(None, description="float32 | float16 | bfloat16 (default: the model's)")
    seeds: list[int] = Field(min_length=1)
    eval_templates: list[str] = Field(default_factory=lambda: ["a photo of a {}"], min_length=1)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    metrics: list[str] | None = Field(None, description="registered metrics to report (default: every one of the kind)")

    @model_validator(mode="after")
    def _known_metrics(self) -> BenchBase:
        for name in self.metrics or []:
            try:
                get_metric(name)
            except RegistryError as err:
                raise ValueError(str(err)) from None
        return self


def resolve_bench_path(path_or_name: str | Path) -> Path:
    """A bench YAML by path or by name under ``configs/bench/`` (``shapes-smoke``)."""
    path = Path(path_or_name)
    if not path.is_file() and not path.suffix:
        path = BENCH_DIR / f"{path_or_name}.yaml"
    return path


def resolve_path(ref: str, bench_path: Path | None, what: str = "method config") -> Path:
    """``ref`` as given (relative to the working directory), else relative to the bench file, else among the shipped
    configs (``configs/erase/uce.yaml``); the error lists every place tried."""
    candidates = [Path(ref)] + ([bench_path.parent / ref] if bench_path is not None else [])
    candidates.append(shipped_config(ref))
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"{what} '{ref}' not found (tried {[str(c) for c in candidates]})")
    return path


def method_config(spec: MethodSpec, bench_path: Path | None) -> tuple[str, dict[str, Any]]:
    """(editor name, params) of a method row: its config file's, updated by the row's overrides."""
    method, params = spec.method, {}
    if spec.config:
        edit_cfg = load_config(resolve_path(spec.config, bench_path), EditConfig)
        method = method or edit_cfg.method
        params = dict(edit_cfg.params)
    if not method:
        raise ValueError(f"method row '{spec.label()}' names neither `method` nor `config`")
    params.update(spec.params)
    return method, params


def resolve_method(spec: MethodSpec, bench_path: Path | None, where: str) -> tuple[str, dict[str, Any]]:
    """(editor, params) of a method row, checked against the editor's registry entry and config, its templates
    (:func:`conceptsmith.validate.check_templates`) included."""
    source = str(bench_path or "config")
    try:
        method, params = method_config(spec, bench_path)
        editor = get_editor(method)
    except (KeyError, ValueError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ConfigError(f"{source}: {where}: {message}") from None
    validate(params, editor.Config, f"{source}: {where}: params")
    check_templates(params, f"{source}: {where}: params")  # a config file's templates too, not only the bench's own
    return method, params
