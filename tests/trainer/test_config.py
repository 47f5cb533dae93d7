"""TrainConfig validation and help texts, and the trainer's import boundary (injection: test_inject.py)."""

from __future__ import annotations

import dataclasses

import pytest

from lora_workbench.trainer.config import TrainConfig, help_text, parse_rate, parse_rates


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "TrainConfig.steps = 0: must be at least 1"),
        ("rank", 0, "TrainConfig.rank = 0: must be at least 1"),
        ("batch_size", 0, "TrainConfig.batch_size = 0"),
        ("learning_rate", float("nan"), "TrainConfig.learning_rate = nan"),
        ("target", "everything", "TrainConfig.target = 'everything': expected one of"),
        ("lr_scheduler", "step", "TrainConfig.lr_scheduler = 'step'"),
        ("precision", "fp8", "TrainConfig.precision = 'fp8'"),
        ("rank", True, "TrainConfig.rank = True: expected a int"),
        ("caption_dropout", 1.0, "TrainConfig.caption_dropout = 1.0: must be at most"),
    ],
)
def test_validate_names_the_field_and_value(field, value, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value}).validate()
    assert message in str(e.value)


def test_every_field_has_help_and_derived_defaults():
    for f in dataclasses.fields(TrainConfig):
        assert len(help_text(f.name)) > 15, f"field {f.name} needs a tooltip-worthy help text"
    c = TrainConfig(rank=4)
    assert (c.effective_alpha, c.effective_te_rank, c.effective_te_alpha) == (4.0, 4, 4.0)
    assert c.effective_te_learning_rate == c.learning_rate
    assert TrainConfig(custom_targets=" to_k , to_v").target_modules == ("to_k", "to_v")
    assert TrainConfig(target="attention+ff").target_modules[-2:] == ("ff.net.0.proj", "ff.net.2")
    with pytest.raises(KeyError, match="nope"):
        help_text("nope")


@pytest.mark.parametrize(
    "value, name, rate",
    [
        ("1e-4", "learning_rate", 1e-4),
        (" 0.0001 ", "learning_rate", 1e-4),
        ("2E-4", "learning_rate", 2e-4),
        (0.0001, "learning_rate", 1e-4),  # a workflow saved when the input was a number widget
        ("0.0001", "learning_rate", 1e-4),  # ComfyUI turns that number into text for a STRING input
        ("1", "learning_rate", 1.0),
        ("0", "te_learning_rate", 0.0),
        ("", "te_learning_rate", 0.0),
        ("5e-5", "te_learning_rate", 5e-5),
    ],
)
def test_learning_rates_typed_as_text_reach_the_config_exactly(value, name, rate):
    assert parse_rate(value, name) == rate  # equal floats: "1e-4" and 0.0001 are the same double


@pytest.mark.parametrize(
    "value, name, message",
    [
        ("1e-4x", "learning_rate", "learning_rate = '1e-4x': not a number; type it like 1e-4 or 0.0001"),
        ("0,0001", "learning_rate", "learning_rate = '0,0001': not a number"),
        ("", "learning_rate", "learning_rate = '': not a number"),
        ("nan", "learning_rate", "learning_rate = 'nan': must be a finite number"),
        ("0", "learning_rate", "learning_rate = '0': must be between 1e-07 and 1"),
        ("2", "learning_rate", "learning_rate = '2': must be between 1e-07 and 1"),
        ("-1e-4", "te_learning_rate", "te_learning_rate = '-1e-4': must be between 0 and 1 (0: the same as"),
        (True, "learning_rate", "learning_rate = True: not a number"),
    ],
)
def test_a_bad_learning_rate_names_the_input_and_value(value, name, message):
    with pytest.raises(ValueError) as e:
        parse_rate(value, name)
    assert message in str(e.value)


def test_parse_rates_converts_only_the_rates():
    parsed = parse_rates({"learning_rate": "1e-4", "te_learning_rate": "2e-5", "steps": 3, "class_prompt": "1e-4"})
    assert parsed == {"learning_rate": 1e-4, "te_learning_rate": 2e-5, "steps": 3, "class_prompt": "1e-4"}
    assert TrainConfig(**parsed).validate().learning_rate == 1e-4
    assert parse_rates({"te_learning_rate": None, "steps": 3}) == {"steps": 3}  # left out: the default applies
