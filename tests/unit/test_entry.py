"""The command's entry point settles ``GRPC_EXPERIMENTS`` before gRPC is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from opea_grpc import entry


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prepare_sets_only_what_is_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", grpc)  # imported: too late to change it
    late: dict[str, str] = {}
    assert not entry.prepare(late)
    assert late == {}
    monkeypatch.delitem(sys.modules, "grpc")  # as in a process that has not imported it
    fresh: dict[str, str] = {}
    assert entry.prepare(fresh)
    assert fresh == {"GRPC_EXPERIMENTS": entry.EXPERIMENTS}
    chosen = {"GRPC_EXPERIMENTS": ""}  # the user's choice, even empty, stands
    assert not entry.prepare(chosen)
    assert chosen == {"GRPC_EXPERIMENTS": ""}


def test_importing_the_package_and_the_entry_point_imports_no_grpc() -> None:
    done = run_python(
        """
        import sys
        import opea_grpc, opea_grpc.entry, gateway, services.chat
        assert "grpc" not in sys.modules, "grpc imported too early"
        from opea_grpc import MicroService, ServiceOrchestrator, connect
        assert "grpc" in sys.modules
        print(MicroService.__name__, ServiceOrchestrator.__name__, connect.__name__)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MicroService", "ServiceOrchestrator", "connect"]


def test_the_command_runs_with_the_experiments_set_and_the_grpcio_here_knows_them() -> None:
    done = run_python(
        """
        import asyncio, os, sys
        from opea_grpc import entry
        assert entry.prepare()
        import grpc

        async def call() -> None:
            server = grpc.aio.server()
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 10)
            await server.stop(None)

        asyncio.run(call())
        print(os.environ["GRPC_EXPERIMENTS"])
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == entry.EXPERIMENTS
    assert "Unknown experiment" not in done.stderr  # gRPC logs names it does not know


def test_python_m_opea_grpc_runs_services_with_them(tmp_path: Path) -> None:
    (tmp_path / "peek.py").write_text(
        "import os\nprint(os.environ.get('GRPC_EXPERIMENTS'), flush=True)\nraise SystemExit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "opea_grpc", "serve", "peek:service", "--port", "0"],
        env={
            **{k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"},
            "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == entry.EXPERIMENTS


def test_every_public_name_resolves_and_unknown_ones_raise() -> None:
    import importlib

    import opea_grpc

    for name in opea_grpc.__all__:
        home = importlib.import_module(opea_grpc._HOMES[name])
        assert getattr(opea_grpc, name) is getattr(home, name)
    assert set(opea_grpc.__all__) <= set(dir(opea_grpc))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = opea_grpc.Nope
