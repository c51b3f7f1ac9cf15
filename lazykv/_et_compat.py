"""Every reach into a private ExecuTorch or torch API, in one module, each saying why.

lazykv builds on public APIs where they exist; where they do not, the reach is here and
nowhere else, so a new release breaks one module, loudly. At import this module checks
the installed ``executorch`` and ``torch`` against :data:`SUPPORTED` (from package
metadata: nothing heavy is imported) and raises
:class:`lazykv.errors.UnsupportedVersion` naming the supported range; set
``LAZYKV_ALLOW_UNSUPPORTED_VERSIONS=1`` to try another version anyway.

Each function imports what it reaches for when called: importing this module costs
nothing more than the version check.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from typing import Any, Iterable, Iterator, Tuple

from lazykv.errors import UnsupportedVersion

#: ``package -> (lowest supported, first unsupported)``: the releases whose private APIs
#: this module was written against.
SUPPORTED = {
    "executorch": ((1, 5, 0), (1, 6, 0)),
    "torch": ((2, 13, 0), (2, 14, 0)),
}
ALLOW_ENV = "LAZYKV_ALLOW_UNSUPPORTED_VERSIONS"


def _release(version: str) -> Tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _show(v: Tuple[int, ...]) -> str:
    return ".".join(str(x) for x in v)


def check_versions() -> dict:
    """The installed versions of :data:`SUPPORTED`'s packages; raises
    :class:`UnsupportedVersion` for one outside its range (unless :data:`ALLOW_ENV`)."""
    found = {}
    for package, (low, high) in SUPPORTED.items():
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise UnsupportedVersion(
                f"lazykv needs {package} >= {_show(low)}, < {_show(high)}, and it is not "
                f"installed; pip install lazykv's dependencies (pyproject.toml)"
            ) from None
        found[package] = version
        if not low <= _release(version) < high and os.environ.get(ALLOW_ENV) != "1":
            raise UnsupportedVersion(
                f"lazykv supports {package} >= {_show(low)}, < {_show(high)}; {version} is "
                f"installed. lazykv reaches into private {package} APIs that change between "
                f"releases (lazykv/_et_compat.py): install a supported version, or set "
                f"{ALLOW_ENV}=1 to try this one anyway"
            )
    return found


VERSIONS = check_versions()


# -- torch -------------------------------------------------------------------------------


def aten_schema(name: str, overload: str):
    """The ``torch.FunctionSchema`` of ATen operator ``name.overload``, or None.

    Private: ``torch._C._get_schema`` is the one lookup by (name, overload) string; the
    public route (``torch.ops.aten.<name>.<overload>._schema``) resolves Python
    attributes and fails differently per operator."""
    import torch

    try:
        return torch._C._get_schema(name, overload)
    except Exception:
        return None


def parse_schema(text: str):
    """A ``torch.FunctionSchema`` parsed from ``text``.

    Private: ``torch._C.parse_schema`` is torch's own schema parser; registering the
    operator instead would import ExecuTorch's runtime and custom-op libraries."""
    import torch

    return torch._C.parse_schema(text)


def tree_flatten(tree) -> list:
    """The leaves of a pytree (``torch.utils._pytree.tree_flatten``).

    Private module, but it is how torch itself flattens the arguments of a
    ``__torch_function__`` call; no public equivalent."""
    from torch.utils._pytree import tree_flatten as flatten

    return flatten(tree)[0]


def drop_program_state(ep, targets: Iterable[str], signature) -> None:
    """Remove ``targets`` from an ``ExportedProgram``'s state dict and constants, and give
    it ``signature``.

    Private: ``ExportedProgram`` exposes ``state_dict``/``constants``/``graph_signature``
    read-only; removing an unused buffer has no public API."""
    for target in targets:
        ep._state_dict.pop(target, None)
        ep._constants.pop(target, None)
    ep._graph_signature = signature


# -- ExecuTorch export -------------------------------------------------------------------


def named_data_store(edge_manager):
    """The named-data store an ``EdgeProgramManager`` hands to ``to_executorch``.

    Private: ``EdgeProgramManager`` has no public way to add named data, and this store
    is what ``to_executorch`` serializes into the ``.pte``."""
    return edge_manager._named_data_store


@contextlib.contextmanager
def private_named_data_store(edge_manager) -> Iterator[Any]:
    """For the block, ``edge_manager`` serializes a copy of its named-data store; the
    original is put back after, untouched (a later ``to_executorch`` must not carry
    what the block added). Yields the copy.

    Private: ``_NamedDataStore`` keeps its state in these attributes (ExecuTorch 1.5);
    a shallow copy of the store would share them."""
    original = edge_manager._named_data_store
    store = copy.copy(original)
    for attr in ("buffers", "fingerprint_to_buffer_idx", "buffer_sha256", "key_to_buffer_idx",
                 "pte_data"):
        if hasattr(store, attr):
            setattr(store, attr, copy.copy(getattr(store, attr)))
    if hasattr(store, "external_data"):
        store.external_data = {k: dict(v) for k, v in original.external_data.items()}
    if hasattr(store, "fingerprint_to_buffer_idx"):
        store.fingerprint_to_buffer_idx = {
            k: list(v) for k, v in original.fingerprint_to_buffer_idx.items()
        }
    edge_manager._named_data_store = store
    try:
        yield store
    finally:
        edge_manager._named_data_store = original


