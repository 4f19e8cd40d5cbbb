"""compose.yaml's services run as local processes, with the image's files, on loopback.

What stands in for what:

* **the image**: the build context that ``.dockerignore`` leaves is copied, built into a wheel
  the way the Dockerfile's ``pip install .`` builds it, and installed into a directory of its own
  (on ``PYTHONPATH``, its scripts on ``PATH``, as ``/opt/venv`` is in the image); the
  dependencies and the MiniLM files come from the test environment, where the README's test
  command installed them. Each process starts with the runtime stage's ``ENV`` and nothing else
  of this machine's environment;
* **the network**: each container has an address of its own, this machine has one loopback. So
  every port a service listens on (its ``*_PORT`` settings and ``expose``) gets a free loopback
  port of its own, and a value naming ``service:port`` (``dns:///retrieval:50052``), or
  ``127.0.0.1:port`` in a service's own healthcheck, names that loopback port instead;
  ``OPEA_HOST=0.0.0.0`` becomes ``127.0.0.1``; a service of a profile (vLLM, TEI, PostgreSQL, the
  collector) is named by the loopback port of what stands in for it in a test, or else left as
  written;
* **volumes and container paths**: a named volume is a directory under the test's temporary
  directory, and a container path under a mount (``/data/retrieval``) the same path under it;
  ``/opt/venv/bin`` is the installed image's script directory, the home directory a temporary one.

Nothing else changes: each service runs its ``command`` with its ``environment`` (interpolated
as Compose does), services start in ``depends_on`` order, each waited for through its own
``healthcheck`` command when a dependent asks for ``service_healthy``, and stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from tests.deploy.compose import Project
from tests.deploy.dockerfile import context_files, parse
from tests.processes import announced, open_log, reap, tail

#: The PATH of the python base image.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Where the Dockerfile puts the virtualenv.
IMAGE_VENV = "/opt/venv"
#: ``host:port`` in a value; the host is a name or an IPv4 address.
_ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d{1,5})\b")
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "0.0.0.0"})


@dataclass(frozen=True)
class Image:
    """The image's files, installed here."""

    #: Where ``pip install --target`` put the packages (``PYTHONPATH``).
    site: Path
    #: The runtime stage's ENV, container paths as written.
    env: dict[str, str]
    #: The runtime stage's WORKDIR.
    workdir: str

    @property
    def bin(self) -> Path:
        return self.site / "bin"


def build_image(root: Path, work: Path) -> Image:
    """Build the wheel from the context the builder would see, and install it under ``work``."""
    context, wheels, site = work / "context", work / "wheels", work / "site"
    for rel in context_files(root):
        target = context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), "."],
        context,
    )
    (wheel,) = wheels.glob("*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], context)
    runtime = parse(root / "Dockerfile")[-1]
    workdirs = runtime.of("WORKDIR")
    return Image(site, runtime.env({"PATH": BASE_PATH}), workdirs[-1] if workdirs else "/")


def _run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Local:
    """One compose service (one replica of it) as a local process."""

    #: ``SERVICE`` or, for further replicas, ``SERVICE-n``.
    name: str
    #: The compose service it is a replica of.
    service: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str] | None
    #: Container port -> loopback port.
    ports: dict[int, int]
    depends_on: dict[str, str]
    stop_grace: float
    cwd: Path
    proc: asyncio.subprocess.Process | None = None
    log: IO[bytes] | None = field(default=None, repr=False)

    def port(self, container_port: int) -> int:
        return self.ports[container_port]

    def logs(self) -> str:
        return tail(self.log) if self.log is not None else ""


def _seconds(text: str | None, default: float) -> float:
    """A Compose duration (``30s``, ``1m30s``, ``500ms``) in seconds."""
    if not text:
        return default
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(a + u for a, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(amount) * units[unit] for amount, unit in parts)


def listening_ports(spec: Mapping[str, Any], env: Mapping[str, str]) -> set[int]:
    """Ports the container listens on: its ``*_PORT`` settings, ``expose`` and ``ports``."""
    found = {int(v) for k, v in env.items() if k.endswith("_PORT") and v.isdigit() and int(v)}
    found.update(int(str(p).split("/")[0]) for p in spec.get("expose", ()))
    found.update(int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in spec.get("ports", ()))
    return found


