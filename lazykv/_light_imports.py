"""Import ExecuTorch's program reader without the heavy packages around it.

ExecuTorch has no public, torch-free reader for the program flatbuffer, so
:mod:`lazykv.pte_file` reaches into private modules: ``executorch.exir.schema`` and
``executorch.exir._serialize._flatbuffer_program``. Both are torch-free, but importing a
submodule runs its packages' ``__init__`` first, and those are not:
``executorch/exir/__init__.py`` imports the whole export stack (``torch._dynamo``,
``torch.distributed``...), and ``executorch/exir/_serialize/__init__.py`` imports
``_program``, which imports torch and sympy through ``_named_data_store``. That was
most of a ``lazykv check`` without ``--runs`` (seconds), which needs none of it.

:func:`defer_executorch_package_inits` registers those packages *before* their
``__init__`` runs. Submodules then import normally; the first access to anything else
(``from executorch.exir import to_edge``) runs the real ``__init__`` in the same module
object, so later users see the normal package. Called by commands that read ``.pte``
files (``check`` without ``--runs``, ``inspect``) and by ``lazykv.runtime_shim`` when it
is imported (the shim needs only the torch-free submodules; without this, importing it
pulled in the export stack and torchao: seconds, and warnings about CUDA kernels).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

#: Parents first: finding ``executorch.exir._serialize`` imports ``executorch.exir``.
_HEAVY_PACKAGES = ("executorch.exir", "executorch.exir._serialize")


def defer_executorch_package_inits() -> list:
    """Defer the ``__init__`` of each package in :data:`_HEAVY_PACKAGES` that nothing has
    imported yet. Returns the names it deferred."""
    return [name for name in _HEAVY_PACKAGES if _defer_package_init(name)]


def _defer_package_init(name: str) -> bool:
    """Register package ``name`` without running its ``__init__`` (see the module
    docstring). Done only when nothing has imported it yet. Returns whether it did."""
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
