"""GPU check -> ``bench/results/gpu_check.json``: the product's code paths on one GPU in half precision.

Setting: a Stable Diffusion 1.5-shaped pipeline (UNet, CLIP ViT-L/14 text encoder and VAE from their
public configs, DDIM) with random weights built on the device (nothing is downloaded), in ``--dtype``
(float16) on ``--device`` (cuda). Stages, in order, each timed (device synchronized) with its peak GPU
memory (``torch.cuda.max_memory_allocated``, reset per stage):

* ``build``: the pipeline;
* ``uce_1`` / ``uce_100``: UCE (``configs/erase/uce.yaml``) erasing 1 / 100 artist-like names;
* ``apply``: the 100-concept edit applied; ``generate``: one 512x512 image, 20 steps, guidance 7.5,
  with the edit applied (fails on non-finite VAE output); ``revert``: the edit undone, checked bit-exact;
* ``lora``: 50 training steps of ``configs/customize/lora.yaml`` (DreamBooth LoRA, learned token) on
  four reference images; ``esd``: 20 training steps of ``configs/erase/esd.yaml`` (its frozen DDIM runs
  included). Both use the training loop's mixed precision ``auto`` (the model's half precision on GPUs).

Any failure stops the script with exit code 1, the failing stage and the error on stderr, and the JSON
written so far (``"failed"``). ``--tiny`` runs the same code on small models (64x64 images, 10 LoRA and 5 ESD
steps, ESD's frozen runs shortened): with ``--device cpu`` it finishes in seconds and is what the test suite runs.

Run: ``python bench/gpu_check.py`` on a machine with a GPU (a few minutes at most), or
``python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.closed_form import names  # noqa: E402  (after the sys.path line)
from conceptsmith.architectures import CLIP_VIT_L_TEXT, SD15_UNET  # noqa: E402

SD15_VAE = dict(  # runwayml/stable-diffusion-v1-5 vae/config.json
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# Small stand-ins with the same structure (``--tiny``): 64x64 images, every block kind of SD 1.5.
TINY_UNET = dict(SD15_UNET, block_out_channels=[32, 32, 32, 32], layers_per_block=1, cross_attention_dim=32,
                 norm_num_groups=8, attention_head_dim=2, sample_size=8)
TINY_TEXT = dict(CLIP_VIT_L_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 projection_dim=32)
TINY_VAE = dict(SD15_VAE, block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64)
TINY_STEPS = dict(lora=10, esd=5)  # the tiny smoke test trains fewer steps
TINY_ESD = dict(trajectories=2, ddim_steps=10)  # and makes shorter frozen ESD runs
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
GENERATION_STEPS, LORA_STEPS, ESD_STEPS, CONCEPTS = 20, 50, 20, 100
PROMPT = "a painting of a lighthouse at dusk"


class StageError(RuntimeError):
    """A stage's own check failed (the product ran but gave a wrong result)."""


def build_pipeline(device: torch.device, dtype: torch.dtype, tiny: bool) -> Any:
    """SD 1.5's architecture (``tiny``: a small stand-in of the same structure) with random weights made on
    ``device``, cast to ``dtype``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptsmith.world.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else CLIP_VIT_L_TEXT)))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shipped_params(ref: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """(method, params) of a shipped edit config with ``overrides``."""
    from conceptsmith.config import EditConfig, load_config
    from conceptsmith.resources import shipped_config

    config = load_config(shipped_config(ref), EditConfig)
    return config.method, {**config.params, **overrides}


def fit(ref: str, pipe: Any, request: Any, **overrides: Any) -> Any:
    from conceptsmith.registry import get_editor

    method, params = shipped_params(ref, **overrides)
    return get_editor(method)(params).fit(pipe, request)


def reference_images(folder: Path, size: int, count: int = 4) -> Path:
    """``count`` seeded random-noise PNGs of ``size`` px in ``folder``."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{index:02d}.png")
    return folder


def edited_weights(pipe: Any, edit: Any) -> dict[str, torch.Tensor]:
    """Copies of the weights ``edit`` changes (module paths ``unet.<module>``)."""
    return {module: pipe.unet.get_submodule(module.removeprefix("unet.")).weight.detach().clone() for module in edit.module_shapes}