def localize(
    project: Project,
    image: Image,
    work: Path,
    *,
    shell: Mapping[str, str] | None = None,
    standins: Mapping[tuple[str, int], int] | None = None,
    replicas: Mapping[str, int] | None = None,
    hosts: Path | None = None,
) -> dict[str, Local]:
    """Every service of ``project`` that runs the image, translated as the module says.

    ``standins`` maps ``(service, port)`` of services that are not this image's (vllm, tei,
    postgres ...) to the loopback port of whatever stands in for them in the test.
    ``replicas`` runs that many copies of a service (``docker compose --scale``): replica ``n``
    as ``SERVICE-n`` on ``127.0.0.n`` (the first keeps the service's name), all on the same port.
    With ``hosts`` (a file written here), names of services stay names: the file maps each name
    to its replicas' addresses, and every service process sees it as its ``/etc/hosts``, as a
    container sees Docker's DNS (in a mount namespace of its own: ``unshare``, as root).
    """
    shell = shell or {}
    standins = dict(standins or {})
    standing_in = {host for host, _ in standins}
    scale = dict(replicas or {})
    names = [n for n in project.enabled() if n in project.built()]
    specs = {n: project.services[n] for n in names}
    envs: dict[str, dict[str, str]] = {}
    ports: dict[tuple[str, int], int] = {}
    for name, spec in specs.items():
        env = dict(image.env)
        for key, value in project.environment(name).items():
            if value is not None:
                env[key] = value
            elif key in shell:  # KEY with no value: the shell's, if it has one
                env[key] = shell[key]
        envs[name] = env
        for port in sorted(listening_ports(spec, env)):
            ports[name, port] = free_port()
    if hosts is not None:
        lines = ["127.0.0.1 localhost"]
        lines += [f"127.0.0.{n} {name}" for name in specs for n in range(1, scale.get(name, 1) + 1)]
        hosts.write_text("\n".join(lines) + "\n")

    def address(name: str, own: str, match: re.Match[str]) -> str:
        host, port = match["host"], int(match["port"])
        if host in standing_in:
            if (host, port) not in standins:
                pytest.fail(f"{name} refers to {match[0]}, and nothing stands in for that port")
            return f"127.0.0.1:{standins[host, port]}"
        owner = name if host in _LOCAL_HOSTS else host if host in specs else None
        if owner is None:
            return match[0]
        if (owner, port) not in ports:
            pytest.fail(f"{name} refers to {match[0]}, but {owner} listens on no port {port}")
        if owner == name and host in _LOCAL_HOSTS:
            return f"{own}:{ports[owner, port]}"
        return f"{host if hosts is not None else '127.0.0.1'}:{ports[owner, port]}"

    def addresses(name: str, own: str) -> Callable[[str], str]:
        return lambda value: _ADDRESS.sub(lambda m: address(name, own, m), value)

    locals_: dict[str, Local] = {}
    for name, spec in specs.items():
        for n in range(1, scale.get(name, 1) + 1):
            instance, own = (name if n == 1 else f"{name}-{n}"), f"127.0.0.{n}"
            locals_[instance] = _instance(
                name, instance, own, spec, envs[name], ports, image, work, hosts,
                addresses(name, own),
            )  # fmt: skip
    return locals_


def _instance(
    service: str,
    instance: str,
    own: str,
    spec: Mapping[str, Any],
    env_in: Mapping[str, str],
    ports: Mapping[tuple[str, int], int],
    image: Image,
    work: Path,
    hosts: Path | None,
    addresses: Callable[[str], str],
) -> Local:
    """One replica of a service: its command, environment and healthcheck, translated."""
    paths = {IMAGE_VENV + "/bin": str(image.bin), "/data": str(work / "scratch" / instance)}
    for mount in spec.get("volumes", ()):
        source, target = str(mount).split(":")[:2]
        paths[target] = str(work / "volumes" / source)
    home = work / "home" / instance
    paths[image.workdir] = str(home)

    def local(value: str, key: str = "") -> str:
        value = addresses(value)
        if key.endswith("_PORT") and value.isdigit() and int(value):
            value = str(ports[service, int(value)])
        if key.endswith("HOST") and value == "0.0.0.0":
            value = own
        entries = value.split(":") if key == "PATH" else [value]
        for i, entry in enumerate(entries):
            for container, here in sorted(paths.items(), key=lambda item: -len(item[0])):
                if entry == container or entry.startswith(container + "/"):
                    entries[i] = here + entry[len(container) :]
                    break
        return ":".join(entries)

    env = {key: local(value, key) for key, value in env_in.items()}
    env["PYTHONPATH"] = str(image.site)
    env["HOME"] = str(home)
    for directory in (home, *map(Path, paths.values())):
        directory.mkdir(parents=True, exist_ok=True)
    command = [local(word) for word in spec["command"]]
    resolved = shutil.which(command[0], path=env["PATH"])
    if resolved is None:
        pytest.fail(f"{instance}: {command[0]} is not on the image's PATH {env['PATH']}")
    argv = [resolved, *command[1:]]
    if hosts is not None:
        # The process itself, after exec, in a mount namespace where hosts is /etc/hosts.
        remount = 'mount --bind "$0" /etc/hosts && exec "$@"'
        argv = ["unshare", "--mount", "--", "sh", "-c", remount, str(hosts), *argv]
    test = spec.get("healthcheck", {}).get("test")
    healthcheck = None
    if test is not None:
        if test[0] != "CMD":
            pytest.fail(f"{instance}: healthcheck {test} is not in the CMD form")
        healthcheck = [local(word) for word in test[1:]]
        found = shutil.which(healthcheck[0], path=env["PATH"])
        if found is None:
            pytest.fail(f"{instance}: healthcheck {healthcheck[0]} is not on the image's PATH")
        healthcheck[0] = found
    depends = spec.get("depends_on", {})
    if isinstance(depends, list):
        depends = {d: {"condition": "service_started"} for d in depends}
    return Local(
        instance,
        service,
        argv,
        env,
        healthcheck,
        {p: port for (owner, p), port in ports.items() if owner == service},
        {d: c.get("condition", "service_started") for d, c in depends.items()},
        _seconds(spec.get("stop_grace_period"), 10.0),
        home,
    )


