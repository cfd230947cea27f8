"""The compiled accelerators, ``proxy._whole``, ``proxy._headers`` and ``proxy._frames``, built by
``pip install``.

Everything else is in pyproject.toml. Optional by default: where no C compiler is found, the
install still succeeds and the pure-Python functions serve, as aiohttp's and yarl's do.
``ORIGINPOOL_REQUIRE_EXTENSIONS=1`` makes a failed compile an error instead, for builds that
must not ship the slower fallback by accident (the container image).
"""

import os

from setuptools import Extension, setup

REQUIRED = bool(os.environ.get("ORIGINPOOL_REQUIRE_EXTENSIONS"))

setup(
    ext_modules=[
        Extension(
            name,
            [f"{name.replace('.', '/')}.c"],
            depends=["proxy/_http_tokens.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=not REQUIRED,
        )
        for name in ("proxy._whole", "proxy._headers", "proxy._frames")
    ]
)
