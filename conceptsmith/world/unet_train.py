"""Stage 4 of ``conceptsmith world train``: the ShapesWorld denoising UNet.

A ``diffusers.UNet2DConditionModel`` on 16x16x4 latents, conditioned through cross-attention on
the frozen ShapesWorld CLIP text tower (exactly as Stable Diffusion 1.x conditions on CLIP-L):
cross-attention at 16x16, 8x8 and 4x4 (10 attn2 layers; ``attention_16=False`` drops the 16x16 level: 7),
epsilon prediction on SD's scaled-linear schedule, classifier-free-guidance dropout (10% empty captions),
Min-SNR loss weighting, optional offset noise, AdamW, EMA weights (those are shipped).

Data: a pool of generator-split renders (no novel objects, no watermark in captions) whose VAE
latents are encoded once and cached; every step re-draws each image's caption from its labels
with the TRAINING templates, so one image is seen under many phrasings.

Checkpoints (model, EMA, optimizer, step) go to ``~/.cache/conceptsmith/world`` every few minutes;
a restarted run resumes from the last one and continues the same data stream (the batch of step
``s`` depends only on (seed, s)). Every checkpoint also exports the EMA UNet into the output
pipeline directory (never the shipped one), so an interrupted run still leaves usable weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from conceptsmith.io import atomic_directory, save_torch, write_text
from conceptsmith.world import render as R
from conceptsmith.world.pipeline import refuse_shipped, save_pipeline
from conceptsmith.world.vae_train import cache_dir, log, render_pool, to_tensor, weights_dir


def unet_config(cross_attention_dim: int, attention_16: bool = True) -> dict:
    """The UNet's diffusers config; ``attention_16`` adds cross-attention at the 16x16 level (each object
    of a two-object scene is only ~6 latent pixels wide)."""
    first_down, last_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attention_16 else ("DownBlock2D", "UpBlock2D")
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=(first_down, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", last_up),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers: number of heads per attention layer
    )


#: Noise schedule of Stable Diffusion 1.x (training and the shipped inference scheduler share it).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1)


@dataclass
class UNetTrainConfig:
    """UNet training settings: the shipped generator's recipe (see its MODEL_CARD.md), with as many steps as
    ``world train`` fitted into its 2.5-hour budget from scratch on the 2-core machine they were sized on (8500 at
    0.57 s per step on 2 threads; on a slower machine ``world train --budget-hours`` plans fewer). The shipped UNet's final
    fine-tune ran 6000 steps from an already trained UNet."""

    seed: int = 0
    pool_size: int = 20000
    steps: int = 8500
    batch_size: int = 48
    lr: float = 4e-4
    warmup: int = 100
    weight_decay: float = 0.01
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.998
    bf16: bool = True
    threads: int = 2
    checkpoint_every_s: float = 240.0
    time_budget_s: float = 0.0  # > 0: stop (checkpointed, exported) after this many seconds of this run
    init_from: str = ""  # a diffusers UNet dir to start from instead of random (see ``grow_from``)
    two_object_share: float = 0.5  # > 0: this share of every batch is drawn from the pool's two-object scenes
    offset_noise: float = 0.1  # > 0: add this much per-(image, channel) constant noise (see ``training_noise``)
    attention_16: bool = True  # cross-attention also at 16x16 (10 attn2 layers instead of 7)


def load_text_side(pipe_dir: Path | None = None):
    """(tokenizer, frozen text encoder) of the generator."""
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe_dir = pipe_dir or weights_dir() / "shapes-sd"
    tokenizer = CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipe_dir / "text_encoder", torch_dtype=torch.float32).eval()
    text_encoder.requires_grad_(False)
    return tokenizer, text_encoder


@torch.no_grad()
def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """What StableDiffusionPipeline conditions on: last hidden state of 77 padded tokens, no mask."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def encoder_digest(vae) -> str:
    """Digest of the VAE's encoder side only: the latent cache survives decoder fine-tuning."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(name.encode())
            h.update(tensor.to(torch.float32).numpy().tobytes())
    h.update(repr(float(vae.config.scaling_factor)).encode())
    return h.hexdigest()[:12]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@torch.no_grad()
def encode_pool(vae, images: np.ndarray, key: str, logfile: str | Path | None = None, batch: int = 250) -> torch.Tensor:
    """Scaled VAE latents (posterior means) of the pool, cached on disk per VAE weights."""
    path = cache_dir() / f"latents_{key}_{len(images)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    out = torch.empty(len(images), 4, 16, 16)
    t0 = time.time()
    for start in range(0, len(images), batch):
        x = to_tensor(images[start : start + batch])
        out[start : start + batch] = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        if (start // batch) % 20 == 0:
            log(f"encoded {start + len(x)}/{len(images)} latents ({time.time() - t0:.0f}s)", logfile)
    save_torch(path, out)
    return out


def build_unet(cross_attention_dim: int, attention_16: bool = True):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(cross_attention_dim, attention_16))


def use_matmul_attention(unet) -> None:
    """Train with diffusers' plain matmul-softmax attention instead of PyTorch's fused SDPA kernel.

    Same function (equal to SDPA within float rounding; tested), but on this CPU under bf16 autocast the fused
    kernel's backward pass took 40% of a training step (heads of width 16 and 32); with plain matmuls a step of
    the 48-image batch takes 0.52 s instead of 0.67 s on 2 threads. Only training uses it: the
    exported UNet carries no processor, so pipelines load with diffusers' default."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


