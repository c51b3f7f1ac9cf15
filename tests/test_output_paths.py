"""Every path lazykv writes: refused up front when it is not a regular file or cannot be
written (one line, exit code 2, before any work), written atomically, and nothing left
behind on failure (issue 17, items 1 and 2).

Root ignores file permissions, so the tests that need an unwritable folder run their
subprocess without CAP_DAC_OVERRIDE when they run as root (dropped from the bounding set
before exec: the child's permissions are then checked like anyone's).
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lazykv.errors import LazyKVError
from lazykv.output_path import OutputPathError, atomic_write, check_output_path, write_bytes

LAZYKV = str(Path(sys.executable).with_name("lazykv"))


def _drop_root_override():
    """A ``preexec_fn`` taking file-permission overrides away from a root child, else None."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: gone from the child after exec

    return drop


@pytest.fixture
def char_device(tmp_path):
    """A character device to write to. As root, a private node (same device as /dev/null)
    in tmp_path: an implementation that replaced its target would otherwise turn the
    machine's /dev/null into a plain file. Others cannot replace /dev/null anyway."""
    if os.geteuid() != 0:
        return Path("/dev/null")
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return node


@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


def _run(args, timeout=120, env=None, **kw):
    t = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})), **kw)
    return r, time.perf_counter() - t


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# -- the helper ----------------------------------------------------------------------------


def test_devices_are_refused(char_device):
    for call in (lambda: check_output_path(char_device, "the .pte (-o)"),
                 lambda: write_bytes(char_device, b"data", "the .pte (-o)")):
        with pytest.raises(OutputPathError, match="character device"):
            call()
        assert stat.S_ISCHR(os.lstat(char_device).st_mode)


def test_fifo_directory_and_symlink_are_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.pte"
    real = tmp_path / "real.pte"
    real.write_bytes(b"keep")
    link.symlink_to(real)
    for path, reason in ((fifo, "FIFO"), (tmp_path, "directory"), (link, "symbolic link")):
        with pytest.raises(OutputPathError, match=reason) as e:
            with atomic_write(path, "x") as f:
                f.write(b"new")
        assert isinstance(e.value, LazyKVError) and e.value.exit_code == 2
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert real.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pte", "pipe", "real.pte"]


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputPathError, match="not a folder"):
        check_output_path(tmp_path / "afile" / "m.png", "the plot (--plot)")


def test_atomic_write_replaces_a_regular_file_and_creates_folders(tmp_path):
    target = tmp_path / "new" / "sub" / "out.bin"
    assert write_bytes(target, b"one") == 3
    write_bytes(target, b"two!")
    assert target.read_bytes() == b"two!"
    assert os.listdir(target.parent) == ["out.bin"]


def test_failure_inside_the_block_leaves_target_and_no_temp_file(tmp_path):
    target = tmp_path / "model.pte"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"partial")
            raise RuntimeError("export failed half-way")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.pte"]


def test_write_error_mid_file_removes_the_temp_file(tmp_path):
    """A write that fails mid-file (here RLIMIT_FSIZE: the same EFBIG/ENOSPC path as a full
    disk) ends in one OutputPathError; the temporary file is gone, the target untouched."""
    target = tmp_path / "big.pte"
    target.write_bytes(b"old")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from lazykv.output_path import OutputPathError, write_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_bytes({str(target)!r}, b"x" * 100_000, "the .pte (-o)")
        except OutputPathError as e:
            print(e)
            sys.exit(e.exit_code)
    """)
    r, _ = _run([sys.executable, "-c", code])
    assert r.returncode == 2, r.stderr
    assert "cannot write the .pte (-o)" in r.stdout and "File too large" in r.stdout
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["big.pte"]


def test_unwritable_folder_is_refused_before_writing(read_only_dir):
    code = textwrap.dedent(f"""
        import sys
        from lazykv.output_path import OutputPathError, check_output_path
        try:
            check_output_path({str(read_only_dir / "m.pte")!r}, "the .pte (-o)")
        except OutputPathError as e:
            print(e)
            sys.exit(e.exit_code)
    """)
    r, _ = _run([sys.executable, "-c", code], preexec_fn=_drop_root_override())
    assert r.returncode == 2, r.stderr
    assert "Permission denied" in r.stdout and str(read_only_dir) in r.stdout
    assert os.listdir(read_only_dir) == []


# -- the commands --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_export_to_a_device_or_fifo_exits_2_and_leaves_it(tmp_path, char_device, kind):
    if kind == "device":
        target = char_device
    else:
        target = tmp_path / "fifo"
        os.mkfifo(target)
    r, seconds = _run([LAZYKV, "export", "--model", "example", "--max-context", "64", "-o", str(target)])
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert str(target) in line and ("device" in line or "FIFO" in line)
    mode = os.lstat(target).st_mode
    assert stat.S_ISCHR(mode) if kind == "device" else stat.S_ISFIFO(mode)
    assert seconds < 15  # refused before any export work


def test_export_into_a_read_only_folder_exits_2_at_once(read_only_dir):
    r, seconds = _run([LAZYKV, "export", "--model", "example", "--max-context", "64",
                       "-o", str(read_only_dir / "m.pte")], preexec_fn=_drop_root_override())
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert str(read_only_dir) in line and "Permission denied" in line
    assert "choose a folder you can write to" in line
    assert seconds < 15 and os.listdir(read_only_dir) == []


def test_generate_plot_path_checked_before_loading(example_lazy, tmp_path):
    (tmp_path / "nodir").write_text("a file")
    r, seconds = _run([LAZYKV, "generate", str(example_lazy[1].path), "--plot",
                       str(tmp_path / "nodir" / "m.png")])
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert "the plot (--plot)" in line and "not a folder" in line
    assert "loaded" not in r.stderr  # nothing was loaded or generated for nothing


def test_generate_with_read_only_cache_still_runs(example_lazy, read_only_dir):
    """Loading keeps only optional metadata in the cache (no copy of the program), so a
    cache folder that cannot be written costs a verification per load, not the load."""
    r, _ = _run([LAZYKV, "generate", str(example_lazy[1].path), "--new-tokens", "2"],
                env={"LAZYKV_CACHE_DIR": str(read_only_dir)}, preexec_fn=_drop_root_override())
    assert r.returncode == 0, r.stderr
    assert "2/2 tokens" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(read_only_dir) == []


def test_check_junit_xml_to_a_directory_fails_before_checking(example_lazy, tmp_path):
    from click.testing import CliRunner

    from lazykv.cli.check_cmd import check

    r = CliRunner().invoke(check, [str(example_lazy[1].path), "--expect-lazy-kv",
                                   "--junit-xml", str(tmp_path)])
    assert r.exit_code == 2
    assert "is a directory" in r.stderr and "FILE" not in r.stdout  # no table: nothing checked


def test_session_save_refuses_devices_and_unwritable_paths(example_lazy, tmp_path, char_device):
    from lazykv.runtime_shim import load

    prog = load(example_lazy[1].path, cache_dir=tmp_path / "cache")
    with prog.session() as s:
        s.run("forward", [torch.tensor([[1, 2, 3]]), torch.tensor([0])])
        with pytest.raises(OutputPathError, match="character device"):
            s.save(char_device)
        (tmp_path / "f").write_text("")
        with pytest.raises(OutputPathError, match="not a folder"):
            s.save(tmp_path / "f" / "chat.kv")
        assert s.save(tmp_path / "chat.kv") > 0
    assert stat.S_ISCHR(os.lstat(char_device).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p != char_device) == ["cache", "chat.kv", "f"]
