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
