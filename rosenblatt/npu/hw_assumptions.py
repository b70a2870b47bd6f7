"""Every hardware assumption of the NPU path that no source states as a fact, in one place.

Each constant names its status and source (tags of docs/npu-reference.md §0):
``[code]`` read in a driver/Mesa source, ``[empirical]`` a third-party project reports it working
on hardware, ``[inferred]`` derived from consistent evidence, unconfirmed, ``[report]`` a field
report (gregordinary/rocket-userspace, "G") that we design for without having confirmed it.
The regcmd builder, the tiling planner and the simulator all read these names, so changing an
assumption here changes the program the NPU gets and the rule the simulator enforces together.
docs/npu.md lists how ``npu-probe`` on a board confirms or refutes each one.
"""

from __future__ import annotations

# --- Convolution buffer (CBUF) --------------------------------------------------------------
#: [code] Mesa rkt_ml.h, TRM "384KB buffer": 12 banks of 32 KiB per core.
CBUF_BANKS = 12
CBUF_BANK_BYTES = 32 * 1024
#: [code] Mesa rkt_ml.h: a bank is 256 entries of 128 bytes.
CBUF_ENTRY_BYTES = 128
CBUF_ENTRIES_PER_BANK = 256

#: [report] G: "at some (M, K) shapes one extra data bank beyond ceil(M*K/32 KiB) avoided
#: corrupted tail rows". The planner reserves this many spare data banks (the simulator only
#: enforces capacity). Set to 0 once the board shows the tail rows are right without it.
DATA_BANK_MARGIN = 1

#: [code]/[empirical] Mesa rkt_task.c and mtx512 keep a whole kernel (one output channel's
#: weights) within one bank: bytes per kernel <= 32 KiB.
MAX_BYTES_PER_KERNEL = CBUF_BANK_BYTES

#: [code] Mesa rkt_task.c: WEIGHT_REUSE on the tasks after the first of a job, when all tasks of
#: the job use the same weights and those stay resident in the weight banks (same core, in
#: order). The simulator models the resident weights and refuses a reuse it cannot honour.
WEIGHT_REUSE_WITHIN_JOB = True


