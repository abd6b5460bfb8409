"""ESD training-step benchmark -> ``bench/results/training_erasure.json``.

Setting: the full-size Stable Diffusion 1.5 UNet and CLIP ViT-L/14 text encoder with random fp32
weights (:func:`bench.closed_form.build_sd15`, nothing downloaded), 32x32 latents, batch 1, on the CPU
with ``--threads`` threads (2). ESD-x with full weights (the published setting: every cross-attention
parameter trained, Adam, negative guidance 1, DDIM 50 steps, start guidance 3), two ways, timed in
separate processes of the same run so that each peak RSS is its own:

* **library**: ``get_editor("esd")`` (no clipping, as published, and ``step_in_backward``: each weight is
  stepped inside the backward pass) -- the frozen model's DDIM runs made once (``--trajectories``),
  frozen predictions from the same network with the original weights swapped in (cached per state);
  ``step_s`` = the training loop's seconds / steps (frozen predictions of new states included),
  ``setup_s`` = the frozen runs and the rest of ``fit``; ``amortized_step_s`` = ``step_s + setup_s / 200``
  (ESD's 200 steps);
* **reference**, written here the way the published script does it: a second full UNet as the frozen
  model, and at every step a fresh partial DDIM run from noise to a random ``t_enc`` of the 50 steps
  with the frozen model (guidance 3), then the two frozen predictions and one trained step.

``speedup`` = reference step / library ``step_s``; ``speedup_amortized_200_steps`` charges the library's
setup to ESD's 200 steps. ``agreement``: both trained for the same 5
seeded steps from the same weights, the reference fed the library's ``(x_t, t)``;
``max_rel_diff`` = max over trained weights of ``||W_lib - W_ref|| / ||W_ref||``
(``max_rel_diff_of_update`` the same on ``W - W_0``).

Run: ``.venv/bin/python bench/training_erasure.py`` (``--arch tiny`` smoke-tests it in seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.closed_form import _status_mb, build_sd15  # noqa: E402  (after the sys.path line)

ETA, DDIM_STEPS, START_GUIDANCE, LR = 1.0, 50, 3.0, 1e-5
CONCEPT = "a painting by vincent van gogh"


def build_pipe(tiny: bool) -> SimpleNamespace:
    """SD 1.5's UNet (sample size 32: 32x32 latents) + text encoder with random weights, and its scheduler."""
    from diffusers import DDIMScheduler

    parts = build_sd15(tiny=tiny)
    parts.unet.register_to_config(sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return SimpleNamespace(unet=parts.unet, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, scheduler=scheduler)


def esd_config(steps: int, trajectories: int) -> dict[str, Any]:
    return {"variant": "x", "mode": "full", "steps": steps, "learning_rate": LR, "negative_guidance": ETA,
            "trajectories": trajectories, "ddim_steps": DDIM_STEPS, "sample_guidance": START_GUIDANCE,
            "max_grad_norm": None, "step_in_backward": True, "eval_batches": 0, "progress": False, "templates": ["{}"]}


def run_library(pipe: SimpleNamespace, steps: int, trajectories: int, record: list | None = None) -> tuple[Any, float]:
    """ESD through the library; ``record`` collects the ``(x_t, t)`` draws of every step."""
    from conceptsmith.diffusion import FrozenTrajectories
    from conceptsmith.registry import EditRequest, get_editor

    original = FrozenTrajectories.sample
    if record is not None:
        def sample(self: FrozenTrajectories, generator: torch.Generator, count: int) -> list:
            draws = original(self, generator, count)
            record.extend(draws)
            return draws

        FrozenTrajectories.sample = sample
    try:
        started = time.perf_counter()
        edit = get_editor("esd")(esd_config(steps, trajectories)).fit(pipe, EditRequest(concepts=[CONCEPT], seed=0))
        return edit, time.perf_counter() - started
    finally:
        FrozenTrajectories.sample = original


# -- the reference: how the published script trains ---------------------------------------------------------------


def encode(pipe: SimpleNamespace, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


class Reference:
    """ESD-x as the official script: a trained UNet and a second, frozen UNet; a fresh partial run per step."""

    def __init__(self, pipe: SimpleNamespace) -> None:
        self.frozen = pipe.unet
        self.model = copy.deepcopy(pipe.unet)  # the second full UNet
        self.params = {n: p for n, p in self.model.named_parameters() if "attn2" in n}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=LR)
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.scheduler.set_timesteps(DDIM_STEPS)
        self.cond, self.uncond = encode(pipe, CONCEPT), encode(pipe, "")

    def eps(self, unet: torch.nn.Module, x: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        return unet(x, torch.tensor([t]), encoder_hidden_states=cond).sample

    @torch.no_grad()
    def partial_run(self, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """From noise to a random t_enc of the 50 DDIM steps with the frozen model and guidance 3."""
        t_enc = int(torch.randint(DDIM_STEPS, (1,), generator=generator))
        x = torch.randn((1, 4, 32, 32) if self.frozen.config.in_channels == 4 else (1, self.frozen.config.in_channels, 32, 32),
                        generator=generator)
        timesteps = [int(t) for t in self.scheduler.timesteps]
        for t in timesteps[:t_enc]:
            eps_u, eps_c = self.frozen(torch.cat([x, x]), torch.tensor([t, t]),
                                       encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample.chunk(2)
            x = self.scheduler.step(eps_u + START_GUIDANCE * (eps_c - eps_u), t, x).prev_sample
        return x, timesteps[t_enc]

    def step(self, x: torch.Tensor, t: int) -> float:
        with torch.no_grad():
            eps_c, eps_u = self.eps(self.frozen, x, t, self.cond), self.eps(self.frozen, x, t, self.uncond)
            target = eps_u - ETA * (eps_c - eps_u)
        loss = torch.nn.functional.mse_loss(self.eps(self.model, x, t, self.cond), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


# -- the parts, each in its own process ---------------------------------------------------------------------------


def part_library(args: argparse.Namespace) -> dict[str, Any]:
    pipe = build_pipe(args.arch == "tiny")
    rss_loaded = _status_mb("VmRSS")
    edit, seconds = run_library(pipe, args.steps, args.trajectories)
    training = edit.metadata["training"]
    step_s = training["seconds"] / args.steps
    setup_s = seconds - training["seconds"]
    return {"step_s": step_s, "setup_s": setup_s, "amortized_step_s": step_s + setup_s / 200, "fit_s": seconds,
            "steps": args.steps, "trajectories": args.trajectories, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": _status_mb("VmHWM")}


def part_reference(args: argparse.Namespace) -> dict[str, Any]:
    pipe = build_pipe(args.arch == "tiny")
    rss_loaded = _status_mb("VmRSS")
    reference = Reference(pipe)
    generator = torch.Generator().manual_seed(0)
    times, t_encs = [], []
    for _ in range(args.reference_steps):
        started = time.perf_counter()
        x, t = reference.partial_run(generator)
        reference.step(x, t)
        times.append(time.perf_counter() - started)
        t_encs.append(t)
    return {"step_s": sum(times) / len(times), "step_s_each": times, "timesteps": t_encs, "steps": len(times),
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": _status_mb("VmHWM")}


def agreement(pipe: SimpleNamespace, steps: int = 5) -> dict[str, Any]:
    """Train ``steps`` seeded steps through the library, then the reference from the same weights on the same
    ``(x_t, t)``; the relative differences of the trained weights and of their updates."""
    draws: list = []
    edit, _ = run_library(pipe, steps, 1, record=draws)
    deltas = {k.removeprefix("unet.").removesuffix(".delta"): v for k, v in edit.tensors.items()}
    reference = Reference(pipe)
    initial = {n: p.detach().clone() for n, p in reference.params.items()}
    for _, x, t, _ in draws:
        reference.step(x, t)
    diff = diff_update = 0.0
    for name, p in reference.params.items():
        module = name.removesuffix(".weight")
        if module not in deltas:  # biases are not trained by the library's module selection
            continue
        base = initial[name].double()
        ours, ref = base + deltas[module].double(), p.detach().double()
        diff = max(diff, float(torch.linalg.norm(ours - ref) / torch.linalg.norm(ref)))
        update = torch.linalg.norm(ref - base).clamp_min(1e-30)
        diff_update = max(diff_update, float(torch.linalg.norm(ours - ref) / update))
    return {"max_rel_diff": diff, "max_rel_diff_of_update": diff_update, "steps": len(draws), "modules": len(deltas)}


def part_agreement(args: argparse.Namespace) -> dict[str, Any]:
    return agreement(build_pipe(args.arch == "tiny"))


PARTS = {"library": part_library, "reference": part_reference, "agreement": part_agreement}


def summarize(results: dict[str, Any], arch: str, threads: int) -> dict[str, Any]:
    """The headline numbers from the three parts' measurements (kept under ``details``)."""
    library, reference = results["library"], results["reference"]
    return {
        "setting": f"ESD-x full weights, SD 1.5 architecture ({arch}), random fp32 weights, CPU, {threads} threads, "
                   "32x32 latents, batch 1",
        "step_s": library["step_s"], "reference_step_s": reference["step_s"],
        "speedup": reference["step_s"] / library["step_s"],
        "setup_s": library["setup_s"], "amortized_step_s": library["amortized_step_s"],
        "speedup_amortized_200_steps": reference["step_s"] / library["amortized_step_s"],
        "peak_rss_mb": library["peak_rss_mb"], "reference_peak_rss_mb": reference["peak_rss_mb"],
        "peak_rss_ratio": library["peak_rss_mb"] / reference["peak_rss_mb"],
        "max_rel_diff": results["agreement"]["max_rel_diff"],
        "max_rel_diff_of_update": results["agreement"]["max_rel_diff_of_update"],
        "details": results,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="library steps timed")
    parser.add_argument("--trajectories", type=int, default=2, help="frozen runs the library makes once")
    parser.add_argument("--reference-steps", type=int, default=5)
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "training_erasure.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return {}
    results: dict[str, Any] = {}
    for part in ("agreement", "library", "reference"):
        command = [sys.executable, __file__, "--part", part, *(argv if argv is not None else sys.argv[1:])]
        print(f"[training_erasure] {part} ...", file=sys.stderr, flush=True)
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        results[part] = json.loads(out.stdout.strip().splitlines()[-1])
    summary = summarize(results, args.arch, args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from conceptsmith.io import write_json

    write_json(args.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("details", "machine")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
