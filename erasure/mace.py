"""MACE — Mass Concept Erasure (Lu et al., CVPR 2024), all three stages, many concepts at once.

Algorithm (``fit``):

1. **Closed-form refinement** (Sec. 3.2): the ``mace-cfr`` editor with the ``cfr`` sub-config (by default
   exactly MACE's CFR: only the tokens *around* the concept are remapped, ``edit_concept_tokens: false``).
   Its K/V update ``dW_cfr`` is folded into a shared copy of the UNet; the caller's pipe is never modified.
2. **One LoRA per concept** (Sec. 3.3), rank ``rank`` (1 in the paper) on every cross-attention ``to_k`` /
   ``to_v`` of that copy, trained through :func:`conceptsmith.training.train` to minimize the attention
   loss: for the concept's images noised at uniform random timesteps and prompted with its templates,
   the cross-attention probability of the concept's tokens summed over the pixels of the concept's
   segmentation mask (resized to each layer's resolution), averaged over layers (:func:`attention_mass`).
   (A layer's maps depend on its keys; its values shape the queries of the layers after it, so the last
   layer's ``to_v`` gets no gradient and is left out of stage 3.)
   Images and masks: :mod:`erasure._mace_data` (one folder per concept with ``NAME.mask.png`` masks, or
   ``images: renderer`` on ``builtin:shapes``).
3. **Closed-form fusion** (Sec. 3.4): per projection, with ``W1`` the stage-1 weights and ``dW_i`` concept
   ``i``'s LoRA, ``min_W sum_i ||W E_i - (W1 + dW_i) E_i||^2 + sum_p b ||W p - W1 p||^2 + lam ||W - W1||^2``
   over every position of concept ``i``'s template prompts ``E_i``, the preserved concepts' tokens and
   the CFR's caption prior (``fusion_prior_weight`` captions' worth) -- one
   :func:`conceptsmith.linalg.solve_ridge` (:func:`fuse_loras`); projections no LoRA changed are skipped.

The result is one ``weights`` Edit ``dW_cfr + dW_fused`` on the K/V projections (applies, reverts
bit-exactly, exports with ``to_lora``); per-stage diagnostics and the training curves are in its metadata.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from conceptsmith.attention import AttentionMapRecorder
from conceptsmith.customization.data import default_resolution
from conceptsmith.diffusion import TextConditioner, noise_scheduler, predict
from conceptsmith.edits import Edit
from conceptsmith.erasure._closed_form import (
    Delta,
    add_deltas,
    check_request,
    kv_weights,
    make_edit,
    solve,
    torch_dtype,
    updated_weights,
)
from conceptsmith.erasure._mace_data import ImageSource, concept_examples, token_mask
from conceptsmith.erasure._trained import TrainedEraserConfig, unet_modules
from conceptsmith.erasure.mace_cfr import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    MaceCFR,
    MaceCFRConfig,
    build_prior,
    captions_mentioning,
    load_or_build_prior,
    read_corpus,
    shapes_captions,
)
from conceptsmith.erasure.uce import default_guide
from conceptsmith.linalg import RidgeSolution
from conceptsmith.registry import UNET_FAMILIES, Editor, EditRequest, register_editor
from conceptsmith.text import encode_prompts
from conceptsmith.trainable import TrainableModules, frozen, pipe_components, shared_copy
from conceptsmith.training import TrainingError, TrainResult, TrainStep, train


class MACEConfig(TrainedEraserConfig):
    """Defaults mirror ``configs/erase/mace.yaml``. The inherited training fields drive stage 2 (per concept)."""

    cfr: MaceCFRConfig = Field(default_factory=lambda: MaceCFRConfig(edit_concept_tokens=False),
                               description="stage 1: the mace-cfr editor's config (edit_concept_tokens defaults to false here)")
    rank: int = Field(1, ge=1, description="LoRA rank per concept (mode: lora)")
    steps: int = Field(50, ge=1, description="optimizer steps per concept")
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(2, ge=1, description="noised images per step")
    templates: list[str] | None = Field(None, description="prompts per concept ({} = the concept); null: the CFR's templates")
    images: ImageSource = Field("request", description="request: one folder per concept with NAME.mask.png masks; renderer: ShapesWorld")
    n_images: int = Field(8, ge=1, description="rendered images per concept (images: renderer)")
    fusion_lam: float = Field(0.1, ge=0, description="stage 3: ridge weight of ||W - W1||")
    fusion_preserve_scale: float = Field(1.0, ge=0, description="stage 3: weight of every token of the preserved concepts")
    fusion_prior_weight: float = Field(100.0, ge=0, description="stage 3: captions' worth of the CFR's caption prior (0: none)")

    @model_validator(mode="before")
    @classmethod
    def _exact_cfr(cls, data: Any) -> Any:
        """A partial ``cfr`` mapping still means MACE's exact CFR unless it says otherwise."""
        if isinstance(data, dict) and isinstance(data.get("cfr"), dict):
            data = {**data, "cfr": {"edit_concept_tokens": False, **data["cfr"]}}
        return data

    def prompt_templates(self) -> list[str]:
        if self.templates is not None:
            return list(self.templates)
        chosen = STYLE_TEMPLATES if self.cfr.concept_type == "art" else OBJECT_TEMPLATES
        return list(chosen[: self.cfr.n_prompts])


