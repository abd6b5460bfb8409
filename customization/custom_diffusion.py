"""Custom Diffusion (Kumari et al., CVPR 2023): tune cross-attention K/V plus one new token per concept.

Algorithm (``fit``):

1. read 3-10 reference images per concept and give each concept a new modifier token
   (``"<new1> dog"``), initialized from ``init_word`` ("ktn" in the paper);
2. with ``prior_preservation``: generate ``num_class_images`` images of the class word with the base
   model itself (cached under ``class_data_dir`` if given);
3. train, with the shared loop, ``attn2.to_k`` / ``attn2.to_v`` of every UNet transformer block
   (``train="cross-attention"``: also ``to_q`` and ``to_out.0``, as the paper recommends for faces)
   and the new token rows only, on the denoising loss of the reference images (prompts from the
   object/style templates, horizontal flips) + ``prior_loss_weight`` x the loss on the class images;
4. return a ``composite`` edit: a ``weights`` part (dense K/V deltas ``W_trained - W_base``) and a
   ``custom-tokens`` part (the token vectors). Several tokens + one image folder per token in one
   request is the paper's *joint* multi-concept training; :func:`customization.merge.closed_form_merge`
   is its *merge* of single-concept edits.

Exports: ``customization.lora.export_diffusers(edit, folder)`` writes the weights as a diffusers
LoRA (exact, full rank) and the token for ``pipe.load_textual_inversion``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from conceptsmith.attention import find_cross_attention
from conceptsmith.customization.data import concept_specs, default_resolution, training_examples
from conceptsmith.customization.textual_inversion import NewTokens
from conceptsmith.customization.training import SubjectTrainingConfig, subject_params
from conceptsmith.diffusion import DenoisingObjective, noise_scheduler
from conceptsmith.edits import Edit, base_fingerprint
from conceptsmith.models import detect_family
from conceptsmith.registry import UNET_FAMILIES, Editor, EditRequest, register_editor
from conceptsmith.trainable import frozen, pipe_components, shared_copy, trainable_clone
from conceptsmith.training import train


class CustomDiffusionConfig(SubjectTrainingConfig):
    """Defaults mirror ``configs/customize/custom-diffusion.yaml`` (the paper's single-concept setting)."""

    steps: int = Field(250, ge=1, description="250 for one concept, 500 for joint training (paper)")
    learning_rate: float = Field(1e-5, gt=0)
    scale_lr: bool = Field(True, description="lr x batch_size x accumulation, as the paper")
    batch_size: int = Field(2, ge=1)
    train: Literal["kv", "cross-attention"] = Field(
        "kv", description="kv: attn2 to_k/to_v; cross-attention: also to_q and to_out.0 (weights, not biases)"
    )
    init_word: str | None = Field("ktn", description="initial value of the modifier token (null: random)")


def target_modules(unet: Any, train: str) -> dict[str, Any]:
    """``{module path relative to the UNet: nn.Linear}`` that Custom Diffusion trains."""
    targets = {}
    for layer in find_cross_attention(unet):
        names = ("to_k", "to_v") if train == "kv" else ("to_q", "to_k", "to_v", "to_out.0")
        for name in names:
            module = layer.module.get_submodule(name)
            targets[f"{layer.name}.{name}"] = getattr(module, "base_layer", module)
    return targets


@register_editor("custom-diffusion", description="Custom Diffusion: cross-attention K/V + a new modifier token per concept")
class CustomDiffusion(Editor):
    Config = CustomDiffusionConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: CustomDiffusionConfig = self.config
        # 1. concepts: token, class word, reference images
        specs = concept_specs(
            request, phrase_format=config.phrase, need_class_word=config.prior_preservation, recommended=(3, 10), method="Custom Diffusion"
        )
        size = config.resolution or default_resolution(pipe)
        base = base_fingerprint(pipe)
        with frozen(*pipe_components(pipe)):
            tokens = NewTokens(pipe, [s.token for s in specs], [config.init_word] * len(specs), 1, request.seed)
            # 2. reference images and class-regularization images from the base model
            instances, classes, prompt_templates = training_examples(pipe, specs, config, size, request.seed)
            # 3. train K/V (on a copy of the UNet that shares every other weight) and the token rows
            unet = shared_copy(pipe.unet)
            modules = target_modules(unet, config.train)
            originals = {name: module.weight.detach() for name, module in modules.items()}
            weights = {f"unet.{name}": trainable_clone(module) for name, module in modules.items()}
            objective = DenoisingObjective(
                unet, noise_scheduler(pipe), tokens.conditioner(size), instances, classes, config.batch_size, config.prior_loss_weight
            )
            result = train(
                {**weights, **tokens.parameters()},
                objective,
                config,
                seed=request.seed,
                evaluate=objective.evaluate,
                models=[unet, *tokens.encoders],
                run_key=f"custom-diffusion:{base}:{[s.token for s in specs]}:{[s.source for s in specs]}",
                description="custom diffusion",
            )
        # 4. the edit: K/V deltas + the tokens
        deltas = {f"unet.{name}": (weights[f"unet.{name}"].detach() - originals[name].float()).cpu() for name in modules}
        concepts = list(request.concepts) or [s.phrase for s in specs]
        params = subject_params(config, specs, prompt_templates)
        metadata = result.metadata(specs)
        family = detect_family(pipe)
        weights_part = Edit.from_weight_deltas("custom-diffusion", concepts, params, base, family, deltas)
        token_part = tokens.edit(pipe, "custom-diffusion", concepts, {"phrases": params["phrases"]})
        return Edit("composite", "custom-diffusion", concepts, params, base, family, parts=[weights_part, token_part], metadata=metadata)