def architecture_digest(cross_attention_dim: int, attention_16: bool = True) -> str:
    """Digest of the UNet config: a checkpoint of another architecture is never resumed into this one."""
    text = json.dumps(unet_config(cross_attention_dim, attention_16), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@torch.no_grad()
def grow_from(unet, start_state: dict[str, torch.Tensor]) -> list[str]:
    """Load a smaller UNet's weights into ``unet``; returns the names of the blocks that are new.

    Every tensor of ``start_state`` must exist in ``unet`` with the same shape (a grown model keeps
    all old layers). New transformer blocks get a zero ``proj_out``; a ``Transformer2DModel`` adds its
    output to its input, so each new block starts as the identity and the grown UNet computes
    exactly what the old one did until training moves it.
    """
    own = unet.state_dict()
    bad = [k for k, v in start_state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"cannot grow from a UNet whose tensors do not fit this architecture: {bad[:5]}")
    missing = unet.load_state_dict(start_state, strict=False).missing_keys
    new_blocks = sorted({k.split(".proj_out.")[0] for k in missing if ".proj_out." in k})
    for name in new_blocks:
        proj_out = unet.get_submodule(f"{name}.proj_out")
        proj_out.weight.zero_()
        proj_out.bias.zero_()
    return new_blocks


def training_noise(shape: tuple[int, ...], offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise plus ``offset`` times a per-(image, channel) constant ("offset noise", Guttenberg 2023).

    SD's scaled-linear schedule never reaches zero SNR: at t = 999 some of the image's mean still
    shows through, the model learns to read it, and sampling from pure noise (mean ~0) regresses every
    image towards the average color. Training with a random per-channel offset teaches the model to set
    the mean itself (on ShapesWorld: dark brown was drawn as orange, orange as yellow).
    """
    noise = torch.randn(shape, generator=generator)
    if offset > 0:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


def _lr_at(cfg: UNetTrainConfig, step: int, total: int | None = None) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak at step ``total`` (default ``cfg.steps``)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, (total or cfg.steps) - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


#: Seconds kept free at the deadline for the final checkpoint, the export and the end of ``world train``.
DEADLINE_RESERVE_S = 90.0


def fit_schedule(step: int, seconds_per_step: float, seconds_left: float, cap: int) -> int:
    """The schedule length that ends by a deadline: ``step`` plus the steps ``seconds_left`` (minus a reserve)
    holds at ``seconds_per_step``, at most ``cap`` and at least one more step.

    Re-planned every 50 steps with the wall time per step (checkpoints included) averaged since the thread count
    last changed: the UNet starts beside the evaluator's process on one core and speeds up when it gets the
    second one, so the plan grows then. In one ``world train`` run a 50-step window alone varied from 0.62 to
    0.81 s per step, which swung the plan by 20% and the learning rate by 7% from one re-plan to the next."""
    affordable = int(max(0.0, seconds_left - DEADLINE_RESERVE_S) / max(seconds_per_step, 1e-6))
    return max(step + 1, min(cap, step + affordable))


def train_unet(cfg: UNetTrainConfig | None, pipe_dir: Path, logfile: str | Path | None = None,
               progress: bool = True, resume: bool = True, threads_now: Callable[[], int] | None = None,
               deadline: float | None = None):
    """Train (or resume) the UNet on ``pipe_dir``'s tokenizer, text encoder and VAE; writes the pipeline there and
    exports the EMA UNet to ``pipe_dir/unet`` at every checkpoint and at the end (never into the shipped weights).

    ``threads_now``, if given, is asked every 50 steps how many torch threads to use from then on (``world train``
    hands the UNet the evaluator's core once that process is done). ``deadline`` (a ``time.time()``), if given,
    shortens the schedule to end by then: every 50 steps its length is re-planned from the measured speed
    (:func:`fit_schedule`, at most ``cfg.steps``), and the cosine decays over the planned length."""
    from diffusers import AutoencoderKL, DDPMScheduler

    refuse_shipped(pipe_dir)
    cfg = cfg or UNetTrainConfig()
    torch.set_num_threads(cfg.threads)
    pipe_dir = Path(pipe_dir)
    tokenizer, text_encoder = load_text_side(pipe_dir)
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae", torch_dtype=torch.float32).eval()
    vae = vae.to(torch.float16).to(torch.float32)  # exactly the values shipped (fp16 storage)
    key = encoder_digest(vae)
    images, labels = render_pool(cfg.pool_size, cfg.seed, progress=progress, logfile=logfile)
    latents = encode_pool(vae, images, key, logfile)
    del images
    log(f"latent pool {tuple(latents.shape)} std {latents.std():.3f}", logfile)

    noise_sched = DDPMScheduler(**SCHEDULE, clip_sample=False)
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    te_key = _file_digest(next((pipe_dir / "text_encoder").glob("*.safetensors")))

    torch.manual_seed(cfg.seed)
    unet = build_unet(text_encoder.config.hidden_size, cfg.attention_16)
    if cfg.init_from:
        from diffusers import UNet2DConditionModel

        start = UNet2DConditionModel.from_pretrained(cfg.init_from, torch_dtype=torch.float32)
        grown = grow_from(unet, start.state_dict())
        log(f"UNet: initialized from {cfg.init_from}" + (f"; new identity-initialized blocks {grown}" if grown else ""),
            logfile)
    use_matmul_attention(unet)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    arch = architecture_digest(text_encoder.config.hidden_size, cfg.attention_16)
    ckpt = cache_dir() / f"unet_ckpt_s{cfg.seed}_{te_key}_{arch}.pt"
    step, elapsed, total = 0, 0.0, cfg.steps
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        total = int(state.get("planned_steps", cfg.steps)) if deadline else cfg.steps
        if state.get("config") and json.loads(state["config"]) != asdict(cfg):
            _note_history(cfg.seed, f"resumed at step {step} with a changed config: was {state['config']}, now {json.dumps(asdict(cfg))}")
        log(f"UNet: resumed from {ckpt} at step {step} ({elapsed / 60:.1f} min trained)", logfile)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"UNet {n_params / 1e6:.2f}M params; config {json.dumps(asdict(cfg))}", logfile)

    save_pipeline(pipe_dir, unet=ema, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    empty = encode_text(tokenizer, text_encoder, [""])[0]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext

    def save(final: bool = False) -> None:
        save_torch(ckpt, {"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                          "elapsed": elapsed, "planned_steps": total, "config": json.dumps(asdict(cfg))})
        export_unet(ema, pipe_dir)
        meta = dict(config=asdict(cfg), step=step, train_minutes=round(elapsed / 60, 1), params=n_params,
                    final=final, text_encoder_digest=te_key, vae_digest=key,
                    **({"planned_steps": total, "fitted_to_deadline": True} if deadline else {}))
        write_text(cache_dir() / f"unet_progress_s{cfg.seed}.json", json.dumps(meta, indent=1))
        log(f"checkpoint at step {step} ({elapsed / 60:.1f} min) -> {ckpt}; EMA UNet exported to {pipe_dir / 'unet'}", logfile)

    unet.train()
    ema_params, model_params = list(ema.parameters()), list(unet.parameters())
    bar = tqdm(total=total, initial=step, desc="unet", disable=not progress)
    run_start, last_ckpt, losses = time.time(), time.time(), []
    pace_from = (time.time(), step)  # the speed the plan uses: wall time per step since this (time, step)
    n = len(latents)
    pairs = np.array([i for i, lab in enumerate(labels) if len(lab["objects"]) == 2])
    while step < total:
        t_step = time.time()
        rng = np.random.default_rng((cfg.seed, 23, step))
        idx = rng.integers(0, n, cfg.batch_size)
        if cfg.two_object_share > 0:
            boost = rng.random(cfg.batch_size) < cfg.two_object_share
            idx[boost] = pairs[rng.integers(0, len(pairs), int(boost.sum()))]
        captions = [R.make_caption(labels[i], rng, templates="train", mention_watermark=False) for i in idx]
        drop = rng.random(cfg.batch_size) < cfg.cfg_dropout
        keep = [c for c, d in zip(captions, drop) if not d]
        cond = empty.expand(cfg.batch_size, -1, -1).clone()
        if keep:
            cond[torch.from_numpy(~drop)] = encode_text(tokenizer, text_encoder, keep)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        x0 = latents[torch.from_numpy(idx)]
        noise = training_noise(tuple(x0.shape), cfg.offset_noise, g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step, total)
        with autocast():
            pred = unet(xt, t, cond).sample
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]  # Min-SNR-gamma for epsilon targets
        loss = (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        step += 1
        elapsed += time.time() - t_step
        losses.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            wanted = threads_now() if threads_now else torch.get_num_threads()
            if deadline:
                pace = (time.time() - pace_from[0]) / (step - pace_from[1])
                total = bar.total = fit_schedule(step, pace, deadline - time.time(), cfg.steps)
                bar.refresh()
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)
                pace_from = (time.time(), step)  # a new speed from here on
                log(f"UNet: {wanted} threads from step {step}", logfile)
            avg = sum(losses) / len(losses)
            losses.clear()
            bar.set_postfix(loss=f"{avg:.4f}")
            log(f"UNet step {step}/{total} loss {avg:.4f} lr {_lr_at(cfg, step, total):.2e} "
                f"{elapsed / step if step else 0:.2f}s/step (avg) {elapsed / 60:.1f} min", logfile)
        out_of_time = cfg.time_budget_s > 0 and time.time() - run_start > cfg.time_budget_s
        if time.time() - last_ckpt > cfg.checkpoint_every_s or step == total or out_of_time:
            save(final=step == total)
            last_ckpt = time.time()
        if out_of_time:
            log(f"time budget of {cfg.time_budget_s:.0f}s reached at step {step}; resume continues from here", logfile)
            break
    bar.close()
    return ema, step


def _note_history(seed: int, note: str) -> None:
    path = cache_dir() / f"unet_history_s{seed}.json"
    data = json.loads(path.read_text()) if path.exists() else {"notes": []}
    data["notes"].append(f"{time.strftime('%H:%M')} {note}")
    write_text(path, json.dumps(data, indent=1))


def export_unet(unet, pipe_dir: Path) -> None:
    """Write the (EMA) UNet into the pipeline dir in fp16 (loads into fp32 with torch_dtype=float32), replacing
    ``unet/`` as a whole."""
    half = copy.deepcopy(unet).to(torch.float16)
    with atomic_directory(refuse_shipped(pipe_dir) / "unet") as temporary:
        half.save_pretrained(temporary)

