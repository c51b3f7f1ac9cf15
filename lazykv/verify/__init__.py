"""Verification of a ``.pte`` before its bytes reach ExecuTorch's C++ runtime.

ExecuTorch's runtime trusts a program's meaning and aborts the process (or reads
through a null pointer) on much of what a corrupt file holds. Two levels, on top of
the format layer (:mod:`lazykv.format`):

* :func:`check_program` (pure Python, no torch): structure (every index resolves, every
  size fits, tensors that are used have memory; :mod:`.structure`), XNNPACK delegate
  blobs (:mod:`.xnnpack`) and the lazykv manifest against the program
  (:mod:`.manifest_check`). ``lazykv inspect`` and ``lazykv check`` run it.
* :func:`verify_pte`: that, plus kernel calls against their operators' schemas
  (:mod:`.kernels`) and shape propagation (:mod:`.shapes`), both with torch and tied to
  the supported ExecuTorch/torch versions. The runtime shim runs it on a program's
  first load, before anything is handed to the runtime; it also returns each method's
  input limits (:mod:`.limits`).

Every refusal is :class:`lazykv.errors.InvalidProgram` (:class:`ManifestError` for the
manifest) naming the file, the method, the value and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Union

from lazykv.format.pte import CORRUPT_ERRORS, PteFile, corrupt, open_pte
from lazykv.manifest import Manifest
from lazykv.verify.limits import MethodLimits, method_limits
from lazykv.verify.manifest_check import check_manifest
from lazykv.verify.structure import DelegateBlobs, check_structure

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, PteFile]


@dataclasses.dataclass(frozen=True)
class Verified:
    """A program that passed :func:`verify_pte`: its manifest (None if lazykv did not
    mark it) and each method's input limits."""

    manifest: Optional[Manifest]
    limits: Dict[str, MethodLimits]


def check_program(pte: PteFile) -> Optional[Manifest]:
    """The torch-free checks (structure, XNNPACK blobs, manifest against the program);
    returns the manifest. Raises :class:`InvalidProgram` naming the file."""
    _run(pte, deep=False)
    return _checked_manifest(pte)


def verify_pte(source: Source) -> Verified:
    """Every check lazykv makes before a program reaches the runtime (see the module
    docstring), on a path, bytes or an opened :class:`PteFile`."""
    if isinstance(source, PteFile):
        return _verify(source)
    with open_pte(source) as pte:
        return _verify(pte)


def validate_pte(source: Source) -> Optional[Manifest]:
    """:func:`verify_pte`, returning just the manifest (None for a program lazykv did
    not mark)."""
    return verify_pte(source).manifest


def _verify(pte: PteFile) -> Verified:
    _run(pte, deep=True)
    manifest = _checked_manifest(pte)
    return Verified(manifest, {p.name: method_limits(p) for p in pte.program.plans})


def _run(pte: PteFile, deep: bool) -> None:
    blobs = DelegateBlobs(pte)
    try:
        check_structure(pte, blobs)
        if deep:
            from lazykv.verify.kernels import check_kernel_calls
            from lazykv.verify.shapes import propagate_shapes

            for plan in pte.program.plans:
                check_kernel_calls(plan)
                propagate_shapes(plan, blobs.io)
    except CORRUPT_ERRORS as e:  # Corrupt, or what corrupt bytes raise inside a check
        raise corrupt(pte.source, e) from None


def _checked_manifest(pte: PteFile) -> Optional[Manifest]:
    manifest = pte.manifest
    if manifest is not None:
        check_manifest(pte.program, manifest, pte.source)
    return manifest


__all__ = ["MethodLimits", "Verified", "check_program", "method_limits", "validate_pte",
           "verify_pte"]
