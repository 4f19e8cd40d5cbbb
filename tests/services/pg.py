"""A throwaway PostgreSQL 16 + pgvector server for tests, run from the ``pgserver`` wheel.

The wheel bundles ``initdb``, ``postgres``, ``pg_ctl``, ``pg_isready``, ``psql`` and the
``vector`` extension. PostgreSQL refuses to run as root, so when the tests run as root (as in
CI) the server runs as the system user :data:`PG_USER`, created here when missing.

>>> with PostgresServer() as pg:           # initdb, start on 127.0.0.1:<port>, CREATE EXTENSION
...     pool = await asyncpg.create_pool(pg.dsn)
...     pg.stop()                          # the database goes away (data kept) ...
...     pg.start()                         # ... and comes back on the same port

``async with`` does the same with the blocking steps in a thread. Start-up (initdb + start +
``CREATE EXTENSION``) takes about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

#: The system user the server runs as when the tests run as root.
PG_USER = "opea-pg"


def _package_dir() -> Path:
    # find_spec locates the package without importing it: its import touches the runtime dir
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise ImportError("pgserver is not installed: pip install -e '.[test]'")
    return Path(spec.origin).resolve().parent


def _traversable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _bin_dir() -> Path:
    """The bundled binaries, where a non-root user can run them.

    A virtualenv inside a private directory (``mktemp -d`` makes them 0700) is out of reach of
    the server's user; then the binaries and the libraries they load (``pgserver.libs``, found
    relative to them) are copied once to a world-readable directory under the temp dir.
    """
    package = _package_dir()
    if os.geteuid() != 0 or _traversable_by_others(package):
        return package / "pginstall" / "bin"
    site = package.parent
    stamp = f"{package.stat().st_mtime_ns:x}"
    shared = Path(tempfile.gettempdir()) / f"opea-pgserver-{stamp}"
    if not (shared / "pgserver" / "pginstall" / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="opea-pgserver-staging-"))
        shutil.copytree(package / "pginstall", staging / "pgserver" / "pginstall", symlinks=True)
        if (site / "pgserver.libs").exists():
            shutil.copytree(site / "pgserver.libs", staging / "pgserver.libs", symlinks=True)
        os.chmod(staging, 0o755)
        try:
            staging.rename(shared)
        except OSError:  # another process copied it first
            shutil.rmtree(staging, ignore_errors=True)
    return shared / "pgserver" / "pginstall" / "bin"


#: The bundled binaries (``pginstall/bin`` inside the pgserver package, or a readable copy).
BIN = _bin_dir()
#: Server settings for a disposable database: durability off, nothing else changed.
FAST_SETTINGS: tuple[tuple[str, str], ...] = (
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
)


class PostgresError(RuntimeError):
    """The test server could not be set up; the message carries the server's log."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", shell, name],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # another process may have created it meanwhile: that is fine too
        return pwd.getpwnam(name)
    except KeyError:
        raise PostgresError(f"cannot create system user {name!r}: {done.stderr.strip()}") from None


def _as_user(user: pwd.struct_passwd | None) -> list[str]:
    """The command prefix that runs a program as ``user`` (nothing when None)."""
    if user is None:
        return []
    if shutil.which("setpriv"):  # execs in place: the child's pid is the program's
        return [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "--",
        ]
    if shutil.which("runuser"):
        return ["runuser", "-u", user.pw_name, "--"]
    raise PostgresError("running as root needs setpriv or runuser (util-linux) to drop privileges")


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only.

    ``start()`` runs initdb the first time, starts the server, waits until it accepts
    connections and creates the ``vector`` extension in database ``postgres``. ``stop()`` shuts
    it down (``pg_ctl stop -m fast``) keeping the data; ``close()`` stops and deletes everything.
    """

    def __init__(
        self,
        *,
        settings: Sequence[tuple[str, str]] = FAST_SETTINGS,
        timeout: float = 60.0,
    ) -> None:
        self.settings = tuple(settings)
        self.timeout = timeout
        self.port = 0
        self._base: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- where it is --------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:<port>/postgres`` (trust auth: no password)."""
        if not self.port:
            raise RuntimeError("not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def base(self) -> Path:
        if self._base is None:
            raise RuntimeError("not started")
        return self._base

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        return self.base / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while running (its children are the backends)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> str:
        """Start (initdb on first use); return the DSN once the server accepts connections."""
        if self.running:
            return self.dsn
        if self._base is None:
            self._init()
        deadline = time.monotonic() + self.timeout
        fixed_port = self.port  # a restart keeps its port, so clients can reconnect
        for _attempt in range(5):
            self.port = fixed_port or _free_port()
            if self._launch(deadline):
                break
            if fixed_port or "could not bind" not in self._log_tail():
                raise PostgresError(f"postgres exited during start-up:\n{self._log_tail()}")
        else:
            raise PostgresError(f"postgres found no free port:\n{self._log_tail()}")
        self._psql("CREATE EXTENSION IF NOT EXISTS vector")
        return self.dsn

    def stop(self) -> None:
        """Shut the server down (fast: abort transactions, close connections); keep the data."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            subprocess.run(
                [
                    *_as_user(self._user),
                    str(BIN / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(self.timeout)),
                ],
                capture_output=True,
                check=False,
            )
            try:
                proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def close(self) -> None:
        """Stop the server and delete its directory."""
        try:
            self.stop()
        finally:
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None
                self.port = 0

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> PostgresServer:
        try:
            await asyncio.to_thread(self.start)
        except BaseException:
            await asyncio.to_thread(self.close)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    # -- steps --------------------------------------------------------------------------------

    def _init(self) -> None:
        if os.geteuid() == 0:
            self._user = _ensure_user(PG_USER)
        base = Path(tempfile.mkdtemp(prefix="opea-pg-"))  # short: the socket path must fit
        self._base = base
        if self._user is not None:
            os.chown(base, self._user.pw_uid, self._user.pw_gid)
        done = subprocess.run(
            [
                *_as_user(self._user),
                str(BIN / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=self.timeout,
        )
        if done.returncode != 0:
            raise PostgresError(f"initdb failed ({done.returncode}):\n{done.stderr}")

    def _launch(self, deadline: float) -> bool:
        """Start postgres; True once it accepts connections, False when it exited."""
        options = [arg for name, value in self.settings for arg in ("-c", f"{name}={value}")]
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    *_as_user(self._user),
                    str(BIN / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-k",
                    str(self.base),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    *options,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach it first
            )
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if self._is_ready():
                return True
            time.sleep(0.02)  # a poll interval, not a guess at how long start-up takes
        self.stop()
        raise PostgresError(
            f"postgres not accepting connections after {self.timeout} s:\n{self._log_tail()}"
        )

    def _is_ready(self) -> bool:
        done = subprocess.run(
            [
                str(BIN / "pg_isready"),
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-t",
                "1",
            ],
            check=False,
        )
        return done.returncode == 0

    def _psql(self, sql: str) -> None:
        done = subprocess.run(
            [
                str(BIN / "psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=self.timeout,
        )
        if done.returncode != 0:
            raise PostgresError(f"{sql!r} failed: {done.stderr.strip()}")

    def _log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
