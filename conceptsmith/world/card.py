"""Write ``MODEL_CARD.md`` beside the ShapesWorld generator weights: training configuration and measured numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conceptsmith.io import write_text
from conceptsmith.world import stage_clock
from conceptsmith.world.check import BARS, passes
from conceptsmith.world.clip_train import EVALUATOR_DEFAULTS, TEXT_TOWER_DEFAULTS
from conceptsmith.world.pipeline import DEFAULTS, PIPE_DIR
from conceptsmith.world.unet_train import SCHEDULE
from conceptsmith.world.vae_train import cache_dir


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _attention_resolutions(unet_cfg: dict) -> str:
    """E.g. ``16x16, 8x8 and 4x4``: the latent sizes of the UNet blocks that have cross-attention."""
    size = unet_cfg.get("sample_size", 16)
    sizes = [size // 2**i for i, kind in enumerate(unet_cfg.get("down_block_types", [])) if "CrossAttn" in kind]
    names = [f"{s}x{s}" for s in sizes]
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def write_model_card(results: dict, pipe_dir: Path | None = None, seed: int = 0) -> Path:
    pipe_dir = Path(pipe_dir) if pipe_dir else PIPE_DIR
    unet_cfg = _read_json(pipe_dir / "unet" / "config.json")
    vae_cfg = _read_json(pipe_dir / "vae" / "config.json")
    te_cfg = _read_json(pipe_dir / "text_encoder" / "config.json")
    vae_stats = _read_json(cache_dir() / f"vae_stats_s{seed}.json")
    unet_progress = _read_json(cache_dir() / f"unet_progress_s{seed}.json")
    clip_dir = pipe_dir.parent / "shapes-clip"
    lines = [
        "# ShapesWorld generator `builtin:shapes` — model card",
        "",
        f"Written by `conceptsmith world check --model-card` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "A micro Stable Diffusion 1.x-style pipeline (diffusers `StableDiffusionPipeline`, `save_pretrained`)",
        "trained from scratch on CPU on ShapesWorld renders (`conceptsmith.world.render`, generator split:",
        "no novel objects; the night watermark is never mentioned in captions; TRAINING caption templates only).",
        "",
        "## Components",
        "- tokenizer: CLIPTokenizer from open_clip's bundled BPE vocabulary (OpenAI CLIP ids), 77 tokens, pad = EOS",
        f"- text_encoder: CLIPTextModel hidden {te_cfg.get('hidden_size')}, {te_cfg.get('num_hidden_layers')} layers, "
        f"{te_cfg.get('num_attention_heads')} heads — the text tower of a contrastive image-text model trained on "
        f"ShapesWorld (`clip_train.train_text_tower`, {json.dumps(TEXT_TOWER_DEFAULTS)}), then frozen",
        f"- vae: AutoencoderKL 64x64x3 -> 16x16x4, block_out_channels {vae_cfg.get('block_out_channels')}, "
        f"no mid-block attention, scaling_factor {vae_cfg.get('scaling_factor')} (measured: 1 / latent std)",
        f"- unet: UNet2DConditionModel block_out_channels {unet_cfg.get('block_out_channels')}, "
        f"down {unet_cfg.get('down_block_types')}, up {unet_cfg.get('up_block_types')}, layers_per_block "
        f"{unet_cfg.get('layers_per_block')}, cross_attention_dim {unet_cfg.get('cross_attention_dim')}, "
        f"{unet_cfg.get('attention_head_dim')} heads; cross-attention at {_attention_resolutions(unet_cfg)} latents",
        f"- scheduler: DPMSolverMultistepScheduler (DPM-Solver++ 2nd order) on SD's scaled-linear schedule {SCHEDULE}",
        f"- defaults: {DEFAULTS}",
        f"- weights stored in float16 (load in float32 with `load_pipeline('builtin:shapes')`); "
        f"generator dir {(_size_mb(pipe_dir)):.1f} MB"
        + (f", evaluator dir {_size_mb(clip_dir):.1f} MB" if clip_dir.exists() else ""),
        "",
        "## Training",
        f"- VAE: {json.dumps(vae_stats.get('config', {}))}; L1 + L2 reconstruction + KL; random 32x32 crops "
        f"(then the decoder is fine-tuned at full size, below); held-out PSNR {vae_stats.get('heldout_psnr_db')} dB",
        f"- UNet: {json.dumps(unet_progress.get('config', {}))}",
        f"  steps done {unet_progress.get('step')}, {unet_progress.get('train_minutes')} min of training; "
        + (f"schedule fitted to the time budget: {unet_progress['planned_steps']} steps planned "
           f"(`world train --budget-hours`; `--unet-steps {unet_progress['planned_steps']}` replays it); "
           if unet_progress.get("fitted_to_deadline") else "")
        + f"{unet_progress.get('params')} parameters; epsilon prediction, Min-SNR-5 weighting, 10% empty captions "
        f"(classifier-free guidance), EMA {unet_progress.get('config', {}).get('ema_decay')} weights shipped, bf16 "
        "autocast, AdamW, warmup + cosine LR"
        + (f", offset noise {offset}" if (offset := unet_progress.get("config", {}).get("offset_noise")) else ""),
        *[f"  - {note}" for note in _read_json(cache_dir() / f"unet_history_s{seed}.json").get("notes", [])],
        f"- VAE decoder fine-tune (encoder frozen, latents unchanged): {json.dumps(vae_stats.get('decoder_finetune'))}",
        f"- Evaluator `builtin:shapes-clip` (open_clip config `clip_config/shapes-clip.json`): {json.dumps(EVALUATOR_DEFAULTS)}; "
        "continue_steps are further warm-restart cosine cycles from the previous weights",
        "- Reproduce: `conceptsmith world train --out DIR` (writes DIR/shapes-sd and DIR/shapes-clip; stages data, "
        "text-tower, vae, unet, evaluator; seeded, "
        "checkpointed in ~/.cache/conceptsmith/world, resumable) runs this recipe with the UNet trained from scratch "
        "on the final text tower; the shipped UNet took the longer path listed in the notes above "
        "(`--unet-init` reproduces its fine-tuning step).",
        *(["- Training clock (`world train`, summed over resumed runs; stages overlap):",
           *stage_clock.report().splitlines()] if stage_clock.totals() else []),
        "",
        "## Measured (`conceptsmith world check`)",
        f"Held-out caption templates only; {results.get('seeds')} seeds per prompt; judged by `builtin:shapes-clip`.",
        "",
        "| metric | value | bar | |",
        "| --- | --- | --- | --- |",
    ]
    for key, (op, bar) in BARS.items():
        if key in results:
            lines.append(f"| {key} | {results[key]} | {op} {bar} | {'pass' if passes(key, results[key]) else 'MISS'} |")
    for key, value in results.items():
        if key not in BARS:
            lines.append(f"| {key} | {value} | | |")
    lines += ["", "Raw: `" + json.dumps(results) + "`", ""]
    path = pipe_dir / "MODEL_CARD.md"
    write_text(path, "\n".join(lines))
    return path
