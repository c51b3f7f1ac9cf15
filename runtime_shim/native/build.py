"""Compile the lazykv native helper against an installed ExecuTorch (standard library only).

One compile recipe, two callers: ``setup.py`` runs it at install (``build_ext``), and
:mod:`lazykv.runtime_shim.native` runs it on first use when the installed helper is
missing, stale or unloadable. This module therefore imports nothing from lazykv and
nothing outside the standard library: ``setup.py`` loads it by file path.

The helper is a plain shared library with a C ABI (``xnnpack_options.cpp``), loaded with
ctypes; it needs the ExecuTorch wheel's headers (``executorch/include``) and its
``libexecutorch.so`` (``executorch/lib``), and a C++17 compiler.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: The C++ source, shipped next to this file.
SOURCE = Path(__file__).resolve().with_name("xnnpack_options.cpp")

#: File name of the compiled helper, wherever it is built.
LIBRARY_NAME = "liblazykv_xnnpack_options.so"

#: Layout version of the C ABI in ``xnnpack_options.cpp`` (``lazykv_native_abi_version``).
ABI_VERSION = 1

# Flags from DESIGN fact 7: the ones the ExecuTorch wheel itself was built with, so
# that the headers' structs (BackendOption, Span, Error) match libexecutorch.so.
_DEFINES = (
    "-D_GLIBCXX_USE_CXX11_ABI=1",
    "-DC10_USING_CUSTOM_GENERATED_MACROS",
    "-DET_EVENT_TRACER_ENABLED",
)
_CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden")
# From site-packages/lazykv/runtime_shim/native/ to site-packages/executorch/lib (a
# regular, non-editable install). Only a fallback: the loader imports executorch.runtime
# first, and the dynamic loader then reuses the libexecutorch.so already in the process.
_RPATH_RELATIVE = "$ORIGIN/../../../executorch/lib"


class NativeBuildError(Exception):
    """The helper cannot be built here; ``str(e)`` says what is missing and the fix."""


@dataclass(frozen=True)
class ExecuTorchInstall:
    """An installed ``executorch`` package with the files the helper is compiled against."""

    root: Path
    version: str

    @property
    def include_dir(self) -> Path:
        return self.root / "include"

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"


def find_executorch() -> ExecuTorchInstall:
    """Locate the ``executorch`` package importable by this interpreter, without importing it.

    Raises :class:`NativeBuildError` when it is not installed or lacks the headers or
    ``libexecutorch.so`` (a wheel built without them).
    """
    if not sys.platform.startswith("linux"):
        raise NativeBuildError(
            f"the native helper is built for Linux only (this is {sys.platform!r})"
        )
    try:
        spec = importlib.util.find_spec("executorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise NativeBuildError(
            "the 'executorch' package is not importable by "
            f"{sys.executable}; install executorch first (for pip's isolated builds it "
            "must be listed in [build-system] requires, or build with "
            "--no-build-isolation in an environment that has it)"
        )
    seen = []
    for location in spec.submodule_search_locations:
        root = Path(location)
        header = root / "include" / "executorch" / "runtime" / "backend" / "interface.h"
        library = root / "lib" / "libexecutorch.so"
        if header.is_file() and library.is_file():
            return ExecuTorchInstall(root=root.resolve(), version=_executorch_version(root))
        seen.append(str(root))
    raise NativeBuildError(
        "found 'executorch' at "
        + ", ".join(seen)
        + " but not include/executorch/runtime/backend/interface.h and lib/libexecutorch.so "
        "in it; the helper needs an ExecuTorch wheel that ships its C++ headers and "
        "libexecutorch.so (executorch>=1.5 from PyPI does)"
    )


def _executorch_version(root: Path) -> str:
    version_file = root / "version.py"
    if version_file.is_file():
        for line in version_file.read_text(encoding="utf-8").splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("'\"")
    try:
        return importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def find_compiler() -> list[str]:
    """The C++ compiler command: ``$CXX`` if set, else the first of g++, c++, clang++ on PATH."""
    from_env = os.environ.get("CXX", "").strip()
    if from_env:
        argv = shlex.split(from_env)
        if shutil.which(argv[0]) is None:
            raise NativeBuildError(
                f"the C++ compiler {argv[0]!r} named by $CXX is not on PATH; "
                "unset CXX or point it at g++/clang++"
            )
        return argv
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name) is not None:
            return [name]
    raise NativeBuildError(
        "no C++ compiler found (looked for $CXX, g++, c++, clang++ on PATH); "
        "install one, e.g. `apt-get install g++`"
    )


def compile_command(
    output: Path, executorch: ExecuTorchInstall, compiler: list[str]
) -> list[str]:
    """The full compiler command line that builds the helper at ``output``."""
    c10 = executorch.include_dir / "executorch" / "runtime" / "core" / "portable_type" / "c10"
    return [
        *compiler,
        *_CXXFLAGS,
        *_DEFINES,
        f'-DLAZYKV_EXECUTORCH_VERSION="{executorch.version}"',
        f"-I{executorch.include_dir}",
        f"-I{c10}",
        str(SOURCE),
        "-o",
        str(output),
        f"-L{executorch.lib_dir}",
        "-Wl,--no-as-needed",
        "-lexecutorch",
        f"-Wl,-rpath,{_RPATH_RELATIVE}:{executorch.lib_dir}",
    ]


def build_key(executorch: ExecuTorchInstall, compiler: list[str]) -> str:
    """A short digest of everything the compiled file depends on (for cache folders)."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    for part in (executorch.version, str(executorch.root), " ".join(compiler), str(ABI_VERSION)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def compile_helper(
    output: Path,
    executorch: ExecuTorchInstall | None = None,
    compiler: list[str] | None = None,
    timeout: float = 300.0,
) -> list[str]:
    """Compile the helper to ``output`` (atomically: a temporary file, then a rename).

    Returns the command that was run. Raises :class:`NativeBuildError` with the
    compiler's own message when anything is missing or the compile fails.
    """
    if not SOURCE.is_file():
        raise NativeBuildError(f"the helper's source {SOURCE} is missing from this install")
    executorch = executorch or find_executorch()
    compiler = compiler or find_compiler()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    command = compile_command(tmp, executorch, compiler)
    try:
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeBuildError(f"could not run {compiler[0]!r}: {exc}") from exc
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise NativeBuildError(
                f"compiling {SOURCE.name} against executorch {executorch.version} "
                f"({executorch.root}) failed with exit code {done.returncode}:\n{tail}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return command


# -- the native runtime (CMakeLists.txt next to this file) ---------------------------------

#: The CMake project of the native runtime (library, lazykv_run, tests, C ABI).
CMAKE_PROJECT = Path(__file__).resolve().parent
#: What the runtime build puts next to the helper: the C ABI library Python loads, the
#: runner behind the ``lazykv_run`` command, the C++ test executable and the C++ side of
#: ``python -m benchmarks native``.
RUNTIME_ARTIFACTS = ("liblazykv_native.so", "lazykv_run", "lazykv_native_tests", "lazykv_bench")


def find_cmake() -> list[str]:
    """``cmake`` on PATH (Debian's, or the ``cmake`` PyPI package's), else NativeBuildError."""
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake as _cmake  # the PyPI package ships the binary

            candidate = Path(_cmake.CMAKE_BIN_DIR) / "cmake"
            if candidate.is_file():
                return [str(candidate)]
        except ImportError:
            pass
        raise NativeBuildError(
            "cmake is not installed; the native runtime builds with CMake >= 3.19 "
            "(`apt-get install cmake ninja-build` or `pip install cmake ninja`)"
        )
    return [found]


def python_link_flags() -> list[str]:
    """Linker flags of this interpreter's libpython (the host custom-op library needs its
    symbols, DESIGN fact 16), as ``python3-config --ldflags --embed`` gives them."""
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR") or ""
    version = sysconfig.get_config_var("LDVERSION") or sysconfig.get_config_var("VERSION") or ""
    flags = []
    if libdir:
        flags += [f"-L{libdir}", f"-Wl,-rpath,{libdir}"]
    flags += [f"-lpython{version}", "-ldl", "-lm"]
    return flags


def runtime_cmake_args(executorch: ExecuTorchInstall, *, sanitize: bool = False) -> list[str]:
    """The ``-D`` options of a host build against ``executorch``."""
    custom_ops = executorch.root / "extension" / "llm" / "custom_ops" / "libcustom_ops_aot_lib.so"
    args = [
        f"-DCMAKE_PREFIX_PATH={executorch.root}",
        "-DCMAKE_BUILD_TYPE=" + ("RelWithDebInfo" if sanitize else "Release"),
        "-DLAZYKV_BUILD_TOOLS=ON",
        "-DLAZYKV_PYTHON_ABI=ON",
        f"-DLAZYKV_SANITIZE={'ON' if sanitize else 'OFF'}",
        "-DLAZYKV_PYTHON_LINK=" + ";".join(python_link_flags()),
    ]
    if custom_ops.is_file():
        args.append(f"-DLAZYKV_CUSTOM_OPS_LIBRARY={custom_ops}")
    return args


def build_runtime(
    output_dir: Path,
    build_dir: Path,
    executorch: ExecuTorchInstall | None = None,
    *,
    sanitize: bool = False,
    targets: tuple = RUNTIME_ARTIFACTS,
    timeout: float = 900.0,
) -> list[Path]:
    """Configure and build the native runtime in ``build_dir``; copy ``targets`` (default
    :data:`RUNTIME_ARTIFACTS`) into ``output_dir`` (each by rename, so a running process
    keeps its inode). Returns the copied paths. Raises :class:`NativeBuildError` with
    CMake's or the compiler's own message."""
    executorch = executorch or find_executorch()
    cmake = find_cmake()
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        [*cmake, *generator, *runtime_cmake_args(executorch, sanitize=sanitize), "-S", str(CMAKE_PROJECT),
         "-B", str(build_dir)],
        [*cmake, "--build", str(build_dir), "--parallel", str(max(1, min(4, os.cpu_count() or 1))),
         "--target", *[t[3:-3] if t.endswith(".so") else t for t in targets]],
    ]
    for command in steps:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeBuildError(f"could not run {command[0]!r}: {exc}") from exc
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
            raise NativeBuildError(
                f"building the native runtime against executorch {executorch.version} failed "
                f"({' '.join(command[:3])} ... exit code {done.returncode}):\n{tail}"
            )
    copied = []
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in targets:
        src = build_dir / name
        if not src.is_file():
            raise NativeBuildError(f"the native build finished without {name} in {build_dir}")
        dest = output_dir / name
        tmp = output_dir / f".{name}.tmp-{os.getpid()}"
        shutil.copy2(src, tmp)
        os.replace(tmp, dest)
        copied.append(dest)
    return copied
