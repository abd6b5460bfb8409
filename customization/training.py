"""Training configuration shared by the customization methods that fine-tune on a subject's images.

The loop itself and everything else training needs live in the core: :mod:`conceptsmith.training`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from conceptsmith.customization.data import CutMixOptions, ZoomOutOptions
from conceptsmith.training import TrainingConfig


class SubjectTrainingConfig(TrainingConfig, ZoomOutOptions, CutMixOptions):
    """Fields of the methods that fine-tune weights on reference images of a subject (Custom Diffusion,
    DreamBooth-LoRA): how the subject appears in prompts and the class-regularization (prior) images."""

    phrase: str = Field("{token} {class_word}", description="how the concept appears in prompts")
    templates: Literal["object", "style"] | list[str] = "object"
    prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(200, ge=1)
    class_prompt: str = Field("a photo of a {}", description="prompt of the class images; {} is the class word")
    class_data_dir: str | None = Field(None, description="cache folder for generated class images")
    class_inference_steps: int | None = Field(None, ge=1, description="sampling steps of the class images (default: the pipeline's)")
    flip: bool = True
    resolution: int | None = None


def subject_params(config: SubjectTrainingConfig, specs: Sequence[Any], prompt_templates: Sequence[str]) -> dict[str, Any]:
    """An Edit's ``params`` for a subject-training run: the config plus what the merges and evaluations read back."""
    return {
        **config.model_dump(),
        "tokens": [s.token for s in specs],
        "class_words": [s.class_word for s in specs],
        "phrases": [s.phrase for s in specs],
        "prompt_templates": list(prompt_templates),
    }

