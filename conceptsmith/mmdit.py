"""MMDiT pipelines (SD3, FLUX): the linear maps through which text reaches the transformer.

An MMDiT has no cross-attention: text tokens and image tokens attend jointly. Text enters through
two linear maps, which play the role a UNet's cross-attention ``to_k`` / ``to_v`` play (linear in the
text features, so the closed-form solver of :mod:`conceptsmith.linalg` applies to them unchanged):

* ``context_embedder`` — the encoders' token states -> the transformer's text stream
  (SD3: CLIP-L + CLIP-G tokens zero-padded to 4096, then T5-XXL tokens; FLUX: T5-XXL tokens; 4096-d);
* ``time_text_embed.text_embedder.linear_1`` — the pooled CLIP text embedding -> the vector that
  modulates every block together with the timestep (SD3: CLIP-L + CLIP-G, 2048-d; FLUX: CLIP-L, 768-d).

Each joint block's ``add_k_proj`` / ``add_v_proj`` (diffusers' ``JointAttnProcessor2_0`` for SD3,
``FluxAttnProcessor`` for FLUX) are the text tokens' keys and values, but their input is the text
stream after ``context_embedder``, a timestep-modulated norm and (from the second block on) earlier
joint attention with the image tokens: no fixed set of text features to solve for. Editing
``context_embedder`` changes what every block's text stream starts from, so the closed-form editors
edit the two maps above; :func:`joint_attention` lists the blocks for inspection.
"""

from __future__ import annotations

from typing import Literal

import torch

TOKEN_MAP = "context_embedder"
POOLED_MAP = "time_text_embed.text_embedder.linear_1"

MMDiTFamily = Literal["sd3", "flux"]


def is_mmdit(pipe: object) -> bool:
    """A pipeline whose denoiser is a ``transformer`` (no UNet)."""
    return getattr(pipe, "unet", None) is None and isinstance(getattr(pipe, "transformer", None), torch.nn.Module)


def mmdit_family(transformer: torch.nn.Module) -> MMDiTFamily:
    """``"sd3"`` for ``SD3Transformer2DModel``, ``"flux"`` for ``FluxTransformer2DModel``; others are refused."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    raise ValueError(
        f"Transformer {type(transformer).__name__} is not a supported architecture: ConceptSmith edits SD 1.x, 2.x, "
        "SDXL (UNet), SD3 (SD3Transformer2DModel) and FLUX (FluxTransformer2DModel) pipelines."
    )


def _linear(transformer: torch.nn.Module, name: str) -> torch.nn.Linear:
    module = transformer.get_submodule(name)
    module = getattr(module, "base_layer", module)  # a peft-wrapped layer edits its base weights
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{type(transformer).__name__}.{name} is a {type(module).__name__}, not the linear map expected.")
    return module


def text_maps(transformer: torch.nn.Module) -> dict[str, dict[str, torch.nn.Linear]]:
    """The text-conditioning maps by input space: ``{"tokens": {TOKEN_MAP: ...}, "pooled": {POOLED_MAP: ...}}``.

    Maps in one group read the same features (one closed-form system per group)."""
    mmdit_family(transformer)
    return {"tokens": {TOKEN_MAP: _linear(transformer, TOKEN_MAP)}, "pooled": {POOLED_MAP: _linear(transformer, POOLED_MAP)}}


def joint_attention(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Attention modules that read the text stream (``add_k_proj`` / ``add_v_proj``), by name, in model order."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(getattr(module, "add_k_proj", None), torch.nn.Module)
        and isinstance(getattr(module, "add_v_proj", None), torch.nn.Module)
    }
