"""The ``opea-grpc`` command.

    opea-grpc serve SERVICE [--host H] [--port P]    serve a service until SIGINT/SIGTERM
    opea-grpc health TARGET [--service NAME]         gRPC health probe: exit 0 only when SERVING
    opea-grpc graph MODULE:ATTR [--format mermaid]   print a pipeline's graph
    opea-grpc demo [--once]                          the README's example, served and run
    opea-grpc up [--docs PATH] [--free-ports]        every service and the gateway, with a corpus
    opea-grpc ingest PATH... [--url URL]             send documents to a running gateway
    opea-grpc certs DIR [--names a,b] [--hosts h]    a development CA and certificates (TLS)
    opea-grpc keys new --scopes chat,embeddings      a gateway API key and its keys-file line
    opea-grpc keys service                           a service-to-service key and its digest

``SERVICE`` is a built-in service name (embedding, retrieval, rerank, chat, gateway) or
``module:attr`` naming a :class:`MicroService` or a function ``(ServerConfig) -> MicroService``.
Settings come from ``OPEA_*`` variables; flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opea_grpc import logs, telemetry
from opea_grpc.config import ClientConfig, ConfigError, ServerConfig, load
from opea_grpc.server import MicroService
from opea_grpc.tls import channel_credentials

log = logging.getLogger("opea_grpc")

#: Built-in services: name -> module. Each module has ``DEFAULT_PORT``, a ``Settings`` class
#: (read from ``OPEA_<NAME>_*``) and ``build(server: ServerConfig, settings) -> MicroService``.
BUILTIN_SERVICES: Mapping[str, str] = {
    "embedding": "services.embedding.service",
    "retrieval": "services.retrieval.service",
    "rerank": "services.rerank.service",
    "chat": "services.chat.service",
    "gateway": "gateway.service",
}

EXIT_NOT_SERVING = 1
EXIT_UNREACHABLE = 2


class UsageError(Exception):
    """Bad command-line input; the message says what to fix."""


def _import(spec: str) -> object:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:ATTR, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None


def build_builtin(
    name: str, env: Mapping[str, str], flags: Mapping[str, object], backend: str | None
) -> MicroService:
    """A built-in service, configured from ``OPEA_*`` and ``OPEA_<NAME>_*`` and the flags."""
    try:
        module = importlib.import_module(BUILTIN_SERVICES[name])
    except ImportError as exc:
        raise UsageError(f"service {name!r} cannot load: {exc}") from None
    prefix = f"OPEA_{name.upper()}_"
    server = load(
        ServerConfig,
        env,
        prefix=("OPEA_", prefix),
        defaults={"port": module.DEFAULT_PORT},
        overrides=flags,
    )
    if backend is not None and "backend" not in {
        f.name for f in dataclasses.fields(module.Settings)
    }:
        raise UsageError(f"--backend does not apply to {name}")
    settings = load(module.Settings, env, prefix=prefix, overrides={"backend": backend})
    extra: dict[str, object] = {}
    if "client" in inspect.signature(module.build).parameters:  # it calls other services
        extra["client"] = load(ClientConfig, env, prefix="OPEA_CLIENT_")
    service = module.build(server, settings, **extra)
    if not isinstance(service, MicroService):
        raise TypeError(f"{module.__name__}.build returned {type(service).__name__}")
    return service


def build_service(spec: str, config: ServerConfig) -> MicroService:
    """The MicroService that ``spec`` (``module:attr``) names."""
    target = _import(spec)
    if isinstance(target, MicroService):
        target.config = config
        return target
    if callable(target):
        service = target(config)
        if isinstance(service, MicroService):
            return service
    raise UsageError(f"{spec} is neither a MicroService nor a function returning one")


async def _serve(service: MicroService) -> None:
    if service.config.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=service.config.blas_threads)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await service.start()
    # What start-up allocated lives as long as the process: keep the collector off it, and
    # collect the young generation less often (request handling allocates in bursts).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 50)
    print(f"{service.name} listening on {service.config.host}:{port}", flush=True)
    await stop.wait()
    log.info("%s: stopping, %.1f s grace", service.name, service.config.grace)
    await service.stop()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (less CPU per call), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:  # pragma: no cover
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(main)


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    flags = {"host": args.host, "port": args.port, "grace": args.grace}
    flags["unix_socket"] = args.unix_socket
    if args.service not in BUILTIN_SERVICES and ":" not in args.service:
        raise UsageError(
            f"unknown service {args.service!r} (built-in: {', '.join(BUILTIN_SERVICES)}); "
            "or give MODULE:ATTR naming a MicroService or a function returning one"
        )
    if args.service not in BUILTIN_SERVICES and args.backend is not None:
        raise UsageError("--backend applies to the built-in services only")

    async def run() -> None:
        # Built inside the loop: grpc.aio channels a service opens belong to the running loop.
        if args.service in BUILTIN_SERVICES:
            service = build_builtin(args.service, env, flags, args.backend)
        else:
            service = build_service(args.service, load(ServerConfig, env, overrides=flags))
        await _serve(service)

    # Before any server or channel exists: both take their interceptors from it.
    telemetry.configure(f"opea-{args.service.rpartition(':')[2]}", env)
    try:
        _run(run())
    finally:
        telemetry.shutdown()
    return 0


def cmd_demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from opea_grpc import demo

    config = load(ServerConfig, env, overrides={"host": args.host, "port": args.port})

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await demo.main(config, once=args.once, stop=stop)

    asyncio.run(run())
    return 0


def cmd_health(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    client = load(ClientConfig, env, prefix="OPEA_CLIENT_")
    credentials = channel_credentials(client)
    options = (
        [("grpc.ssl_target_name_override", client.tls_server_name)]
        if client.tls_server_name
        else []
    )
    channel = (
        grpc.insecure_channel(args.target)
        if credentials is None
        else grpc.secure_channel(args.target, credentials, options=options)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            print(f"{args.target}: {code.name}: {details}", file=sys.stderr)
            return EXIT_NOT_SERVING if code is grpc.StatusCode.NOT_FOUND else EXIT_UNREACHABLE
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target} {args.service or '(server)'}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING


def cmd_certs(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from pathlib import Path

    from opea_grpc import certs

    names = [n.strip() for n in args.names.split(",") if n.strip()]
    hosts = [h.strip() for h in (args.hosts or "").split(",") if h.strip()]
    if not names:
        raise UsageError("--names lists no name")
    directory = Path(args.directory)
    for issued in certs.issue(directory, names, hosts):
        print(f"{issued.name}: {issued.cert} {issued.key}")
    print(f"CA: {directory / 'ca.pem'}")
    return 0


def cmd_keys(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from gateway import auth
    from opea_grpc import keys

    if args.action == "service":
        key = keys.new_key("os-")
        print(f"key (OPEA_CLIENT_SERVICE_KEY of the callers; shown once): {key}")
        print(f"digest (add to OPEA_SERVICE_KEYS of the services): {keys.digest(key)}")
        return 0
    if not args.scopes:
        raise UsageError("keys new needs --scopes")
    scopes = sorted({s.strip() for s in args.scopes.split(",") if s.strip()})
    unknown = [s for s in scopes if s not in auth.SCOPES]
    if not scopes or unknown:
        raise UsageError(f"--scopes takes some of {', '.join(auth.SCOPES)}; got {args.scopes!r}")
    key = keys.new_key()
    print(f"key (give it to the client; it is shown once): {key}")
    print("line for OPEA_GATEWAY_API_KEYS_FILE:")
    print(f"{keys.digest(key)} {','.join(scopes)} {args.name}".rstrip())
    return 0


def cmd_graph(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from opea_grpc.orchestrator import ServiceOrchestrator

    target = _import(args.pipeline)
    graph = target() if callable(target) and not isinstance(target, ServiceOrchestrator) else target
    if not isinstance(graph, ServiceOrchestrator):
        raise UsageError(
            f"{args.pipeline} is not a ServiceOrchestrator or a function returning one"
        )
    print(graph.describe(args.format))
    return 0


def cmd_ingest(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from gateway import loader

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    work = loader.ingest(
        args.url, args.paths, collection=args.collection, chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap, batch=args.batch, progress=not args.quiet,
    )  # fmt: skip
    try:
        summary = asyncio.run(work)
    except loader.IngestError as exc:
        print(f"opea-grpc: error: {exc}", file=sys.stderr)
        return 1
    print(summary.report())
    for problem in summary.failed:
        print(f"opea-grpc: warning: left out {problem}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_up(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from pathlib import Path

    from gateway import launcher

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    options = launcher.Options(
        data_dir=launcher.data_dir(args.data_dir, env), docs=tuple(map(Path, args.docs or ())),
        host=args.host, rest_port=args.rest_port, base_port=args.base_port,
        free_ports=args.free_ports, collection=args.collection, ready_timeout=args.timeout,
        unix_sockets=not args.tcp_only,
    )  # fmt: skip

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await launcher.up(options, env, stop)

    return asyncio.run(run())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opea-grpc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (OPEA_LOG_LEVEL)")
    parser.add_argument(
        "--log-format", choices=logs.FORMATS, help="plain or json lines (OPEA_LOG_FORMAT)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a microservice")
    serve.add_argument("service", help="built-in service name, or MODULE:ATTR")
    serve.add_argument("--host", help="address to bind (OPEA_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind, 0 for any (OPEA_PORT)")
    serve.add_argument("--grace", type=float, help="seconds to drain calls on stop (OPEA_GRACE)")
    serve.add_argument(
        "--unix-socket", metavar="PATH",
        help="also listen on this Unix socket, for callers on this machine (OPEA_UNIX_SOCKET)",
    )  # fmt: skip
    serve.add_argument("--backend", help="backend of a built-in service (OPEA_<NAME>_BACKEND)")
    serve.set_defaults(run=cmd_serve)

    health = sub.add_parser("health", help="check a server's gRPC health; exit 0 when SERVING")
    health.add_argument("target", help="host:port")
    health.add_argument("--service", default="", help="service name (default: whole server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.set_defaults(run=cmd_health)

    demo = sub.add_parser("demo", help="serve the README's example and run its pipeline")
    demo.add_argument("--host", help="address to bind (OPEA_HOST, default 127.0.0.1)")
    demo.add_argument("--port", type=int, help="port to bind, 0 for any (OPEA_PORT)")
    demo.add_argument("--once", action="store_true", help="run the pipeline once and exit")
    demo.set_defaults(run=cmd_demo)

    certs = sub.add_parser("certs", help="write a development CA and per-service certificates")
    certs.add_argument("directory", help="where to write them (an existing CA there is reused)")
    certs.add_argument(
        "--names",
        default="embedding,retrieval,rerank,chat,gateway,client",
        help="one certificate per name (default: the services, the gateway and a client)",
    )
    certs.add_argument("--hosts", help="more DNS names or IPs every certificate is valid for")
    certs.set_defaults(run=cmd_certs)

    keys = sub.add_parser(
        "keys", help="make a gateway API key (new) or a service-to-service key (service)"
    )
    keys.add_argument("action", choices=("new", "service"))
    keys.add_argument("--scopes", help="new: chat,embeddings,rerank,search,ingest,admin")
    keys.add_argument("--name", default="", help="a name for the logs")
    keys.set_defaults(run=cmd_keys)

    graph = sub.add_parser("graph", help="print a pipeline's graph")
    graph.add_argument("pipeline", help="MODULE:ATTR naming a ServiceOrchestrator or a factory")
    graph.add_argument("--format", choices=("json", "mermaid"), default="json")
    graph.set_defaults(run=cmd_graph)

    ingest = sub.add_parser("ingest", help="send documents to a running gateway to be searched")
    ingest.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="files or folders (recursively): .md, .markdown, .txt, .rst; others are skipped",
    )  # fmt: skip
    ingest.add_argument(
        "--url", default="http://127.0.0.1:8888",
        help="the gateway's REST URL (default http://127.0.0.1:8888)",
    )  # fmt: skip
    ingest.add_argument(
        "--collection", metavar="NAME", help="collection to add to (default: the gateway's)"
    )
    ingest.add_argument(
        "--chunk-size", type=int, metavar="N", help="characters per chunk (default: the gateway's)"
    )
    ingest.add_argument(
        "--chunk-overlap", type=int, metavar="N",
        help="characters neighbouring chunks share (default: the gateway's)",
    )  # fmt: skip
    ingest.add_argument(
        "--batch", type=int, default=16, metavar="N", help="documents per request (default 16)"
    )
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.set_defaults(run=cmd_ingest)

    up = sub.add_parser(
        "up", help="run every service and the gateway, ingest documents, say how to ask"
    )
    up.add_argument(
        "--docs", action="append", metavar="PATH",
        help="files or folders to ingest instead of the sample guide (repeatable)",
    )  # fmt: skip
    up.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    up.add_argument(
        "--rest-port", type=int, default=8888, metavar="PORT",
        help="the gateway's REST port (default 8888)",
    )  # fmt: skip
    up.add_argument(
        "--base-port", type=int, default=50050, metavar="PORT",
        help="the gateway's gRPC port; embedding, retrieval, rerank and chat take the next four "
        "(default 50050)",
    )  # fmt: skip
    up.add_argument("--free-ports", action="store_true", help="let the system pick every port")
    up.add_argument(
        "--tcp-only", action="store_true",
        help="the gateway calls the services over loopback TCP, not their Unix sockets",
    )  # fmt: skip
    up.add_argument(
        "--data-dir", metavar="DIR",
        help="keep the retrieval index in DIR/retrieval (default: OPEA_RETRIEVAL_DATA_DIR, else "
        "$XDG_DATA_HOME/opea-grpc/retrieval, else ~/.local/share/opea-grpc/retrieval)",
    )  # fmt: skip
    up.add_argument(
        "--collection", metavar="NAME", help="collection to ingest into (default: the gateway's)"
    )
    up.add_argument(
        "--timeout", type=float, default=180.0, metavar="SECONDS",
        help="seconds everything may take to be ready (default 180)",
    )  # fmt: skip
    up.set_defaults(run=cmd_up)
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.run
    try:
        logs.configure(
            args.log_level or env.get("OPEA_LOG_LEVEL", "INFO"),
            args.log_format or env.get("OPEA_LOG_FORMAT", "plain"),
        )
        return run(args, env)
    except (UsageError, ConfigError, OSError) as exc:
        print(f"opea-grpc: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
