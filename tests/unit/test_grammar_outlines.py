"""llguidance (what :mod:`rosenblatt.text.grammar` uses) against outlines-core, the library
``scripts/bench-grammar`` compares it with: for one JSON schema both allow the same tokens at
every step of a valid answer where there is a choice (so the benchmark's two masks do the same
work), and where the text is forced llguidance allows one of outlines-core's tokens only."""

from __future__ import annotations

import json

import numpy as np
import outlines_core as oc                      # the test extra brings it

from rosenblatt.text import grammar
from rosenblatt.text.tokenizer import TokenAttr, Tokenizer
from support import smollm2_path

# no free strings: the two libraries' string grammars differ on purpose (\u escapes, C1 controls)
SCHEMA = {"type": "object", "properties": {
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer"},
    "ok": {"type": "boolean"},
    "where": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
              "required": ["zip"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["unit", "days", "ok", "where", "tags"]}
ANSWER = '{"unit":"fahrenheit","days":12,"ok":false,"where":{"zip":"75001"},"tags":["b","a"]}'


def test_llguidance_and_outlines_core_allow_the_same_tokens():
    import llguidance
    from outlines_core.json_schema import build_regex_from_schema
    tok = Tokenizer.from_gguf(smollm2_path())
    attrs = tok.token_attrs()
    pieces: dict[bytes, list[int]] = {}
    for i in range(len(attrs)):
        if not attrs[i] & TokenAttr.CONTROL and (p := tok.token_to_piece(i)):
            pieces.setdefault(p, []).append(i)
    # both without whitespace: llguidance's separators "," and ":", outlines-core's pattern ""
    text = llguidance.LLMatcher.grammar_from_json_schema(
        grammar.closed_objects(SCHEMA), defaults={"whitespace_flexible": False, "item_separator": ",",
                                                  "key_separator": ":"})
    c = grammar.Constraint(tok, text)
    g = oc.Guide(oc.Index(build_regex_from_schema(json.dumps(SCHEMA), ""), oc.Vocabulary(tok.eos_id, pieces)))
    eog = {i for i in range(len(attrs)) if tok.is_eog(i)}
    ids = tok.encode(ANSWER, add_special=False)
    assert len(ids) > 20
    free = 0
    for k, t in enumerate(ids + [tok.eos_id]):
        llg = set(np.flatnonzero(c.allowed()).tolist()) - eog
        out = set(g.get_tokens()) - eog
        where = repr(tok.decode(ids[:k]))
        assert (t in llg or t in eog) and (t in out or t in eog), where
        if llg == out:
            free += len(out) > 1
        else:
            # the text is forced here: llguidance allows one token (its tokenization of the forced
            # text), outlines-core every token that fits the text
            assert len(llg) == 1 and llg < out, where
        c.consume(t)
        if t != tok.eos_id:
            g.advance(t, return_tokens=False)
    assert c.finished and g.is_finished()
    assert free >= 10          # the steps with a choice (enum, digits, booleans, arrays) agree exactly
