"""Build step of lazykv: the native helper in ``runtime_shim/native``.

Everything about the package is declared in ``pyproject.toml``; this file only adds the
native code, compiled against the *installed* ExecuTorch's headers and
``libexecutorch.so``: the helper, a small C++ library that switches XNNPACK's weight
cache on (``runtime_shim/weight_cache.py``), and the native runtime (CMake project in
``runtime_shim/native``: ``liblazykv_native.so``, ``lazykv_run``, the C++ tests). The
recipes live in ``runtime_shim/native/build.py``, shared with the first-use fallback.

If the helper cannot be built (no executorch in the build environment, no C++
compiler), the install still succeeds with a warning and lazykv compiles the helper on
first use, or runs with the cache off. Set ``LAZYKV_REQUIRE_NATIVE=1`` to make that an
install error instead (the Makefile does, so CI proves the install-time build).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent
NATIVE_DIR = Path("runtime_shim") / "native"
EXT_NAME = "lazykv.runtime_shim.native._helper"  # only names the build step; see get_ext_filename
REQUIRE = os.environ.get("LAZYKV_REQUIRE_NATIVE", "").strip() not in ("", "0")


def _native_build():
    """``runtime_shim/native/build.py``, loaded by path (the package is not importable yet)."""
    path = HERE / NATIVE_DIR / "build.py"
    spec = importlib.util.spec_from_file_location("_lazykv_native_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


native_build = _native_build()


class BuildNative(build_ext):
    """``build_ext`` that compiles the helper with ``native_build.compile_helper``."""

    def get_ext_filename(self, fullname: str) -> str:
        # distutils asks with the full dotted name and with its last part alone.
        if fullname in (EXT_NAME, EXT_NAME.rpartition(".")[2]):
            # A plain shared library loaded with ctypes, not an importable module.
            return os.path.join(*fullname.split(".")[:-1], native_build.LIBRARY_NAME)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if ext.name != EXT_NAME:
            super().build_extension(ext)
            return
        output = Path(self.get_ext_fullpath(ext.name))
        try:
            executorch = native_build.find_executorch()
            command = native_build.compile_helper(output, executorch)
            # The native runtime (CMake): the C ABI library, lazykv_run, the C++ tests.
            runtime = native_build.build_runtime(
                output.parent, Path(self.build_temp) / "lazykv-native", executorch
            )
        except native_build.NativeBuildError as exc:
            output.unlink(missing_ok=True)  # never ship a stale helper from an earlier build
            for name in native_build.RUNTIME_ARTIFACTS:
                (output.parent / name).unlink(missing_ok=True)
            message = (
                f"lazykv: the native helper and runtime were not built: {exc}. "
                + (
                    "LAZYKV_REQUIRE_NATIVE is set, so the install stops here."
                    if REQUIRE
                    else "lazykv will compile it on first use if a C++ compiler is available "
                    "then, and otherwise run with the weight cache off."
                )
            )
            raise CompileError(message) from exc  # optional: a warning; required: the error
        print(
            f"lazykv: built {output.name} against executorch {executorch.version} "
            f"({executorch.root}): {' '.join(command)}; native runtime: "
            + ", ".join(p.name for p in runtime),
            file=sys.stderr,
        )

    def copy_extensions_to_source(self) -> None:
        """Editable installs: put the helper in the source folder by rename, not in place.

        distutils rewrites the target file in place; a running process that has the
        helper loaded would then see its code change under it (SIGBUS). A rename leaves
        that process its old inode.
        """
        ours = [ext for ext in self.extensions if ext.name == EXT_NAME]
        others = [ext for ext in self.extensions if ext.name != EXT_NAME]
        build_py = self.get_finalized_command("build_py")
        for ext in ours:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if not os.path.exists(regular_file):
                continue  # optional and not built: the warning was given
            pairs = [(regular_file, inplace_file)] + [
                (os.path.join(os.path.dirname(regular_file), name),
                 os.path.join(os.path.dirname(inplace_file), name))
                for name in native_build.RUNTIME_ARTIFACTS
            ]
            for src, dest in pairs:
                if not os.path.exists(src):
                    continue
                tmp = f"{dest}.tmp-{os.getpid()}"
                shutil.copy2(src, tmp)
                os.replace(tmp, dest)
        self.extensions = others
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = others + ours


setup(
    ext_modules=[
        Extension(
            EXT_NAME,
            sources=[str(NATIVE_DIR / "xnnpack_options.cpp")],
            depends=[str(NATIVE_DIR / "build.py"), str(NATIVE_DIR / "CMakeLists.txt")]
            + sorted(str(p.relative_to(HERE)) for sub in ("src", "include", "tools", "tests")
                     for p in (HERE / NATIVE_DIR / sub).rglob("*") if p.is_file()),
            language="c++",
            optional=not REQUIRE,
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
