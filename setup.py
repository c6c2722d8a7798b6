"""Builds the optional C++ extension ``tangent_kernels._C`` from ``csrc/``.

``TANGENT_KERNELS_SKIP_EXT=1`` skips it; the package then runs on its Triton and reference
backends and says why the ``cpp`` backend is unavailable when asked for it. Install with
``pip install -e . --no-build-isolation`` once torch is installed, so the build uses that torch.
"""

import glob
import os
import platform

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
    extension = CppExtension(
        "tangent_kernels._C",
        sorted(glob.glob("csrc/*.cpp")),
        extra_compile_args={"cxx": ["-O3", "-fopenmp", *native_arch_flags()]},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