# -- stage 2: the attention loss -------------------------------------------------------------------------


def attention_mass(maps: Mapping[str, torch.Tensor], masks: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """MACE's attention loss per example ``[b]`` (Lu et al., CVPR 2024, Sec. 3.3).

    ``maps``: ``{layer: [b, h, w, T]}`` cross-attention probabilities averaged over heads
    (:attr:`conceptsmith.attention.AttentionMapRecorder.maps`); ``masks``: ``[b, 1, H, W]`` in ``[0, 1]``,
    area-resized to each layer's ``h x w``; ``tokens``: ``[b, T]``, 1 at the concept's tokens. Per layer
    ``sum_{pixels, tokens} mask * token * A``, then the mean over layers (a mask of ones gives the
    concept tokens' total attention mass).
    """
    if not maps:
        raise TrainingError("No cross-attention map was recorded; the UNet has no cross-attention layer to train.")
    total = torch.zeros(masks.shape[0], device=next(iter(maps.values())).device)
    for probs in maps.values():
        region = F.interpolate(masks.to(probs), size=tuple(probs.shape[1:3]), mode="area")[:, 0]
        total = total + torch.einsum("bhwt,bhw,bt->b", probs, region, tokens.to(probs))
    return total / len(maps)


class AttentionLoss:
    """``loss_fn`` of :func:`conceptsmith.training.train` for one concept: :func:`attention_mass` of a batch of
    its images, noised at random timesteps (all randomness from the step's generator), read by ``recorder``
    (an entered :class:`~conceptsmith.attention.AttentionMapRecorder` with ``keep_grad``) on ``unet``.
    ``tokens``: ``{prompt: [context]}``, the concept-token mask of every prompt the examples can draw."""

    def __init__(self, pipe: Any, unet: nn.Module, recorder: Any, examples: Any, tokens: Mapping[str, torch.Tensor],
                 batch_size: int, size: int) -> None:
        self.unet, self.recorder, self.examples, self.tokens, self.batch_size = unet, recorder, examples, tokens, batch_size
        self.scheduler = noise_scheduler(pipe)
        conditioner = TextConditioner.for_pipe(pipe, size=size)
        with torch.no_grad():
            self.conds = {prompt: conditioner([prompt]).detach() for prompt in tokens}

    def _encode(self, prompts: Sequence[str]) -> tuple[Any, torch.Tensor]:
        cond = self.conds[prompts[0]]
        for prompt in prompts[1:]:
            cond = cond.cat(self.conds[prompt])
        return cond, torch.stack([self.tokens[p] for p in prompts])

    def _mass(self, generator: torch.Generator) -> torch.Tensor:
        batch = self.examples.sample(self.batch_size, generator)
        noise = torch.randn(batch.latents.shape, generator=generator)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch_size,), generator=generator)
        noisy = self.scheduler.add_noise(batch.latents, noise, timesteps)
        cond, tokens = self._encode(batch.prompts)
        self.recorder.reset()
        predict(self.unet, noisy, timesteps, cond)
        return attention_mass(self.recorder.maps, batch.mask, tokens)

    def __call__(self, step: TrainStep) -> torch.Tensor:
        return self._mass(step.generator).mean()

    def evaluate(self, batches: int, seed: int = 1234) -> float:
        """Mean attention mass over ``batches`` fixed draws (comparable before and after training)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return sum(float(self._mass(generator).mean()) for _ in range(batches)) / max(1, batches)


# -- stage 3: the fusion ---------------------------------------------------------------------------------


def _dense(delta: Delta) -> torch.Tensor:
    return delta[0].double() @ delta[1].double() if isinstance(delta, tuple) else delta.double()


def _changes(delta: Delta | None) -> bool:
    if delta is None:
        return False
    return bool(delta[0].any() and delta[1].any()) if isinstance(delta, tuple) else bool(delta.any())


def fuse_loras(
    weights: Mapping[str, torch.Tensor],
    inputs: Sequence[torch.Tensor],
    loras: Sequence[Mapping[str, Delta]],
    *,
    preserve_inputs: torch.Tensor | None = None,
    preserve_scale: float = 1.0,
    preserve_gram: torch.Tensor | None = None,
    lam: float = 0.1,
    dtype: torch.dtype = torch.float64,
) -> RidgeSolution | None:
    """MACE's multi-LoRA fusion (Sec. 3.4) in closed form, for every projection some LoRA changes.

    ``weights``: ``{name: W1}`` (the anchor); ``inputs[i]``: ``E_i`` ``[k_i, d_in]``, concept ``i``'s
    embeddings; ``loras[i]``: ``{name: dW_i}`` (dense or ``(up, down)``). The edit rows ``E_i`` get the
    targets ``(W1 + dW_i) E_i``; the preserved rows and ``preserve_gram`` keep ``W1``'s outputs.
    None when no LoRA changes anything.
    """
    if len(inputs) != len(loras):
        raise ValueError(f"Got {len(inputs)} embedding sets but {len(loras)} LoRAs: pass one of each per concept.")
    names = [name for name in weights if any(_changes(lora.get(name)) for lora in loras)]
    if not names:
        return None
    targets = {}
    for name in names:
        anchor = weights[name].double()
        targets[name] = torch.cat([
            e.to(anchor) @ (anchor + _dense(lora[name]).to(anchor) if name in lora else anchor).T
            for e, lora in zip(inputs, loras)
        ])
    return solve(
        {name: weights[name] for name in names}, torch.cat(list(inputs)), targets,
        preserve_inputs=preserve_inputs, preserve_weights=preserve_scale, preserve_gram=preserve_gram, lam=lam, dtype=dtype,
    )


def caption_prior(pipe: Any, cfr: MaceCFRConfig, concepts: Sequence[str], weight: float) -> torch.Tensor | None:
    """The CFR's cached caption prior (same corpus, cache and exclusions), as ``weight`` captions' worth."""
    if weight <= 0:
        return None
    captions = read_corpus(cfr.corpus_file) if cfr.corpus_file else shapes_captions(cfr.corpus_size)
    prior = load_or_build_prior(pipe, captions, cfr.cache_dir)
    excluded = captions_mentioning(captions, list(concepts)) if cfr.exclude_concept_captions else []
    gram = prior.gram - build_prior(pipe, excluded)[0] if excluded else prior.gram
    return gram * (weight / max(1, prior.n_captions - len(excluded)))


# -- the editor ------------------------------------------------------------------------------------------


def weight_deltas(edit: Edit) -> dict[str, Delta]:
    """``{module: delta or (up, down)}`` of a ``weights`` Edit (the layout of :meth:`Edit.from_weight_deltas`)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in edit.tensors.items():
        module, _, part = key.rpartition(".")
        parts.setdefault(module, {})[part] = tensor
    return {module: p["delta"] if "delta" in p else (p["up"], p["down"]) for module, p in parts.items()}


