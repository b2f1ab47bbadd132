"""Builds fused_segloss's compiled parts with CMake against the *installed* TensorFlow.

Install with `pip install --no-build-isolation .` (add -e for development): an isolated
build environment would download its own TensorFlow, and an op library compiled against
one TensorFlow version does not load in another. So the build runs in the user's
environment, with the build tools of pyproject.toml's [build-system] (a `cmake` on the
PATH is enough for the op library; pybind11 adds the `_core` test module; ninja is
optional). Build options come from the environment:
FUSED_SEGLOSS_CUDA=AUTO|ON|OFF, FUSED_SEGLOSS_NATIVE=ON|OFF, FUSED_SEGLOSS_SANITIZE=ON|OFF,
CMAKE_BUILD_PARALLEL_LEVEL.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake build produces both libraries; each extension just points at it."""

    _built_dirs = set()

    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        if out_dir in self._built_dirs:
            return
        self._built_dirs.add(out_dir)
        build_dir = ROOT / "build" / f"py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DFUSED_SEGLOSS_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        for opt in ("FUSED_SEGLOSS_CUDA", "FUSED_SEGLOSS_NATIVE", "FUSED_SEGLOSS_SANITIZE",
                    "FUSED_SEGLOSS_CUDA_ARCHS"):
            if os.environ.get(opt):
                args.append(f"-D{opt}={os.environ[opt]}")
        if not os.environ.get("CMAKE_CUDA_COMPILER") and Path("/usr/local/cuda/bin/nvcc").exists():
            args.append("-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        if (build_dir / "CMakeCache.txt").exists():
            cache = (build_dir / "CMakeCache.txt").read_text()
            if ("Ninja" in cache) != ("-GNinja" in args):
                (build_dir / "CMakeCache.txt").unlink()
        if shutil.which("cmake") is None:
            raise RuntimeError("fused_segloss needs CMake >= 3.18 to build: `pip install cmake` "
                               "(pyproject.toml's [build-system] lists every build tool)")
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir)
        if getattr(self, "editable_mode", False):
            # setuptools copies the extensions into the source tree; the build record too.
            shutil.copy(out_dir / "_build_info.json", ROOT / "fused_segloss" / "_build_info.json")


    def copy_extensions_to_source(self):
        # Editable installs copy the built libraries into the package. Copy to a temporary
        # name and rename, so a process that has the old library loaded keeps a valid file.
        for ext in self.extensions:
            filename = self.get_ext_filename(self.get_ext_fullname(ext.name))
            built = Path(self.build_lib) / filename  # where build_extension wrote it
            dest = ROOT / filename
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copy2(built, tmp)
            os.replace(tmp, dest)


VERSION = re.search(r'__version__ = "([^"]+)"',
                    (ROOT / "fused_segloss" / "_version.py").read_text()).group(1)

setup(
    name="fused_segloss",
    version=VERSION,
    description="Fused sigmoid cross-entropy + soft Dice loss for segmentation in TensorFlow/Keras",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["fused_segloss", "fused_segloss.*"]),
    package_data={"fused_segloss": ["_build_info.json", "*.so"]},
    ext_modules=[CMakeExtension("fused_segloss._segloss_ops"), CMakeExtension("fused_segloss._core")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    # TensorFlow is not declared here: the build needs it installed already (CMake reads
    # its flags), and a declared `tensorflow` would make pip replace a user's
    # tensorflow-cpu or nightly build. requirements.txt gives the supported range.
    install_requires=["numpy"],
    extras_require={"plot": ["matplotlib"]},
    zip_safe=False,
)
