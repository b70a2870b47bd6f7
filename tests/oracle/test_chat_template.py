"""Chat templates: renderings must equal transformers' apply_chat_template (fixtures README §5)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import pytest

from rosenblatt.text.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from rosenblatt.errors import RosenblattError
from rosenblatt.gguf.file import read_metadata
from rosenblatt.text.tokenizer import Tokenizer

from support import FIXTURES

FIX = FIXTURES
CASES = json.loads((FIX / "chat-templates" / "chat-templates.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def metadata(name: str) -> dict:
    return read_metadata(FIX / "tokenizer" / f"{name}.vocab.gguf")


@lru_cache(maxsize=None)
def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(metadata(name))


def test_fixture_has_both_templates():
    assert sorted({c["template_name"] for c in CASES}) == ["qwen2.5", "smollm2"]
    assert len(CASES) == 8


@pytest.mark.parametrize("name", ["qwen2.5", "smollm2"])
def test_gguf_template_is_the_jinja_file(name):
    assert metadata(name)["tokenizer.chat_template"] == (FIX / "chat-templates" / f"{name}.jinja").read_text(
        encoding="utf-8")


@pytest.mark.parametrize("case", CASES, ids=[f"{c['template_name']}-{i % 4}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_rendering_matches_transformers(case, with_tokenizer):
    name = case["template_name"]
    tmpl = ChatTemplate.from_metadata(metadata(name), tokenizer(name) if with_tokenizer else None)
    assert not tmpl.is_fallback
    assert tmpl.render(case["messages"]) == case["rendered"]
    assert tmpl.render(case["messages"], add_generation_prompt=True) == case["rendered"]


@pytest.mark.parametrize("name", ["qwen2.5", "smollm2"])
def test_without_generation_prompt(name):
    case = next(c for c in CASES if c["template_name"] == name)
    tmpl = ChatTemplate.from_metadata(metadata(name))
    suffix = "<|im_start|>assistant\n"
    assert case["rendered"].endswith(suffix)
    assert tmpl.render(case["messages"], add_generation_prompt=False) == case["rendered"][:-len(suffix)]


def test_smollm2_prompts_render_and_tokenize_like_the_references():
    # end to end: messages → template → llama.cpp's prompt ids of the real SmolLM2 runs
    refs = json.loads((FIX / "smollm2" / "smollm2-refs.json").read_text(encoding="utf-8"))
    tk = tokenizer("smollm2")
    tmpl = ChatTemplate.from_metadata(metadata("smollm2"), tk)
    chats = [p for p in refs["prompts"] if "messages" in p]
    assert len(chats) == 2
    for p in chats:
        rendered = tmpl.render(p["messages"])
        assert rendered == p["rendered"]
        assert tk.encode(rendered) == p["prompt_ids"]


def test_special_token_variables():
    md = dict(metadata("qwen2.5"))
    md["tokenizer.chat_template"] = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}"
    assert ChatTemplate.from_metadata(md).render([]) == "<|endoftext|>|<|im_end|>|<|endoftext|>|False"
    assert ChatTemplate.from_metadata(md, Tokenizer.from_metadata(md)).render([]) == \
        "<|endoftext|>|<|im_end|>|<|endoftext|>|False"
    md = dict(metadata("smollm2"))
    md["tokenizer.chat_template"] = "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}"
    assert ChatTemplate.from_metadata(md).render([]) == "<|im_start|>|<|im_end|>|<|endoftext|>"


def test_chatml_fallback_without_template():
    md = {k: v for k, v in metadata("smollm2").items() if k != "tokenizer.chat_template"}
    tmpl = ChatTemplate.from_metadata(md)
    assert tmpl.is_fallback and tmpl.source == CHATML_TEMPLATE
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert tmpl.render(msgs) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tmpl.render(msgs, add_generation_prompt=False) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tmpl.end_of_turn == "<|im_end|>"
    assert ChatTemplate(None).is_fallback


def test_stop_strings():
    for name in ("qwen2.5", "smollm2"):
        for tk in (None, tokenizer(name)):
            tmpl = ChatTemplate.from_metadata(metadata(name), tk)
            assert tmpl.end_of_turn == "<|im_end|>"
            assert tmpl.stop_strings == ("<|im_end|>",)
    llama3 = ChatTemplate("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                          "{{ m.content }}<|eot_id|>{% endfor %}", special_tokens={"eos_token": "<|end_of_text|>"})
    assert llama3.end_of_turn == "<|eot_id|>"
    assert llama3.stop_strings == ("<|eot_id|>", "<|end_of_text|>")


def test_tools_are_passed_to_the_template():
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Wetter für <Ort>",
                                             "parameters": {"type": "object", "properties": {}}}}
    tmpl = ChatTemplate.from_metadata(metadata("qwen2.5"))
    out = tmpl.render([{"role": "user", "content": "Hi"}], tools=[tool])
    assert out.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                          "\n\n# Tools\n")
    assert "\n<tools>\n" + json.dumps(tool, ensure_ascii=False) + "\n</tools>" in out
    assert out.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # tools=None (the default) takes the template's no-tools branch
    assert "# Tools" not in tmpl.render([{"role": "user", "content": "Hi"}])


def test_assistant_tool_calls_render_with_transformers_tojson():
    tmpl = ChatTemplate.from_metadata(metadata("qwen2.5"))
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "w", "arguments": {"city": "Zürich", "html": "<b>"}}}]}]
    out = tmpl.render(msgs, add_generation_prompt=False)
    assert out.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "w", "arguments": '
                        '{"city": "Zürich", "html": "<b>"}}\n</tool_call><|im_end|>\n')


def test_tojson_filter_like_transformers():
    t = ChatTemplate("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ y | tojson(sort_keys=true) }}")
    out = t.render([], x={"a": "<é>"}, y={"b": 1, "a": 2})
    assert out == '{"a": "<é>"}|{\n  "a": "<é>"\n}|{"a": 2, "b": 1}'


def test_strftime_now_and_extra_variables():
    t = ChatTemplate("{{ strftime_now('%Y') }}{% if enable_thinking is defined and not enable_thinking %} no-think{% endif %}")
    year = datetime.now().year
    assert t.render([]) in (str(year), str(year + 1))
    assert t.render([], enable_thinking=False).endswith(" no-think")


def test_trim_blocks_lstrip_blocks_and_loop_controls():
    src = ("  {% for m in messages %}\n"
           "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
           "[{% generation %}{{ m.content }}{% endgeneration %}]\n"
           "  {% endfor %}\n")
    out = ChatTemplate(src).render([{"content": c} for c in "abc"])
    assert out == "[a]\n[b]\n"


@pytest.mark.parametrize("source, messages, match", [
    ("{% if %}", [], "syntax error.*line 1"),
    ("{{ raise_exception('Conversation roles must alternate') }}", [], "Conversation roles must alternate"),
    ("{{ messages.append(1) }}", [], "sandbox"),
    ("{{ ''.__class__.__mro__ }}", [], "sandbox"),
    ("{{ messages[0]['content'] }}", [], "UndefinedError"),
    ("{{ messages[0]['content'] + 1 }}", [{"content": "x"}], "TypeError"),
])
def test_template_problems_are_clear_errors(source, messages, match):
    with pytest.raises(ChatTemplateError, match=match) as info:
        ChatTemplate(source).render(messages)
    assert isinstance(info.value, RosenblattError)
    assert "\n" not in str(info.value)


def test_bad_messages():
    tmpl = ChatTemplate.from_metadata(metadata("smollm2"))
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        tmpl.render("hello")
    with pytest.raises(ChatTemplateError, match="message 0"):
        tmpl.render(["hello"])
    with pytest.raises(ChatTemplateError):  # the template needs 'content'
        tmpl.render([{"role": "user"}])


def test_template_from_metadata_must_be_a_string():
    with pytest.raises(ChatTemplateError):
        ChatTemplate.from_metadata({"tokenizer.chat_template": 5})
