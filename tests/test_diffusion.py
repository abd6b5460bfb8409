"""The diffusion objective's target follows the scheduler's prediction type."""

import pytest
import torch
from diffusers import DDPMScheduler

from conceptsmith.diffusion import prediction_target
from conceptsmith.training import TrainingError


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_target_matches_the_closed_form_of_each_prediction_type(kind: str) -> None:
    scheduler = DDPMScheduler(prediction_type=kind)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 900])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {
        "epsilon": noise,
        "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents,  # v = sqrt(a) eps - sqrt(1-a) x0
        "sample": latents,
    }[kind]
    torch.testing.assert_close(prediction_target(scheduler, latents, noise, t), expected)


def test_an_unknown_prediction_type_is_refused_by_name() -> None:
    scheduler = DDPMScheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(TrainingError, match="flow"):
        prediction_target(scheduler, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]))
