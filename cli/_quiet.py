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


class _NativeLogFilter:
    """A text stream that drops ExecuTorch log lines (``[file.cpp:123] ...``) into ``log``
    and passes everything else through."""

    _PATTERN = None

    def __init__(self, stream, log) -> None:
        import re

        if _NativeLogFilter._PATTERN is None:
            _NativeLogFilter._PATTERN = re.compile(r"^\[[A-Za-z0-9_./-]+\.(cpp|h|cc|c):\d+\] ")
        self._stream = stream
        self._log = log
        self._partial = ""

    def write(self, text: str) -> int:
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        for line in lines:
            if self._PATTERN.match(line):
                self._log.write((line + "\n").encode("utf-8", "replace"))
            else:
                self._stream.write(line + "\n")
        if self._partial and not self._partial.startswith("["):
            self._stream.write(self._partial)  # progress bars end lines with \r, not \n
            self._partial = ""
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        if self._partial:
            self._stream.write(self._partial)
            self._partial = ""
        self._stream.close()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass


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
    written straight to file descriptors 1 and 2) off the terminal while the block runs.

    Both descriptors go to a temporary file; Python's ``sys.stdout``/``sys.stderr`` keep
    writing to the real ones, so ``--json`` output stays clean. If the block raises an
    exception for which ``explains(exc)`` is true (default :func:`log_explains`), the
    captured log, less start-up noise, is replayed on stderr first, since it may say why.
    """
    import sys
    import tempfile

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
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
    except (OSError, ValueError, AttributeError):
        yield
        return
    log = tempfile.TemporaryFile()
    old = {1: sys.stdout, 2: sys.stderr}
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    # ExecuTorch's pybindings also forward C++ logs to Python's sys.stdout/sys.stderr
    # (pybind11 ostream redirect), so those are filtered by line, too.
    sys.stdout = _NativeLogFilter(
        os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace"), log)
    sys.stderr = _NativeLogFilter(
        os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace"), log)
    replay = False
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:
        replay = explains(e)
        raise
    finally:
        _flush_c_stdio()  # C++ logs to stdio's stdout, block-buffered when piped
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            try:
                stream.flush()
                stream.close()
            except Exception:
                pass
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        sys.stdout, sys.stderr = old[1], old[2]
        if replay:
            log.seek(0)
            lines = log.read().decode("utf-8", "replace").splitlines()
            text = "\n".join(ln for ln in lines if not any(n in ln for n in _NOISE)).strip()
            if text:
                sys.stderr.write("ExecuTorch's log:\n" + text + "\n")
        log.close()
