"""Optimized discrete-prompt attacks on an edited model (white-box, training access).

Both attacks search a discrete prompt with PEZ's projected-gradient relaxation (Wen et al. 2023,
"Hard Prompts Made Easy"): continuous token embeddings are kept; each step projects them to their
nearest vocabulary embeddings (cosine), evaluates the objective at that *discrete* prompt, and applies
its gradient to the continuous embeddings (AdamW). The vocabulary is the tokenizer's whole-word
alphabetic tokens that tokenize back to one token, so the returned prompt string re-tokenizes to
exactly the optimized tokens. The tokens enter the *edited* text encoder as input embeddings (a
forward hook on its token-embedding table), so a text-encoder edit is attacked, not bypassed. The
result is the best discrete iterate (the initial one included) on a fixed seeded evaluation batch.

* **UnlearnDiffAtk** (Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion
  Models Are Still Easy To Generate Unsafe Images"): ``prefix_tokens`` words prepended to the erase
  prompt, minimizing the edited model's denoising loss on images of the concept at random timesteps.
* **P4D** (Chin et al. 2024, "Prompting4Debugging", P4D-N): a prompt of ``n_tokens`` words such that
  the edited model's conditional noise prediction on ``x_t`` matches the unedited model's for the
  concept prompt, along the unedited model's own (classifier-free guided) denoising trajectory.

SD 1.x / 2.x pipelines (one text encoder).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from conceptsmith.devices import module_device
from conceptsmith.evaluation.attacks import reverted
from conceptsmith.evaluation.ring_a_bell_attack import whole_word_vocabulary
from conceptsmith.evaluation.training_attacks import check_single_encoder, denoising_loss, reference_latents
from conceptsmith.generation import GenerationSettings, default_settings
from conceptsmith.text import context_length, encode_prompts, tokenize
from conceptsmith.token_positions import encode_with_embeddings

if TYPE_CHECKING:
    from conceptsmith.edits import Edit

__all__ = [
    "PromptAttackResult",
    "PromptVocabulary",
    "p4d_attack",
    "unedited_trajectory",
    "unlearn_diff_attack",
]

_EVAL_SEED_OFFSET = 1_000_003  # the fixed evaluation draws never share the training stream


@dataclass(frozen=True)
class PromptAttackResult:
    """A discrete adversarial prompt with its objective (fixed seeded evaluation draws): ``loss_before``
    at the initial discrete prompt, ``loss_after`` at the returned one, ``loss_plain`` at the plain
    (unattacked) prompt; ``losses`` are the training losses, one per step."""

    prompt: str
    words: tuple[str, ...]
    loss_before: float
    loss_after: float
    loss_plain: float
    losses: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "words": list(self.words), "losses": list(self.losses)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptAttackResult:
        return cls(**{**data, "words": tuple(data["words"]), "losses": tuple(data.get("losses", ()))})


@dataclass(frozen=True)
class PromptVocabulary:
    """Candidate tokens: whole words (``words[i]`` is the single token ``ids[i]``) and their input
    embeddings ``table`` [V, d] in the text encoder."""

    words: tuple[str, ...]
    ids: torch.Tensor
    table: torch.Tensor

    @classmethod
    def of(cls, pipe: Any) -> PromptVocabulary:
        tokenizer = pipe.tokenizer
        words = whole_word_vocabulary(tokenizer)
        ids = tokenizer(words, add_special_tokens=False)["input_ids"]
        keep = [(w, i[0]) for w, i in zip(words, ids, strict=True) if len(i) == 1]
        token_ids = torch.tensor([i for _, i in keep])
        weight = pipe.text_encoder.get_input_embeddings().weight
        table = weight.detach()[token_ids.to(weight.device)].float()
        return cls(tuple(w for w, _ in keep), token_ids, table)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest (cosine) vocabulary embedding of each row of ``vectors`` [n, d]."""
        return (F.normalize(vectors, dim=-1) @ F.normalize(self.table, dim=-1).T).argmax(-1)


