"""Stage 3 of ``conceptsmith world train``: the ShapesWorld autoencoder (64x64 RGB <-> 16x16x4 latents).

A small ``diffusers.AutoencoderKL`` (no mid-block attention: decoding one image must stay in the
few-millisecond range so that a whole generation fits in a second on 2 CPU threads) trained on a
pool of generator-split renders with an L1 + L2 reconstruction loss and a very small KL term. The
latent scaling factor written into the config is measured (1 / std of the latents), as Stable
Diffusion's 0.18215 was.

Also home of the render pool shared by the VAE and UNet stages: renders are cached in chunks
under ``~/.cache/conceptsmith/world`` so a restarted run only renders what is missing.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from conceptsmith.io import atomic_directory, save_numpy, save_torch, write_text
from conceptsmith.world import render as R
from conceptsmith.world.pipeline import refuse_shipped

VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
    mid_block_add_attention=False,
)

POOL_CHUNK = 2000


def cache_dir() -> Path:
    """Where checkpoints and render pools live (outside the repository)."""
    root = os.environ.get("CONCEPTSMITH_CACHE") or Path.home() / ".cache" / "conceptsmith"
    path = Path(root) / "world"
    path.mkdir(parents=True, exist_ok=True)
    return path


def weights_dir() -> Path:
    return Path(__file__).resolve().parent / "weights"


def log(message: str, logfile: str | Path | None) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as fh:
            fh.write(line + "\n")


def render_pool(n: int, seed: int, *, progress: bool = True, logfile: str | Path | None = None):
    """``n`` generator-split renders (training templates) with labels; cached in chunks.

    Returns (images uint8 [n,64,64,3], labels list[dict]). Captions are re-drawn from the labels
    at training time (``render.make_caption``), so one image is seen under many captions."""
    root = cache_dir() / f"pool_generator_s{seed}"
    root.mkdir(parents=True, exist_ok=True)
    n_chunks = math.ceil(n / POOL_CHUNK)
    images, labels = [], []
    bar = tqdm(total=n_chunks * POOL_CHUNK, desc="render pool", unit="img", disable=not progress)
    for c in range(n_chunks):
        img_file, lab_file = root / f"chunk{c:04d}.npy", root / f"chunk{c:04d}.json"
        if img_file.exists() and lab_file.exists():
            imgs = np.load(img_file)
            labs = json.loads(lab_file.read_text())
        else:
            imgs, _, labs = R.dataset(POOL_CHUNK, seed, start=c * POOL_CHUNK, split="generator", templates="train")
            save_numpy(img_file, imgs)
            write_text(lab_file, json.dumps(labs))
            log(f"rendered pool chunk {c + 1}/{n_chunks}", logfile)
        images.append(imgs)
        labels.extend(labs)
        bar.update(POOL_CHUNK)
    bar.close()
    return np.concatenate(images)[:n], labels[:n]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n,H,W,3] -> float [n,3,H,W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class VAETrainConfig:
    seed: int = 0
    pool_size: int = 10000
    steps: int = 1000
    batch_size: int = 32
    crop: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-7
    threads: int = 1  # the 2 cores are shared: one thread avoids OpenMP spin contention
    checkpoint_every_s: float = 180.0


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def _resume(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, resume: bool, what: str, logfile) -> int:
    """Load model + optimizer state from ``ckpt`` when resuming; returns the step to continue from (0: fresh)."""
    if not (resume and ckpt.exists()):
        return 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    log(f"{what}: resumed from {ckpt} at step {int(state['step'])}", logfile)
    return int(state["step"])


def train_vae(cfg: VAETrainConfig | None, out_dir: Path, logfile: str | Path | None = None,
              progress: bool = True, resume: bool = True):
    """Train (or resume) the autoencoder; writes ``out_dir`` (e.g. ``<world train --out>/shapes-sd/vae``) with
    save_pretrained, never the shipped weights."""
    refuse_shipped(out_dir)
    cfg = cfg or VAETrainConfig()
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    images, _ = render_pool(cfg.pool_size, cfg.seed, progress=progress, logfile=logfile)
    torch.manual_seed(cfg.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    ckpt = cache_dir() / f"vae_ckpt_s{cfg.seed}.pt"
    step = _resume(ckpt, vae, opt, resume, "VAE", logfile)
    gen = np.random.default_rng((cfg.seed, 11, step))
    n_eval = 256
    held = to_tensor(images[-n_eval:])
    train_n = len(images) - n_eval
    last_ckpt = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="vae", disable=not progress)
    vae.train()
    t0 = time.time()
    while step < cfg.steps:
        lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = gen.integers(0, train_n, cfg.batch_size)
        x = to_tensor(images[idx])
        if cfg.crop < x.shape[-1]:  # random aligned crops train it 4x cheaper (GroupNorm: see finetune_decoder)
            oy, ox = (int(v) * 4 for v in gen.integers(0, (x.shape[-1] - cfg.crop) // 4 + 1, 2))
            x = x[..., oy : oy + cfg.crop, ox : ox + cfg.crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        err = recon - x
        loss = err.abs().mean() + err.pow(2).mean() + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(f"VAE step {step}/{cfg.steps} loss {loss.item():.4f} lr {lr:.2e} {time.time() - t0:.0f}s", logfile)
        if time.time() - last_ckpt > cfg.checkpoint_every_s or step == cfg.steps:
            save_torch(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
            last_ckpt = time.time()
    bar.close()
    vae.eval()
    with torch.no_grad():
        post = vae.encode(held).latent_dist
        rec = vae.decode(post.mode()).sample
        mse = (rec - held).pow(2).mean().item()
        psnr = 10 * math.log10(4.0 / mse)
        std = post.mode().std().item()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    with atomic_directory(out_dir) as temporary:
        vae.save_pretrained(temporary)
    stats = dict(config=asdict(cfg), heldout_psnr_db=round(psnr, 2), latent_std=round(std, 4),
                 scaling_factor=round(1.0 / std, 5), steps=step)
    write_text(cache_dir() / f"vae_stats_s{cfg.seed}.json", json.dumps(stats, indent=1))
    log(f"VAE done: held-out PSNR {psnr:.2f} dB, latent std {std:.4f} -> scaling_factor {1 / std:.4f}; saved {out_dir}", logfile)
    return vae, stats


def finetune_decoder(vae_dir: Path, steps: int = 2000, batch_size: int = 32, lr: float = 5e-4, seed: int = 0,
                     crop: int = 64, threads: int = 1, logfile: str | Path | None = None, progress: bool = True,
                     resume: bool = True):
    """Improve the decoder with the encoder frozen: the latent space (and every latent the UNet was
    trained on) stays bit-identical, only the pixels decoded from it get better. Decodes posterior
    means, which is what the sampler's final latents approximate.

    Train at the full 64x64 size (``crop=64``): the decoder's GroupNorm layers normalize over the
    whole latent, so a decoder trained on 32x32 crops sees other statistics than at generation time
    and shifts colors (measured on the crop-32 decoder before this fine-tune: a mean tint of up to 20/255 per
    background, evaluator color accuracy on reconstructions 0.78 vs 0.97 on the renders themselves)."""
    from diffusers import AutoencoderKL

    refuse_shipped(vae_dir)
    torch.set_num_threads(threads)
    vae_dir = Path(vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    images, _ = render_pool(10000, seed, progress=progress, logfile=logfile)
    ckpt = cache_dir() / f"vae_decoder_ckpt_s{seed}.pt"
    step = _resume(ckpt, vae, opt, resume, "decoder fine-tune", logfile)
    held = to_tensor(images[-256:])
    last = time.time()
    bar = tqdm(total=steps, initial=step, desc="vae-decoder", disable=not progress)
    while step < steps:
        gen = np.random.default_rng((seed, 12, step))
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = to_tensor(images[gen.integers(0, len(images) - 256, batch_size)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        oy, ox = (int(v) for v in gen.integers(0, (x.shape[-1] - crop) // 4 + 1, 2))
        zc = z[..., oy : oy + crop // 4, ox : ox + crop // 4]
        xc = x[..., oy * 4 : oy * 4 + crop, ox * 4 : ox * 4 + crop]
        err = vae.decode(zc).sample - xc
        loss = err.abs().mean() + err.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f}", logfile)
        if time.time() - last > 120 or step == steps:
            save_torch(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
            last = time.time()
    bar.close()
    vae.eval()
    with torch.no_grad():
        rec = vae.decode(vae.encode(held).latent_dist.mean).sample
        psnr = 10 * math.log10(4.0 / (rec - held).pow(2).mean().item())
    with atomic_directory(vae_dir) as temporary:
        vae.to(torch.float16).save_pretrained(temporary)  # stored in fp16 like every ShapesWorld component
    stats_path = cache_dir() / f"vae_stats_s{seed}.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats.update(decoder_finetune=dict(steps=step, batch_size=batch_size, lr=lr, crop=crop), heldout_psnr_db=round(psnr, 2))
    write_text(stats_path, json.dumps(stats, indent=1))
    log(f"decoder fine-tune done: held-out PSNR {psnr:.2f} dB; saved {vae_dir}", logfile)
    return vae