def cbuf_entries_per_row(width: int, channels: int) -> int:
    """[code] Mesa rkt_task.c estimate of CBUF entries one input row (``width`` pixels of
    ``channels`` int8 channels) occupies. For width 1 it is ceil(channels/128)."""
    c16 = -(-channels // 16)
    rem = c16 % 8
    whole = (c16 // 8) * width
    if rem == 3:
        return whole + width
    return whole + -(-(rem * width) // 8)


def cbuf_data_banks(width: int, height: int, channels: int) -> int:
    """Banks the input cube needs: the larger of Mesa's entry estimate and mtx512's
    byte count (ceil(W*H*C / 32 KiB)); [inferred] that the larger one is safe."""
    by_entries = -(-(cbuf_entries_per_row(width, channels) * height) // CBUF_ENTRIES_PER_BANK)
    by_bytes = -(-(width * height * channels) // CBUF_BANK_BYTES)
    return max(by_entries, by_bytes, 1)


def cbuf_weight_banks(weight_bytes: int) -> int:
    """[empirical] mtx512: weights occupy ceil(bytes / 32 KiB) banks."""
    return max(1, -(-weight_bytes // CBUF_BANK_BYTES))


#: Weight streaming: what of a task's weights must fit its weight banks.
#:
#: * [empirical] mtx512 (vendor driver, kernel 5.10): ``tests/matmul_int8.c`` runs each meson test
#:   shape as ONE task and compares every int32 result (but the last column) exactly; its
#:   generator (``gen_matmul_int8``) only requires the input to fit (data banks <= 11) and
#:   bytes per kernel <= 32 KiB, and gives the weights the rest of the 12 banks. Its meson
#:   tests include int8 544x544x4096 ("max feature data for one task": 10 data banks, 2 weight
#:   banks for 2.2 MB of weights) and int8 1x4096x4096 (1 data bank, 11 weight banks for 16 MB),
#:   fp16 384x384x4096 (9 + 3 banks for 3 MB). So whole weights larger than the weight banks
#:   stream through them. This is the only hardware evidence: those shapes, one task each;
#:   no run probed the boundary below.
#: * [code] Mesa rkt_task.c: when the weights (+1 bank) do not fit, it runs "partial weights"
#:   tasks with 5 weight banks and no WEIGHT_REUSE; WEIGHT_REUSE only when they all fit.
#: * [inferred] the unit that must fit is one kernel group: WEIGHT_KERNEL_GROUP (32) kernels x
#:   bytes per kernel (32*K bytes at int8), the outer block of the weight layout
#:   (docs/npu-reference.md §5.2) and what the 32x32 int8 MAC array (NN_MODE 0,
#:   CONV_CON2.KERNEL_GROUP 0 = one group of 32) computes at a time. In every mtx512 run a group
#:   fit its banks (largest: 1x4096x4096, a 128 KiB group in 11 banks of 352 KiB); whether the
#:   hardware needs one group or two (double buffering) is unknown, hence
#:   ``STREAM_GROUPS_IN_BANKS``. No K split is needed while a group and ROW_ALIGN input rows fit.
#: Weights that do fit whole stay resident (WEIGHT_REUSE possible); streamed weights do not.
#: ``npu-probe`` confirms it with any shape whose whole weights exceed the weight banks (e.g.
#: 64x1536x1536: 2.25 MiB through 8 banks). Set STREAM_WEIGHTS = False to go back to
#: whole-weights-resident tasks if the board refutes it.
STREAM_WEIGHTS = True
#: [inferred] kernel groups the weight banks must hold when the weights stream (see above).
STREAM_GROUPS_IN_BANKS = 1


def cbuf_weight_banks_min(bytes_per_kernel: int, kernels: int) -> int:
    """Fewest weight banks a task of ``kernels`` kernels can run with: its whole weights, or,
    with STREAM_WEIGHTS, STREAM_GROUPS_IN_BANKS kernel groups (the rest streams)."""
    whole = cbuf_weight_banks(bytes_per_kernel * kernels)
    if not STREAM_WEIGHTS:
        return whole
    return min(whole, cbuf_weight_banks(bytes_per_kernel * WEIGHT_KERNEL_GROUP * STREAM_GROUPS_IN_BANKS))


def cbuf_weights_resident(bytes_per_kernel: int, kernels: int, weight_banks: int) -> bool:
    """[code] Mesa rkt_task.c: weights stay in the CBUF (WEIGHT_REUSE is possible) only if
    they fit the weight banks whole."""
    return cbuf_weight_banks(bytes_per_kernel * kernels) <= weight_banks


def cbuf_data_entries(width: int, channels: int) -> int:
    """[code]/[empirical] CBUF_CON1.DATA_ENTRIES: Mesa ceil(W*ceil(C/16)/4), mtx512
    ceil(W*C/64) for int8; equal for C a multiple of 16."""
    return -(-(width * -(-channels // 16)) // 4)


# --- Feature (input) layout in memory -------------------------------------------------------
#: [code] Mesa/mtx512: NC1HWC2 with a 16-byte atom (16 int8 channels).
FEATURE_ATOM_BYTES = 16
#: [empirical] mtx512's int8 matmul test runs M % 4 == 0 (or M == 1 with a negative surface
#: stride); G reports M == 1 broken on rocket. Rows per task and row offsets are multiples of 4.
ROW_ALIGN = 4
#: [empirical] mtx512's tests reach M = 544; FEATURE_GRAINS (10 bits) = rows + 1 must fit.
MAX_ROWS_PER_TASK = 512


def cna_line_stride(width: int) -> int:
    """[inferred] DMA_CON1.LINE_STRIDE for a feature row of ``width`` pixels: 4*W (Mesa, X).
    The hardware reads one row at 4*LINE_STRIDE bytes (the 4x is undocumented)."""
    return 4 * width


def cna_surf_stride(width: int, plane_bytes: int) -> int:
    """[inferred] DMA_CON2.SURF_STRIDE such that one 16-channel plane spans
    ``plane_bytes`` = 16*(SURF_STRIDE + LINE_STRIDE) bytes (holds for every Mesa/X case)."""
    if plane_bytes % FEATURE_ATOM_BYTES:
        raise ValueError("plane size must be a multiple of the 16-byte atom")
    return plane_bytes // FEATURE_ATOM_BYTES - cna_line_stride(width)


def cna_line_bytes(line_stride: int) -> int:
    """[inferred] inverse of :func:`cna_line_stride` used by the simulator."""
    return 4 * line_stride


def cna_plane_bytes(line_stride: int, surf_stride: int) -> int:
    """[inferred] inverse of :func:`cna_surf_stride` used by the simulator (SURF_STRIDE is a
    28-bit two's-complement value)."""
    return FEATURE_ATOM_BYTES * (surf_stride + line_stride)


def feature_grains(rows: int) -> int:
    """[empirical] CONV_CON2.FEATURE_GRAINS: rows + 1 (mtx512 int8/fp16 matmul).
    Mesa uses 50 + stride + 1 for convolutions; the TRM text suggests stride_y + kernel_h + 1
    as the minimum. The simulator only requires it to cover kernel_h + stride_y + 1 rows."""
    return rows + 1


# --- Weight layout --------------------------------------------------------------------------
#: [code] Mesa rkt_coefs.c / mtx512 weight_int8: int8 weights in blocks of 32 kernels x 32
#: channels. Mesa compacts a partial last group/chunk, mtx512 always strides by 32: we pad N
#: and K to multiples of 32 so both conventions give the same bytes (the open question whether
#: the hardware compacts never arises). The simulator refuses kernels/channels not multiples
#: of these.
WEIGHT_KERNEL_GROUP = 32
WEIGHT_CHANNEL_CHUNK = 32

# --- Output (DPU write DMA) -----------------------------------------------------------------
#: [empirical] mtx512 int32 output: 4 int32 per 16-byte atom, plane = rows*16 bytes.
OUT_INT32_PER_ATOM = 4
#: [empirical] BS_OW_CFG.SIZE_E_{0,1,2} per output precision (int32 7, fp32 3, int8/fp16 1).
#: The simulator refuses other values for int32 output.
SIZE_E_INT32 = 7
#: [empirical] DPU.SURFACE_ADD field (bits 31:4) = DST_SURF_STRIDE/16 * (32 kernels / channels
#: per atom); 8 for int32 output (mtx512 surf_add = dst_surf_stride * 8).
SURFACE_ADD_FACTOR_INT32 = 8

# --- Task program ---------------------------------------------------------------------------
#: [code] Mesa rkt_ml.c uses 0x1D (CNA, CORE, DPU, DPU_RDMA) and programs the DPU_RDMA block;
#: [report] G says a bias-less GEMM on mainline times out unless DPU_RDMA is programmed with
#: its reads disabled and enabled in the mask; [empirical] mtx512 (vendor driver) and allbilly
#: (6.18 rocket) ran 0x0D without DPU_RDMA writes. Switch both together.
PROGRAM_DPU_RDMA = True
OP_ENABLE_MASK = 0x1D if PROGRAM_DPU_RDMA else 0x0D

#: [empirical] CORE.MISC_CFG.QD_EN as mtx512's int8 matmul and G set it (1). With
#: BS_OW_CFG.OD_BYPASS = 1 it should not change an int32 result; the simulator refuses
#: OD_BYPASS = 0 (the CPEND/OW path) rather than guess its arithmetic.
CORE_QD_EN = 1

#: [code] Mesa rkt_ml.c aligns each task's regcmd block to 64 bytes (the PC needs 16).
REGCMD_TASK_ALIGN = 64
#: [code] kernel rocket_job.c: PC fetches (regcmd_count + 1) / 2 pairs of words; we keep the
#: count even (zero-word padding) so the PC never fetches a word past the program.
REGCMD_EVEN_COUNT = True

# --- The jobs of one SUBMIT: order and synchronisation -----------------------------------------
#: How the jobs of one fd (one SUBMIT, and successive SUBMITs) are ordered:
#:
#: * [code] kernel rocket_job.c ``rocket_ioctl_submit``: the jobs of a SUBMIT are pushed one by
#:   one, in array order, onto the fd's one drm_sched entity (``rocket_job_open``: one entity
#:   per file, its scheduler list all the cores); ``rocket_job_init``: each core's scheduler has
#:   ``credit_limit = 1`` (one job at a time per core).
#: * [code] drm_sched (sched_entity.c, sched_fence.c): an entity is a FIFO; its jobs' finished
#:   fences share the entity's fence context with increasing seqnos, and fences of one context
#:   signal in order (the dma_fence contract ``dma_resv_add_fence`` relies on to keep only the
#:   latest fence of a context); the entity moves to another core only when its queue is empty
#:   and its last job has finished (``drm_sched_entity_select_rq``).
#: * [inferred] hence one fd's jobs run one at a time in submit order, within a SUBMIT and
#:   across SUBMITs, and once a job's fence has signalled every earlier job of the fd is done.
#:   Not observed on a board (open question 8 is the multi-fd case).
JOBS_RUN_IN_SUBMIT_ORDER = True
#: [code] rocket_job.c ``rocket_job_push``: each in-BO adds the BO's WRITE fences as
#: dependencies (``drm_sched_job_add_implicit_dependencies(job, bo, false)``), each out-BO all
#: of its fences (``true``), and the job's finished fence is attached to its **out-BOs only**
#: (``DMA_RESV_USAGE_WRITE``). So a job that lists an earlier job's out-BO as an in-BO waits for
#: it (even from another fd), but nothing records that a job *reads* a BO: PREP_BO on a BO the
#: NPU only reads (features, weights, regcmd) returns at once. The CPU may rewrite such a BO only
#: after a PREP_BO has waited on an out-BO of that job or of a later job of the fd; the simulator
#: refuses a FINI_BO that breaks this (``bo-busy``).
IN_BO_FENCES = "write fences only"
#: [code] what the GEMM path relies on for several products in one SUBMIT (``gemm.GemmBatch``):
#: the jobs are independent (each has its own feature and output region); one PREP_BO on the
#: shared output BO waits for the last job's fence, which (by the order above) covers all.
#: Dependent products -- an input computed on the CPU from another product's result -- always
#: need the CPU between them, so they go in separate SUBMITs (``graph.submit_levels``).
BATCH_ONE_OUTPUT_WAIT = True

# --- Timing ---------------------------------------------------------------------------------
#: [code] kernel JOB_TIMEOUT_MS: a job (all of its tasks) that runs longer is reset.
JOB_TIMEOUT_S = 0.5
#: [code] DT assigned-clock-rates (no devfreq in rocket) and [inferred] 1024 int8 MAC/cycle.
NPU_CLOCK_HZ = 200_000_000
MACS_PER_CYCLE = 1024
#: [inferred] planner cost model (only used to choose among legal tilings): fixed cost of a
#: task (IRQ + kick), of a job (scheduler, fences), effective DMA bandwidth in bytes/s and the
#: CPU cost per int32 element of summing K-split partials. Tune from `npu-probe` numbers.
TASK_OVERHEAD_S = 30e-6
JOB_OVERHEAD_S = 50e-6
DMA_BYTES_PER_S = 2.0e9
CPU_SUM_S_PER_ELEMENT = 1.0e-9
#: Budget per job, well under JOB_TIMEOUT_S, at the DT clock: the planner never builds a job
#: whose estimated run time exceeds it.
JOB_TIME_BUDGET_S = 0.1

# --- The board's choice among the disputed settings (``probe --selftest``) --------------------
#: The settings the public sources disagree on (docs/npu-reference.md §10, §11), which the board
#: self-test (``rosenblatt.npu.selftest``) runs in variants, with their built-in values. The values
#: above are these defaults; a board's stored choice (below) may replace them at import.
DISPUTED_SETTINGS = ("PROGRAM_DPU_RDMA", "OP_ENABLE_MASK", "DATA_BANK_MARGIN", "CORE_QD_EN", "STREAM_WEIGHTS",
                     "ROW_ALIGN", "WEIGHT_REUSE_WITHIN_JOB")
DEFAULTS = {_name: globals()[_name] for _name in DISPUTED_SETTINGS}
_SETTING_TYPES = {"PROGRAM_DPU_RDMA": bool, "OP_ENABLE_MASK": int, "DATA_BANK_MARGIN": int, "CORE_QD_EN": int,
                  "STREAM_WEIGHTS": bool, "ROW_ALIGN": int, "WEIGHT_REUSE_WITHIN_JOB": bool}

#: Environment variable: "off" (or "default"/"none") ignores any stored choice; a JSON object
#: (``{"CORE_QD_EN": 0}``) gives the settings directly; anything else is the path of a variant file
#: (default ``$XDG_CACHE_HOME/rosenblatt/npu-variant.json``, i.e. ``~/.cache/...``).
VARIANT_ENV = "ROSENBLATT_NPU_VARIANT"
VARIANT_FILE_NAME = "npu-variant.json"


def cache_dir() -> str:
    """The user's cache directory for rosenblatt ($XDG_CACHE_HOME/rosenblatt or ~/.cache/rosenblatt)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rosenblatt")


def variant_file() -> str | None:
    """Where the board's chosen variant is stored (None when the environment disables it or gives
    the settings inline)."""
    import os

    env = os.environ.get(VARIANT_ENV, "").strip()
    if env.lower() in ("off", "none", "default") or env.startswith("{"):
        return None
    return env or os.path.join(cache_dir(), VARIANT_FILE_NAME)


def board_key() -> str | None:
    """The board's device-tree compatible (first entry, e.g. "radxa,rock-5b"), None off a DT system."""
    for root in ("/proc/device-tree", "/sys/firmware/devicetree/base"):
        try:
            with open(root + "/compatible", "rb") as f:
                first = f.read(4096).split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if first:
            return first
    return None


def check_settings(settings: dict) -> dict:
    """``settings`` restricted to DISPUTED_SETTINGS with the right types (ValueError otherwise)."""
    out = {}
    for name, value in dict(settings).items():
        if name not in _SETTING_TYPES:
            raise ValueError(f"{name!r} is not a disputed NPU setting ({', '.join(DISPUTED_SETTINGS)})")
        typ = _SETTING_TYPES[name]
        if typ is bool and not isinstance(value, bool) or typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} = {value!r} is not a {typ.__name__}")
        out[name] = value
    if out.get("OP_ENABLE_MASK", 0x0D) not in (0x0D, 0x1D) or out.get("ROW_ALIGN", 4) not in (1, 4) \
            or out.get("DATA_BANK_MARGIN", 0) not in (0, 1) or out.get("CORE_QD_EN", 0) not in (0, 1):
        raise ValueError(f"NPU variant settings out of range: {out}")
    return out


def load_board_variant(key: str | None = None) -> tuple[dict, str] | None:
    """(settings, source) of the variant this board's self-test chose, or None: the inline JSON of
    $ROSENBLATT_NPU_VARIANT, else the entry for ``key`` (default: :func:`board_key`) in the variant
    file. Never raises: a bad file or entry is ignored with a warning."""
    import json
    import logging
    import os

    env = os.environ.get(VARIANT_ENV, "").strip()
    try:
        if env.startswith("{"):
            return check_settings(json.loads(env)), f"${VARIANT_ENV}"
        path = variant_file()
        if path is None or not os.path.isfile(path):
            return None
        key = key or board_key()
        if key is None:
            return None
        with open(path, encoding="utf-8") as f:
            entry = json.load(f).get("boards", {}).get(key)
        if not entry:
            return None
        return check_settings(entry["settings"]), f"{path} [{key}]"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logging.getLogger("rosenblatt").warning("ignoring the stored NPU variant: %s", e)
        return None


def apply_settings(settings: dict) -> None:
    """Set the disputed settings (module globals read by the planner, regcmd builder and simulator)."""
    for name, value in check_settings(settings).items():
        globals()[name] = value


def apply_board_variant() -> str | None:
    """Apply the stored choice (see :func:`load_board_variant`); returns its source or None."""
    found = load_board_variant()
    if found is None:
        return None
    apply_settings(found[0])
    return found[1]


#: Where the settings in force came from: None = the built-in defaults above.
APPLIED_VARIANT = apply_board_variant()
