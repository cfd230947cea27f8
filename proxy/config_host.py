"""What this host says about a valid config, kept out of parsing on purpose.

A parsed config is right anywhere; whether its egress IPs exist is a fact of the machine
it runs on (see :class:`EgressPresence`), so the host's answer lives in its own module and
only ``check-config`` and ``serve`` (through :func:`proxy.config.load_on_host`) ask it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pool.connectx import is_local_address
from proxy.config_model import Config, EgressConfig


@dataclass(frozen=True, slots=True)
class HostReport:
    """Problems a config has on this host only: errors stop ``serve``, warnings are told."""

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class EgressPresence:
    """Egress IPs the host does not have, found before the first connect needs them.

    Apart from :func:`~proxy.config.parse` on purpose: parsing says whether a config is right
    anywhere, this says whether it fits the namespace it runs in, so a config rendered or
    reviewed on another machine (deploy/kubernetes renders on the node, ``originpool ports``
    reads the config to label pairs) is not refused for IPs that only the target host has.

    An unassigned IP is an error by default: a typo in an address would otherwise only show
    as a smaller capacity than planned. ``[egress] allow_unassigned = true`` turns it into a
    warning for IPs that arrive after the proxy (a failover address, a cloud secondary IP
    attached later): the pool keeps them down and takes them up once they are there.
    Presence is asked with :func:`~pool.connectx.is_local_address` (why a bind: see there).
    """

    def __init__(self, is_local: Callable[[str], bool] = is_local_address) -> None:
        self._is_local = is_local

    def check(self, config: Config) -> HostReport:
        return self.check_egress(config.egress, config.source)

    def check_egress(self, egress: EgressConfig, source: str) -> HostReport:
        """The check on the ``[egress]`` section alone: also asked of a config that failed
        to parse elsewhere, so ``check-config`` names every problem in one run."""
        if egress.mode == "plain":
            return HostReport()  # the addresses are not used at all
        errors: list[str] = []
        warnings: list[str] = []
        for i, address in enumerate(egress.addresses):
            try:
                present = self._is_local(address.ip)
                reason = f"{address.ip} is not assigned to any interface in this namespace"
            except OSError as e:
                present = False
                reason = f"{address.ip} cannot be used here: {e.strerror or e}"
            if present:
                continue
            where = f"{source}: egress.addresses[{i}]"
            if egress.allow_unassigned:
                warnings.append(
                    f"{where}: warning: {reason}; allow_unassigned = true: the pool keeps it "
                    "down and uses it once it is added"
                )
            else:
                errors.append(
                    f"{where}: {reason} (add it, see deploy/egress-ips.md; or set [egress] "
                    "allow_unassigned = true if it is added after the proxy starts)"
                )
        return HostReport(tuple(errors), tuple(warnings))


def log_file_problems(config: Config) -> tuple[str, ...]:
    """``[log]`` files this user could not open for append here, one problem each naming its
    key: told by ``check-config`` before a restart, not found at the first line written.
    Asked without creating anything, so ``check-config`` leaves no empty log behind."""
    problems = []
    for key in ("access_file", "error_file"):
        path = getattr(config.log, key)
        reason = None if path is None else _unwritable(path)
        if reason is not None:
            problems.append(f"{config.source}: log.{key}: {path}: {reason}")
    return tuple(problems)


def _unwritable(path: str) -> str | None:
    """Why ``open(path, O_WRONLY | O_APPEND | O_CREAT)`` would fail here, or None."""
    if os.path.isdir(path):
        return "is a directory; name a file in it"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "not writable by this user"
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return f"cannot be created: no directory {directory} (create it first)"
    if not os.access(directory, os.W_OK | os.X_OK):
        # access(2) answers EROFS for a read-only mount even to root
        return f"cannot be created: directory {directory} is not writable by this user"
    return None
