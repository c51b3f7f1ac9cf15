"""lazykv's disk cache (issue 17, item 7): one folder, listed, measured, cleared, bounded
by least-recently-used eviction, and off when asked; loading keeps metadata only there
(issue 15)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lazykv import disk_cache

DIGEST_A, DIGEST_B, DIGEST_C = ("a" * 64, "b" * 64, "c" * 64)


def _fake_program(root: Path, digest: str, size: int, age: float) -> None:
    for name, n in ((f"{digest}.v1.bound.pte", size), (f"{digest}.v1.meta.json", 10)):
        p = root / name
        p.write_bytes(b"\0" * n)
        t = time.time() - age
        os.utime(p, (t, t))


def test_one_cache_folder_for_every_writer(monkeypatch, tmp_path):
    from lazykv.export import cache_dir as export_cache_dir
    from lazykv.runtime_shim.native import user_cache_dir

    def default_cache_dir():
        return disk_cache.metadata_dir()  # the folder runtime_shim.load writes to

    monkeypatch.setenv("LAZYKV_CACHE_DIR", "~/somewhere")
    want = Path.home() / "somewhere"
    assert disk_cache.cache_dir() == export_cache_dir() == default_cache_dir() == user_cache_dir() == want
    monkeypatch.delenv("LAZYKV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == user_cache_dir() == tmp_path / "lazykv"


def test_entries_size_and_clear(tmp_path):
    _fake_program(tmp_path, DIGEST_A, 1000, age=30)
    (tmp_path / "checkpoints" / "k1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "k1" / "checkpoint.pth").write_bytes(b"\0" * 500)
    (tmp_path / "hashes").mkdir()
    (tmp_path / "hashes" / "h").write_text("1 2 3 digest")
    kinds = {(e.kind, e.key): e.nbytes for e in disk_cache.entries(tmp_path)}
    assert kinds == {("program", DIGEST_A): 1010, ("checkpoint", "k1"): 500, ("hashes", "hashes"): 12}
    assert disk_cache.total_bytes(tmp_path) == 1522
    assert disk_cache.clear(tmp_path) == (3, 1522)
    assert disk_cache.entries(tmp_path) == [] and os.listdir(tmp_path) == []
    assert disk_cache.entries(tmp_path / "missing") == []


def test_eviction_is_least_recently_used_and_keeps_the_entry_in_use(tmp_path):
    _fake_program(tmp_path, DIGEST_A, 1000, age=300)  # oldest
    _fake_program(tmp_path, DIGEST_B, 1000, age=200)
    _fake_program(tmp_path, DIGEST_C, 1000, age=100)
    disk_cache.touch(tmp_path / f"{DIGEST_A}.v1.bound.pte")  # A used now: B is the oldest
    gone = disk_cache.evict(tmp_path, keep=(DIGEST_C,), cap=2100)
    assert [e.key for e in gone] == [DIGEST_B]
    gone = disk_cache.evict(tmp_path, keep=(DIGEST_C,), cap=0)
    assert [e.key for e in gone] == [DIGEST_A]
    assert {e.key for e in disk_cache.entries(tmp_path)} == {DIGEST_C}


def test_max_bytes_setting(monkeypatch):
    monkeypatch.delenv("LAZYKV_CACHE_MAX_BYTES", raising=False)
    assert disk_cache.max_bytes() == disk_cache.DEFAULT_MAX_BYTES
    for raw, n in (("2GiB", 2 << 30), ("500MB", 500_000_000), ("0", 0), ("off", 0)):
        monkeypatch.setenv("LAZYKV_CACHE_MAX_BYTES", raw)
        assert disk_cache.max_bytes() == n
    monkeypatch.setenv("LAZYKV_CACHE_MAX_BYTES", "lots")
    with pytest.raises(disk_cache.CacheConfigError, match="LAZYKV_CACHE_MAX_BYTES"):
        disk_cache.max_bytes()


def test_loads_keep_metadata_only(example_lazy, llama_tiny_lazy, monkeypatch, tmp_path):
    """Two lazy programs through runtime_shim.load: each leaves one small metadata entry
    (no copy of the program); the second load of a file reads it and verifies nothing."""
    from lazykv.runtime_shim import load

    monkeypatch.setenv("LAZYKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LAZYKV_CACHE_MAX_BYTES", "1GiB")
    first = load(example_lazy[1].path)
    second = load(llama_tiny_lazy[1].path)
    digests = {first.digest, second.digest}  # waits for the threads that store the metadata
    programs = {e.key: e.nbytes for e in disk_cache.entries(tmp_path) if e.kind == "program"}
    assert set(programs) == digests
    assert max(programs.values()) < 64 << 10  # a few KB of JSON each
    assert disk_cache.total_bytes(tmp_path) < 1 << 20
    assert load(llama_tiny_lazy[1].path).cache_hit is True
    with first.session() as s:
        s.run("forward", [torch.tensor([[1, 2]]), torch.tensor([0])])


def test_cache_off_keeps_nothing(example_lazy, monkeypatch, tmp_path):
    from lazykv.runtime_shim import load

    monkeypatch.setenv("LAZYKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LAZYKV_CACHE_MAX_BYTES", "0")
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    prog = load(example_lazy[1].path)
    assert prog.lazy and not (tmp_path / "cache").exists()
    with prog.session() as s:  # the program runs from the original file
        s.run("forward", [torch.tensor([[1, 2, 3]]), torch.tensor([0])])
    left = {n for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before if n.startswith("lazykv-")}
    assert not left


def test_cache_command_lists_sizes_and_clears(monkeypatch, tmp_path):
    from lazykv.cli.cache_cmd import cache

    monkeypatch.setenv("LAZYKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LAZYKV_CACHE_MAX_BYTES", "1GiB")
    _fake_program(tmp_path, DIGEST_A, 2048, age=10)
    r = CliRunner().invoke(cache, [])
    assert r.exit_code == 0, r.output
    assert f"cache folder {tmp_path}; cap 1.0 GiB (LAZYKV_CACHE_MAX_BYTES)" in r.output
    assert "program" in r.output and DIGEST_A in r.output and "total 2.0 KiB (2,058 B) in 1 entries" in r.output
    r = CliRunner().invoke(cache, ["size"])
    assert r.output.startswith("2,058 B (2.0 KiB) in ")
    r = CliRunner().invoke(cache, ["clear"])
    assert r.exit_code == 0 and "removed 1 entries, 2,058 B" in r.output
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("LAZYKV_CACHE_MAX_BYTES", "0")
    assert "off (LAZYKV_CACHE_MAX_BYTES=0" in CliRunner().invoke(cache, ["size"]).output
