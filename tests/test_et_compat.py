"""``lazykv._et_compat``: the installed versions are checked at import, by name and range."""

from __future__ import annotations

import importlib.metadata

import pytest

from lazykv import _et_compat
from lazykv.errors import LazyKVError, UnsupportedVersion


def test_installed_versions_are_supported():
    assert set(_et_compat.VERSIONS) == {"executorch", "torch"}
    assert _et_compat.check_versions() == _et_compat.VERSIONS


@pytest.mark.parametrize("package, version", [("executorch", "1.6.0"), ("torch", "2.12.1+cpu")])
def test_unsupported_version_names_the_range(monkeypatch, package, version):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: version if name == package else real(name))
    monkeypatch.delenv(_et_compat.ALLOW_ENV, raising=False)
    with pytest.raises(UnsupportedVersion) as e:
        _et_compat.check_versions()
    low, high = _et_compat.SUPPORTED[package]
    msg = str(e.value)
    assert isinstance(e.value, LazyKVError)
    assert f"{package} >= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}" in msg
    assert version in msg and _et_compat.ALLOW_ENV in msg
    monkeypatch.setenv(_et_compat.ALLOW_ENV, "1")
    assert _et_compat.check_versions()[package] == version
