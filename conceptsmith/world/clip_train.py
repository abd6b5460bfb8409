"""Contrastive image-text training on ShapesWorld: the generator's text tower and the evaluator.

Two independent models, trained the CLIP way (symmetric InfoNCE over a batch, learned temperature,
AdamW, warmup + cosine learning rate):

* :func:`train_text_tower` - a small convolutional image tower + a ``transformers.CLIPTextModel``
  (causal, EOS pooling) on the generator's data split (seed A, data sample A, train templates,
  watermark never mentioned). The text model is then frozen and saved as the generator's text
  encoder (``text_encoder/`` via ``save_pretrained``, stored in float16 to fit the size budget;
  load it with ``torch_dtype=torch.float32``) next to the CLIP tokenizer (``tokenizer/``).
* :func:`train_evaluator` - an open_clip ``CLIP`` built from ``clip_config/shapes-clip.json``
  (ModifiedResNet image tower, 4-layer text transformer) on the evaluator's split (seed B, another
  data sample, captions that say whether there is a watermark, novel objects included). Saved as
  ``shapes-clip/open_clip_config.json`` + ``open_clip_model.safetensors`` and loaded only through
  open_clip's own API (:func:`load_shapes_clip`).

Both stages checkpoint to ``~/.cache/conceptsmith/world/`` (override with ``CONCEPTSMITH_CACHE``)
and resume from there. Batches are a pure function of (seed, step), so a resumed run sees the same
data as an uninterrupted one. Captions are re-drawn every step from the scene labels; 25% of
captions get 1-3 random vocabulary tokens inserted so that words never seen in training (as in
held-out templates) do not derail the text towers.

Zero-shot evaluation (:func:`zero_shot_accuracy`) uses fresh renders and only the held-out
templates, with class-prompt ensembles (templates x shapes).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from conceptsmith.io import atomic_directory, save_numpy, save_torch, write_text

from . import render as R
from . import vocab as V
from .pipeline import refuse_shipped
from .tokenizer import clip_tokenizer, save_clip_tokenizer

WORLD_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = WORLD_DIR / "weights"
CLIP_CONFIG = WORLD_DIR / "clip_config" / "shapes-clip.json"
EVALUATOR_NAME = "shapes-clip"

BOS_ID, EOS_ID = 49406, 49407
TEXT_TOWER_CONTEXT = 40  # training length of the generator's text tower (captions are <= 36 tokens)

TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=128,
    hidden_act="quick_gelu",
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=EOS_ID,
)

# Default stage settings (seed, data sample) - the generator's and the evaluator's never overlap.
TEXT_TOWER_DEFAULTS = dict(seed=1001, data_seed=11, n_images=16000, batch=128, lr=1e-3, steps=1500, stop_at=None,
                           group_size=8, continue_steps=(600, 1500), continue_lr=3e-4, binding_groups=4)
EVALUATOR_DEFAULTS = dict(seed=2002, data_seed=22, n_images=16000, batch=128, lr=1.5e-3, steps=2000, stop_at=None,
                          group_size=8, continue_steps=(700, 700, 2400, 2400, 2400, 2400), continue_lr=6e-4)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def cache_dir() -> Path:
    root = Path(os.environ.get("CONCEPTSMITH_CACHE", Path.home() / ".cache" / "conceptsmith"))
    d = root / "world"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- data

def _render_chunk(args):
    n, seed, start, split = args
    imgs, _caps, labs = R.dataset(n, seed, start=start, split=split)
    return imgs, labs


def rendered_dataset(n: int, seed: int, split: str, workers: int = 2) -> tuple[np.ndarray, list[dict]]:
    """Images + labels of ``R.dataset(n, seed, split=split)``, rendered once and cached on disk."""
    base = cache_dir() / f"data-{split}-s{seed}-n{n}"
    img_path, lab_path = base.with_suffix(".npy"), base.with_suffix(".json")
    if img_path.exists() and lab_path.exists():
        return np.load(img_path), json.loads(lab_path.read_text())
    chunk = 1000
    jobs = [(min(chunk, n - s), seed, s, split) for s in range(0, n, chunk)]

    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            parts = list(tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc=f"render {split}"))
    else:
        parts = [_render_chunk(j) for j in tqdm(jobs, desc=f"render {split}")]
    imgs = np.concatenate([p[0] for p in parts])
    labs = [lab for p in parts for lab in p[1]]
    save_numpy(img_path, imgs)
    write_text(lab_path, json.dumps(labs))
    return imgs, labs


def _encode_ids(encode: Callable[[str], list[int]], captions: Sequence[str], length: int, pad_id: int,
                rng: np.random.Generator | None = None, insert_p: float = 0.0) -> torch.Tensor:
    """[BOS] ids [EOS] padded to the longest caption (at most ``length``); optionally inserts random
    vocabulary tokens. Shorter-than-context batches are exact for causal, EOS-pooled text towers."""
    rows = []
    for c in captions:
        ids = list(encode(c))
        if rng is not None and rng.random() < insert_p:
            for _ in range(int(rng.integers(1, 4))):
                ids.insert(int(rng.integers(0, len(ids) + 1)), int(rng.integers(0, BOS_ID)))
        rows.append([BOS_ID, *ids[: length - 2], EOS_ID])
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.tensor(ids)
    return out


# ----------------------------------------------------------------------------- models

class ConvImageTower(nn.Module):
    """Small CNN for 64x64 images: a 4x4 patchify stem (keeps fine textures in channels), three
    conv stages down to 4x4x128, flattened (keeps the layout, for 'left of' / 'above') -> dim."""

    def __init__(self, dim: int = 128, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())

        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 4, 4), nn.BatchNorm2d(w), nn.GELU(),
            block(w, 2 * w, 1), block(2 * w, 3 * w, 2), block(3 * w, 3 * w, 1), block(3 * w, 4 * w, 2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * w * 16, dim))

    def forward(self, x):
        return self.head(self.features(x))


class TextTowerCLIP(nn.Module):
    """Image tower + transformers CLIPTextModel (EOS-pooled, projected) + learned temperature."""

    def __init__(self, text_config: dict | None = None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(**(text_config or TEXT_ENCODER_CONFIG))
        self.text = CLIPTextModel(cfg)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        self.visual = ConvImageTower(cfg.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):
        return self.text_proj(self.text(input_ids=ids).pooler_output)


def _normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- training loop

def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def _contrastive_train(
    model: nn.Module,
    *,
    name: str,
    images: np.ndarray,
    labels: list[dict],
    caption: Callable[[dict, np.random.Generator], str],
    tokenize: Callable[[list[str], np.random.Generator], torch.Tensor],
    mean, std,
    steps: int, batch: int, lr: float, seed: int, resume: bool,
    stop_at: int | None = None,
    group_size: int = 1,
    binding_groups: int = 0,
    ckpt_every: int = 10,
    threads: int = 2,
) -> nn.Module:
    """Train with a ``steps``-long warmup+cosine schedule; ``stop_at`` < steps ends the run early
    (same schedule, so a run stopped at k equals the first k steps of the full run).

    ``group_size`` > 1 builds each batch from groups of scenes that share background, artist and
    first color: in random batches those global cues alone tell most pairs apart, so the towers
    would learn shape and pattern late (a contrastive shortcut); grouped batches make them matter.

    ``binding_groups`` > 0 replaces that many groups of every batch by freshly rendered
    :func:`render.binding_variants` of two-object scenes (4 per scene): captions with the same words
    and different bindings, so that the text tower must encode which color and place go with which
    object (without them it barely tells "left of" from "right of": token cosine 0.997)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ckpt = cache_dir() / f"ckpt-{name}.pt"
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    start = 0
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("steps") == steps and state.get("seed") == seed:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = int(state["step"])
        else:
            print(f"[{name}] checkpoint is for another run (steps/seed differ); starting fresh")
    warmup = max(1, steps // 20)
    n = len(images)
    groups: list[np.ndarray] = []
    if group_size > 1:
        by_key: dict[tuple, list[int]] = {}
        for i, lab in enumerate(labels):
            by_key.setdefault((lab["background"], lab["artist"], lab["objects"][0]["color"]), []).append(i)
        groups = [np.array(v) for _, v in sorted(by_key.items(), key=lambda kv: str(kv[0])) if len(v) >= group_size]
    pairs = np.array([i for i, lab in enumerate(labels) if len(lab["objects"]) == 2])
    if binding_groups and (group_size % 4 or not len(pairs) or binding_groups * group_size > batch):
        raise ValueError("binding_groups needs two-object scenes, a group_size divisible by 4 and room in the batch")
    regular = batch - binding_groups * group_size  # rows of every batch drawn from the data set
    model.train()
    end = min(steps, stop_at or steps)
    bar = tqdm(range(start, end), initial=start, total=end, desc=name)
    t0, run_loss = time.time(), None
    for step in bar:
        rng = np.random.default_rng((seed, 7, step))
        if groups:
            keys = rng.integers(0, len(groups), regular // group_size)
            idx = np.concatenate([rng.choice(groups[k], group_size, replace=False) for k in keys])
        else:
            idx = rng.integers(0, n, regular)
        batch_labels, pixels = [labels[i] for i in idx], images[idx]
        if binding_groups:
            scenes = rng.choice(pairs, binding_groups * group_size // 4, replace=False)
            variants = [(v, int(k)) for k in scenes for v in R.binding_variants(labels[k])]
            batch_labels += [v for v, _ in variants]
            pixels = np.concatenate([pixels, np.stack([R.render_scene(v, seed=(seed, step, k)) for v, k in variants])])
        caps = [caption(lab, rng) for lab in batch_labels]
        ids = tokenize(caps, rng)
        x = _normalize(torch.from_numpy(pixels), mean, std)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup)
        fi = F.normalize(model.encode_image(x), dim=-1)
        ft = F.normalize(getattr(model, "encode_text_train", model.encode_text)(ids), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0)
        logits = scale * fi @ ft.T
        # captions can repeat inside a batch: identical captions are all positives for each other
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        run_loss = loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * loss.item()
        bar.set_postfix(loss=f"{run_loss:.3f}", T=f"{scale.item():.1f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == end:
            save_torch(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                              "steps": steps, "seed": seed})
    print(f"[{name}] {end - start} steps in {time.time() - t0:.0f}s, loss {run_loss}")
    model.eval()
    return model


# ----------------------------------------------------------------------------- stage (a): text tower

def _hf_encoder():
    tok = clip_tokenizer()
    return lambda c: tok(c, add_special_tokens=False).input_ids


def train_text_tower(out_dir: str | Path, steps: int | None = None, seed: int | None = None,
                     resume: bool = True, threads: int = 2, **overrides: Any) -> Path:
    """Stage (a): contrastive training; saves ``out_dir/text_encoder`` (fp16) and ``out_dir/tokenizer`` (a
    generator pipeline folder such as ``<world train --out>/shapes-sd``; never the shipped weights)."""
    refuse_shipped(out_dir)
    cfg = dict(TEXT_TOWER_DEFAULTS, **overrides)
    steps = steps or cfg["steps"]
    seed = cfg["seed"] if seed is None else seed
    torch.set_num_threads(threads)
    images, labels = rendered_dataset(cfg["n_images"], cfg["data_seed"], "generator")
    encode = _hf_encoder()

    def caption(lab, rng):
        return R.make_caption(lab, rng, templates="train", mention_watermark=False)

    def tokenize(caps, rng):
        return _encode_ids(encode, caps, TEXT_TOWER_CONTEXT, EOS_ID, rng, insert_p=0.25)

    torch.manual_seed(seed)
    model = TextTowerCLIP()
    model = _contrastive_train(model, name=f"text-tower-s{seed}", images=images, labels=labels, caption=caption,
                               tokenize=tokenize, mean=(0.5,) * 3, std=(0.25,) * 3, steps=steps,
                               batch=cfg["batch"], lr=cfg["lr"], seed=seed, resume=resume, stop_at=cfg["stop_at"],
                               group_size=cfg["group_size"], threads=threads)
    for k, cont_steps in enumerate(cfg.get("continue_steps") or ()):
        # further cosine cycles from the previous weights, with binding-variant groups in every batch
        model = _contrastive_train(model, name=f"text-tower-s{seed}-bind{k + 1}", images=images, labels=labels,
                                   caption=caption, tokenize=tokenize, mean=(0.5,) * 3, std=(0.25,) * 3,
                                   steps=cont_steps, batch=cfg["batch"], lr=cfg["continue_lr"], seed=seed + 1 + k,
                                   resume=resume, group_size=cfg["group_size"],
                                   binding_groups=cfg["binding_groups"], threads=threads)
    save_torch(cache_dir() / f"text-tower-s{seed}-full.pt", model.state_dict())
    out = Path(out_dir)
    text = model.text.eval().requires_grad_(False)
    with atomic_directory(out / "text_encoder") as temporary:
        copy.deepcopy(text).to(torch.float16).save_pretrained(temporary)

    save_clip_tokenizer(out / "tokenizer")
    return out / "text_encoder"


def load_text_tower(seed: int | None = None) -> TextTowerCLIP:
    """The full contrastive model of stage (a) (image tower included) from the cache, for evaluation."""
    seed = TEXT_TOWER_DEFAULTS["seed"] if seed is None else seed
    model = TextTowerCLIP()
    model.load_state_dict(torch.load(cache_dir() / f"text-tower-s{seed}-full.pt", map_location="cpu", weights_only=True))
    return model.eval()


# ----------------------------------------------------------------------------- stage (b): evaluator

def _model_cfg() -> dict:
    return json.loads(CLIP_CONFIG.read_text())


def _openclip_encode_text_prefix(model, ids: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on ids shorter than the context: identical to padding with 0 up to the
    context length (causal attention, EOS = argmax pooling), but cheaper. Training only."""
    L = ids.shape[1]
    x = model.token_embedding(ids) + model.positional_embedding[:L]
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    return x @ model.text_projection if not isinstance(model.text_projection, nn.Linear) else model.text_projection(x)


def _register_config() -> None:
    import open_clip

    if EVALUATOR_NAME not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIG)


def train_evaluator(out_dir: str | Path, steps: int | None = None, seed: int | None = None,
                    resume: bool = True, threads: int = 2, **overrides: Any) -> Path:
    """Stage (b): the open_clip evaluator; saves ``out_dir/shapes-clip/{open_clip_config.json,
    open_clip_model.safetensors}`` (weights in float16; never into the shipped weights)."""
    import open_clip

    refuse_shipped(out_dir)
    cfg = dict(EVALUATOR_DEFAULTS, **overrides)
    steps = steps or cfg["steps"]
    seed = cfg["seed"] if seed is None else seed
    torch.set_num_threads(threads)
    images, labels = rendered_dataset(cfg["n_images"], cfg["data_seed"], "evaluator")
    _register_config()
    torch.manual_seed(seed)
    model = open_clip.create_model(EVALUATOR_NAME, pretrained=None)
    tok = open_clip.get_tokenizer(EVALUATOR_NAME)
    ctx = tok.context_length

    def caption(lab, rng):
        return R.make_caption(lab, rng, templates="train", mention_watermark=True)

    def tokenize(caps, rng):
        return _encode_ids(tok.encode, caps, ctx, 0, rng, insert_p=0.25)

    model.encode_text_train = lambda ids: _openclip_encode_text_prefix(model, ids)
    model = _contrastive_train(model, name=f"evaluator-s{seed}", images=images, labels=labels, caption=caption,
                               tokenize=tokenize, mean=OPENAI_MEAN, std=OPENAI_STD, steps=steps,
                               batch=cfg["batch"], lr=cfg["lr"], seed=seed, resume=resume, stop_at=cfg["stop_at"],
                               group_size=cfg["group_size"], threads=threads)
    for k, cont_steps in enumerate(cfg.get("continue_steps") or ()):
        # further cosine cycles (warm restarts, lower peak LR, other batch streams) from the previous weights
        model = _contrastive_train(model, name=f"evaluator-s{seed}-cont{k + 1 if k else ''}", images=images,
                                   labels=labels, caption=caption, tokenize=tokenize, mean=OPENAI_MEAN,
                                   std=OPENAI_STD, steps=cont_steps, batch=cfg["batch"], lr=cfg["continue_lr"],
                                   seed=seed + 1 + k, resume=resume, group_size=cfg["group_size"], threads=threads)
    out = Path(out_dir) / EVALUATOR_NAME
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    config = {
        "model_cfg": _model_cfg(),
        "preprocess_cfg": {"size": 64, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    with atomic_directory(out) as temporary:  # weights and config are replaced together
        save_file(state, str(temporary / "open_clip_model.safetensors"))
        (temporary / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_shapes_clip(device: str = "cpu", weights_dir: str | Path | None = None):
    """(model, preprocess, tokenizer) of the ShapesWorld evaluator, through open_clip's own API."""
    import open_clip

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR / EVALUATOR_NAME
    if not (d / "open_clip_model.safetensors").exists():
        raise FileNotFoundError(f"no shapes-clip weights in {d}; run `conceptsmith world train`")
    name = f"local-dir:{d}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    tokenizer = open_clip.get_tokenizer(name)
    return model.eval(), preprocess, tokenizer


# ----------------------------------------------------------------------------- zero-shot evaluation

ATTRIBUTES = ("shape", "color", "pattern", "artist", "watermark")


def _eval_set(attribute: str, n: int, seed: int) -> tuple[np.ndarray, list[int], list[str]]:
    """Fresh renders for one attribute (held-out templates) -> images, class indices, class names."""
    classes: list[str]
    force: dict[str, Any] = {}
    if attribute == "shape":
        classes = list(V.GENERATOR_SHAPES)
    elif attribute == "color":
        classes = list(V.COLORS)
    elif attribute == "pattern":
        classes = list(V.PATTERNS)
    elif attribute == "artist":
        classes = list(V.ARTISTS)
    elif attribute == "watermark":
        classes = ["no watermark", "watermark"]
        force = dict(background=V.WATERMARK_BACKGROUND)
    else:
        raise KeyError(attribute)
    imgs = np.empty((n, V.IMAGE_SIZE, V.IMAGE_SIZE, 3), np.uint8)
    ys = []
    for i in range(n):
        y = i % len(classes)
        f = dict(force, n_objects=1)
        if attribute == "watermark":
            f["watermark"] = bool(y)
        else:
            f[attribute] = classes[y]
        s = R.render((seed, 31337, i), split="generator", templates="heldout", **f)
        imgs[i] = s.image
        ys.append(y)
    return imgs, ys, classes


def class_prompts(attribute: str, classes: Sequence[str]) -> list[list[str]]:
    """Held-out-template prompt ensembles per class: each class prompt is averaged over the held-out
    templates and over the values of the other attributes (shapes, colors), as CLIP's ImageNet
    prompt ensembles average over phrasings."""
    shapes = list(V.GENERATOR_SHAPES)
    colors = [None, *V.COLORS]
    out = []
    for c in classes:
        ps = []
        for t in V.HELDOUT_TEMPLATES:
            if attribute == "shape":
                ps += [R.describe(c, co, template=t) for co in colors]
            elif attribute == "color":
                ps += [R.describe(s, c, template=t) for s in shapes]
            elif attribute == "pattern":
                ps += [R.describe(s, co, c, template=t) for s in shapes for co in colors]
            elif attribute == "artist":
                ps += [R.describe(s, artist=c, template=t) for s in shapes]
            elif attribute == "watermark":
                ps += [R.describe(s, background=V.WATERMARK_BACKGROUND, watermark=(c == "watermark"), template=t)
                       for s in shapes]
            else:
                raise KeyError(attribute)
        out.append(ps)
    return out


@torch.no_grad()
def zero_shot_accuracy(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[list[str]], torch.Tensor],
    attribute: str,
    *,
    n: int = 220,
    seed: int = 4242,
    image_transform: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> float:
    """Zero-shot accuracy for one attribute on fresh one-object renders.

    ``encode_image`` takes a float batch produced by ``image_transform`` (uint8 [n,64,64,3] ->
    tensor); ``encode_text`` takes prompts."""
    imgs, ys, classes = _eval_set(attribute, n, seed)
    prompts = class_prompts(attribute, classes)
    w = []
    for ps in prompts:
        e = torch.cat([F.normalize(encode_text(ps[i:i + 256]).float(), dim=-1) for i in range(0, len(ps), 256)]).mean(0)
        w.append(F.normalize(e, dim=-1))
    W = torch.stack(w)
    feats = []
    for i in range(0, n, 128):
        x = image_transform(imgs[i:i + 128])
        feats.append(F.normalize(encode_image(x).float(), dim=-1))
    pred = (torch.cat(feats) @ W.T).argmax(1)
    return float((pred == torch.tensor(ys)).float().mean())


def evaluate_shapes_clip(n: int = 220, seed: int = 4242, device: str = "cpu", weights_dir=None) -> dict[str, float]:
    """Zero-shot accuracies of the shipped evaluator, loaded through open_clip, using its preprocess."""
    model, preprocess, tokenizer = load_shapes_clip(device, weights_dir)

    def tf(arr):
        return torch.stack([preprocess(Image.fromarray(a)) for a in arr]).to(device)

    return {f"eval_{a}_acc": zero_shot_accuracy(model.encode_image, lambda ps: model.encode_text(tokenizer(ps).to(device)),
                                                a, n=n, seed=seed, image_transform=tf) for a in ATTRIBUTES}


def evaluate_text_tower(n: int = 220, seed: int = 4242, model: TextTowerCLIP | None = None) -> dict[str, float]:
    """Zero-shot accuracies of the stage-(a) contrastive model (a sanity check of the text encoder)."""
    model = model or load_text_tower()
    encode = _hf_encoder()

    def tf(arr):
        return _normalize(torch.from_numpy(np.ascontiguousarray(arr)), (0.5,) * 3, (0.25,) * 3)

    def et(ps):
        return model.encode_text(_encode_ids(encode, ps, TEXT_TOWER_CONTEXT, EOS_ID))

    return {f"text_tower_{a}_acc": zero_shot_accuracy(model.encode_image, et, a, n=n, seed=seed, image_transform=tf)
            for a in ATTRIBUTES}


if __name__ == "__main__":  # pragma: no cover - manual entry point; the CLI wires `conceptsmith world train`
    import argparse

    ap = argparse.ArgumentParser(description="train ShapesWorld CLIP stages")
    ap.add_argument("stage", choices=["text-tower", "evaluator", "eval-text-tower", "eval-evaluator"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", required=True, help="a new folder (never the shipped weights)")
    ap.add_argument("--no-resume", action="store_true")
    a = ap.parse_args()
    if a.stage == "text-tower":
        print(train_text_tower(a.out, a.steps, a.seed, resume=not a.no_resume))
        print(json.dumps(evaluate_text_tower()))
    elif a.stage == "evaluator":
        print(train_evaluator(a.out, a.steps, a.seed, resume=not a.no_resume))
        print(json.dumps(evaluate_shapes_clip(weights_dir=Path(a.out) / EVALUATOR_NAME)))
    elif a.stage == "eval-text-tower":
        print(json.dumps(evaluate_text_tower()))
    else:
        print(json.dumps(evaluate_shapes_clip(weights_dir=Path(a.out) / EVALUATOR_NAME)))
