"""kernel/: the NPU device-tree overlay and the rocket config fragment.

The overlay is compiled with the real device-tree compiler (`dtc -@`), decoded, and checked
fragment by fragment: which mainline labels it targets (its ``__fixups__``), which properties
it sets there, and that it applies with ``fdtoverlay`` onto a base DTB carrying those labels.
The tools come from the Debian package ``device-tree-compiler``; CI installs it, so a missing
tool is a test failure, not a skip.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNEL = REPO / "kernel"
OVERLAY = KERNEL / "rk3588-rock-5-itx-npu.dtso"
README = KERNEL / "README.md"
CONFIG = KERNEL / "rocket.config"

INSTALL_HINT = "install it with: apt-get install -y device-tree-compiler"

CORES = ("rknn_core_0", "rknn_core_1", "rknn_core_2")
MMUS = ("rknn_mmu_0", "rknn_mmu_1", "rknn_mmu_2")
POWER_DOMAIN = "pd_npu"
SUPPLY = "vdd_npu_s0"
EXPECTED_LABELS = {*CORES, *MMUS, POWER_DOMAIN, SUPPLY}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH; the kernel overlay tests need it ({INSTALL_HINT})")
    return path


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------ a minimal FDT reader

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9


def parse_fdt(blob: bytes) -> dict:
    """Flattened device tree → {"props": {name: bytes}, "children": {name: node}} (spec v17)."""
    magic, totalsize, off_struct, off_strings = struct.unpack_from(">4I", blob, 0)
    assert magic == FDT_MAGIC, "not a flattened device tree"
    assert totalsize == len(blob)
    size_strings, size_struct = struct.unpack_from(">2I", blob, 32)
    strings = blob[off_strings:off_strings + size_strings]

    def cstr(buf: bytes, at: int) -> str:
        return buf[at:buf.index(b"\0", at)].decode()

    pos, end = off_struct, off_struct + size_struct
    root: dict | None = None
    stack: list[dict] = []
    while pos < end:
        (tok,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if tok == FDT_BEGIN_NODE:
            name = cstr(blob, pos)
            pos = (pos + len(name) + 1 + 3) & ~3
            node = {"props": {}, "children": {}}
            if stack:
                stack[-1]["children"][name] = node
            else:
                root = node
            stack.append(node)
        elif tok == FDT_END_NODE:
            stack.pop()
        elif tok == FDT_PROP:
            length, nameoff = struct.unpack_from(">2I", blob, pos)
            pos += 8
            stack[-1]["props"][cstr(strings, nameoff)] = blob[pos:pos + length]
            pos = (pos + length + 3) & ~3
        elif tok == FDT_NOP:
            continue
        elif tok == FDT_END:
            break
        else:
            raise AssertionError(f"bad FDT token {tok} at {pos - 4}")
    assert root is not None and not stack
    return root


def strlist(value: bytes) -> list[str]:
    return value.decode().rstrip("\0").split("\0")


def node_at(tree: dict, path: str) -> dict:
    node = tree
    for part in path.strip("/").split("/"):
        node = node["children"][part]
    return node


def u32(value: bytes) -> int:
    assert len(value) == 4, value
    return struct.unpack(">I", value)[0]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dtbo(tmp_path_factory) -> Path:
    dtc = tool("dtc")
    out = tmp_path_factory.mktemp("overlay") / "rk3588-rock-5-itx-npu.dtbo"
    res = run(dtc, "-@", "-I", "dts", "-O", "dtb", "-o", str(out), str(OVERLAY))
    assert res.returncode == 0, f"dtc failed:\n{res.stderr}"
    assert "Warning" not in res.stderr and "ERROR" not in res.stderr, res.stderr
    return out


@pytest.fixture(scope="module")
def overlay(dtbo) -> dict:
    return parse_fdt(dtbo.read_bytes())


@pytest.fixture(scope="module")
def fixups(overlay) -> dict[str, list[str]]:
    return {label: strlist(v) for label, v in overlay["children"]["__fixups__"]["props"].items()}


def target_fragment(fixups: dict[str, list[str]], label: str) -> str:
    """The fragment whose `target` phandle is resolved from `label` (exactly one)."""
    targets = [ref for ref in fixups[label] if ref.endswith(":target:0")]
    assert len(targets) == 1, f"{label} is the target of {len(targets)} fragments: {fixups[label]}"
    return targets[0].split(":")[0].strip("/")


# ------------------------------------------------------------------ the compiled overlay


def test_dtc_decodes_the_overlay(dtbo):
    res = run(tool("dtc"), "-I", "dtb", "-O", "dts", str(dtbo))
    assert res.returncode == 0, res.stderr
    assert "__fixups__" in res.stdout
    assert res.stdout.count('status = "okay";') == len(CORES) + len(MMUS)
    for label in EXPECTED_LABELS:
        assert re.search(rf"^\s*{label} = ", res.stdout, re.M), f"{label} missing from __fixups__"


def test_fixups_are_exactly_the_mainline_labels(fixups):
    assert set(fixups) == EXPECTED_LABELS


def test_overlay_is_label_based_only(overlay):
    """No target-path (paths differ between kernel versions) and no new nodes."""
    fragments = {k: v for k, v in overlay["children"].items() if k.startswith("fragment@")}
    assert len(fragments) == len(CORES) + len(MMUS) + 1
    for name, frag in fragments.items():
        assert "target-path" not in frag["props"], name
        assert u32(frag["props"]["target"]) == 0xFFFFFFFF, f"{name}: target must be an unresolved label"
        assert frag["children"]["__overlay__"]["children"] == {}, f"{name} adds nodes"
    assert set(overlay["children"]) == set(fragments) | {"__fixups__"}


@pytest.mark.parametrize("label", CORES)
def test_each_core_is_enabled_with_its_supplies(overlay, fixups, label):
    frag = target_fragment(fixups, label)
    props = overlay["children"][frag]["children"]["__overlay__"]["props"]
    assert set(props) == {"status", "npu-supply", "sram-supply"}
    assert props["status"] == b"okay\0"
    for supply in ("npu-supply", "sram-supply"):
        assert u32(props[supply]) == 0xFFFFFFFF
        assert f"/{frag}/__overlay__:{supply}:0" in fixups[SUPPLY], f"{label} {supply} is not {SUPPLY}"


@pytest.mark.parametrize("label", MMUS)
def test_each_iommu_is_enabled(overlay, fixups, label):
    frag = target_fragment(fixups, label)
    props = overlay["children"][frag]["children"]["__overlay__"]["props"]
    assert props == {"status": b"okay\0"}


def test_npu_power_domain_gets_the_npu_rail(overlay, fixups):
    frag = target_fragment(fixups, POWER_DOMAIN)
    props = overlay["children"][frag]["children"]["__overlay__"]["props"]
    assert set(props) == {"domain-supply"}
    assert f"/{frag}/__overlay__:domain-supply:0" in fixups[SUPPLY]
    # the supply is only ever a referenced phandle, never a target
    assert not [r for r in fixups[SUPPLY] if r.endswith(":target:0")]
    assert len(fixups[SUPPLY]) == 1 + 2 * len(CORES)


def test_clock_is_left_at_the_dt_default(overlay):
    for name, frag in overlay["children"].items():
        if name.startswith("fragment@"):
            props = frag["children"]["__overlay__"]["props"]
            assert not {"assigned-clocks", "assigned-clock-rates", "clocks"} & set(props), name


# ------------------------------------------------------------------ applying it

# A stand-in for the mainline base DTB: the same labels on nodes at the mainline addresses
# (rk3588-base.dtsi NPU cores/IOMMUs, the NPU power domain, the board's vdd_npu_s0 on I2C1).
STANDIN_BASE = """/dts-v1/;
/ {
	#address-cells = <2>;
	#size-cells = <2>;
	power-management@fd8d8000 {
		reg = <0x0 0xfd8d8000 0x0 0x400>;
		power-controller {
			#power-domain-cells = <1>;
			#address-cells = <1>;
			#size-cells = <0>;
			pd_npu: power-domain@8 {
				reg = <8>;
				#power-domain-cells = <0>;
			};
		};
	};
	i2c@fea90000 {
		reg = <0x0 0xfea90000 0x0 0x1000>;
		#address-cells = <1>;
		#size-cells = <0>;
		vdd_npu_s0: regulator@42 {
			reg = <0x42>;
			regulator-name = "vdd_npu_s0";
			regulator-always-on;
		};
	};
	rknn_core_0: npu@fdab0000 { reg = <0x0 0xfdab0000 0x0 0x1000>; status = "disabled"; };
	rknn_mmu_0: iommu@fdab9000 { reg = <0x0 0xfdab9000 0x0 0x100>; status = "disabled"; };
	rknn_core_1: npu@fdac0000 { reg = <0x0 0xfdac0000 0x0 0x1000>; status = "disabled"; };
	rknn_mmu_1: iommu@fdaca000 { reg = <0x0 0xfdaca000 0x0 0x100>; status = "disabled"; };
	rknn_core_2: npu@fdad0000 { reg = <0x0 0xfdad0000 0x0 0x1000>; status = "disabled"; };
	rknn_mmu_2: iommu@fdada000 { reg = <0x0 0xfdada000 0x0 0x100>; status = "disabled"; };
};
"""
STANDIN_PATHS = {
    "rknn_core_0": "npu@fdab0000", "rknn_mmu_0": "iommu@fdab9000",
    "rknn_core_1": "npu@fdac0000", "rknn_mmu_1": "iommu@fdaca000",
    "rknn_core_2": "npu@fdad0000", "rknn_mmu_2": "iommu@fdada000",
}


def compile_base(tmp_path: Path, with_symbols: bool) -> Path:
    src = tmp_path / "base.dts"
    src.write_text(STANDIN_BASE)
    out = tmp_path / ("base-sym.dtb" if with_symbols else "base-nosym.dtb")
    flags = ["-@"] if with_symbols else []
    res = run(tool("dtc"), *flags, "-I", "dts", "-O", "dtb", "-o", str(out), str(src))
    assert res.returncode == 0 and "Warning" not in res.stderr, res.stderr
    return out


def test_overlay_applies_onto_a_base_with_the_mainline_labels(tmp_path, dtbo):
    base = compile_base(tmp_path, with_symbols=True)
    merged = tmp_path / "merged.dtb"
    res = run(tool("fdtoverlay"), "-i", str(base), "-o", str(merged), str(dtbo))
    assert res.returncode == 0, f"fdtoverlay failed: {res.stderr}"
    before, after = parse_fdt(base.read_bytes()), parse_fdt(merged.read_bytes())

    for label, path in STANDIN_PATHS.items():
        assert node_at(before, path)["props"]["status"] == b"disabled\0"
        assert node_at(after, path)["props"]["status"] == b"okay\0", label

    rail = node_at(after, "i2c@fea90000/regulator@42")["props"]["phandle"]
    assert node_at(after, "power-management@fd8d8000/power-controller/power-domain@8")["props"]["domain-supply"] == rail
    for label in CORES:
        props = node_at(after, STANDIN_PATHS[label])["props"]
        assert props["npu-supply"] == rail and props["sram-supply"] == rail, label

    # cross-check with fdtget, the way README tells users to inspect a DTB
    res = run(tool("fdtget"), "-t", "s", str(merged), "/npu@fdad0000", "status")
    assert res.returncode == 0 and res.stdout.strip() == "okay", res.stderr


def test_overlay_needs_a_base_built_with_symbols(tmp_path, dtbo):
    """Documented in kernel/README.md: without __symbols__ the labels cannot be resolved."""
    base = compile_base(tmp_path, with_symbols=False)
    res = run(tool("fdtoverlay"), "-i", str(base), "-o", str(tmp_path / "x.dtb"), str(dtbo))
    assert res.returncode != 0


def test_overlay_is_idempotent_on_a_base_that_already_enables_the_npu(tmp_path, dtbo):
    """Kernels >= 7.2 enable the NPU in the board DT; applying the overlay there is harmless."""
    base = compile_base(tmp_path, with_symbols=True)
    once, twice = tmp_path / "once.dtb", tmp_path / "twice.dtb"
    assert run(tool("fdtoverlay"), "-i", str(base), "-o", str(once), str(dtbo)).returncode == 0
    assert run(tool("fdtoverlay"), "-i", str(once), "-o", str(twice), str(dtbo)).returncode == 0
    a, b = parse_fdt(once.read_bytes()), parse_fdt(twice.read_bytes())
    for path in STANDIN_PATHS.values():
        assert node_at(a, path)["props"] == node_at(b, path)["props"]


# ------------------------------------------------------------------ documentation


def test_readme_documents_every_label_and_property(overlay, fixups):
    text = README.read_text()
    props = set()
    for name, frag in overlay["children"].items():
        if name.startswith("fragment@"):
            props |= set(frag["children"]["__overlay__"]["props"])
    for word in sorted(set(fixups) | props):
        assert f"`{word}`" in text, f"kernel/README.md does not document `{word}`"
    # and says where they come from
    for source in ("rk3588-base.dtsi", "rk3588-rock-5-itx.dts", "rockchip,rk3588-rknn-core.yaml"):
        assert source in text


# ------------------------------------------------------------------ config fragment

LINE_RE = re.compile(r"^(?:CONFIG_([A-Z0-9_]+)=(y|m|n|\"[^\"]*\"|-?\d+|0x[0-9a-fA-F]+)|# CONFIG_([A-Z0-9_]+) is not set)$")


def read_config() -> dict[str, str]:
    values: dict[str, str] = {}
    for n, line in enumerate(CONFIG.read_text().splitlines(), 1):
        if not line.strip() or (line.startswith("#") and " is not set" not in line):
            continue
        m = LINE_RE.match(line)
        assert m, f"rocket.config line {n} is not Kconfig syntax: {line!r}"
        sym, val = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), "n")
        assert sym not in values, f"CONFIG_{sym} set twice"
        values[sym] = val
    return values


def test_config_fragment_builds_rocket_as_a_module_with_its_dependencies():
    cfg = read_config()
    assert cfg["DRM_ACCEL_ROCKET"] == "m"
    # drivers/accel/rocket/Kconfig: depends on DRM_ACCEL, (ARCH_ROCKCHIP && ARM64), ROCKCHIP_IOMMU
    for sym in ("DRM_ACCEL", "ARCH_ROCKCHIP", "ROCKCHIP_IOMMU"):
        assert cfg.get(sym) == "y", sym
    # drivers/accel/Kconfig: DRM_ACCEL sits inside "if DRM"
    assert cfg.get("DRM") in ("y", "m")
    # what the DT wiring of the overlay needs: power domains, the RK8602 rail, the SCMI clock
    for sym in ("ROCKCHIP_PM_DOMAINS", "REGULATOR", "REGULATOR_FAN53555", "I2C_RK3X", "COMMON_CLK_SCMI"):
        assert cfg.get(sym) in ("y", "m"), sym
