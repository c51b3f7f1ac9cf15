"""Every file lazykv writes: checked up front, written atomically, never anything but a file.

Two calls, used for ``export -o``, ``generate --plot``, ``check --junit-xml``,
``Session.save`` and the disk cache:

- :func:`check_output_path` before any work: the target must be absent or a regular
  file (not a directory, device, FIFO or socket, and not a symbolic link: lazykv follows
  none silently), its folder must exist or be creatable, and a file must be creatable
  in it (probed by creating and removing one). A refusal is one
  :class:`OutputPathError` naming the path, the reason and the fix.
- :func:`atomic_write` to write: a temporary file in the same folder, renamed over the
  target only when complete. On any failure (a full disk, a file size limit, a write
  error, an exception of the caller's) the temporary file is removed and the target is
  left as it was.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator, Optional, Union

from lazykv.errors import LazyKVError

PathLike = Union[str, os.PathLike]


class OutputPathError(LazyKVError, OSError):
    """A path lazykv cannot write to (not a regular file, an unwritable or missing
    folder, a full disk); the message names the path and the fix."""

    exit_code = 2


_KINDS = (
    (stat.S_ISDIR, "is a directory", "give a file name inside it"),
    (stat.S_ISCHR, "is a character device", "give the path of a regular file"),
    (stat.S_ISBLK, "is a block device", "give the path of a regular file"),
    (stat.S_ISFIFO, "is a FIFO (named pipe)", "give the path of a regular file"),
    (stat.S_ISSOCK, "is a socket", "give the path of a regular file"),
)

_FIXES = {
    errno.ENOSPC: "free disk space or write to another folder",
    errno.EDQUOT: "free space in your quota or write to another folder",
    errno.EFBIG: "the file size limit (ulimit -f) was reached; raise it or write less",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
}


def _refuse(what: str, path: Path, reason: str, fix: str, override: Optional[str] = None) -> OutputPathError:
    return OutputPathError(f"cannot write {what} {path}: {reason}; {override or fix}")


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_output_path(path: PathLike, what: str = "output", fix: Optional[str] = None) -> Path:
    """Check that ``path`` can be written as a regular file, before any work; return it
    as a :class:`~pathlib.Path`.

    ``what`` names the file in messages (``"the .pte (-o)"``); ``fix``, if given, replaces
    the suggested fix for a folder that cannot be written. Missing parent folders are
    created. Raises :class:`OutputPathError` when the target exists and is not a regular
    file (a directory, device, FIFO, socket or symbolic link), when a parent is not a
    folder, or when no file can be created in the folder (permissions, read-only file
    system).
    """
    path = Path(os.fspath(path))
    if not path.name or path.name in (".", ".."):
        raise _refuse(what, path, "it names a folder, not a file", "give a file name")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise _refuse(what, path, "a parent in the path is a file, not a folder",
                      "choose a path whose folders are folders") from None
    except OSError as e:
        raise _refuse(what, path, _os_reason(e), _FIXES.get(e.errno, "choose another path")) from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(what, path, f"it is a symbolic link (to {os.readlink(path)})",
                          "lazykv does not write through links: give the link's target "
                          "or remove the link first")
        for test, reason, kind_fix in _KINDS:
            if test(st.st_mode):
                raise _refuse(what, path, f"it {reason}", kind_fix)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise _refuse(what, path, f"{folder} is a file, not a folder",
                      "choose a path whose folders are folders") from None
    except NotADirectoryError:
        raise _refuse(what, path, f"a parent of {folder} is a file, not a folder",
                      "choose a path whose folders are folders") from None
    except OSError as e:
        raise _refuse(what, path, f"cannot create the folder {folder} ({_os_reason(e)})",
                      _FIXES.get(e.errno, "choose another folder"), fix) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise _refuse(what, path, f"no file can be created in {folder} ({_os_reason(e)})",
                      _FIXES.get(e.errno, "choose another folder"), fix) from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_write(path: PathLike, what: str = "output", mode: str = "wb",
                 fix: Optional[str] = None) -> Iterator[IO]:
    """Write ``path`` atomically: yields a file object open on a temporary file in the
    same folder, which replaces ``path`` when the block ends without an exception.

    Checks ``path`` with :func:`check_output_path` first (``what`` and ``fix`` as there).
    The new file gets the mode a plain ``open()`` would give it (or the mode of the file
    it replaces). On any failure the temporary file is removed and ``path`` is untouched;
    an ``OSError`` from writing (full disk, file size limit, ...) becomes an
    :class:`OutputPathError` naming the path and the fix.
    """
    path = check_output_path(path, what, fix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
        try:
            perm = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            perm = 0o666 & ~umask
        os.chmod(tmp, perm)
        st = os.lstat(path) if os.path.lexists(path) else None
        if st is not None and not stat.S_ISREG(st.st_mode):  # changed while we wrote
            check_output_path(path, what, fix)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, LazyKVError) and e.filename in (None, tmp, str(path)):
            raise _refuse(what, path, _os_reason(e), _FIXES.get(e.errno, "choose another path"),
                          None if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else fix) from None
        raise


def write_bytes(path: PathLike, data, what: str = "output", fix: Optional[str] = None) -> int:
    """Write ``data`` (bytes-like) to ``path`` with :func:`atomic_write`; returns its size."""
    with atomic_write(path, what, fix=fix) as f:
        f.write(data)
    return len(memoryview(data))
