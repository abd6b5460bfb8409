"""The diffusion side of training: prompts -> conditioning, the denoising loss, frozen-model trajectories.

:class:`TextConditioner` turns prompts into the UNet's conditioning with autograd (SD 1.x/2.x and
SDXL); :func:`denoising_loss` is the standard diffusion objective (epsilon, v or sample targets);
:class:`DenoisingObjective` applies it to reference (and class) images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from conceptsmith.devices import module_device
from conceptsmith.text import text_encoders
from conceptsmith.training import TrainingError, TrainStep


def expand_multi_vector(prompt: str, tokenizer: Any) -> str:
    """Replace a multi-vector token ``<t>`` by ``<t> <t>_1 ... <t>_{n-1}`` (what the pipelines do)."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    for token in sorted(set(tokenizer.tokenize(prompt))):
        if token in added and f"{token}_1" in added:
            names, i = [token], 1
            while f"{token}_{i}" in added:
                names.append(f"{token}_{i}")
                i += 1
            prompt = prompt.replace(token, " ".join(names))
    return prompt


@dataclass
class Conditioning:
    hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def cat(self, other: Conditioning) -> Conditioning:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: torch.cat([v, other.added_cond_kwargs[k]]) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(torch.cat([self.hidden_states, other.hidden_states]), added)

    def detach(self) -> Conditioning:
        added = None if self.added_cond_kwargs is None else {k: v.detach() for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.hidden_states.detach(), added)


class TextConditioner:
    """Prompts -> the UNet's conditioning, differentiable (for training new token embeddings / text LoRA).

    ``pairs``: ``[(tokenizer, text_encoder), ...]`` in the pipeline's order (usually copies holding
    new tokens). SD 1.x/2.x: the last hidden state of the one encoder. SDXL (two pairs): penultimate
    hidden states of both, concatenated, plus ``added_cond_kwargs`` (pooled embedding of the second
    encoder and the size/crop ``time_ids`` of ``size``).
    """

    def __init__(self, pairs: Sequence[tuple[Any, nn.Module]], *, dual: bool, size: int) -> None:
        self.pairs = list(pairs)
        self.dual = dual
        self.size = size

    @classmethod
    def for_pipe(cls, pipe: object, pairs: Sequence[tuple[Any, nn.Module]] | None = None, size: int = 512) -> TextConditioner:
        dual = getattr(pipe, "text_encoder_2", None) is not None
        return cls(pairs if pairs is not None else text_encoders(pipe), dual=dual, size=size)

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        states, pooled = [], None
        for tokenizer, encoder in self.pairs:
            texts = [expand_multi_vector(p, tokenizer) for p in prompts]
            batch = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
            device = module_device(encoder)
            ids = batch["input_ids"].to(device)
            if self.dual:
                out = encoder(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder's is used)
            else:
                use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
                mask = batch["attention_mask"].to(device) if use_mask else None
                states.append(encoder(ids, attention_mask=mask)[0])
        hidden = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        added = None
        if self.dual:
            time_ids = torch.tensor([[self.size, self.size, 0, 0, self.size, self.size]], dtype=hidden.dtype, device=hidden.device)
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}
        return Conditioning(hidden, added)


def noise_scheduler(pipe: object) -> Any:
    """A DDPM scheduler with the pipeline's training noise schedule (betas, prediction type)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def prediction_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict for ``latents`` noised with ``noise`` at ``timesteps``: the noise,
    the velocity (Salimans & Ho, 2022, Sec. 4) or the clean sample, by the scheduler's ``prediction_type``."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise TrainingError(f"Unsupported prediction_type {kind!r} of the pipeline's scheduler.")


def denoising_loss(
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    conditioning: Conditioning,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example diffusion loss ``[B]``: MSE between the UNet's prediction and the scheduler's target.

    Noise and timesteps come from ``generator`` (CPU); the target follows the scheduler's
    ``prediction_type`` (epsilon, v_prediction or sample). ``mask`` ``[B, 1, h, w]`` restricts the mean to
    the latent cells where it is 1 (zoomed-out reference images, :class:`customization.data.ZoomOut`).
    """
    device = module_device(unet)
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
    latents = latents.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    dtype = next(unet.parameters()).dtype
    hidden = conditioning.hidden_states.to(dtype=dtype)
    kwargs = {}
    if conditioning.added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = {k: v.to(dtype=dtype) for k, v in conditioning.added_cond_kwargs.items()}
    prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=hidden, **kwargs).sample
    error = (prediction.float() - target.float()).pow(2)
    if mask is None:
        return error.flatten(1).mean(1)
    mask = mask.to(error.device).expand_as(error)
    return (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1.0)


