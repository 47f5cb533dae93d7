"""Merging: concat is exact, svd reports the error it makes, linear reports its true error, bad inputs refused."""

from __future__ import annotations

import math

import pytest
import torch

from lora_workbench.lora import keys, merge, safeio
from lora_workbench.lora.state import LoraState

# float32 factors with entries ~1 and ranks up to ~24: products accumulate rounding of ~1e-7 per term;
# 1e-5 relative leaves two orders of margin without hiding a real mistake (a wrong scale is off by >= 1e-1).
F32_RTOL = 1e-5


def _target(states, weights):
    """The exact weighted sum of full deltas per module, formed independently of merge.py."""
    out = {}
    for st, w in zip(states, weights):
        for n, m in st.modules.items():
            d = w * m.delta()
            out[n] = out[n] + d if n in out else d
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).flatten()) / torch.linalg.norm(b.flatten()))


@pytest.fixture
def three(make_state):
    # Mixed ranks and alphas, a module only in the third LoRA (disjoint keys), conv and text-encoder modules.
    a = make_state(rank=4, alpha=2.0, seed=1, source="a.safetensors")
    b = make_state(rank=8, alpha=16.0, seed=2, source="b.safetensors")
    c = make_state(rank=6, alpha=None, seed=3, source="c.safetensors")
    c.modules.update(
        make_state(rank=6, seed=4, modules=[("lora_unet_mid_block_attentions_0_proj_in", 40, 40, None)]).modules
    )
    return [a, b, c]


def test_concat_of_three_equals_weighted_sum_of_deltas(three):
    weights = [0.7, -0.4, 1.3]
    res = merge.merge(three, weights, "concat")
    target = _target(three, weights)
    assert set(res.state.modules) == set(target)
    for n, t in target.items():
        m = res.state.modules[n]
        assert m.delta().shape == t.shape, n
        assert _rel(m.delta(), t) < F32_RTOL, n
    assert res.state.modules["lora_unet_down_blocks_0_resnets_0_conv1"].rank == 4 + 8 + 6
    assert res.state.modules["lora_unet_mid_block_attentions_0_proj_in"].rank == 6
    assert res.report.overall_error == 0.0


def test_weight_means_stacking_strength_not_its_square(make_state):
    st = make_state(rank=4, alpha=4.0)
    for method in ("concat", "svd", "linear"):
        res = merge.merge([st], [0.5], method)
        for n, m in st.modules.items():
            # kohya's merge_lora.py would give 0.25 * delta here.
            assert _rel(res.state.modules[n].delta(), 0.5 * m.delta()) < F32_RTOL, (method, n)


def test_svd_at_full_rank_is_exact(three):
    weights = [1.0, 0.5, -0.8]
    res = merge.merge(three, weights, "svd", rank=18)
    target = _target(three, weights)
    for n, t in target.items():
        assert _rel(res.state.modules[n].delta(), t) < F32_RTOL, n
    # The reported error comes from discarded singular values, which are float rounding here.
    assert res.report.overall_error < F32_RTOL


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_svd_low_rank_reports_the_error_it_made(three, rank):
    weights = [1.0, 0.5, -0.8]
    res = merge.merge(three, weights, "svd", rank=rank)
    target = _target(three, weights)
    err_sq = tot_sq = 0.0
    for n, t in target.items():
        got = res.state.modules[n].delta()
        measured = _rel(got, t)
        assert res.state.modules[n].rank == min(rank, sum(s.modules[n].rank for s in three if n in s.modules))
        # Reported (from singular values, float64) vs measured (full matrices, float32): agree to rounding.
        assert math.isclose(res.report.module_errors[n], measured, rel_tol=1e-3, abs_tol=1e-5), n
        err_sq += float(torch.linalg.norm((got - t).flatten())) ** 2
        tot_sq += float(torch.linalg.norm(t.flatten())) ** 2
    assert math.isclose(res.report.overall_error, math.sqrt(err_sq / tot_sq), rel_tol=1e-3)
    assert res.report.overall_error > 1e-3, "a truncated merge of random factors cannot be exact"


