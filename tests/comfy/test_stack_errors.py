"""Every warning and error of the inference nodes, triggered with bad input through the executor."""

from __future__ import annotations

import pytest
import torch
from graphs import our_stack, rows_json, txt2img
from safetensors.torch import save_file

from lora_workbench.headless.example_loras import random_lora_tensors, write_example_lora
from lora_workbench.headless.runner import WorkflowError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def good(loras_dir):
    return write_example_lora(loras_dir / "errors_good.safetensors", seed=11, rank=4, trigger="goodtok").name


def _report(run, ckpt_name, entries, **inputs):
    prompt, _ = txt2img(ckpt_name, our_stack(entries, **inputs))
    result = run(prompt)
    return result.output("apply", 3), result.output("apply", 2)


def test_missing_file_is_reported_at_queue_time_with_close_matches(run, ckpt_name, good):
    prompt, _ = txt2img(ckpt_name, our_stack([("errors_goood", 1.0, 1.0)]))
    with pytest.raises(WorkflowError) as e:
        run(prompt)
    message = str(e.value)
    assert "node stack (LoraWorkbenchStack)" in message
    assert "errors_goood" in message and good in message, message


def test_pickle_file_is_refused_with_an_explanation(run, ckpt_name, loras_dir):
    path = loras_dir / "pickled.pt"
    torch.save(random_lora_tensors(1, rank=2, text_encoder=False), path)
    prompt, _ = txt2img(ckpt_name, our_stack([(path.name, 1.0, 1.0)]))
    with pytest.raises(WorkflowError) as e:
        run(prompt)
    assert "pickled.pt" in str(e.value) and "pickle" in str(e.value).lower()


def test_truncated_safetensors_names_the_file(run, ckpt_name, loras_dir, good):
    data = (loras_dir / good).read_bytes()
    (loras_dir / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    prompt, _ = txt2img(ckpt_name, our_stack([("truncated.safetensors", 1.0, 1.0)]))
    with pytest.raises(WorkflowError) as e:
        run(prompt)
    assert "truncated.safetensors" in str(e.value)
    assert "LoraWorkbenchApplyStack" in str(e.value)


def test_metadata_naming_another_family_warns_and_applies(run, ckpt_name, loras_dir):
    # SD1-shaped tensors tagged SDXL: the shapes decide (shared files often carry wrong metadata); the report
    # says so. A LoRA whose shapes do not fit is refused: tests/comfy/test_tool_files.py.
    tensors = random_lora_tensors(2, rank=2, text_encoder=False)
    save_file(tensors, str(loras_dir / "for_sdxl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    report, _ = _report(run, ckpt_name, [("for_sdxl.safetensors", 1.0, 1.0)])
    assert "patched 56 model and 0 CLIP weights" in report, report
    assert "WARNING: its metadata says sdxl, but its tensor shapes are sd1's" in report, report


def test_unmatched_keys_are_counted_and_listed(run, ckpt_name, loras_dir):
    tensors = random_lora_tensors(3, rank=2, text_encoder=False)
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 8)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 2)
    save_file(tensors, str(loras_dir / "stray_keys.safetensors"))
    report, _ = _report(run, ckpt_name, [("stray_keys.safetensors", 1.0, 1.0)])
    assert "2 key(s) matched nothing" in report, report
    assert "lora_unet_no_such_block_to_q.lora_down.weight" in report


def test_total_strength_above_two_warns_but_runs(run, ckpt_name, good, loras_dir, caplog):
    other = write_example_lora(loras_dir / "errors_other.safetensors", seed=12, rank=4).name
    with caplog.at_level("WARNING"):
        report, words = _report(run, ckpt_name, [(good, 1.4, 1.0), (other, -1.0, 1.0)])
    assert any("Apply LoRA Stack" in r.getMessage() and "2.4" in r.getMessage() for r in caplog.records)
    assert "total model strength 2.40" in report
    assert "WARNING" in report and "2.0" in report
    assert "goodtok" in words
    below, _ = _report(run, ckpt_name, [(good, 1.0, 1.0), (other, 0.5, 1.0)])
    assert "WARNING" not in below


def test_rows_that_are_not_json_are_a_queue_time_error(run, ckpt_name):
    def patch(g, model, clip):
        stack = g.node("LoraWorkbenchStack", id="stack", rows="[{oops")
        apply = g.node("LoraWorkbenchApplyStack", id="apply", model=model, clip=clip, lora_stack=stack.out(0))
        return apply.out(0), apply.out(1)

    with pytest.raises(WorkflowError, match="not valid JSON"):
        run(txt2img(ckpt_name, patch)[0])


@pytest.mark.parametrize(
    "text, expected",
    [("a dog <lora:errors_good:0.8", "unclosed"), ("a dog <lora:errors_good:abc>", "abc"), ("<lora:>", "<lora:>")],
)
def test_malformed_prompt_tags_quote_the_tag(run, ckpt_name, good, text, expected):
    def patch(g, model, clip):
        tags = g.node("LoraWorkbenchPromptTags", id="tags", text=text)
        apply = g.node("LoraWorkbenchApplyStack", id="apply", model=model, clip=clip, lora_stack=tags.out(0))
        return apply.out(0), apply.out(1)

    with pytest.raises(WorkflowError) as e:
        run(txt2img(ckpt_name, patch)[0])
    assert "LoraWorkbenchPromptTags" in str(e.value) and expected in str(e.value)


def test_prompt_tags_equal_the_same_stack(run, ckpt_name, good):
    def tagged(g, model, clip):
        tags = g.node("LoraWorkbenchPromptTags", id="tags", text=f"a dog <lora:{good[:-12]}:0.7:0.4>")
        apply = g.node("LoraWorkbenchApplyStack", id="apply", model=model, clip=clip, lora_stack=tags.out(0))
        return apply.out(0), apply.out(1)

    a = run(txt2img(ckpt_name, tagged)[0])
    # Read before the next run: the executor drops cached outputs of nodes the next prompt lacks.
    cleaned, from_tags = a.output("tags", 1), a.output("sampler")["samples"]
    from_stack = run(txt2img(ckpt_name, our_stack([(good, 0.7, 0.4)]))[0]).output("sampler")["samples"]
    assert cleaned == "a dog"
    assert torch.equal(from_tags, from_stack)


def test_stacks_from_other_packs_are_accepted(comfy, good, loras_dir):
    stack_cls = comfy.node_classes["LoraWorkbenchStack"]
    absolute = str(loras_dir / good)
    comfyroll = [(good, 0.5, 0.25), ("None", 1.0, 1.0)]
    efficiency = [(good.replace("/", "\\"), 0.5, 0.25)]
    lora_manager = [(absolute, 0.5, 0.25)]
    for incoming in (comfyroll, efficiency, lora_manager):
        out = stack_cls.execute(rows=rows_json([(good, 1.0, None)]), lora_stack=incoming).result[0]
        assert out[-1] == (good, 1.0, 1.0), out
        assert len(out) == 2 and out[0][1:] == (0.5, 0.25), out
