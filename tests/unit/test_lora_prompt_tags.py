"""A1111-style <lora:...> tags: parsing, stripping, and errors that quote the tag."""

from __future__ import annotations

import pytest

from lora_workbench.lora.prompt_tags import PromptTag, parse_prompt_tags


@pytest.mark.parametrize(
    ("text", "tags", "cleaned"),
    [
        ("a photo of sks dog <lora:sks_dog:0.8>", [PromptTag("sks_dog", 0.8, 0.8)], "a photo of sks dog"),
        ("<lora:ink:0.8:0.6>, ink style, <lora:detail>", [PromptTag("ink", 0.8, 0.6), PromptTag("detail", 1.0, 1.0)],
         "ink style"),
        ("x <lora:sub/dir/name.safetensors:-0.5> y", [PromptTag("sub/dir/name.safetensors", -0.5, -0.5)], "x y"),
        ("a, <LORA:A:1> , b", [PromptTag("A", 1.0, 1.0)], "a, b"),
        ("<lora:n:unet=0.3:te=0.9>", [PromptTag("n", 0.3, 0.9)], ""),
        ("line one <lora:a:1>\nline  two", [PromptTag("a", 1.0, 1.0)], "line one\nline two"),
        ("no tags here  ", [], "no tags here  "),
    ],
)  # fmt: skip
def test_parse(text, tags, cleaned):
    got, out = parse_prompt_tags(text)
    assert got == tags
    assert out == cleaned


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a <lora:> b", r"'<lora:>' at position 2 has no LoRA name"),
        ("<lora:x:abc>", r"'<lora:x:abc>' at position 0: strength 'abc' is not a number"),
        ("a <lora:x:0.5", r"unclosed LoRA tag '<lora:x:0.5' at position 2"),
        ("<lora:x:0.5 <lora:y:1>", r"unclosed LoRA tag '<lora:x:0.5' at position 0"),
        ("<lora:x:1:2:3>", r"has 3 strengths"),
        ("<lora:x:foo=1>", r"unknown argument 'foo'"),
    ],
)
def test_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt_tags(text)
