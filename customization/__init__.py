"""ConceptSmith customization methods (each module registers its plugins on import).

Editors (``conceptsmith.registry.get_editor(name)``):

* ``custom-diffusion`` (:mod:`customization.custom_diffusion`): cross-attention K/V + one new token per concept;
* ``lora`` (:mod:`customization.lora`): DreamBooth-style LoRA through peft (optionally + a new token);
* ``textual-inversion`` (:mod:`customization.textual_inversion`): one or more new token vectors per concept;
* ``t2i-zero`` / ``a-star`` (:mod:`customization.t2i_zero`, :mod:`customization.a_star`): training-free
  multi-concept composition as inference-time ``hook`` edits.

Merging edits: :mod:`customization.merge`. The textual-inversion ceiling of a model (the whole conditioning
inverted, a measurement rather than an edit): :mod:`customization.conditioning_ceiling`. The training loop every training-based method of the
project shares lives in the core (:mod:`conceptsmith.training`, :mod:`conceptsmith.trainable`, :mod:`conceptsmith.diffusion`). Reference and class images: :mod:`customization.data`.
"""

from pathlib import Path

from conceptsmith.errors import CustomizationError
from conceptsmith.registry import EditRequest, get_editor

__all__ = ["CustomizationError", "customize"]


def customize(
    pipe: object,
    method: str,
    tokens: list[str],
    images: list,
    class_words: list[str] | None = None,
    *,
    params: dict | None = None,
    concepts: list[str] | None = None,
    seed: int = 0,
):
    """Run a customization editor (``custom-diffusion``, ``lora``, ``textual-inversion``) and return its Edit.

    ``images``: one folder (or image files) for one token; one folder per token for several tokens.
    ``params``: the method's hyper-parameters (``configs/customize/<method>.yaml`` ``params``).
    The pipe is not modified; apply the result with ``edit.apply(pipe)`` or save it with ``edit.save``.
    """
    request = EditRequest(
        concepts=list(concepts or []),
        tokens=list(tokens),
        class_words=list(class_words or []),
        images=[Path(p) for p in images],
        seed=seed,
    )
    return get_editor(method)(params or {}).fit(pipe, request)
