"""Build the optional C fast paths; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and sona_shm runs
on its pure-Python paths (same results, a few microseconds slower per call).
"""

import numpy
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sona_shm._speedups",
            ["sona_shm/_speedups.c"],
            include_dirs=[numpy.get_include()],
            optional=True,
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
