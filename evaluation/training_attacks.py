"""Attacks that train on the edited model with the denoising loss: the textual-inversion attack, and
the machinery it shares with :mod:`evaluation.prompt_attacks` (reference latents, the loss, token-
embedding overrides).

**Textual-inversion attack** (Pham et al. 2023, "Circumventing Concept Erasure Methods For Text-to-
Image Generative Models") -- learn one token embedding from (<= 8) images of the erased concept on the
*edited* model by the denoising loss; if the edited model draws the concept from it, the knowledge
was hidden, not removed. SD 1.x / 2.x pipelines (one text encoder).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from conceptsmith.devices import module_device
from conceptsmith.diffusion import prediction_target
from conceptsmith.evaluation.clip import uint8_images
from conceptsmith.text import encode_prompts, tokenize

__all__ = [
    "DEFAULT_TI_TEMPLATES",
    "TextualInversionAttack",
    "denoising_loss",
    "reference_latents",
    "textual_inversion_attack",
]

DEFAULT_TI_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a picture of {}",
    "a rendering of {}",
    "an image of {}",
    "a drawing of {}",
)


# ============================================================================================
# shared: images -> latents, the denoising loss, token-embedding overrides
# ============================================================================================
def _image_tensor(image: Any, size: int) -> torch.Tensor:
    """An image as a 3 x size x size tensor in [-1, 1] (shorter side resized, center crop)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(uint8_images(image)[0])
    image = image.convert("RGB")
    w, h = image.size
    s = size / min(w, h)
    image = image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return x