class Check:
    """Runs the stages in order and records each one's seconds and peak GPU memory."""

    def __init__(self, device: torch.device, report: dict[str, Any], out: Path) -> None:
        self.device, self.report, self.out = device, report, out

    def stage(self, name: str, run: Callable[[], Any], **facts: Any) -> Any:
        from conceptsmith.io import write_json

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            value = run()
            if cuda:
                torch.cuda.synchronize(self.device)
        except Exception as err:
            self.report["failed"] = {"stage": name, "error": f"{type(err).__name__}: {err}"}
            write_json(self.out, self.report)
            traceback.print_exc()
            raise SystemExit(f"gpu_check: stage '{name}' failed: {type(err).__name__}: {err} (partial results: {self.out})") from None
        record = {"seconds": round(time.perf_counter() - started, 3), **facts}
        record["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1) if cuda else None
        self.report["stages"][name] = record
        print(f"[gpu_check] {name}: {record['seconds']:.2f} s", file=sys.stderr, flush=True)
        return value


def run_check(device: torch.device, dtype: torch.dtype, tiny: bool, out: Path) -> dict[str, Any]:
    from conceptsmith.generation import GenerationSettings, generate
    from conceptsmith.io import write_json
    from conceptsmith.registry import EditRequest

    report = machine(device, dtype, tiny)
    check = Check(device, report, out)
    started = time.perf_counter()
    pipe = check.stage("build", lambda: build_pipeline(device, dtype, tiny))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    concepts = names(CONCEPTS, seed=0)
    check.stage("uce_1", lambda: fit("erase/uce.yaml", pipe, EditRequest(concepts=concepts[:1])), concepts=1)
    uce = check.stage("uce_100", lambda: fit("erase/uce.yaml", pipe, EditRequest(concepts=concepts)), concepts=CONCEPTS)
    before = edited_weights(pipe, uce)
    check.stage("apply", lambda: uce.apply(pipe), modules=len(before))

    finite: list[bool] = []
    hook = pipe.vae.decoder.register_forward_hook(lambda module, args, output: finite.append(bool(torch.isfinite(output).all())))

    def draw() -> None:
        settings = GenerationSettings(num_inference_steps=GENERATION_STEPS, guidance_scale=7.5, height=size, width=size, batch_size=1)
        [(_, _, image)] = generate(pipe, [PROMPT], [0], settings, progress=False)
        if image.size != (size, size):
            raise StageError(f"the image is {image.size}, expected {size}x{size}")
        if not all(finite):
            raise StageError(f"the VAE decoded non-finite values in {dtype}: the half-precision pipeline overflowed")

    try:
        check.stage("generate", draw, size=size, steps=GENERATION_STEPS)
    finally:
        hook.remove()

    def revert() -> None:
        uce.revert(pipe)
        changed = [m for m, w in edited_weights(pipe, uce).items() if not torch.equal(w, before[m])]
        if changed:
            raise StageError(f"revert left {len(changed)} of {len(before)} edited weights changed, e.g. {changed[0]}")

    check.stage("revert", revert)
    with tempfile.TemporaryDirectory() as tmp:
        refs = reference_images(Path(tmp) / "refs", size)
        request = EditRequest(concepts=[], tokens=["<gpu-check>"], class_words=["painting"], images=[refs], seed=0)
        steps = TINY_STEPS["lora"] if tiny else LORA_STEPS
        lora = check.stage("lora", lambda: fit("customize/lora.yaml", pipe, request, steps=steps, progress=False), steps=steps)
    report["stages"]["lora"].update(training_facts(lora))
    steps, short = (TINY_STEPS["esd"], TINY_ESD) if tiny else (ESD_STEPS, {})
    esd = check.stage("esd", lambda: fit("erase/esd.yaml", pipe, EditRequest(concepts=concepts[:1]), steps=steps,
                                         progress=False, **short), steps=steps, **short)
    report["stages"]["esd"].update(training_facts(esd))
    report["total_seconds"] = round(time.perf_counter() - started, 3)
    peaks = [s["peak_memory_mb"] for s in report["stages"].values() if s["peak_memory_mb"] is not None]
    report["peak_memory_mb"] = max(peaks) if peaks else None
    write_json(out, report)
    return report


def training_facts(edit: Any) -> dict[str, Any]:
    """The training loop's own seconds, precision and losses of a trained edit."""
    training = edit.metadata["training"]
    for key in ("loss_start", "loss_end"):
        if training.get(key) is None or not torch.isfinite(torch.tensor(training[key])):
            raise StageError(f"the {edit.method} training loss is not finite ({key}={training.get(key)})")
    return {"train_seconds": training["seconds"], "mixed_precision": training["mixed_precision"],
            "loss_start": training["loss_start"], "loss_end": training["loss_end"]}


def machine(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict[str, Any]:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {
        "setting": "SD 1.5-shaped pipeline, random weights" if not tiny else "tiny stand-in models (--tiny)",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stages": {},
    }


def main(argv: list[str] | None = None) -> int:
    from conceptsmith.devices import DeviceError, resolve_device, resolve_dtype

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | mps | cpu (default: cuda)")
    parser.add_argument("--dtype", default="float16", help="float16 | bfloat16 | float32 (default: float16)")
    parser.add_argument("--tiny", action="store_true", help="small stand-in models (a CPU smoke test in seconds)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    try:
        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    except DeviceError as err:
        parser.exit(2, f"gpu_check: error: {err}\n")
    report = run_check(device, dtype, args.tiny, args.out)
    summary = {name: stage["seconds"] for name, stage in report["stages"].items()}
    print(f"gpu_check: all stages passed in {report['total_seconds']:.1f} s on {report['gpu'] or report['device']} "
          f"({report['dtype']}); peak memory {report['peak_memory_mb']} MB; {summary} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
