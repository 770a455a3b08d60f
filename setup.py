"""Builds the fused CPU kernel: a plain C shared library (no Python or torch headers used),
compiled by `pip install` and loaded with ctypes by rmsprop.backends.fused_cpu.

Without a working C compiler the package still installs (CPU steps then take torch's foreach
path) and the build says so plainly; RMSPROP_REQUIRE_KERNEL=1 makes such a build fail instead.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -O3 vectorises the element loops; -fno-math-errno lets sqrt vectorise; -fno-trapping-math lets
# the selects of the fp16/bf16 conversions vectorise (no FP trap handler is ever installed, and
# IEEE results are unchanged); -ffp-contract=off keeps a*b+c unfused so the AVX2 and baseline
# clones round identically. No -ffast-math: NaN and rounding behaviour must stay IEEE.
# -g0 drops the debug info that Python's own CFLAGS (-g) would add: 7.5 MB -> 1.9 MB. -s (Linux
# only: macOS's ld calls it obsolete) also drops the static symbol table; the exported functions
# live in the dynamic one, which ctypes uses, and stay.
flags = ["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-pthread", "-g0"]
link = ["-pthread"] + (["-s"] if sys.platform.startswith("linux") else [])

NOT_BUILT = """
************************************************************************************************
rmsprop: the fused CPU kernel was NOT built ({reason}).
The package installs and works without it, but CPU optimizer steps then take torch's foreach
path: about 5-6x slower per step on large float32 models (README, "Benchmarks"), and the
first such step warns once. To get the kernel: install a C compiler (gcc or clang) and
reinstall. To make a build without the kernel fail instead: RMSPROP_REQUIRE_KERNEL=1.
************************************************************************************************
"""


def _tell_the_user(message: str) -> None:
    """Print to stderr and, where there is one, to the terminal itself.

    pip runs this build in a subprocess and shows its output (stdout and stderr alike) only with
    `pip -v` or when the build fails; writing to the controlling terminal is the one way a
    successful build can still be heard in a plain `pip install`. Without a terminal (CI, a
    pipe) stderr is all there is, and `pip -v` or the build log shows it.
    """
    sys.stderr.write(message)
    sys.stderr.flush()
    if sys.platform == "win32":
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message)
    except OSError:
        pass


class BuildKernel(build_ext):
    """build_ext that turns a failed kernel build into a plain warning (or, on request, an error)."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing or failing: CompileError, LinkError, OSError...
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            if os.environ.get("RMSPROP_REQUIRE_KERNEL", "") not in ("", "0"):
                sys.stderr.write(f"rmsprop: the fused CPU kernel failed to build ({reason}) and "
                                 "RMSPROP_REQUIRE_KERNEL is set, so the build fails.\n")
                raise
            _tell_the_user(NOT_BUILT.format(reason=reason))


ext = Extension(
    "rmsprop._rmsprop_cpu",
    sources=["src/rmsprop/_cpu/rmsprop_cpu.c"],
    extra_compile_args=flags if sys.platform != "win32" else [],
    extra_link_args=link if sys.platform != "win32" else [],
)
setup(ext_modules=[ext], cmdclass={"build_ext": BuildKernel})
