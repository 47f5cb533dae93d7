"""LyCORIS files written by the ``lycoris-lora`` package itself, read by ``lora.lycoris``.

Each network is built by LyCORIS on a small diffusers UNet (attention/feed-forward linears and 3x3 resnet convs),
filled with random non-zero values and saved with LyCORIS' ``save_weights``. References, both independent of
``lora/``: LyCORIS' own module ``get_weight(shape)`` (the change its ``forward`` adds, float32), and the documented
formulas recomputed here in float64. Tolerances: float32 products of four O(1) factors against float64 differ by
~1e-7 of the largest entry, so 1e-5 bounds it and still fails a wrong scale (a factor 2 here) or a wrong layout.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lora_workbench.lora import keys, lycoris, merge
from lora_workbench.lora import metadata as md

pytest.importorskip("lycoris")  # in the test extra (pyproject.toml)
pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from lycoris import LycorisNetwork, create_lycoris  # noqa: E402

RANK, ALPHA = 4, 2.0  # scale 0.5
TOLERANCE = 1e-5  # see the module docstring

VARIANTS = {
    "loha": {"algo": "loha"},
    "loha_tucker": {"algo": "loha", "use_tucker": True},  # hada_t1/t2 cores on the 3x3 convs
    "lokr": {"algo": "lokr", "factor": 4},  # w1 full, w2 = w2_a @ w2_b
    "lokr_both": {"algo": "lokr", "factor": 8, "decompose_both": True, "linear_dim": 2},  # w1 factored too
}


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def _write(tmp_path, variant: str, **extra):
    """Return ``(path, {kohya name: LyCORIS' own change in float64})`` for a network written by LyCORIS."""
    kwargs = {**VARIANTS[variant], **extra}
    dim = kwargs.pop("linear_dim", RANK)
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D"]})
    net = create_lycoris(_unet(), 1.0, linear_dim=dim, linear_alpha=ALPHA, conv_dim=dim, conv_alpha=ALPHA, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + 0.05)
    path = tmp_path / f"{variant}.safetensors"
    net.save_weights(str(path), torch.float32, {"modelspec.trigger_phrase": "sks toy", "ss_output_name": variant})
    with torch.no_grad():
        # The change LyCORIS' forward adds (get_weight * scalar, scalar 1). Its get_diff_weight multiplies the
        # scale in a second time in lycoris-lora 4.1.3, which neither its forward nor ComfyUI does.
        own = {
            lycoris.kohya_module_name(m.lora_name): m.get_weight(m.shape).double().reshape(m.shape) for m in net.loras
        }
    net.restore()
    return path, own


def _formula(sd: dict, name: str) -> torch.Tensor:
    """The documented change of one module, float64, flattened to (out, in * kernel)."""
    t = {k.split(".", 1)[1]: v.double() for k, v in sd.items() if k.split(".")[0] == name}
    alpha = float(t["alpha"])

    def half(a, b, core):
        return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a).flatten(1) if core is not None else a @ b

    if "hada_w1_a" in t:
        w1 = half(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
        w2 = half(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
        return w1 * w2 * alpha / t["hada_w1_b"].shape[0]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"].flatten(1) if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    return torch.kron(w1, w2) * (alpha / rank if rank else 1.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().flatten(1) - b.double().flatten(1)).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deltas_equal_lycoris_own_and_the_formula(tmp_path, variant):
    path, own = _write(tmp_path, variant)
    sd = load_file(str(path))
    mods = lycoris.read_modules(sd, source=path.name)
    assert set(mods) == set(own) and len(mods) == 113
    assert any(len(m.shape) == 4 or m.shape[1] % 9 == 0 for m in mods.values()), "the 3x3 convs are covered"
    worst_own = max(_rel(m.delta(), own[n]) for n, m in mods.items())
    worst_formula = max(_rel(m.delta(), _formula(sd, "lycoris_" + n[len("lora_unet_") :])) for n, m in mods.items())
    print(f"MEASURE {variant}: vs LyCORIS get_weight {worst_own:.1e}, vs float64 formula {worst_formula:.1e}")
    assert worst_own < TOLERANCE and worst_formula < 1e-12


@pytest.mark.parametrize("variant", ["loha", "loha_tucker", "lokr"])
def test_describe_and_exact_state_and_svd_error(tmp_path, variant):
    path, own = _write(tmp_path, variant)
    sd = load_file(str(path))
    info = md.describe(sd, {"modelspec.trigger_phrase": "sks toy"}, source=path.name)
    assert (info["format"], info["algorithm"], info["ranks"], info["alphas"]) == (
        "lycoris",
        VARIANTS[variant]["algo"],
        [4],
        [2.0],
    )
    assert info["modules"] == 113 and info["trigger_words"] == ["sks toy"]

    state = lycoris.state_from_any(sd, source=path.name)
    exact = max(_rel(state.modules[n].delta(), own[n]) for n in own)
    # Exact factors of each change at its true rank (LoHa: at most rank**2, a Hadamard product; LoKr: rank(w1) *
    # rank(w2)), not a padded full-rank copy.
    some = sorted(own)[::8]  # every 8th module: matrix_rank is a full SVD, and 113 of them take ~15 s here
    true_ranks = {n: int(torch.linalg.matrix_rank(_formula(sd, "lycoris_" + n[len("lora_unet_") :]))) for n in some}
    got = {n: state.modules[n].rank for n in some}
    assert got == true_ranks, {n: (got.get(n), r) for n, r in true_ranks.items() if got.get(n) != r}
    assert exact < TOLERANCE, exact

    result = merge.merge([state], [1.0], "svd", rank=3)
    err2 = total2 = 0.0
    for n, target in own.items():
        got = result.state.modules[n].delta().double().flatten(1)
        err2 += float(((got - target.flatten(1)) ** 2).sum())
        total2 += float((target**2).sum())
    measured = math.sqrt(err2 / total2)
    print(f"MEASURE {variant} -> rank 3: reported {result.report.overall_error:.6f}, measured {measured:.6f}")
    assert 0.01 < measured and abs(result.report.overall_error - measured) < 1e-4 * measured


def test_merge_with_a_plain_lora_is_the_exact_sum(tmp_path):
    path, own = _write(tmp_path, "loha")
    name = next(iter(own))
    out, inp = own[name].flatten(1).shape
    g = torch.Generator().manual_seed(5)
    plain = {
        f"{name}.lora_down.weight": torch.randn(2, inp, generator=g),
        f"{name}.lora_up.weight": torch.randn(out, 2, generator=g),
        f"{name}.alpha": torch.tensor(1.0),
    }
    result = merge.merge([load_file(str(path)), plain], [0.5, 2.0], "concat")
    want = 0.5 * own[name].flatten(1) + 2.0 * 0.5 * (
        plain[f"{name}.lora_up.weight"] @ plain[f"{name}.lora_down.weight"]
    )
    assert _rel(result.state.modules[name].delta(), want) < TOLERANCE


def test_dora_is_described_and_refused_for_merge_with_the_reason(tmp_path):
    path, _ = _write(tmp_path, "loha", dora_wd=True)
    sd = load_file(str(path))
    assert any(k.endswith(".dora_scale") for k in sd)
    assert md.describe(sd, {}, source=path.name)["algorithm"] == "loha+dora"
    with pytest.raises(keys.UnsupportedLoraError, match=r"'loha\.safetensors' is a DoRA adapter.*model's weights"):
        lycoris.state_from_any(sd, source=path.name)


def test_incomplete_module_names_file_and_module():
    sd = {"lycoris_x.hada_w1_a": torch.ones(2, 2), "lycoris_x.hada_w1_b": torch.ones(2, 2)}
    with pytest.raises(keys.DamagedLoraError, match=r"'bad.safetensors': loha module 'lycoris_x' is incomplete"):
        lycoris.read_modules(sd, source="bad.safetensors")