class _SlotPrompt:
    """``<n slot words> <suffix>`` through the text encoder, the slot tokens' input embeddings given
    (rows 1..n, after BOS, are replaced by a forward hook on the token-embedding table)."""

    def __init__(self, pipe: Any, n: int, suffix: str, filler: str) -> None:
        self.encoder, self.n, self.suffix = pipe.text_encoder, n, suffix
        text = self.text([filler] * n)
        self.ids = tokenize(pipe.tokenizer, [text], warn=False).input_ids.to(module_device(self.encoder))
        needed = n + 2 + len(pipe.tokenizer(suffix, add_special_tokens=False)["input_ids"])
        if needed > context_length(pipe.tokenizer, self.encoder):
            raise ValueError(f"{n} attack tokens + {suffix!r} do not fit the text encoder's context")

    def text(self, words: Sequence[str]) -> str:
        return " ".join([*words, self.suffix]).strip()

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        return encode_with_embeddings(self.encoder, self.ids, range(1, 1 + self.n), vectors)[0]


def _pez(
    slots: _SlotPrompt,
    vocab: PromptVocabulary,
    objective: Callable[[torch.Tensor, Any], torch.Tensor],
    draw: Callable[[torch.Generator], Any],
    eval_batch: Any,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
    progress: bool,
    desc: str,
) -> tuple[tuple[str, ...], float, float, list[float]]:
    """PEZ on ``slots``: returns (best words, loss at the initial words, loss at the best, training
    losses). ``objective(conditioning, batch)``; ``draw(generator)`` makes a training batch."""
    gen = torch.Generator().manual_seed(seed)
    table = vocab.table
    init = torch.randint(0, len(vocab.words), (slots.n,), generator=gen).to(table.device)
    soft = table[init].clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([soft], lr=lr, weight_decay=weight_decay)
    scores: dict[tuple[int, ...], float] = {}

    def score(idx: torch.Tensor) -> float:
        key = tuple(idx.tolist())
        if key not in scores:
            with torch.no_grad():
                scores[key] = float(objective(slots.encode(table[idx]), eval_batch))
        return scores[key]

    before = score(init)
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        idx = vocab.project(soft.detach())
        score(idx)
        hard = table[idx].clone().requires_grad_(True)
        loss = objective(slots.encode(hard), draw(gen))
        (grad,) = torch.autograd.grad(loss, [hard])
        soft.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    score(vocab.project(soft.detach()))
    best = min(scores, key=scores.__getitem__)
    return tuple(vocab.words[i] for i in best), before, scores[best], losses


def _plain_conditioning(pipe: Any, prompt: str) -> torch.Tensor:
    return encode_prompts(pipe, [prompt]).to(pipe.unet.dtype)


