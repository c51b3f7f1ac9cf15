"""One exception family for everything lazykv refuses.

``LazyKVError`` is a user-facing problem: the message names what is wrong (buffer,
node, method, file, figure) and the fix. Bugs in lazykv itself are plain
``AssertionError``/``RuntimeError`` and are never raised on user input. The CLI prints
a ``LazyKVError`` without a traceback and exits non-zero.
"""

from __future__ import annotations


class LazyKVError(Exception):
    """Base of every error lazykv raises on purpose. ``str(e)`` is the whole message."""

    #: CLI exit code used when this error ends a command.
    exit_code = 1


class ExportRefused(LazyKVError):
    """An export-time pass refused the program (e.g. a KV buffer that is read in full)."""


class NoMatchingBuffer(ExportRefused):
    """A user-given FQN pattern matched no buffer; the message lists the FQNs seen."""


class DivergentConstant(ExportRefused):
    """The same FQN holds different bytes in two methods."""


class InvalidProgram(LazyKVError):
    """A ``.pte`` file that cannot be read: truncated, corrupt, or not a ``.pte``."""

    exit_code = 2


class ManifestError(InvalidProgram):
    """The lazykv manifest in a ``.pte`` is missing, inconsistent, or from a newer/foreign writer."""


class InvalidInput(LazyKVError):
    """Inputs to a method that the runtime would mis-handle: shape, dtype, range, position."""


class UnknownMethod(InvalidInput):
    """A method name the program does not have; the message lists the ones it has."""


class ContextOverflow(LazyKVError):
    """A call would fill positions past the exported upper bound of a KV buffer."""


class MemoryBudgetExceeded(LazyKVError):
    """Growing KV storage would pass the session's ``max_bytes``."""


class SessionClosed(LazyKVError):
    """A session was used after ``close()``."""


class SessionFileError(LazyKVError):
    """A saved session file is truncated, corrupt, or was made for another program."""


class ProgramRejected(InvalidProgram):
    """The ExecuTorch runtime refused to load a program or one of its methods (e.g. a
    corrupt delegate blob); the message names the file, the method and ExecuTorch's
    error code."""


class UnsupportedVersion(LazyKVError):
    """The installed ExecuTorch or torch is outside the versions lazykv supports (it
    reaches into private APIs that change between releases: :mod:`lazykv._et_compat`)."""


class NativeRuntimeMissing(LazyKVError):
    """lazykv's native runtime (``liblazykv_native.so``, through which every program
    loads) is not built or cannot be loaded; the message names the fix (``make venv``)."""


class ExecutionFailed(LazyKVError):
    """The ExecuTorch runtime reported an error while running a method (a kernel check
    failed); the session is left as it was before the call."""


#: ExecuTorch's ``runtime/core/error.h`` codes (the one table: runtime errors and the
#: native helper's ``set_option``/``get_option`` results).
ET_ERROR_NAMES = {
    0x00: "Ok", 0x01: "Internal", 0x02: "InvalidState", 0x03: "EndOfMethod", 0x04: "AlreadyLoaded",
    0x10: "NotSupported", 0x11: "NotImplemented", 0x12: "InvalidArgument",
    0x13: "InvalidType", 0x14: "OperatorMissing", 0x15: "RegistrationExceedingMaxKernels",
    0x16: "RegistrationAlreadyRegistered", 0x20: "NotFound", 0x21: "MemoryAllocationFailed",
    0x22: "AccessFailed", 0x23: "InvalidProgram", 0x24: "InvalidExternalData",
    0x25: "OutOfResources", 0x30: "DelegateInvalidCompatibility",
    0x31: "DelegateMemoryAllocationFailed", 0x32: "DelegateInvalidHandle",
}


def runtime_error(exc: BaseException, context: str) -> LazyKVError:
    """A :class:`LazyKVError` for a ``RuntimeError`` raised by ExecuTorch's Python runtime.

    ``context`` says what was being done (``"model.pte: loading method 'forward'"``).
    Load failures (``Failed to load ...``) become :class:`ProgramRejected`, anything else
    (``method->execute() failed ...``) :class:`ExecutionFailed`. Use as
    ``raise runtime_error(e, ctx) from None``.
    """
    import re

    text = str(exc)
    m = re.search(r"error:? ?0x:?([0-9a-fA-F]+)", text)
    code = int(m.group(1), 16) if m else None
    return et_failure(code, context, loading="load" in text.lower(), detail=repr(text[:200]))


def et_failure(code: "int | None", context: str, *, loading: bool, detail: str = "") -> LazyKVError:
    """The :class:`LazyKVError` for ExecuTorch's error ``code`` (``runtime/core/error.h``;
    None: unknown, then ``detail`` says what it reported) while loading (``loading``:
    :class:`ProgramRejected`) or running (:class:`ExecutionFailed`) what ``context``
    names (``"model.pte: running method 'forward'"``)."""
    if code:
        what = f"error 0x{code:02x} ({ET_ERROR_NAMES.get(code, 'unknown')})"
    else:
        what = detail or "no error code"
    if loading:
        return ProgramRejected(
            f"{context}: the ExecuTorch runtime refused it, {what}. The file is corrupt, "
            f"needs a backend or operator this runtime lacks, or was exported for another "
            f"runtime version; ExecuTorch's own log lines (stderr) say which"
        )
    return ExecutionFailed(
        f"{context}: the ExecuTorch runtime failed while running it, {what}; a kernel "
        f"rejected its inputs or the program is corrupt. The session is unchanged; "
        f"ExecuTorch's own log lines (stderr) say which"
    )


class AllocationFailed(LazyKVError):
    """Growing a session's KV storage failed: the allocator raised (out of memory) or
    returned storage of the wrong shape, dtype or layout. The session is left as it was."""
