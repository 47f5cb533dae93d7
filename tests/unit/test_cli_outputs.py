"""The CLI copies only what output nodes report inside ComfyUI's output folder, and only into --output."""

from __future__ import annotations

import pytest

from lora_workbench.headless.cli import collect_outputs


def _ui(subfolder: str, filename: str) -> dict:
    return {"9": {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}}


def test_outputs_are_copied_with_their_subfolders(tmp_path):
    root, dest = tmp_path / "comfy_output", tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"png")
    written = collect_outputs(_ui("sub", "a.png"), root, dest)
    assert written == [(dest / "sub" / "a.png").resolve()] and written[0].read_bytes() == b"png"


@pytest.mark.parametrize(
    ("subfolder", "filename"),
    [("../../escaped", "a.png"), ("", "../a.png"), ("ABSOLUTE", "a.png"), ("sub/../..", "a.png")],
)
def test_a_reported_path_outside_the_folders_is_refused(tmp_path, subfolder, filename):
    root, dest = tmp_path / "x" / "comfy_output", tmp_path / "x" / "out"
    root.mkdir(parents=True)
    subfolder = str(tmp_path / "elsewhere") if subfolder == "ABSOLUTE" else subfolder
    # The file exists where the escaping path points, so only the containment check can stop the copy.
    for base in (root, dest):
        target = (base / subfolder / filename).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"secret")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="outside"):
        collect_outputs(_ui(subfolder, filename), root, dest)
    assert sorted(p for p in tmp_path.rglob("*")) == before, "nothing may be written"
