"""The kernel transport's plumbing, checked on ordinary file descriptors (no NPU needed)."""

import ctypes
import os
import termios

import numpy as np
import pytest

from rosenblatt.npu import NPUDeviceError, NPUUnavailableError, RocketDevice
from rosenblatt.npu.device import KernelTransport


class winsize(ctypes.Structure):
    _fields_ = [("ws_row", ctypes.c_ushort), ("ws_col", ctypes.c_ushort),
                ("ws_xpixel", ctypes.c_ushort), ("ws_ypixel", ctypes.c_ushort)]


def test_ctypes_struct_goes_through_fcntl_ioctl_both_ways():
    master, slave = os.openpty()
    try:
        t = KernelTransport(os.ttyname(slave))
        try:
            t.ioctl(termios.TIOCSWINSZ, winsize(ws_row=37, ws_col=101))
            out = winsize()
            t.ioctl(termios.TIOCGWINSZ, out)  # the kernel writes into the ctypes struct
            assert (out.ws_row, out.ws_col) == (37, 101)
        finally:
            t.close()
    finally:
        os.close(master)
        os.close(slave)


def test_a_non_drm_node_is_refused_with_the_errno():
    with pytest.raises(NPUDeviceError, match="DRM_IOCTL_VERSION failed: ENOTTY"):
        RocketDevice(KernelTransport("/dev/null"))
    with pytest.raises(NPUUnavailableError, match="/dev/null.*ENOTTY"):
        RocketDevice.open("/dev/null")


def test_mmap_is_shared_and_writable(tmp_path):
    path = tmp_path / "bo"
    path.write_bytes(bytes(8192))
    t = KernelTransport(str(path))
    try:
        m = t.mmap(4096, 4096)
        arr = np.frombuffer(m, dtype=np.uint8)
        arr[:4] = [1, 2, 3, 4]
        del arr
        m.close()
    finally:
        t.close()
    assert path.read_bytes()[4096:4100] == bytes([1, 2, 3, 4])
