"""The opea-grpc command: serve, health probe, graph."""

from __future__ import annotations

import socket

import pytest

from opea_grpc.pb.v1 import rerank_pb2_grpc
from opea_grpc.testing import serve
from tests.processes import health, run_cli, served
from tests.replica import IdentityReranker


class Flag:
    value = True

    def __call__(self) -> bool:
        return self.value


async def test_health_probe_exit_codes(subprocess_env: dict[str, str]) -> None:
    ready = Flag()
    adder = rerank_pb2_grpc.add_RerankServiceServicer_to_server
    async with serve((adder, IdentityReranker("a"), ready)) as server:
        code, out, _ = await run_cli(subprocess_env, "health", server.target)
        assert (code, out.strip()) == (0, f"{server.target} (server): SERVING")
        code, out, _ = await run_cli(
            subprocess_env, "health", server.target, "--service", "opea.v1.RerankService"
        )
        assert code == 0
        code, _, err = await run_cli(subprocess_env, "health", server.target, "--service", "x.Nope")
        assert code == 1
        assert "NOT_FOUND" in err
        ready.value = False
        await server.service.refresh_health()
        code, out, _ = await run_cli(subprocess_env, "health", server.target)
        assert code == 1
        assert "NOT_SERVING" in out


async def test_health_probe_unreachable(subprocess_env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: nothing answers
        code, _, err = await run_cli(
            subprocess_env, "health", f"127.0.0.1:{port}", "--timeout", "1"
        )
    assert code == 2
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


async def test_serve_a_user_module_and_stop_on_sigterm(subprocess_env: dict[str, str]) -> None:
    argv = ["-m", "opea_grpc", "serve", "tests.replica:build", "--port", "0"]
    async with served(subprocess_env, *argv) as child:
        assert "listening on 127.0.0.1:" in child.line
        code, out, _ = await health(subprocess_env, child.target)
        assert code == 0, out
        assert await child.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "nope"], "unknown service 'nope'"),
        (["serve", "tests.replica:missing"], "has no attribute 'missing'"),
        (["serve", "no_such_module:x"], "cannot import 'no_such_module'"),
        (["serve", "tests.replica:build", "--port", "0", "--grace", "x"], "invalid float"),
    ],
)
async def test_bad_input_is_a_clear_error(
    subprocess_env: dict[str, str], args: list[str], message: str
) -> None:
    code, _, err = await run_cli(subprocess_env, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


async def test_bad_environment_is_a_clear_error(subprocess_env: dict[str, str]) -> None:
    env = {**subprocess_env, "OPEA_PORT": "eighty"}
    code, _, err = await run_cli(env, "serve", "tests.replica:build")
    assert code == 2
    assert "OPEA_PORT: expected a number" in err
