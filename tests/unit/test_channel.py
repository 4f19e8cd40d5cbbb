from __future__ import annotations

import json

from opea_grpc.channel import channel_options, service_config
from opea_grpc.config import ClientConfig
from opea_grpc.retry import RetryBudget


def test_service_config_balances_checks_health_and_retries() -> None:
    doc = service_config(["opea.v1.RerankService"], ClientConfig(max_attempts=3))
    assert doc["loadBalancingConfig"] == [{"round_robin": {}}]
    assert doc["healthCheckConfig"] == {"serviceName": "opea.v1.RerankService"}
    method_config = doc["methodConfig"]
    assert isinstance(method_config, list)
    (method,) = method_config
    assert method["name"] == [
        {"service": "opea.v1.RerankService", "method": "Rerank"},
        {"service": "opea.v1.RerankService", "method": "RerankBatch"},
    ]
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 3
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "timeout" not in method  # broken in grpcio: every call passes timeout= instead
    assert doc["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}


def test_no_retry_for_unknown_methods_or_when_disabled() -> None:
    assert "methodConfig" not in service_config(["acme.Unknown"], ClientConfig())
    assert "methodConfig" not in service_config(
        ["opea.v1.ChatService"], ClientConfig(max_attempts=1)
    )
    plain = service_config(["opea.v1.ChatService"], ClientConfig(round_robin=False))
    assert "loadBalancingConfig" not in plain
    assert "healthCheckConfig" not in plain


def test_channel_options_carry_the_config_as_json() -> None:
    options = dict(channel_options(["opea.v1.ChatService"], ClientConfig()))
    assert json.loads(str(options["grpc.service_config"]))["healthCheckConfig"]
    assert options["grpc.enable_retries"] == 1


def test_retry_budget_bounds_retries() -> None:
    budget = RetryBudget(ratio=0.1, reserve=2, capacity=5)
    assert [budget.withdraw() for _ in range(3)] == [True, True, False]
    for _ in range(100):
        budget.deposit()
    assert budget.tokens == 5
    granted = sum(budget.withdraw() for _ in range(10))
    assert granted == 5
    assert budget.retries == 7
