"""Builds the optional C++ extension ``lrec_fast._wordpiece`` from csrc/.

Metadata lives in pyproject.toml. Where no C++ compiler works, the package still installs, with
a clear warning, and lrec_fast falls back to HF tokenizers.
"""

from __future__ import annotations

import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install because a compiler is missing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all: distutils raises from run()
            self._warn(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc: Exception) -> None:
        msg = (
            "\n*** lrec_fast: could not build the C++ extension lrec_fast._wordpiece "
            f"({type(exc).__name__}: {exc}).\n*** Installing without it; the tokeniser falls "
            "back to HF tokenizers (same ids, slower).\n"
        )
        sys.stderr.write(msg)


# The tokeniser core, shared by the extension and the sanitizer build (tests/test_sanitizers.py).
CORE_SOURCES = ["csrc/normalizer.cpp", "csrc/tokenizer.cpp", "csrc/wordpiece.cpp"]

ext_modules = [
    Pybind11Extension(
        "lrec_fast._wordpiece",
        [*CORE_SOURCES, "csrc/bindings.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
        depends=[
            "csrc/unicode_tables.inc",
            "csrc/unicode.hpp",
            "csrc/normalizer.hpp",
            "csrc/tokenizer.hpp",
            "csrc/wordpiece.hpp",
        ],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