def test_svd_is_optimal_truncation(make_state):
    # Eckart-Young: the factor-based result must equal the truncated SVD of the full matrix.
    st = [make_state(rank=8, seed=s, modules=[("lora_unet_a_to_q", 30, 20, None)]) for s in (1, 2)]
    res = merge.merge(st, [1.0, 1.0], "svd", rank=5)
    t = _target(st, [1.0, 1.0])["lora_unet_a_to_q"].double()
    u, s, vh = torch.linalg.svd(t)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert _rel(res.state.modules["lora_unet_a_to_q"].delta().double(), best) < 1e-5


def test_svd_energy_threshold(make_state):
    st = [make_state(rank=8, seed=s) for s in (1, 2)]
    res = merge.merge(st, [1.0, 1.0], "svd", energy=0.9)
    for n, kept in res.report.energy_kept.items():
        assert kept >= 0.9 - 1e-9, n
        assert res.report.module_errors[n] <= math.sqrt(0.1) + 1e-6, n
    assert merge.merge(st, [1.0, 1.0], "svd", energy=1.0).report.overall_error < F32_RTOL


def test_linear_reports_its_true_error(make_state):
    st = [make_state(rank=4, alpha=a, seed=s) for s, a in ((1, 2.0), (2, 4.0), (3, None))]
    weights = [0.6, 0.9, -0.5]
    res = merge.merge(st, weights, "linear")
    target = _target(st, weights)
    for n, t in target.items():
        measured = _rel(res.state.modules[n].delta(), t)
        assert math.isclose(res.report.module_errors[n], measured, rel_tol=1e-3, abs_tol=1e-5), n
        assert res.state.modules[n].rank == 4
    # Random factors: cross terms make the naive average far from the sum, and the report must say so.
    assert res.report.overall_error > 0.3


def test_merged_state_survives_a_file(tmp_path, three):
    res = merge.merge(three, [1.0, 1.0, 1.0], "svd", rank=4)
    path = tmp_path / "m.safetensors"
    safeio.write_safetensors(path, keys.to_kohya_dict(res.state), res.state.metadata)
    sd, meta = safeio.read_safetensors(path)
    back = keys.state_from_dict(sd, meta)
    for n, m in res.state.modules.items():
        assert torch.equal(back.modules[n].delta(), m.delta()), n
    assert '"method": "svd"' in meta["lora_workbench.merge_recipe"] and meta["ss_network_dim"] == "4"


