"""The one switch for originpool's compiled twins: ``ORIGINPOOL_NO_EXTENSIONS``.

Modules with a C twin (``proxy.whole`` -> ``proxy._whole``, ``proxy.headers`` ->
``proxy._headers``, ``proxy.websocket``'s frame trackers -> ``proxy._frames``) keep their
Python functions as the spec and the fallback, and take the compiled ones only when this says
so, as aiohttp's ``AIOHTTP_NO_EXTENSIONS`` does. Set it to any non-empty value to run pure
Python: to compare, to debug, or where the C modules could not be built (then the fallback
happens by itself; this switch is for doing it on purpose).
"""

from __future__ import annotations

import os
from typing import Final

NO_EXTENSIONS: Final = bool(os.environ.get("ORIGINPOOL_NO_EXTENSIONS"))


def describe(compiled: bool) -> str:
    """What the ``ready`` log line says, so an operator can tell a slow worker's cause:
    ``compiled``, or which fallback is running and why."""
    if compiled:
        return "compiled"
    if NO_EXTENSIONS:
        return "pure Python (ORIGINPOOL_NO_EXTENSIONS is set)"
    return "pure Python (the C modules were not built: install gcc and the Python headers)"
