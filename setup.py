"""Builds the optional C++ extension ``tangent_kernels._C`` from ``csrc/``.

``TANGENT_KERNELS_SKIP_EXT=1`` skips it; the package then runs on its Triton and reference
backends and says why the ``cpp`` backend is unavailable when asked for it. Install with
``pip install -e . --no-build-isolation`` once torch is installed, so the build uses that torch.
"""

import glob
import os
import platform
import sys

from setuptools import setup


def native_arch_flags():
    """Compile for the building machine's CPU (the extension is built where it runs, by
    ``pip install -e .``), so ATen's AVX2 vectors serve the kernels; ``TANGENT_KERNELS_NATIVE=0``
    builds for the compiler's default target instead."""
    if os.environ.get("TANGENT_KERNELS_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    return ["-march=native"]


def extension_build():
    """``(ext_modules, cmdclass)`` for the extension, or nothing when it is switched off."""
    if os.environ.get("TANGENT_KERNELS_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        raise SystemExit(
            "building tangent_kernels._C needs torch installed first (then "
            "`pip install -e . --no-build-isolation`), or set TANGENT_KERNELS_SKIP_EXT=1 "
            f"to skip the extension: {error}"
        ) from error

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """Builds the extension, or says what failed and installs the package without it."""

        failed: set = set()

        def build_extensions(self):
            super().build_extensions()
            self.extensions = [e for e in self.extensions if e.name not in self.failed]  # nothing to copy

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001  (any build failure leaves a working package)
                self.failed.add(ext.name)
                print(
                    "\n" + "=" * 78 + "\nWARNING: tangent_kernels._C (the C++ CPU backend) failed to build: "
                    f"{type(error).__name__}: {error}\nIt needs a C++20 compiler (g++ >= 10) with OpenMP and "
                    "torch's headers (pip install torch first, then pip install -e . --no-build-isolation). "
                    "The package works without it: 'auto' uses the reference backend on the CPU and says so.\n"
                    + "=" * 78 + "\n",
                    file=sys.stderr,
                )

    extension = CppExtension(
        "tangent_kernels._C",
        sorted(glob.glob("csrc/*.cpp")),
        # -g0: no debug info (Python's own flags add -g, which doubles the build: 98 s -> 50 s on 2 cores)
        extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp", *native_arch_flags()]},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
