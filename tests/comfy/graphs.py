"""API-format prompts for the tests, built with ComfyUI's own GraphBuilder."""

from __future__ import annotations

import json

SAMPLER = dict(seed=7, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)


def rows_json(entries) -> str:
    """Return a LoRA Stack ``rows`` value for ``[(name, strength_model, strength_clip[, on]), ...]``."""
    rows = []
    for entry in entries:
        name, sm, sc, *rest = entry
        rows.append({"on": rest[0] if rest else True, "lora": name, "strength": sm, "strength_clip": sc})
    return json.dumps(rows)


def txt2img(ckpt_name: str, patch=None, *, text="a photo of a dog", steps=4, size=64) -> tuple[dict, str]:
    """Return ``(prompt, sampler_node_id)`` for a 64x64 text-to-image graph.

    ``patch(graph, model_out, clip_out) -> (model_out, clip_out)`` inserts LoRA nodes.
    """
    from comfy_execution.graph_utils import GraphBuilder  # importable once the `comfy` fixture ran

    g = GraphBuilder(prefix="")
    ckpt = g.node("CheckpointLoaderSimple", id="ckpt", ckpt_name=ckpt_name)
    model, clip = ckpt.out(0), ckpt.out(1)
    if patch is not None:
        model, clip = patch(g, model, clip)
    pos = g.node("CLIPTextEncode", id="pos", text=text, clip=clip)
    neg = g.node("CLIPTextEncode", id="neg", text="", clip=clip)
    latent = g.node("EmptyLatentImage", id="latent", width=size, height=size, batch_size=1)
    params = dict(SAMPLER, steps=steps)
    ks = g.node(
        "KSampler",
        id="sampler",
        model=model,
        positive=pos.out(0),
        negative=neg.out(0),
        latent_image=latent.out(0),
        **params,
    )
    g.node("SaveLatent", id="save", samples=ks.out(0), filename_prefix="test/latent")
    return g.finalize(), "sampler"


def core_chain(entries):
    """A patch function chaining one core LoraLoader per ``(name, strength_model, strength_clip)``."""

    def patch(g, model, clip):
        for i, (name, sm, sc) in enumerate(entries):
            node = g.node(
                "LoraLoader",
                id=f"core_lora_{i}",
                model=model,
                clip=clip,
                lora_name=name,
                strength_model=sm,
                strength_clip=sc,
            )
            model, clip = node.out(0), node.out(1)
        return model, clip

    return patch


def our_stack(entries, **apply_inputs):
    """A patch function: one LoRA Stack node with these rows, then Apply LoRA Stack."""

    def patch(g, model, clip):
        stack = g.node("LoraWorkbenchStack", id="stack", rows=rows_json(entries))
        apply = g.node(
            "LoraWorkbenchApplyStack", id="apply", model=model, clip=clip, lora_stack=stack.out(0), **apply_inputs
        )
        return apply.out(0), apply.out(1)

    return patch


TRAIN_DEFAULTS = dict(
    steps=8,
    rank=4,
    alpha=4.0,
    learning_rate=1e-3,
    batch_size=2,
    target="attention",
    train_text_encoder=False,
    prior_preservation=False,
    class_prompt="",
    num_class_images=2,
    prior_loss_weight=1.0,
    class_images_dir="",
    seed=0,
    precision="fp32",
    gradient_checkpointing=False,
    checkpoint_every=0,
    run_name="test_run",
    resume=False,
)


def dataset_inputs(folder: str, **changes) -> dict:
    """Return the Image Folder Dataset inputs the tests use (64 px, center crop, trigger "sks", class "toy")."""
    inputs = dict(
        folder=folder,
        trigger="sks",
        class_noun="toy",
        caption_template="a photo of {trigger} {class_noun}",
        resolution=64,
        crop="center",
        buckets=False,
        flip=False,
        repeats=1,
        caption_dropout=0.0,
    )
    return {**inputs, **changes}


def train_patch(dataset_folder: str, outputs: dict, **train_inputs):
    """A patch function inserting Image Folder Dataset -> Train LoRA; ``outputs`` gets the train node's handle."""

    def patch(g, model, clip):
        ds = g.node("LoraWorkbenchImageFolder", id="dataset", **dataset_inputs(dataset_folder))
        ckpt = g.lookup_node("ckpt")
        train = g.node(
            "LoraWorkbenchTrain",
            id="train",
            model=model,
            clip=clip,
            vae=ckpt.out(2),
            dataset=ds.out(0),
            **{**TRAIN_DEFAULTS, **train_inputs},
        )
        outputs["train"] = train
        return train.out(0), train.out(1)

    return patch


def build_tiny(family: str):
    """Return a tiny model of ``family`` (``headless.tiny_families``) made as a checkpoint loader hands models out:
    under the executor's inference mode."""
    import torch

    from lora_workbench.headless import tiny_families

    with torch.inference_mode():
        return tiny_families.build(family)


def run_train_node(comfy, tiny, dataset, run_name: str, **settings):
    """Run the Train node on a tiny model as ComfyUI's executor runs a node (under inference mode), resume off.

    Returns:
        ``(MODEL, CLIP, adapter, summary)``.
    """
    import torch

    node = comfy.node_classes["LoraWorkbenchTrain"]
    with torch.inference_mode():
        out = node.execute(
            model=tiny.model,
            clip=tiny.clip,
            vae=tiny.vae,
            dataset=dataset,
            run_name=run_name,
            resume=False,
            **settings,
        )
    model, clip, adapter, _curve, summary = out.result
    return model, clip, adapter, summary