async def run(
    argv: list[str], env: Mapping[str, str], timeout: float, cwd: Path | None = None
) -> tuple[int, str]:
    """Run a command to its end; its exit code and its output (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        await reap(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def healthy(service: Local, deadline: float) -> str:
    """Run the service's healthcheck until it passes; its last output. Fails past ``deadline``."""
    assert service.healthcheck is not None
    loop = asyncio.get_running_loop()
    while True:
        code, out = await run(service.healthcheck, service.env, 30, service.cwd)
        if code == 0:
            return out
        if service.proc is not None and service.proc.returncode is not None:
            pytest.fail(f"{service.name} exited with {service.proc.returncode}:\n{service.logs()}")
        if loop.time() > deadline:
            pytest.fail(
                f"{service.name}: healthcheck {service.healthcheck} still fails ({code}): "
                f"{out}\n{service.logs()}"
            )
        await asyncio.sleep(0.25)


@asynccontextmanager
async def running(services: dict[str, Local], ready_timeout: float = 180) -> AsyncIterator[None]:
    """Start ``services`` in ``depends_on`` order; on leaving, stop them, dependents first.

    A dependency with ``condition: service_healthy`` is waited for through its healthcheck
    before its dependents start, as Compose does.
    """
    order: list[str] = []
    while len(order) < len(services):
        pending = {s.service for n, s in services.items() if n not in order}
        ready = [
            n for n, s in services.items() if n not in order and not set(s.depends_on) & pending
        ]
        if not ready:
            pytest.fail(f"depends_on has a cycle among {sorted(set(services) - set(order))}")
        order.extend(sorted(ready))
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        for name in order:
            service = services[name]
            for dependency, condition in service.depends_on.items():
                if condition == "service_healthy":
                    for replica in services.values():
                        if replica.service == dependency:
                            await healthy(replica, loop.time() + ready_timeout)
            service.log = stack.enter_context(open_log(None))
            service.proc = await asyncio.create_subprocess_exec(
                *service.argv, env=service.env, cwd=service.cwd,
                stdout=asyncio.subprocess.PIPE, stderr=service.log,
            )  # fmt: skip
            stack.push_async_callback(reap, service.proc)
            try:
                line = await asyncio.wait_for(
                    announced(service.proc, re.compile("listening on (\\S+)")), ready_timeout
                )
            except asyncio.TimeoutError:
                line = None
            if line is None:
                pytest.fail(f"{name} did not start:\n{service.logs()}")
        yield


async def stop(service: Local) -> int:
    """SIGTERM, as ``docker compose stop`` sends; the exit code (killed past the grace period)."""
    assert service.proc is not None
    if service.proc.returncode is None:
        service.proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(service.proc.wait(), service.stop_grace)
    except asyncio.TimeoutError:
        await reap(service.proc)
        pytest.fail(f"{service.name} did not stop within {service.stop_grace} s:\n{service.logs()}")


async def all_healthy(services: Mapping[str, Local], timeout: float = 60) -> None:
    """Every service's healthcheck passes and reports SERVING."""
    deadline = asyncio.get_running_loop().time() + timeout
    for service in services.values():
        out = await healthy(service, deadline)
        assert "SERVING" in out, out


async def stop_all(services: Mapping[str, Local]) -> None:
    """``docker compose stop``: dependents first; each process must exit 0 on SIGTERM."""
    stopped: set[str] = set()
    while len(stopped) < len(services):
        needed = {d for n, s in services.items() if n not in stopped for d in s.depends_on}
        for name in sorted(n for n in set(services) - stopped if services[n].service not in needed):
            code = await stop(services[name])
            assert code == 0, f"{name} exited with {code}:\n{services[name].logs()}"
            stopped.add(name)
