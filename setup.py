"""Builds the torch-free C kernel library as a plain setuptools Extension (loaded with ctypes)."""
import glob

from setuptools import Extension, setup

kernels = Extension(
    "evalkit._evalkit_kernels",
    sources=sorted(glob.glob("kernels/*.c")),
    include_dirs=["kernels"],
    # Bit-exactness: no FMA contraction, no fast-math, so that every float expression rounds as in
    # ik_llama.cpp's quantizers (quantize_row_*_impl) built with -ffp-contract=off, as the golden data were.
    extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11", "-pthread",
                        "-fvisibility=default"],
    extra_link_args=["-pthread", "-lm"],
)

setup(ext_modules=[kernels])
