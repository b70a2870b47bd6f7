"""Hostile inputs end in one clean error: oversized and deeply nested chat templates."""

from __future__ import annotations

import pytest
from gguf import GGUFValueType

from rosenblatt import Engine, ModelFileError
from rosenblatt.text.chat_template import MAX_TEMPLATE_BYTES, MAX_TEMPLATE_DEPTH, ChatTemplate, ChatTemplateError

from support import micro_path, rewrite

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("source, fragment", [
    ("{{ " * 200_000, "bytes, more than"),                               # 600 kB of openings
    ("{{ " * 80_000, "nested more than"),                                # under the size limit
    ("{% if a %}" * 3000 + "x" + "{% endif %}" * 3000, "nested more than"),
    ("{{ " + "(" * 100 + "1" + ")" * 100 + " }}", "nested more than"),
    ("{% for m in messages %}" * (MAX_TEMPLATE_DEPTH + 1), "nested more than"),
    ("x" * (MAX_TEMPLATE_BYTES + 1), "bytes, more than"),
])
def test_pathological_templates_are_one_clean_error(source, fragment):
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(source)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_templates_within_the_limits_still_render():
    depth = MAX_TEMPLATE_DEPTH // 2
    source = "{% if messages %}" * depth + "{{ messages[0]['content'] }}" + "{% endif %}" * depth
    assert ChatTemplate(source).render(HI, add_generation_prompt=False) == "hi"


def test_a_model_with_a_nested_template_loads_and_chat_names_the_field(tmp_path):
    """The model still loads and runs; chat() is one ModelFileError naming the metadata key, never
    a RecursionError traceback (the 200,000-deep template of the hardening report)."""
    p = rewrite(micro_path("qwen2-micro-q8_0"), tmp_path / "deep.gguf",
                meta={"tokenizer.chat_template": (GGUFValueType.STRING, "{{ " * 80_000)})
    e = Engine.load(p, n_ctx=32)
    assert e.generate("hi", max_new_tokens=2, temperature=0)
    with pytest.raises(ModelFileError, match="tokenizer.chat_template.*nested more than") as ei:
        e.chat(HI)
    assert str(p) in str(ei.value)