def forget_mutable_buffers(memory_planning_pass, fqns: Iterable[str]) -> None:
    """Make ``MemoryPlanningPass.run_multimethod`` forget buffers ``fqns``.

    Private: with ``share_mutable_buffers=True`` the pass records every mutable buffer
    in its ``state`` and puts them all on memory id 2 regardless of dynamism; a lazy
    buffer must stay unplanned, and there is no public way to exclude one."""
    state = getattr(memory_planning_pass, "state", None)
    for attr in ("mutable_buffers", "maybe_mutable_buffers"):
        table = getattr(state, attr, None)
        if isinstance(table, dict):
            for fqn in fqns:
                table.pop(fqn, None)


def prepare_llama_export(llm_config):
    """``LLMEdgeManager`` for ExecuTorch's Llama, built the way ``export_llm`` does.

    Private: ``export_llama_lib._prepare_for_llama_export`` is the one function that
    loads params + checkpoint and applies export_llm's source transforms (custom KV
    cache, custom SDPA); calling it beats re-implementing it."""
    from executorch.examples.models.llama.export_llama_lib import _prepare_for_llama_export

    return _prepare_for_llama_export(llm_config)


@contextlib.contextmanager
def wrapped_prepare_for_llama_export(wrap) -> Iterator[None]:
    """For the block, export_llm's model construction
    (``export_llama_lib._prepare_for_llama_export``) is ``wrap(original)``; restored
    after (blocks nest: an inner ``wrap`` gets the outer's function).

    Private: the one function of export_llm that builds the model and applies its source
    transforms; ``_export_llama`` and the multi-method export both call it through the
    module, so the module attribute is the only hook that keeps export_llm's own code
    path (lazykv.llm_export)."""
    from executorch.examples.models.llama import export_llama_lib

    original = export_llama_lib._prepare_for_llama_export
    export_llama_lib._prepare_for_llama_export = wrap(original)
    try:
        yield
    finally:
        export_llama_lib._prepare_for_llama_export = original


def llama_xnnpack_partitioners(llm_config) -> list:
    """The XNNPACK partitioners ``export_llm`` uses for ``llm_config``.

    Private (``export_llama_lib._get_xnnpack_partitioners``), but it is export_llm's own
    choice of partitioners, which a lazy export must match."""
    from executorch.examples.models.llama.export_llama_lib import _get_xnnpack_partitioners

    return _get_xnnpack_partitioners(llm_config)


def export_with_builder(builder, graph_module):
    """``LLMEdgeManager``'s own ``torch.export`` call (its dynamic shapes, strictness)
    on ``graph_module``.

    Private (``LLMEdgeManager._export``): the public ``export()`` stores one program;
    a prefill/decode pair needs it twice."""
    return builder._export(graph_module)


def builder_edge_config(builder):
    """The ``EdgeCompileConfig`` ``LLMEdgeManager`` lowers with (private
    ``_get_edge_config``), for lowering several methods together."""
    return builder._get_edge_config()


def convert_to_linear_pass():
    """XNNPACK's ``ConvertToLinearPass``, which ``LLMEdgeManager.to_executorch`` runs.

    Private module (``backends.xnnpack._passes``); lazykv calls ``to_executorch`` itself
    and must run the same pass."""
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass

    return ConvertToLinearPass()


# -- ExecuTorch runtime ------------------------------------------------------------------

#: Packages whose ``__init__`` imports ExecuTorch's whole export stack (``torch._dynamo``,
#: torchao...). Parents first: finding ``executorch.exir._serialize`` imports
#: ``executorch.exir``.
_HEAVY_PACKAGES = ("executorch.exir", "executorch.exir._serialize")


def defer_export_stack() -> list:
    """Register ``executorch.exir`` (and ``exir._serialize``) without running their
    ``__init__``, unless something imported them already; returns the names deferred.

    Private (edits ``sys.modules``): ExecuTorch's Python runtime imports
    ``executorch.exir._warnings`` (``portable_lib``), and importing any submodule runs its
    packages' ``__init__``, which imports the whole export stack and torchao (seconds of
    CPU, warnings about CUDA kernels) that running a program never uses. Submodules then
    import normally; the first access to anything else (``from executorch.exir import
    to_edge``) runs the real ``__init__`` in the same module object, so later users see
    the normal package. Called by the runtime shim just before it imports the runtime."""
    return [name for name in _HEAVY_PACKAGES if _defer_package_init(name)]


def _defer_package_init(name: str) -> bool:
    if name in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        if importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")  # a submodule: stay light
        del module.__dict__["__getattr__"]
        spec.loader.exec_module(module)  # the real __init__, in this same module
        return getattr(module, attr)

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    parent_name, _, child = name.rpartition(".")
    parent = sys.modules.get(parent_name)
    if parent is not None:
        setattr(parent, child, module)
    return True


def registered_operator_names() -> set:
    """Names (``namespace::op.overload``) of the kernels registered with the runtime.

    Private (``portable_lib._get_operator_names``), but the one view of the runtime's
    kernel registry from Python (the same list ExecuTorch's own tests read)."""
    from executorch.extension.pybindings import portable_lib

    return set(portable_lib._get_operator_names())
