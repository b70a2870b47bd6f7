"""The rocket uapi mirror: request numbers and struct layouts equal the C header's."""

import ctypes

import pytest

from rosenblatt.npu import uapi


def test_rocket_request_numbers():
    assert uapi.DRM_IOCTL_ROCKET_CREATE_BO == 0xC0186440
    assert uapi.DRM_IOCTL_ROCKET_SUBMIT == 0x40186441
    assert uapi.DRM_IOCTL_ROCKET_PREP_BO == 0x40106442
    assert uapi.DRM_IOCTL_ROCKET_FINI_BO == 0x40086443


def test_core_drm_request_numbers():
    assert uapi.DRM_IOCTL_GEM_CLOSE == 0x40086409
    assert uapi.DRM_IOCTL_VERSION == 0xC0406400


def test_ioc_helpers_encode_and_decode():
    req = uapi._IOWR(ord("d"), 0x40, uapi.drm_rocket_create_bo)
    assert uapi.ioc_dir(req) == uapi._IOC_READ | uapi._IOC_WRITE
    assert uapi.ioc_type(req) == ord("d")
    assert uapi.ioc_nr(req) == 0x40
    assert uapi.ioc_size(req) == 24
    assert uapi._IO(ord("d"), 1) == 0x6401
    with pytest.raises(ValueError):
        uapi._IOC(uapi._IOC_WRITE, ord("d"), 0x100, 8)
    with pytest.raises(ValueError):
        uapi._IOC(uapi._IOC_WRITE, ord("d"), 1, 1 << 14)


# (field, offset, size) exactly as include/uapi/drm/rocket_accel.h and drm.h lay them out (LP64)
LAYOUTS = {
    uapi.drm_rocket_create_bo: (24, [("size", 0, 4), ("handle", 4, 4), ("dma_address", 8, 8), ("offset", 16, 8)]),
    uapi.drm_rocket_prep_bo: (16, [("handle", 0, 4), ("reserved", 4, 4), ("timeout_ns", 8, 8)]),
    uapi.drm_rocket_fini_bo: (8, [("handle", 0, 4), ("reserved", 4, 4)]),
    uapi.drm_rocket_task: (8, [("regcmd", 0, 4), ("regcmd_count", 4, 4)]),
    uapi.drm_rocket_job: (40, [
        ("tasks", 0, 8), ("in_bo_handles", 8, 8), ("out_bo_handles", 16, 8), ("task_count", 24, 4),
        ("task_struct_size", 28, 4), ("in_bo_handle_count", 32, 4), ("out_bo_handle_count", 36, 4),
    ]),
    uapi.drm_rocket_submit: (24, [("jobs", 0, 8), ("job_count", 8, 4), ("job_struct_size", 12, 4), ("reserved", 16, 8)]),
    uapi.drm_gem_close: (8, [("handle", 0, 4), ("pad", 4, 4)]),
    uapi.drm_version: (64, [
        ("version_major", 0, 4), ("version_minor", 4, 4), ("version_patchlevel", 8, 4), ("name_len", 16, 8),
        ("name", 24, 8), ("date_len", 32, 8), ("date", 40, 8), ("desc_len", 48, 8), ("desc", 56, 8),
    ]),
}


@pytest.mark.parametrize("struct", list(LAYOUTS), ids=lambda s: s.__name__)
def test_struct_layout_matches_header(struct):
    size, fields = LAYOUTS[struct]
    assert ctypes.sizeof(struct) == size
    assert [f[0] for f in struct._fields_] == [f[0] for f in fields]
    for name, offset, fsize in fields:
        desc = getattr(struct, name)
        assert (desc.offset, desc.size) == (offset, fsize), name


def test_signedness_of_fields():
    # timeout_ns is an s64 (a deadline may be compared with negative values); counts are u32
    p = uapi.drm_rocket_prep_bo(timeout_ns=-1)
    assert p.timeout_ns == -1
    t = uapi.drm_rocket_task(regcmd=0xFFFFFFFF)
    assert t.regcmd == 0xFFFFFFFF


def test_request_sizes_match_structs():
    for req, struct in [
        (uapi.DRM_IOCTL_ROCKET_CREATE_BO, uapi.drm_rocket_create_bo),
        (uapi.DRM_IOCTL_ROCKET_SUBMIT, uapi.drm_rocket_submit),
        (uapi.DRM_IOCTL_ROCKET_PREP_BO, uapi.drm_rocket_prep_bo),
        (uapi.DRM_IOCTL_ROCKET_FINI_BO, uapi.drm_rocket_fini_bo),
        (uapi.DRM_IOCTL_GEM_CLOSE, uapi.drm_gem_close),
        (uapi.DRM_IOCTL_VERSION, uapi.drm_version),
    ]:
        assert uapi.ioc_size(req) == ctypes.sizeof(struct)
