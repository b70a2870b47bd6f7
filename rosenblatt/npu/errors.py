"""Errors of the NPU layer.

Every failure the NPU path can report on purpose is one of these, with a one-line message that
names what went wrong (the ioctl, the BO, the simulator fault). They derive from the package's
:class:`~rosenblatt.errors.RosenblattError` so a caller that catches that sees them too.
"""

from __future__ import annotations

from ..errors import RosenblattError


class NPUError(RosenblattError):
    """Base class of NPU errors."""


class NPUUnavailableError(NPUError):
    """No usable NPU: no ``/dev/accel`` node, or the node is not driven by ``rocket``."""


class NPUDeviceError(NPUError):
    """An ioctl or mmap on the device failed (the message names the call and errno)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class NPUSubmitError(NPUError):
    """A job was refused before it reached the device (userspace validation).

    The kernel's SUBMIT returns 0 even for a job it rejects, so everything the kernel would
    reject is checked here first and reported by this exception instead.
    """


class NPUJobError(NPUError):
    """A submitted job never completed (PREP_BO timed out) or was dropped.

    ``faults`` holds the fault records the transport could name (the simulator's fault log; on
    hardware the kernel only writes "NPU job timed out" to dmesg, so the list may be empty).
    ``code`` is the first fault's code, e.g. ``"iova-unmapped"`` or ``"no-op-enable"``.
    """

    def __init__(self, message: str, faults: list | None = None, errno: int | None = None):
        self.faults = list(faults or [])
        self.errno = errno
        self.code = self.faults[0].code if self.faults else None
        super().__init__(message)


class NPUPlanError(NPUError, ValueError):
    """A GEMM that cannot be tiled for the NPU (bad dtype/shape, or a register field overflow)."""