def trained_deltas(trainable: Any) -> dict[str, Delta]:
    """``{"unet.<module>": dW}`` of a trained :class:`~conceptsmith.trainable.TrainableModules` (LoRA scale folded)."""
    state = trainable.state()
    if trainable.mode == "full":
        return state
    return {
        key.removesuffix(".lora_A.weight"): (state[key.replace(".lora_A.", ".lora_B.")] * (trainable.alpha / down.shape[0]), down)
        for key, down in state.items() if key.endswith(".lora_A.weight")
    }


def _digest(tensor: torch.Tensor) -> str:
    """Identifies a run's training images (so that ``resume`` never continues a run on other images)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def with_deltas(unet: nn.Module, deltas: Mapping[str, Delta]) -> nn.Module:
    """A shared copy of ``unet`` whose ``unet.<module>`` weights are ``W + delta`` (new frozen tensors)."""
    copy = shared_copy(unet)
    for name, delta in deltas.items():
        layer = copy.get_submodule(name.removeprefix("unet."))
        weight = layer.weight
        layer.weight = nn.Parameter((weight.double() + _dense(delta).to(weight.device)).to(weight.dtype), requires_grad=False)
    return copy


@register_editor("mace", description="MACE: closed-form refinement + one attention-loss LoRA per concept + closed-form fusion")
class MACE(Editor):
    Config = MACEConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: MACEConfig = self.config
        started = time.perf_counter()
        checked = check_request(pipe, request, default_guide(config.cfr.concept_type))
        templates = config.prompt_templates()
        with frozen(*pipe_components(pipe)):
            examples = concept_examples(pipe, checked.concepts, request.images, config.images, templates,
                                        config.n_images, request.seed)
            prompts = {c: [t.format(c) for t in templates] for c in checked.concepts}
            tokens = {c: dict(zip(prompts[c], token_mask(pipe, prompts[c], [c] * len(templates)))) for c in checked.concepts}
            stage1 = MaceCFR(config.cfr).fit(pipe, request)
            first = weight_deltas(stage1)
            base = with_deltas(pipe.unet, first)
            loras, results = [], {}
            for index, (concept, data) in enumerate(zip(checked.concepts, examples)):
                trainable, results[concept] = self._train(pipe, base, concept, data, tokens[concept], index, request.seed)
                loras.append(trained_deltas(trainable))
            trained = time.perf_counter()
            inputs = [encode_prompts(pipe, prompts[c]).flatten(0, 1) for c in checked.concepts]
            preserve = encode_prompts(pipe, checked.preserve).flatten(0, 1) if checked.preserve else None
            fused = fuse_loras(
                updated_weights(kv_weights(pipe), first), inputs, loras, preserve_inputs=preserve,
                preserve_scale=config.fusion_preserve_scale, lam=config.fusion_lam, dtype=torch_dtype(config.cfr.solve_dtype),
                preserve_gram=caption_prior(pipe, config.cfr, checked.concepts, config.fusion_prior_weight),
            )
        deltas = first if fused is None else add_deltas(first, fused.deltas)
        params = {**config.model_dump(), "templates": templates, "guide": checked.guide, "preserve": checked.preserve}
        metadata = {
            "closed_form": stage1.metadata["closed_form"],
            "fusion": None if fused is None else fused.metrics(),
            "training": {concept: result.summary() for concept, result in results.items()},
            "losses": {concept: result.losses for concept, result in results.items()},
            "timing_s": {"cfr_and_training": trained - started, "total": time.perf_counter() - started},
        }
        return make_edit(pipe, self.name, checked.concepts, params, deltas, metadata)

    def _train(self, pipe: Any, base: nn.Module, concept: str, examples: Any, tokens: Mapping[str, torch.Tensor], index: int,
               seed: int) -> tuple[Any, TrainResult]:
        """Stage 2 for one concept: a fresh LoRA (or full K/V clone) on a shared copy of ``base``."""
        config: MACEConfig = self.config
        with torch.random.fork_rng():
            torch.manual_seed(seed + index)  # LoRA init
            trainable = TrainableModules(base, "unet", unet_modules(base, "x-strict"), mode=config.mode, rank=config.rank,
                                         alpha=config.alpha, init=config.init)
        run = config
        if config.checkpoint_dir:  # one checkpoint folder per concept
            run = config.model_copy(update={"checkpoint_dir": str(Path(config.checkpoint_dir) / f"concept-{index}")})
        with AttentionMapRecorder(trainable.module, keep_grad=True) as recorder:
            loss = AttentionLoss(pipe, trainable.module, recorder, examples, tokens, config.batch_size, default_resolution(pipe))
            result = train(trainable.named_parameters(), loss, run, seed=seed + index, models=[trainable.module],
                           run_key=f"mace:{concept}:{examples.templates}:{_digest(examples.mean)}", description=f"mace {concept}",
                           evaluate=loss.evaluate)
        return trainable, result
