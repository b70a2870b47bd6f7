"""The DRM / rocket userspace ABI as ctypes structures and ioctl request numbers.

Mirrors ``include/uapi/drm/rocket_accel.h`` (Linux >= 6.18) and the two core DRM ioctls the
driver layer needs (``DRM_IOCTL_VERSION``, ``DRM_IOCTL_GEM_CLOSE``) from ``drm.h``. Request
numbers are computed with the ``_IOC`` encoding of ``asm-generic/ioctl.h`` (nr bits 0-7,
type bits 8-15, size bits 16-29, direction bits 30-31), exactly as the C macros do; the tests
compare them with the values the header produces. See docs/npu-reference.md §1.
"""

from __future__ import annotations

import ctypes

# --- asm-generic/ioctl.h -------------------------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= nr < (1 << _IOC_NRBITS):
        raise ValueError(f"ioctl nr {nr:#x} does not fit {_IOC_NRBITS} bits")
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOW(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def ioc_dir(request: int) -> int:
    return (request >> _IOC_DIRSHIFT) & ((1 << _IOC_DIRBITS) - 1)


def ioc_type(request: int) -> int:
    return (request >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def ioc_nr(request: int) -> int:
    return (request >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def ioc_size(request: int) -> int:
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


# --- drm.h ---------------------------------------------------------------------------------
DRM_IOCTL_BASE = ord("d")
DRM_COMMAND_BASE = 0x40


def DRM_IOW(nr: int, struct: type) -> int:
    return _IOW(DRM_IOCTL_BASE, nr, struct)


def DRM_IOWR(nr: int, struct: type) -> int:
    return _IOWR(DRM_IOCTL_BASE, nr, struct)


class drm_version(ctypes.Structure):
    """``struct drm_version``: the driver fills the lengths and copies the strings into the
    caller's buffers (at most ``*_len`` bytes each), then sets ``*_len`` to the full length."""

    _fields_ = [
        ("version_major", ctypes.c_int),
        ("version_minor", ctypes.c_int),
        ("version_patchlevel", ctypes.c_int),
        ("name_len", ctypes.c_size_t),
        ("name", ctypes.c_uint64),  # char __user *
        ("date_len", ctypes.c_size_t),
        ("date", ctypes.c_uint64),
        ("desc_len", ctypes.c_size_t),
        ("desc", ctypes.c_uint64),
    ]


class drm_gem_close(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


DRM_IOCTL_VERSION = DRM_IOWR(0x00, drm_version)
DRM_IOCTL_GEM_CLOSE = DRM_IOW(0x09, drm_gem_close)


# --- rocket_accel.h ------------------------------------------------------------------------
DRM_ROCKET_CREATE_BO = 0x00
DRM_ROCKET_SUBMIT = 0x01
DRM_ROCKET_PREP_BO = 0x02
DRM_ROCKET_FINI_BO = 0x03


class drm_rocket_create_bo(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),  # in
        ("handle", ctypes.c_uint32),  # out
        ("dma_address", ctypes.c_uint64),  # out: NPU IOVA, private to the fd
        ("offset", ctypes.c_uint64),  # out: fake offset for mmap()
    ]


class drm_rocket_prep_bo(ctypes.Structure):
    _fields_ = [
        ("handle", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),  # must be 0
        ("timeout_ns", ctypes.c_int64),  # ABSOLUTE CLOCK_MONOTONIC deadline
    ]


class drm_rocket_fini_bo(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class drm_rocket_task(ctypes.Structure):
    _fields_ = [
        ("regcmd", ctypes.c_uint32),  # IOVA of the register-command buffer
        ("regcmd_count", ctypes.c_uint32),  # number of 64-bit words
    ]


class drm_rocket_job(ctypes.Structure):
    _fields_ = [
        ("tasks", ctypes.c_uint64),  # user pointer to drm_rocket_task[task_count]
        ("in_bo_handles", ctypes.c_uint64),  # user pointer to u32[in_bo_handle_count]
        ("out_bo_handles", ctypes.c_uint64),  # user pointer to u32[out_bo_handle_count]
        ("task_count", ctypes.c_uint32),
        ("task_struct_size", ctypes.c_uint32),
        ("in_bo_handle_count", ctypes.c_uint32),
        ("out_bo_handle_count", ctypes.c_uint32),
    ]


class drm_rocket_submit(ctypes.Structure):
    _fields_ = [
        ("jobs", ctypes.c_uint64),  # user pointer to drm_rocket_job[job_count]
        ("job_count", ctypes.c_uint32),
        ("job_struct_size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint64),  # must be 0
    ]


DRM_IOCTL_ROCKET_CREATE_BO = DRM_IOWR(DRM_COMMAND_BASE + DRM_ROCKET_CREATE_BO, drm_rocket_create_bo)
DRM_IOCTL_ROCKET_SUBMIT = DRM_IOW(DRM_COMMAND_BASE + DRM_ROCKET_SUBMIT, drm_rocket_submit)
DRM_IOCTL_ROCKET_PREP_BO = DRM_IOW(DRM_COMMAND_BASE + DRM_ROCKET_PREP_BO, drm_rocket_prep_bo)
DRM_IOCTL_ROCKET_FINI_BO = DRM_IOW(DRM_COMMAND_BASE + DRM_ROCKET_FINI_BO, drm_rocket_fini_bo)

#: Name the rocket driver reports through DRM_IOCTL_VERSION.
DRIVER_NAME = "rocket"

REQUEST_NAMES = {
    DRM_IOCTL_VERSION: "DRM_IOCTL_VERSION",
    DRM_IOCTL_GEM_CLOSE: "DRM_IOCTL_GEM_CLOSE",
    DRM_IOCTL_ROCKET_CREATE_BO: "DRM_IOCTL_ROCKET_CREATE_BO",
    DRM_IOCTL_ROCKET_SUBMIT: "DRM_IOCTL_ROCKET_SUBMIT",
    DRM_IOCTL_ROCKET_PREP_BO: "DRM_IOCTL_ROCKET_PREP_BO",
    DRM_IOCTL_ROCKET_FINI_BO: "DRM_IOCTL_ROCKET_FINI_BO",
}
