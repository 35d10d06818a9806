"""Builds the optional C part of the read path, ``lmdbkit._speedups`` (see lmdbkit/speedups.py); everything
else is in pyproject.toml. ``optional``: where it does not compile, the install goes on in pure Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("lmdbkit._speedups", ["lmdbkit/_speedups.c"], optional=True,
                             include_dirs=["third_party/xxhash"], depends=["third_party/xxhash/xxhash.h"],
                             extra_compile_args=["-O2", "-Wall"])])
