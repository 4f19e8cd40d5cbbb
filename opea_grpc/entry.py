"""The ``opea-grpc`` command's entry point: settle gRPC core's environment, then run the CLI.

gRPC core reads ``GRPC_EXPERIMENTS`` once, when ``grpc`` is first imported, so it is set here,
before anything imports it (importing the ``opea_grpc`` package imports none of its modules
until one of its names is used). Every process the command starts inherits it.

:data:`EXPERIMENTS` turns off gRPC core's EventEngine TCP client and listener, the default for
Python since grpcio 1.80, for the older endpoints both still ship. With ``grpc.aio`` they cost
less CPU per call on both sides of a hop: ``python bench/unary_hop.py`` compares the two (on two
cores, one call at a time: about 20 % less on the server and on the client). Everything the
test suite checks (TLS, mutual TLS, keepalive, connection age, replicas, faults) passes on
both. A ``GRPC_EXPERIMENTS`` already in the environment, even an empty one, is left as it is:
set it empty to run on gRPC's own defaults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence

#: What ``GRPC_EXPERIMENTS`` is set to when it is not set (names of the pinned grpcio's
#: experiments; an unknown name would only be logged and ignored).
EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def prepare(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``GRPC_EXPERIMENTS`` unless it is set; False when it was, or when ``grpc`` is
    already imported (too late for this process to change)."""
    env = os.environ if environ is None else environ
    if "GRPC_EXPERIMENTS" in env or "grpc" in sys.modules:
        return False
    env["GRPC_EXPERIMENTS"] = EXPERIMENTS
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``opea-grpc``: :func:`prepare`, then :func:`opea_grpc.cli.main`."""
    prepare()
    from opea_grpc.cli import main as run

    return run(argv)
