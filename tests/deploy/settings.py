"""Which ``OPEA_*`` variables a built-in service reads, to catch misspelt ones in deployments."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Mapping

from opea_grpc.cli import BUILTIN_SERVICES
from opea_grpc.config import ClientConfig, ServerConfig

#: Read by the ``opea-grpc`` entrypoint itself, not by a settings class.
ENTRYPOINT = frozenset({"OPEA_LOG_LEVEL", "OPEA_LOG_FORMAT"})


def _fields(cls: type, prefixes: Iterable[str]) -> set[str]:
    names = [f.name.upper() for f in dataclasses.fields(cls)]
    return {p + n for p in prefixes for n in names}


def known_variables(service: str) -> frozenset[str]:
    """Every ``OPEA_*`` variable ``opea-grpc serve SERVICE`` (or ``opea-grpc health``) reads."""
    module = importlib.import_module(BUILTIN_SERVICES[service])
    own = f"OPEA_{service.upper()}_"
    return frozenset(
        ENTRYPOINT
        | _fields(ServerConfig, ("OPEA_", own))
        | _fields(module.Settings, (own,))
        | _fields(ClientConfig, ("OPEA_CLIENT_",))
    )


def unknown_variables(service: str, env: Mapping[str, object]) -> list[str]:
    """The ``OPEA_*`` names in ``env`` that ``service`` does not read."""
    known = known_variables(service)
    return sorted(k for k in env if k.startswith("OPEA_") and k not in known)
