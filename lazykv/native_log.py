"""ExecuTorch's native log, captured: the one helper that redirects file descriptors.

ExecuTorch's runtime logs from C++ straight to file descriptors 1 and 2 (CPU probing on
every load, "No temp allocator provided"; the reason for a failure, e.g. ``Missing
operator: [2] foo.out``, which the Python exception leaves out), and its Python bindings
forward C++ logs to Python's ``sys.stdout``/``sys.stderr`` too (pybind11's ostream
redirect), which are not the descriptors under pytest's capture or ``click``'s runner.
:class:`NativeLog` sends both to one temporary file while a block runs:

* ``lazykv check --runs`` keeps the log and quotes the lines that explain a failure
  (``passthrough=False``: everything written to stderr goes to the file);
* the ``lazykv`` command keeps the log off the terminal (``passthrough=True``: Python's
  streams still reach the terminal, only lines that look like ExecuTorch's log,
  ``[file.cpp:123] ...``, go to the file) and replays it if the command fails.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import List, Sequence

#: A line of ExecuTorch's log: ``[file.cpp:123] message``.
_LOG_LINE = re.compile(r"^\[[A-Za-z0-9_./-]+\.(cpp|h|cc|c):\d+\] ")
#: Log lines that explain a failure.
_RELEVANT = re.compile(r"missing|error|fail|not found|invalid|abort|mismatch", re.I)
_STREAMS = {1: "stdout", 2: "stderr"}


def _flush(stream) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _flush_c_stdio() -> None:
    """C++ logs to stdio's stdout, block-buffered when piped: flush it."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass


class _LogFilter:
    """A text stream that drops ExecuTorch log lines into ``log`` (binary) and passes
    everything else through to ``stream``."""

    def __init__(self, stream, log) -> None:
        self._stream = stream
        self._log = log
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if _LOG_LINE.match(line):
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


class NativeLog:
    """Descriptors ``fds`` (and Python's matching streams) into a temporary file for the
    ``with`` block; see the module docstring for ``passthrough``. After the block,
    :attr:`text` is everything captured; inside it, :meth:`new_text` what came since the
    last call."""

    def __init__(self, fds: Sequence[int] = (2,), passthrough: bool = False) -> None:
        self.fds = tuple(fds)
        self.passthrough = passthrough
        self.text = ""
        self._pos = 0

    def __enter__(self) -> "NativeLog":
        for fd in self.fds:
            _flush(getattr(sys, _STREAMS[fd]))
        self._file = tempfile.TemporaryFile()
        self._saved_fds = {fd: os.dup(fd) for fd in self.fds}
        self._saved_streams = {fd: getattr(sys, _STREAMS[fd]) for fd in self.fds}
        for fd in self.fds:
            os.dup2(self._file.fileno(), fd)
        for fd in self.fds:
            if self.passthrough:
                real = os.fdopen(os.dup(self._saved_fds[fd]), "w", buffering=1,
                                 encoding="utf-8", errors="replace")
                stream = _LogFilter(real, self._file)
            else:
                stream = open(self._file.fileno(), "w", encoding="utf-8", errors="replace",
                              buffering=1, closefd=False)
            setattr(sys, _STREAMS[fd], stream)
        return self

    def __exit__(self, *exc) -> None:
        _flush_c_stdio()
        for fd in self.fds:
            stream = getattr(sys, _STREAMS[fd])
            _flush(stream)
            try:
                stream.close()
            except Exception:
                pass
            setattr(sys, _STREAMS[fd], self._saved_streams[fd])
            os.dup2(self._saved_fds[fd], fd)
            os.close(self._saved_fds[fd])
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()

    def new_text(self) -> str:
        """What was written since the last call (inside the block)."""
        for fd in self.fds:
            _flush(getattr(sys, _STREAMS[fd]))
        fd = self._file.fileno()
        end = os.fstat(fd).st_size
        start = self._pos
        self._pos = end
        return os.pread(fd, end - start, start).decode("utf-8", "replace") if end > start else ""

    @staticmethod
    def relevant(text: str, limit: int = 4) -> List[str]:
        """The log lines that explain a failure (errors, missing kernels), last ``limit``."""
        lines = [ln.strip() for ln in text.splitlines()]
        keep = [ln for ln in lines if ln and _RELEVANT.search(ln) and "cpuinfo" not in ln]
        return keep[-limit:]
