"""Keep third-party chatter (ExecuTorch/torch warnings and logs) off the user's terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from lazykv.units import format_size


@contextlib.contextmanager
def quiet_third_party(debug: bool = False):
    """Silence Python warnings and INFO logs from torch/executorch while the block runs."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = logging.root.level
        logging.root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.root.setLevel(old)


def silence_import_noise(import_torch: bool = True) -> None:
    """Raise torch/torchao/executorch loggers to ERROR: at import they warn about optional
    CUDA kernels and pytree registrations, nothing about the user's program.

    Importing torch resets its logger, so by default torch is imported first. Commands
    call it at the start of their body (never at import or in the group: ``--help`` must
    not import torch); ``import_torch=False`` only sets the loggers."""
    if import_torch:
        import torch  # noqa: F401  (torch configures its loggers on import)

    for name in ("torch", "torchao", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


fmt_bytes = format_size  # the CLI's name for lazykv.units.format_size


os.environ.setdefault("TORCHINDUCTOR_DISABLE", "1")


#: ExecuTorch log lines that never explain a failure (hardware probes at start-up).
_NOISE = ("cpuinfo_utils.cpp",)


def log_explains(exc: BaseException) -> bool:
    """Whether ExecuTorch's captured log may explain ``exc``: a failure reported by the
    runtime itself (:class:`ProgramRejected`, :class:`ExecutionFailed`) or an unexpected
    exception. lazykv's other refusals are decided in Python before the runtime is
    called, and their message says all there is."""
    from lazykv.errors import ExecutionFailed, LazyKVError, ProgramRejected

    if isinstance(exc, (ProgramRejected, ExecutionFailed)):
        return True
    return not isinstance(exc, (LazyKVError, KeyboardInterrupt))


@contextlib.contextmanager
def native_output_captured(enabled: bool = True, explains=log_explains):
    """Keep ExecuTorch's C++ log lines (cpuinfo probes, "No temp allocator provided",
    written straight to file descriptors 1 and 2) off the terminal while the block runs
    (:class:`lazykv.native_log.NativeLog`).

    Both descriptors go to a temporary file; Python's ``sys.stdout``/``sys.stderr`` keep
    writing to the real ones, so ``--json`` output stays clean. If the block raises an
    exception for which ``explains(exc)`` is true (default :func:`log_explains`), the
    captured log, less start-up noise, is replayed on stderr first, since it may say why.
    """
    import sys

    from lazykv.native_log import NativeLog

    def _on_fd(stream, fd):
        try:
            return stream.fileno() == fd
        except (AttributeError, OSError, ValueError):
            return False

    # Only when Python writes to the real descriptors: under click's CliRunner or
    # pytest's capsys the streams are in-memory and must stay as they are.
    if not enabled or not (_on_fd(sys.stdout, 1) and _on_fd(sys.stderr, 2)):
        yield
        return
    log = NativeLog(fds=(1, 2), passthrough=True)
    try:
        log.__enter__()
    except (OSError, ValueError, AttributeError):
        yield
        return
    replay = False
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:
        replay = explains(e)
        raise
    finally:
        log.__exit__(None, None, None)
        if replay:
            lines = log.text.splitlines()
            text = "\n".join(ln for ln in lines if not any(n in ln for n in _NOISE)).strip()
            if text:
                sys.stderr.write("ExecuTorch's log:\n" + text + "\n")
