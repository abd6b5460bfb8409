"""Conditioning inversion: the ceiling of textual inversion on a model (a measurement, not an edit).

Textual inversion reaches only the conditionings that the frozen text encoder makes from a few input
vectors. Here the conditioning itself is optimized: every row of the text encoder's output for one
prompt (``[1, tokens, d]``, initialized from the encoding of ``init_prompt`` with the class word),
with textual inversion's denoising objective on the same reference images and the project's training
loop (:func:`conceptsmith.training.train`). No prompt can produce an arbitrary conditioning, so the
images generated from the result show what the frozen UNet can draw of the object from any text at all:
an upper reference for textual inversion on the same model. the customization bench reports it as
the ``conditioning-ceiling`` row (``ceiling`` in a customization bench config).

Pipelines with one text encoder (SD 1.x / 2.x); SDXL's pooled embedding is not inverted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field

from conceptsmith.customization import CustomizationError
from conceptsmith.customization.data import Examples, default_resolution, load_images
from conceptsmith.diffusion import Conditioning, DenoisingObjective, noise_scheduler
from conceptsmith.text import encode_prompts
from conceptsmith.trainable import frozen, pipe_components, shared_copy
from conceptsmith.training import TrainingConfig, train


class CeilingConfig(TrainingConfig):
    """The training settings of the inversion (textual inversion's fields, without tokens)."""

    steps: int = Field(2400, ge=1)
    learning_rate: float = Field(1e-2, gt=0)
    batch_size: int = Field(4, ge=1)
    init_prompt: str = Field("a picture of a {}", description="initial conditioning: this prompt, {} = the class word")
    flip: bool = Field(True, description="also train on horizontally mirrored images")
    resolution: int | None = Field(None, description="training size (default: the pipeline's generation size)")
    eval_batches: int = 0


class FixedConditioning:
    """A conditioner that ignores the prompts: every example gets the same (trainable) ``states``."""

    def __init__(self, states: torch.nn.Parameter) -> None:
        self.states = states

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        return Conditioning(self.states.expand(len(prompts), -1, -1))


def invert_conditioning(
    pipe: object, images: Sequence[str | Path], class_word: str, config: CeilingConfig | None = None, seed: int = 0
) -> torch.Tensor:
    """The conditioning ``[1, tokens, d]`` (float32, detached) that best denoises ``images`` (files or folders)."""
    config = config or CeilingConfig()
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise CustomizationError("The conditioning ceiling supports pipelines with one text encoder (SD 1.x / 2.x), not SDXL.")
    references = load_images(list(images))
    size = config.resolution or default_resolution(pipe)
    with frozen(*pipe_components(pipe)):
        with torch.no_grad():
            initial = encode_prompts(pipe, [config.init_prompt.format(class_word)]).float()
        states = torch.nn.Parameter(initial.clone())
        instances = Examples.from_images(pipe.vae, references, size, class_word, ("{}",), config.flip)
        unet = shared_copy(pipe.unet)
        objective = DenoisingObjective(unet, noise_scheduler(pipe), FixedConditioning(states), instances, None, config.batch_size)
        train(
            {"conditioning": states},
            objective,
            config,
            seed=seed,
            models=[unet],
            run_key=f"conditioning-ceiling:{class_word}:{[str(p) for p in images]}",
            description="conditioning ceiling",
        )
    return states.detach().clone()
