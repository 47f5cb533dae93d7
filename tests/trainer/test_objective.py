"""The objective per model family: DDPM draws as before, flow matching's noise levels, inputs and target."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lora_workbench.trainer import conds, objective


def _sd3_shift(u: torch.Tensor, shift: float = 3.0) -> torch.Tensor:
    # SD3's time shift (ComfyUI's time_snr_shift): the same mapping a flow model's own sampling applies.
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class FlowSchedule:
    prediction_type: str = "flow"
    num_train_timesteps: int = 1000
    alphas_cumprod: torch.Tensor | None = None
    flow_sigma: object = _sd3_shift


@dataclass
class DdpmSchedule:
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    alphas_cumprod: torch.Tensor = torch.linspace(0.999, 0.01, 1000)
    flow_sigma: object = None


def test_ddpm_timesteps_are_drawn_exactly_as_before():
    """Default sampling for DDPM models is the uniform integer draw the trainer always made (resume stays exact)."""
    drawn = objective.sample_timesteps(DdpmSchedule(), 64, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


def test_flow_timesteps_are_logit_normal_through_the_models_shift():
    schedule = FlowSchedule()
    sigmas = objective.sample_timesteps(schedule, 20000, torch.Generator().manual_seed(0))
    assert sigmas.dtype == torch.float32 and 0 < float(sigmas.min()) and float(sigmas.max()) < 1
    # Logit-normal u has median 0.5; the shift moves it to 0.75 (uniform without the shift: 0.5).
    assert abs(float(sigmas.median()) - 0.75) < 0.01
    # Logit-normal puts less weight on the ends than uniform: about 2.4% of u below 0.1 against 10%.
    uniform = objective.sample_timesteps(schedule, 20000, torch.Generator().manual_seed(0), "uniform")
    low = float(_sd3_shift(torch.tensor(0.1)))
    assert float((sigmas < low).float().mean()) < 0.04 < 0.08 < float((uniform < low).float().mean())


class _Model:
    """Predicts with a function of (noisy, sigma) that the test picks; records what it was given."""

    def __init__(self, schedule, predict):
        self.schedule, self.predict, self.seen = schedule, predict, []

    def predict_noise(self, noisy, timesteps, cond):
        self.seen.append((noisy, timesteps))
        return self.predict(noisy, timesteps)


def test_flow_loss_is_the_velocity_error_of_the_rectified_flow():
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    # A model that knows x0 predicts the velocity noise - x0 from x_t exactly: zero loss.
    oracle = _Model(FlowSchedule(), lambda xt, s: (xt - x0) / s.view(-1, 1, 1, 1))
    loss = objective.per_example_loss(oracle, x0, None, torch.Generator(), timesteps=sigma, noise=noise)
    assert torch.allclose(loss, torch.zeros(3), atol=1e-10)
    ((noisy, given),) = oracle.seen
    assert torch.allclose(noisy, sigma.view(-1, 1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1, 1)) * x0)
    assert torch.equal(given, sigma)
    # Predicting nothing costs the velocity's mean square.
    silent = _Model(FlowSchedule(), lambda xt, s: torch.zeros_like(xt))
    loss = objective.per_example_loss(silent, x0, None, torch.Generator(), timesteps=sigma, noise=noise)
    assert torch.allclose(loss, ((noise - x0) ** 2).mean(dim=(1, 2, 3)))


def test_min_snr_is_refused_for_flow_models():
    model = _Model(FlowSchedule(), lambda xt, s: xt)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        objective.per_example_loss(model, torch.zeros(1, 4, 8, 8), None, torch.Generator(), min_snr_gamma=5.0)


def test_conditioning_dicts_concatenate_and_repeat_like_tensors():
    a = {"cross_attn": torch.ones(1, 3, 2), "pooled_output": torch.ones(1, 4)}
    b = {"cross_attn": torch.zeros(2, 3, 2), "pooled_output": torch.zeros(2, 4)}
    both = conds.concat([a, b])
    assert both["cross_attn"].shape == (3, 3, 2) and both["pooled_output"].shape == (3, 4)
    assert conds.repeat(a, 5)["pooled_output"].shape == (5, 4)
    assert torch.equal(conds.concat([a["cross_attn"], b["cross_attn"]]), both["cross_attn"])
    with pytest.raises(ValueError, match="different parts"):
        conds.concat([a, {"cross_attn": a["cross_attn"]}])