def test_conv_shapes_preserved(three):
    res = merge.merge(three, [1, 1, 1], "svd", rank=2)
    m = res.state.modules["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert tuple(m.down.shape) == (2, 16, 3, 3) and tuple(m.up.shape) == (32, 2, 1, 1)


def test_rank_zero_refused(three):
    with pytest.raises(ValueError, match="target rank must be >= 1, got 0"):
        merge.merge(three, [1, 1, 1], "svd", rank=0)


def test_rank_above_sum_refused(three):
    with pytest.raises(ValueError, match=r"target rank 19 is above.*18 for module 'lora_"):
        merge.merge(three, [1, 1, 1], "svd", rank=19)


def test_different_families_refused(make_state):
    a = make_state(source="one.safetensors")  # SD1 shapes: cross-attention context 768
    sdxl = [("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048, None)]
    b = make_state(modules=sdxl, source="two.safetensors")
    with pytest.raises(ValueError, match=r"one.safetensors is sd1, two.safetensors is sdxl"):
        merge.merge([a, b], [1, 1], "concat")


def test_metadata_family_claims_do_not_refuse_a_merge(make_state):
    # Shared files often carry wrong metadata: the shapes (SD1 for both) decide.
    a = make_state(metadata={"ss_base_model_version": "sd_v1"}, source="one.safetensors")
    b = make_state(seed=1, metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, source="two")
    assert merge.merge([a, b], [1, 1], "concat").report.overall_error == 0.0


def test_dora_input_refused_with_the_reason_and_advice():
    # LoHa/LoKr merge as exact deltas (tests/unit/test_lycoris.py); DoRA's change depends on the base weights.
    dora = {
        "lora_unet_x.lora_down.weight": torch.ones(2, 3),
        "lora_unet_x.lora_up.weight": torch.ones(3, 2),
        "lora_unet_x.dora_scale": torch.ones(3, 1),
    }
    with pytest.raises(keys.UnsupportedLoraError, match=r"DoRA.*model's weights.*apply them together in a LoRA stack"):
        merge.merge([dora], [1.0], "concat")


def test_linear_with_different_ranks_refused(make_state):
    a = make_state(rank=4, source="a.safetensors")
    b = make_state(rank=8, source="b.safetensors")
    with pytest.raises(ValueError, match=r"ranks 4 \(a.safetensors\), 8 \(b.safetensors\); use concat.*svd"):
        merge.merge([a, b], [1, 1], "linear")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "avg"}, "unknown merge method 'avg'"),
        ({"weights": [1.0]}, "got 1 weights for 2 LoRAs"),
        ({"energy": 1.5}, r"energy must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_arguments(make_state, kwargs, message):
    args = {"weights": [1.0, 1.0], "method": "svd"} | kwargs
    with pytest.raises(ValueError, match=message):
        merge.merge([make_state(), make_state(seed=1)], **args)


def test_shape_conflict_between_inputs(make_state):
    a = make_state(modules=[("lora_unet_a", 8, 8, None)], source="a.safetensors")
    b = make_state(modules=[("lora_unet_a", 8, 9, None)], source="b.safetensors")
    with pytest.raises(ValueError, match="module 'lora_unet_a' has different shapes in a.safetensors"):
        merge.merge([a, b], [1, 1], "concat")


def test_extras_are_summed_with_weights(make_state):
    a, b = make_state(seed=1), make_state(seed=2)
    a.extras["lora_unet_x.diff"] = torch.ones(3)
    b.extras["lora_unet_x.diff"] = 2 * torch.ones(3)
    res = merge.merge([a, b], [0.5, 0.25], "concat")
    assert torch.allclose(res.state.extras["lora_unet_x.diff"], torch.ones(3))


def test_empty_state_list_refused():
    with pytest.raises(ValueError, match="at least one"):
        merge.merge([], [], "concat")


def test_zero_weights_give_zero_error_not_nan(make_state):
    res = merge.merge([make_state()], [0.0], "svd", rank=2)
    assert res.report.overall_error == 0.0
    assert all(float(m.delta().abs().max()) == 0.0 for m in res.state.modules.values())


def test_states_accept_raw_dicts(make_state):
    st = make_state(rank=2, alpha=1.0)
    res = merge.merge([keys.to_kohya_dict(st)], [1.0], "concat")
    for n, m in st.modules.items():
        assert _rel(res.state.modules[n].delta(), m.delta()) < F32_RTOL
    assert isinstance(res.state, LoraState)


# The steps merge() is built from.


def test_contributions_name_each_input_that_has_a_module_in_input_order(make_state):
    a = make_state(rank=2, seed=1, modules=[("lora_unet_b", 4, 4, None), ("lora_unet_a", 4, 4, None)])
    b = make_state(rank=3, seed=2, modules=[("lora_unet_a", 4, 4, None)])
    plan = merge._contributions([a, b])
    assert list(plan) == ["lora_unet_a", "lora_unet_b"], "sorted names"
    assert [(i, m.rank) for i, m in plan["lora_unet_a"]] == [(0, 2), (1, 3)]
    assert [i for i, _ in plan["lora_unet_b"]] == [0], "an input without the module contributes nothing"


def test_svd_rank_defaults_to_the_largest_input_rank_unless_energy_decides(make_state):
    states = [make_state(rank=2, seed=1), make_state(rank=5, seed=2)]
    plan = merge._contributions(states)
    assert merge._svd_rank(plan, states, None, None) == 5
    assert merge._svd_rank(plan, states, None, 0.9) is None
    assert merge._svd_rank(plan, states, 7, None) == 7
    with pytest.raises(ValueError, match="target rank 8 is above"):
        merge._svd_rank(plan, states, 8, None)


@pytest.mark.parametrize("method", ["concat", "svd", "linear"])
def test_each_method_on_one_input_gives_back_its_weighted_delta(make_state, method):
    st = make_state(rank=3, alpha=1.5, seed=7, modules=[("lora_unet_x", 6, 5, None)])
    contributions = merge._contributions([st])["lora_unet_x"]
    module, merged = merge._merge_module("lora_unet_x", contributions, [-0.5], ["a"], method, 3, None)
    assert _rel(module.delta(), -0.5 * st.modules["lora_unet_x"].delta()) < F32_RTOL
    assert merged.error < F32_RTOL * max(merged.target_norm, 1.0)
    assert (merged.energy_kept is not None) == (method == "svd")
