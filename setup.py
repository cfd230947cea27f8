"""The compiled accelerator (``proxy._whole``), built by ``pip install``; everything else is
in pyproject.toml. ``optional=True``: where no C compiler is found, the install still succeeds
and ``proxy.whole``'s pure-Python functions serve, as aiohttp's and yarl's do."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxy._whole",
            ["proxy/_whole.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