@torch.no_grad()
def reference_latents(pipe: Any, images: Sequence[Any]) -> torch.Tensor:
    """Latents of ``images`` at the UNet's native size: VAE posterior means, scaled as the UNet expects."""
    unet, vae = pipe.unet, pipe.vae
    size = int(unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    pixels = torch.stack([_image_tensor(im, size) for im in images]).to(module_device(unet), vae.dtype)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def denoising_loss(
    pipe: Any, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """MSE of ``pipe.unet``'s prediction on ``x0`` noised to ``t`` with the given ``noise`` against the
    scheduler's target (:func:`~conceptsmith.diffusion.prediction_target`), conditioned on ``cond``."""
    scheduler = pipe.scheduler
    noisy = scheduler.add_noise(x0, noise, t)
    pred = pipe.unet(noisy, t, encoder_hidden_states=cond.to(pipe.unet.dtype)).sample
    return F.mse_loss(pred.float(), prediction_target(scheduler, x0, noise, t).float())


def _single_token_id(tokenizer: Any, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"{word!r} is {len(ids)} tokens for this tokenizer; the carrier/init word must be one token"
        )
    return int(ids[0])


class _EmbeddingOverride:
    """Forward hook on the text encoder's token-embedding table: rows whose input id is ``token_id``
    are replaced by ``vector`` (no weight, tokenizer or pipe state is changed)."""

    def __init__(self, encoder: torch.nn.Module, token_id: int, vector: torch.Tensor) -> None:
        self.token_id, self.vector = token_id, vector
        self.handle = encoder.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(
        self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        mask = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.vector.to(output.dtype), output)

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> _EmbeddingOverride:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def check_single_encoder(pipe: Any, what: str) -> None:
    """Refuse SDXL-style pipelines (two text encoders): the training attacks condition one encoder."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise NotImplementedError(f"{what} supports SD 1.x / 2.x pipelines (one text encoder)")


# ============================================================================================
# the textual-inversion attack
# ============================================================================================
@dataclass
class TextualInversionAttack:
    """A learned token embedding. Use it in prompts through :meth:`encode` (non-mutating) or
    :meth:`install` (adds ``token`` to the pipe's tokenizer/text encoder via diffusers'
    ``load_textual_inversion``)."""

    token: str
    embedding: torch.Tensor  # [d]
    carrier: str
    losses: list[float]
    eval_loss_before: float
    eval_loss_after: float
    params: dict[str, Any]

    def encode(self, pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Conditioning ``[n, L, d]`` of prompts that contain :attr:`token`, without mutating ``pipe``."""
        tokenizer = pipe.tokenizer
        carrier_id = _single_token_id(tokenizer, self.carrier)
        texts = [p.replace(self.token, self.carrier) for p in prompts]
        with _EmbeddingOverride(pipe.text_encoder, carrier_id, self.embedding.to(module_device(pipe.text_encoder))):
            return encode_prompts(pipe, texts)

    def install(self, pipe: Any) -> None:
        """Make :attr:`token` usable in plain string prompts of ``pipe`` (mutates its tokenizer and text
        encoder's embedding table)."""
        pipe.load_textual_inversion({self.token: self.embedding.detach().clone()[None]}, token=self.token)


def textual_inversion_attack(
    pipe: Any,
    images: Sequence[Any],
    *,
    token: str = "<attack>",
    carrier: str = "sks",
    init_word: str | None = "object",
    templates: Sequence[str] = DEFAULT_TI_TEMPLATES,
    steps: int = 100,
    lr: float = 5e-3,
    batch_size: int | None = None,
    eval_samples: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> TextualInversionAttack:
    """Learn a token embedding from ``images`` (the protocol uses <= 8) of the erased concept on the
    edited ``pipe`` (apply the edit first) by minimizing the denoising loss of
    ``"<template with token>" -> image`` pairs.

    Only the new vector is optimized (AdamW); ``pipe`` is not modified: during training the
    ``carrier`` word's embedding row is overridden by a forward hook, and gradients are taken with
    ``torch.autograd.grad`` so no parameter ``.grad`` is touched. The initial vector is ``init_word``'s
    embedding (the carrier's own if None). ``eval_loss_before/after`` is the loss on a fixed seeded set
    of (image, template, timestep, noise) draws -- the number that shows the optimization worked.
    """
    check_single_encoder(pipe, "textual_inversion_attack")
    images = list(images)
    if not images:
        raise ValueError("textual_inversion_attack needs at least one image of the erased concept")
    if len(images) > 8:
        warnings.warn(
            f"{len(images)} images given; the attack protocol uses at most 8", UserWarning, stacklevel=2
        )
    templates = [t if "{}" in t else t + " {}" for t in templates]
    tokenizer, encoder, scheduler = pipe.tokenizer, pipe.text_encoder, pipe.scheduler
    device = module_device(pipe.unet)
    carrier_id = _single_token_id(tokenizer, carrier)
    table = encoder.get_input_embeddings().weight
    init_id = _single_token_id(tokenizer, init_word) if init_word else carrier_id
    vector = table[init_id].detach().clone().float().requires_grad_(True)

    latents = reference_latents(pipe, images)
    n_train = int(scheduler.config.num_train_timesteps)
    ids = {t: tokenize(tokenizer, [t.format(carrier)], warn=False).input_ids[0] for t in templates}

    def loss_on(idx: torch.Tensor, tmpl: list[str], t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        token_ids = torch.stack([ids[s] for s in tmpl]).to(device)
        with _EmbeddingOverride(encoder, carrier_id, vector):
            cond = encoder(token_ids)[0]
        return denoising_loss(pipe, latents[idx], cond, t, noise)

    def draw(gen: torch.Generator, n: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, latents.shape[0], (n,), generator=gen)
        tmpl = [templates[int(i)] for i in torch.randint(0, len(templates), (n,), generator=gen)]
        t = torch.randint(0, n_train, (n,), generator=gen)
        noise = torch.randn((n, *latents.shape[1:]), generator=gen)
        return idx.to(device), tmpl, t.to(device), noise.to(device, latents.dtype)

    eval_batch = draw(torch.Generator().manual_seed(seed + 1_000_003), eval_samples)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(loss_on(*eval_batch))

    before = eval_loss()
    optimizer = torch.optim.AdamW([vector], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    bs = batch_size or len(images)
    losses = []
    for _ in tqdm(range(steps), desc="textual inversion attack", disable=not progress):
        loss = loss_on(*draw(gen, bs))
        (grad,) = torch.autograd.grad(loss, [vector])
        vector.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    after = eval_loss()
    return TextualInversionAttack(
        token=token,
        embedding=vector.detach().cpu(),
        carrier=carrier,
        losses=losses,
        eval_loss_before=before,
        eval_loss_after=after,
        params={
            "steps": steps,
            "lr": lr,
            "batch_size": bs,
            "init_word": init_word,
            "templates": list(templates),
            "n_images": len(images),
            "seed": seed,
        },
    )
