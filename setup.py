"""Builds the pushbook._core extension with the project's CMake build (see pyproject.toml)."""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        # A build directory of its own, kept between runs (a second `pip install` rebuilds only
        # what changed; with ccache installed, a fresh one reuses earlier compilations too), and
        # only the library and the module: no tests, examples or benchmarks.
        build = os.path.join(ROOT, "build", f"pip-{sys.implementation.cache_tag}")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        print(f"pushbook: building the C++ core and the module in {build} "
              "(a few minutes the first time on 2 cores; `pip install -v` shows the progress)",
              file=sys.stderr, flush=True)
        subprocess.check_call([
            "cmake", "-S", ROOT, "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release",
            f"-DPUSHBOOK_PYTHON={sys.executable}", "-DPUSHBOOK_BUILD_PYTHON=ON",
            "-DPUSHBOOK_BUILD_TESTS=OFF", "-DPUSHBOOK_BUILD_EXAMPLES=OFF", "-DPUSHBOOK_BUILD_BENCH=OFF",
            "-DPUSHBOOK_INSTALL=OFF"])
        subprocess.check_call(["cmake", "--build", build, "--target", "pushbook_python",
                               "-j", str(os.cpu_count() or 1)])
        built = glob.glob(os.path.join(build, "python", "pushbook", "_core*.so"))
        if not built:
            raise RuntimeError("the CMake build produced no pushbook/_core extension")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(built[0], target)


setup(ext_modules=[CMakeExtension("pushbook._core")], cmdclass={"build_ext": CMakeBuild})
