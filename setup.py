"""The compiled accelerators, ``proxy._whole`` and ``proxy._headers``, built by ``pip install``.

Everything else is in pyproject.toml. ``optional=True``: where no C compiler is found, the
install still succeeds and the pure-Python functions serve, as aiohttp's and yarl's do.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            name,
            [f"{name.replace('.', '/')}.c"],
            depends=["proxy/_http_tokens.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
        for name in ("proxy._whole", "proxy._headers")
    ]
)
