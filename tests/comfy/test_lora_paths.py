"""LoRA names resolve only inside ComfyUI's loras folders, once; the info route reads headers, shows no paths."""

from __future__ import annotations

import pytest
from graphs import our_stack, txt2img
from safetensors.torch import save_file

from lora_workbench.headless.example_loras import random_lora_tensors, write_example_lora
from lora_workbench.headless.runner import WorkflowError

pytestmark = pytest.mark.slow

SUB = "lw_paths"


def test_absolute_path_outside_the_loras_folders_is_never_read(comfy, loras_dir, tmp_path):
    from lora_workbench.nodes import files

    inside = write_example_lora(loras_dir / SUB / "inside.safetensors", seed=41, rank=2)
    # Same basename outside: LoRA Manager-style absolute paths resolve by name to the listed file, never to it.
    outside = tmp_path / "inside.safetensors"
    save_file(random_lora_tensors(42, rank=2), str(outside))
    assert files.resolve_lora_path(str(outside)) == str(inside.resolve())
    assert files.resolve_lora_path(str(inside)) == str(inside.resolve())
    lonely = tmp_path / "nowhere_listed.safetensors"
    save_file(random_lora_tensors(43, rank=2), str(lonely))
    with pytest.raises(LookupError):
        files.resolve_lora_path(str(lonely))


def test_queue_time_refuses_an_outside_path_as_execution_would(comfy, ckpt_name, tmp_path, run):
    lonely = tmp_path / "elsewhere_only.safetensors"
    save_file(random_lora_tensors(44, rank=2), str(lonely))
    prompt, _ = txt2img(ckpt_name, our_stack([(str(lonely), 1.0, 1.0)]))
    with pytest.raises(WorkflowError) as err:
        run(prompt)
    assert "node stack (LoraWorkbenchStack)" in str(err.value) and "elsewhere_only" in str(err.value)


def test_info_route_reads_the_header_and_shows_no_server_path(comfy, loras_dir, monkeypatch):
    from lora_workbench.lora import safeio
    from lora_workbench.nodes import routes

    write_example_lora(loras_dir / SUB / "info_ok.safetensors", seed=45, rank=4, trigger="tok45")
    data = (loras_dir / SUB / "info_ok.safetensors").read_bytes()
    (loras_dir / SUB / "info_cut.safetensors").write_bytes(data[: len(data) // 2])
    calls = []
    monkeypatch.setattr(safeio.safetensors.torch, "load_file", lambda *a, **k: calls.append(a))
    ok = routes.lora_info(f"{SUB}/info_ok")
    assert calls == [], "the panel must not read the weights"
    assert ok["rank"] == 4 and ok["alpha"] == 4 and ok["base_family"] == "sd1" and ok["trigger_words"] == ["tok45"]
    cut = routes.lora_info(f"{SUB}/info_cut.safetensors")
    assert cut["exists"] and "info_cut.safetensors" in cut["error"], cut
    assert str(loras_dir) not in cut["error"], f"a server path reached the client: {cut['error']}"
    # Wrongly typed metadata is an answer with an error, not a server error.
    sd = random_lora_tensors(46, rank=2, text_encoder=False)
    sd = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    bad = {"lora_adapter_metadata": '{"lora_alpha": "x"}'}
    save_file(sd, str(loras_dir / SUB / "typed.safetensors"), metadata=bad)
    typed = routes.lora_info(f"{SUB}/typed.safetensors")
    assert "lora_alpha" in (typed["error"] or ""), typed
