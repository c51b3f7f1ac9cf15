"""Keep third-party chatter (ExecuTorch/torch warnings and logs) off the user's terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings


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

    Importing torch resets its logger, so by default torch is imported first.
    ``import_torch=False`` is for commands that may never need torch (2 s to import); one
    that imports it later calls this again first."""
    if import_torch:
        import torch  # noqa: F401  (torch configures its loggers on import)

    for name in ("torch", "torchao", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fmt_bytes(n) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


os.environ.setdefault("TORCHINDUCTOR_DISABLE", "1")


@contextlib.contextmanager
def native_output_captured(enabled: bool = True):
    """Keep ExecuTorch's C++ log lines (cpuinfo probes, "No temp allocator provided",
    written straight to file descriptors 1 and 2) off the terminal while the block runs.

    Both descriptors go to a temporary file; Python's ``sys.stdout``/``sys.stderr`` keep
    writing to the real ones, so ``--json`` output stays clean. If the block raises
    something other than a clean exit, the captured native log is replayed on stderr
    first, since it may say why.
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
    failed = False
    try:
        yield
    except SystemExit:
        raise
    except BaseException:
        failed = True
        raise
    finally:
        log.__exit__(None, None, None)
        if failed and log.text.strip():
            sys.stderr.write("ExecuTorch's log:\n" + log.text.strip() + "\n")
