"""Builds the optional C extension ``dcp_ext.storage.tensorstore._rowio`` (everything else is in
pyproject.toml).

``optional=True``: where it cannot be compiled (no C compiler, no POSIX ``preadv``), the install
goes on without it and dcp-ext uses its pure-Python path (see dcp_ext/storage/tensorstore/native.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dcp_ext.storage.tensorstore._rowio", ["dcp_ext/storage/tensorstore/_rowio.c"],
                             optional=True, extra_compile_args=["-Wall"])])
