"""TrainConfig validation and help texts, and the trainer's import boundary (injection: test_inject.py)."""

from __future__ import annotations

import dataclasses

import pytest

from lora_workbench.trainer.config import TrainConfig, help_text


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