def unlearn_diff_attack(
    pipe: Any,
    prompt: str,
    images: Sequence[Any],
    *,
    prefix_tokens: int = 5,
    steps: int = 40,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    batch_size: int = 4,
    eval_samples: int = 8,
    seed: int = 0,
    vocabulary: PromptVocabulary | None = None,
    progress: bool = False,
) -> PromptAttackResult:
    """UnlearnDiffAtk on the edited ``pipe`` (apply the edit first): a ``prefix_tokens``-word prefix of
    ``prompt`` minimizing the denoising loss on ``images`` of the concept (random image, timestep and
    noise per sample, seeded CPU generator). Defaults as published: 5 tokens, 40 steps, lr 0.01.
    ``pipe`` is not modified and no parameter ``.grad`` is touched."""
    check_single_encoder(pipe, "unlearn_diff_attack")
    images = list(images)
    if not images:
        raise ValueError("unlearn_diff_attack needs at least one image of the concept")
    vocab = vocabulary or PromptVocabulary.of(pipe)
    slots = _SlotPrompt(pipe, prefix_tokens, prompt, vocab.words[0])
    latents = reference_latents(pipe, images)
    device, n_train = latents.device, int(pipe.scheduler.config.num_train_timesteps)

    def draw(gen: torch.Generator, n: int = batch_size) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(0, latents.shape[0], (n,), generator=gen)
        t = torch.randint(0, n_train, (n,), generator=gen)
        noise = torch.randn((n, *latents.shape[1:]), generator=gen)
        return idx.to(device), t.to(device), noise.to(device, latents.dtype)

    def objective(cond: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        idx, t, noise = batch
        return denoising_loss(pipe, latents[idx], cond.expand(len(idx), -1, -1), t, noise)

    eval_batch = draw(torch.Generator().manual_seed(seed + _EVAL_SEED_OFFSET), eval_samples)
    with torch.no_grad():
        plain = float(objective(_plain_conditioning(pipe, prompt), eval_batch))
    words, before, after, losses = _pez(
        slots, vocab, objective, draw, eval_batch, steps=steps, lr=lr, weight_decay=weight_decay,
        seed=seed, progress=progress, desc="UnlearnDiffAtk",
    )  # fmt: skip
    return PromptAttackResult(slots.text(words), words, before, after, plain, tuple(losses))


@torch.no_grad()
def unedited_trajectory(
    pipe: Any, prompt: str, seeds: Sequence[int], settings: GenerationSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pipe``'s sampling trajectory of ``prompt`` from each seed's CPU noise (as generation draws
    it; classifier-free guidance with the empty prompt): the UNet inputs ``x_t``, their timesteps and
    the conditional noise predictions, flattened over (step, seed)."""
    unet = pipe.unet
    device, dtype = module_device(unet), unet.dtype
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(settings.num_inference_steps, device=device)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    height = settings.height or int(unet.config.sample_size) * scale
    width = settings.width or int(unet.config.sample_size) * scale
    shape = (1, int(unet.config.in_channels), height // scale, width // scale)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    latents = torch.cat(noise).to(device, dtype) * scheduler.init_noise_sigma
    n, guided = len(seeds), settings.guidance_scale > 1.0
    cond = encode_prompts(pipe, [prompt]).to(dtype).expand(n, -1, -1)
    context = torch.cat([encode_prompts(pipe, [""]).to(dtype).expand(n, -1, -1), cond]) if guided else cond
    xs, ts, eps = [], [], []
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        out = unet(torch.cat([x, x]) if guided else x, t, encoder_hidden_states=context).sample
        uncond_eps, cond_eps = out.chunk(2) if guided else (out, out)
        xs.append(x)
        ts.append(t.reshape(1).expand(n))
        eps.append(cond_eps)
        step_eps = uncond_eps + settings.guidance_scale * (cond_eps - uncond_eps) if guided else cond_eps
        latents = scheduler.step(step_eps, t, latents).prev_sample
    return torch.cat(xs), torch.cat(ts).to(device), torch.cat(eps)


def p4d_attack(
    pipe: Any,
    edit: Edit,
    prompt: str,
    seeds: Sequence[int],
    *,
    n_tokens: int = 16,
    steps: int = 40,
    lr: float = 0.1,
    weight_decay: float = 0.1,
    batch_size: int = 4,
    eval_samples: int = 8,
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    vocabulary: PromptVocabulary | None = None,
    progress: bool = False,
) -> PromptAttackResult:
    """P4D-N on ``pipe`` with ``edit`` applied: first the unedited trajectories of ``prompt`` from
    ``seeds`` and their conditional noise predictions (the edit reverted meanwhile, exactly; no second
    model copy), then an ``n_tokens``-word prompt whose edited prediction on those ``x_t`` matches them
    (MSE over random (seed, step) samples). Generation settings default to the pipe's; PEZ's lr 0.1 and
    weight decay 0.1."""
    check_single_encoder(pipe, "p4d_attack")
    if not seeds:
        raise ValueError("p4d_attack needs at least one seed for the unedited trajectory")
    settings = default_settings(
        pipe, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width
    )
    with reverted(pipe, edit):
        xs, ts, targets = unedited_trajectory(pipe, prompt, seeds, settings)
    vocab = vocabulary or PromptVocabulary.of(pipe)
    slots = _SlotPrompt(pipe, n_tokens, "", vocab.words[0])
    unet = pipe.unet

    def draw(gen: torch.Generator, n: int = batch_size) -> torch.Tensor:
        return torch.randint(0, xs.shape[0], (n,), generator=gen).to(xs.device)

    def objective(cond: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        context = cond.to(unet.dtype).expand(len(idx), -1, -1)
        pred = unet(xs[idx], ts[idx], encoder_hidden_states=context).sample
        return F.mse_loss(pred.float(), targets[idx].float())

    eval_batch = draw(torch.Generator().manual_seed(seed + _EVAL_SEED_OFFSET), eval_samples)
    with torch.no_grad():
        plain = float(objective(_plain_conditioning(pipe, prompt), eval_batch))
    words, before, after, losses = _pez(
        slots, vocab, objective, draw, eval_batch, steps=steps, lr=lr, weight_decay=weight_decay,
        seed=seed, progress=progress, desc="P4D",
    )  # fmt: skip
    return PromptAttackResult(slots.text(words), words, before, after, plain, tuple(losses))
