"""One size parser for every size lazykv reads (issue 17, item 6): SI as SI, IEC as IEC,
bare numbers are bytes, anything else refused; the same answer from every command."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lazykv.units import SizeError, format_size, parse_size


@pytest.mark.parametrize("text, n", [
    ("123", 123), (123, 123), ("7B", 7), ("8,388,608", 8_388_608),
    ("64MB", 64_000_000), ("64mb", 64_000_000), ("64MiB", 64 * 2**20), ("64 mib", 64 * 2**20),
    ("1.5GB", 1_500_000_000), ("0.5KiB", 512), ("10kB", 10_000), ("2TiB", 2 * 2**40),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text, hint", [
    ("64M", "ambiguous: write MiB"), ("64k", "ambiguous"), ("lots", "KiB/MiB/GiB"),
    ("-5", "negative"), ("1.5", "whole number of bytes"), (True, "expected a size"),
    ("64 MBs", "cannot read"), (None, "expected a size"),
])
def test_parse_size_refuses(text, hint):
    with pytest.raises(SizeError, match=hint) as e:
        parse_size(text, "--max-bytes")
    assert "--max-bytes" in str(e.value) and e.value.exit_code == 2


def test_format_size():
    assert [format_size(n) for n in (None, 512, 1536, 64 * 2**20, 3 * 2**30)] == \
        ["-", "512 B", "1.5 KiB", "64.0 MiB", "3.0 GiB"]


def test_generate_and_check_read_sizes_the_same_way():
    """`generate --max-bytes 64MB` and `check --max-planned-bytes 64MB` are both 64,000,000
    bytes, and both refuse `64M` at parse time (before any work)."""
    from lazykv.cli.check_cmd import check
    from lazykv.cli.generate_cmd import generate

    gen = generate.make_context("generate", ["x.pte", "--max-bytes", "64MB"], resilient_parsing=True)
    chk = check.make_context("check", ["x.pte", "--max-planned-bytes", "64MB"], resilient_parsing=True)
    assert gen.params["max_bytes"] == chk.params["max_planned_bytes"] == 64_000_000
    gen = generate.make_context("generate", ["x.pte", "--max-bytes", "64MiB"], resilient_parsing=True)
    assert gen.params["max_bytes"] == 2**26
    for cmd, opt in ((generate, "--max-bytes"), (check, "--max-planned-bytes")):
        r = CliRunner().invoke(cmd, ["/dev/null", opt, "64M"])
        assert r.exit_code == 2 and "ambiguous" in r.output, r.output


def test_policy_byte_parameters_use_the_same_parser():
    from lazykv.runtime_shim.policy import Hybrid, PolicyError, parse_policy

    assert parse_policy("hybrid:linear_after=64MB,increment=1MiB") == Hybrid(
        linear_after=64_000_000, increment=2**20)
    with pytest.raises((PolicyError, SizeError), match="ambiguous"):
        parse_policy("hybrid:increment=32M")


def test_load_accepts_size_strings(example_lazy, tmp_path):
    from lazykv.runtime_shim import load

    prog = load(example_lazy[1].path, max_bytes="64MiB", cache_dir=tmp_path)
    assert prog.max_bytes == 64 * 2**20
    with pytest.raises(SizeError, match="max_bytes"):
        load(example_lazy[1].path, max_bytes="64M", cache_dir=tmp_path)