class DenoisingObjective:
    """Denoising loss on the reference images, plus ``prior_weight`` x the loss on class images.

    Each call samples ``batch_size`` reference examples (and as many class examples when
    ``classes`` is given: DreamBooth / Custom Diffusion prior preservation) from the step's
    generator, encodes their prompts with ``conditioner`` and returns ``{"loss", "instance", "prior"}``.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        conditioner: TextConditioner,
        instances: Any,
        classes: Any | None,
        batch_size: int,
        prior_weight: float = 1.0,
    ) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.conditioner = conditioner
        self.instances = instances
        self.classes = classes
        self.batch_size = batch_size
        self.prior_weight = prior_weight

    def __call__(self, step: TrainStep) -> dict[str, torch.Tensor]:
        batch = self.instances.sample(self.batch_size, step.generator)
        if self.classes is not None:
            batch = batch.cat(self.classes.sample(self.batch_size, step.generator))
        losses = denoising_loss(self.unet, self.scheduler, batch.latents, self.conditioner(batch.prompts), step.generator,
                                batch.mask)
        instance = losses[: self.batch_size].mean()
        if self.classes is None:
            return {"loss": instance, "instance": instance}
        prior = losses[self.batch_size :].mean()
        return {"loss": instance + self.prior_weight * prior, "instance": instance, "prior": prior}

    @torch.no_grad()
    def evaluate(self, batches: int, seed: int = 1234) -> float:
        """Mean reference-image loss over ``batches`` draws of fixed noise: comparable before/after training."""
        generator = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(batches):
            batch = self.instances.sample(self.batch_size, generator)
            total += float(denoising_loss(self.unet, self.scheduler, batch.latents, self.conditioner(batch.prompts),
                                          generator, batch.mask).mean())
        return total / max(1, batches)



class FrozenTrajectories:
    """Partial denoising runs of the frozen model, computed once and sampled by every training step.

    ESD (Gandikota et al., ICCV 2023, Sec. 3) and Concept Ablation train on ``x_t`` reached by the
    frozen model from noise with DDIM. Those states do not depend on the weights being trained, so
    instead of a fresh partial run at every step (the published scripts), ``trajectories`` full DDIM
    runs of ``ddim_steps`` are made once and every intermediate ``(x_t, t)`` is kept: a step then costs
    one forward/backward of the trained model. ``denoise(latents, t, cond)`` is the frozen model's
    prediction (e.g. ``TrainableModules.disabled``); ``prompts_cond`` / ``uncond`` the conditioning of
    the sampled prompts and of the empty prompt; ``guidance`` the sampler's classifier-free guidance.
    Frozen predictions at a kept state can be cached by the caller under :meth:`sample`'s key.
    """

    def __init__(
        self,
        denoise: Any,
        scheduler_config: Any,
        latent_shape: Sequence[int],
        conds: Sequence[Conditioning],
        uncond: Conditioning,
        *,
        trajectories: int,
        ddim_steps: int,
        guidance: float,
        seed: int,
        device: torch.device,
        progress: bool = True,
    ) -> None:
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(ddim_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        generator = torch.Generator().manual_seed(seed)
        self.states: list[list[torch.Tensor]] = []  # [trajectory][step] -> x_t before that step, [1, C, h, w]
        self.prompt_index: list[int] = []
        bar = tqdm(total=trajectories * ddim_steps, desc="frozen trajectories", unit="step", disable=not progress)
        with torch.no_grad():
            for i in range(trajectories):
                which = i % len(conds)
                x = torch.randn((1, *latent_shape), generator=generator).to(device) * self.scheduler.init_noise_sigma
                kept = []
                for t in self.timesteps:
                    kept.append(x.cpu())
                    both = uncond.cat(conds[which])
                    eps_u, eps_c = denoise(torch.cat([x, x]), t, both).chunk(2)
                    eps = eps_u + guidance * (eps_c - eps_u)
                    x = self.scheduler.step(eps, t, x).prev_sample
                    bar.update(1)
                self.states.append(kept)
                self.prompt_index.append(which)
        bar.close()

    def sample(self, generator: torch.Generator, count: int) -> list[tuple[tuple[int, int], torch.Tensor, int, int]]:
        """``count`` kept states drawn uniformly: ``[((trajectory, step), x_t, t, prompt index), ...]``."""
        draws = []
        for _ in range(count):
            i = int(torch.randint(len(self.states), (1,), generator=generator))
            j = int(torch.randint(len(self.timesteps), (1,), generator=generator))
            draws.append(((i, j), self.states[i][j], self.timesteps[j], self.prompt_index[i]))
        return draws


def predict(unet: nn.Module, latents: torch.Tensor, t: int | torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
    """The UNet's prediction for ``latents`` at timestep ``t`` under ``conditioning`` (model dtype in, float32 out)."""
    dtype = next(unet.parameters()).dtype
    device = module_device(unet)
    kwargs = {}
    if conditioning.added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in conditioning.added_cond_kwargs.items()}
    timestep = torch.as_tensor(t, device=device)
    timestep = timestep.expand(latents.shape[0]) if timestep.ndim == 0 else timestep
    hidden = conditioning.hidden_states.to(device, dtype)
    return unet(latents.to(device, dtype), timestep, encoder_hidden_states=hidden, **kwargs).sample.float()
