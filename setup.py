"""Builds the fused CPU kernel: a plain C shared library (no Python or torch headers used),
compiled by `pip install` and loaded with ctypes by rmsprop.backends.fused_cpu."""

import sys

from setuptools import Extension, setup

# -O3 vectorises the element loops; -fno-math-errno lets sqrt vectorise; -fno-trapping-math lets
# the selects of the fp16/bf16 conversions vectorise (no FP trap handler is ever installed, and
# IEEE results are unchanged); -ffp-contract=off keeps a*b+c unfused so the AVX2 and baseline
# clones round identically. No -ffast-math: NaN and rounding behaviour must stay IEEE.
flags = ["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-pthread"]
ext = Extension(
    "rmsprop._rmsprop_cpu",
    sources=["src/rmsprop/_cpu/rmsprop_cpu.c"],
    extra_compile_args=flags if sys.platform != "win32" else [],
    extra_link_args=["-pthread"] if sys.platform != "win32" else [],
    optional=True,  # a build without a C compiler still installs; the library then falls back to foreach
)
setup(ext_modules=[ext])
