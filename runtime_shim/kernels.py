"""Kernel libraries of the installed ExecuTorch that programs' operators need.

The ExecuTorch wheel's Python runtime registers only its portable and optimized ATen
kernels. Programs that ``export_llm`` makes also call operators whose kernels live in
libraries that register themselves when their Python module is imported: the LLM custom
ops (``llama::update_cache``, ``llama::custom_sdpa``, ``llama::custom_quantized_sdpa``...)
and the quantized kernels (``quantized_decomposed::embedding_4bit`` of 4-bit embeddings,
``quantize_per_token`` of a quantized KV cache...). Without them ``load_method`` fails
with ``OperatorMissing`` (DESIGN facts 3 and 12).

:func:`load_kernel_libraries` imports every such library the installed ExecuTorch has
(once per process; a library that cannot be imported is remembered, not fatal), and
:func:`missing_operators` / :func:`missing_kernels_error` name what a program still
lacks and which library would provide it.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Dict, Iterable, List, Optional

from lazykv import _et_compat
from lazykv.errors import ProgramRejected

logger = logging.getLogger(__name__)

#: Operator namespace -> the module of the installed ExecuTorch whose import registers
#: its kernels with the runtime (in the order they are loaded).
KERNEL_LIBRARIES: Dict[str, str] = {
    "llama": "executorch.extension.llm.custom_ops.custom_ops",
    "quantized_decomposed": "executorch.kernels.quantized",
}

_LOCK = threading.Lock()
_LOADED = False
#: Module -> why it could not be imported.
_FAILED: Dict[str, str] = {}


class MissingKernels(ProgramRejected):
    """A program calls operators that no kernel library loaded in this process provides."""


def load_kernel_libraries() -> None:
    """Import every kernel library of :data:`KERNEL_LIBRARIES` (once per process).

    ExecuTorch's ``portable_lib`` is imported first (the libraries register into its
    kernel registry). A library that fails to import is logged and remembered; programs
    that need it get :class:`MissingKernels` naming it.
    """
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _et_compat.defer_export_stack()  # the runtime needs none of exir's export stack
        import executorch.extension.pybindings.portable_lib  # noqa: F401  (first)

        for module in KERNEL_LIBRARIES.values():
            try:
                importlib.import_module(module)
            except Exception as e:  # a wheel built without it: programs using it fail
                _FAILED[module] = f"{type(e).__name__}: {e}"
                logger.warning("kernel library %s unavailable (%s)", module, e)
        _LOADED = True


_RUNTIME = None


def runtime():
    """ExecuTorch's Python runtime (``executorch.runtime.Runtime``) with the kernel
    libraries of :data:`KERNEL_LIBRARIES` registered (DESIGN facts 3 and 12). lazykv's
    C++ engine runs inside it: importing it loads ``libexecutorch.so`` and registers the
    kernels and delegates the engine finds."""
    global _RUNTIME
    if _RUNTIME is None:
        load_kernel_libraries()
        from executorch.runtime import Runtime

        with _LOCK:
            _RUNTIME = Runtime.get()
    return _RUNTIME


def registered_operators() -> set:
    """Names (``namespace::op.overload``) of the kernels registered in this process."""
    return _et_compat.registered_operator_names()


def missing_operators(operators: Iterable[str]) -> List[str]:
    """The operators of ``operators`` (``namespace::op`` or ``namespace::op.overload``)
    that no registered kernel provides, after :func:`load_kernel_libraries`."""
    load_kernel_libraries()
    have = registered_operators()
    bare = {name.split(".", 1)[0] for name in have}
    out = []
    for op in operators:
        if op in have or ("." not in op and op in bare):
            continue
        out.append(op)
    return sorted(set(out))


def program_operators(source) -> List[str]:
    """``namespace::op.overload`` of every operator a ``.pte``'s methods call (``source``:
    its path or its bytes)."""
    from lazykv.format.pte import open_pte

    with open_pte(source) as pte:
        return sorted({o.full_name for plan in pte.program.plans for o in plan.operators})


def missing_kernels_error(
    source, context: str, operators: Optional[Iterable[str]] = None
) -> Optional[MissingKernels]:
    """A :class:`MissingKernels` naming the operators of program ``source`` (its path or
    bytes; or the given ``operators``) that have no kernel here and the library that
    provides each (or that none of the installed ExecuTorch does); None if every
    operator has a kernel."""
    missing = missing_operators(program_operators(source) if operators is None else operators)
    if not missing:
        return None
    parts = []
    for op in missing:
        ns = op.split("::", 1)[0]
        module = KERNEL_LIBRARIES.get(ns)
        if module is None:
            parts.append(f"{op} (no kernel library of the installed ExecuTorch registers "
                         f"the {ns!r} namespace: a runtime built with that library is needed)")
        elif module in _FAILED:
            parts.append(f"{op} (from {module}, which failed to import: {_FAILED[module]})")
        else:
            parts.append(f"{op} (from {module}, which is loaded but does not register it: "
                         f"the installed ExecuTorch is older than the exporter's)")
    return MissingKernels(
        f"{context}: the program calls operators without a kernel in this process: "
        + "; ".join(parts)
        + ". Fix: install the ExecuTorch the program was exported with (its wheel ships "
        "these libraries), or load the library that registers them before loading"
    )
