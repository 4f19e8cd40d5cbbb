"""``compose.yaml`` read as Compose reads it: YAML (anchors, merge keys), then interpolation.

>>> project = Project.load(ROOT / "compose.yaml", env_file(ROOT / "deploy/compose/production.env"))
>>> project.environment("chat")["OPEA_CHAT_BACKEND"]
'openai'

Interpolation follows the Compose specification: ``${VAR}``, ``${VAR:-default}``,
``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}``, ``$VAR``
and ``$$`` for a literal dollar. ``strict`` makes a variable that is unset and has no default an
error, where Compose would warn and use an empty string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
PRODUCTION_ENV = ROOT / "deploy" / "compose" / "production.env"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is missing, or (strict) an unset variable."""


def interpolate(text: str, env: Mapping[str, str], *, strict: bool = True) -> str:
    """``text`` with its variables replaced from ``env``."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        value = env.get(name)
        op, arg = match["op"], match["arg"] or ""
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise InterpolationError(f"${{{name}}}: {arg or 'required'}")
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        if value is None:
            if strict:
                raise InterpolationError(f"${{{name}}} is unset and has no default")
            return ""
        return value

    return _VARIABLE.sub(replace, text)


def interpolated(node: Any, env: Mapping[str, str], *, strict: bool = True) -> Any:
    """Every string value within ``node`` interpolated (keys are left as they are)."""
    if isinstance(node, str):
        return interpolate(node, env, strict=strict)
    if isinstance(node, list):
        return [interpolated(item, env, strict=strict) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env, strict=strict) for key, value in node.items()}
    return node


def env_file(path: Path) -> dict[str, str]:
    """A Compose env file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    found: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ValueError(f"{path}:{number}: not KEY=VALUE: {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[key.strip()] = value
    return found


def raw(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The file as YAML, anchors and merge keys resolved, nothing interpolated."""
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a mapping")
    return document


@dataclass(frozen=True)
class Project:
    """The interpolated document and the profiles the environment turns on."""

    document: dict[str, Any]
    profiles: frozenset[str]

    @classmethod
    def load(cls, path: Path = COMPOSE_FILE, env: Mapping[str, str] | None = None) -> Project:
        env = dict(env or {})
        profiles = frozenset(p for p in env.get("COMPOSE_PROFILES", "").split(",") if p)
        return cls(interpolated(raw(path), env), profiles)

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        services: dict[str, dict[str, Any]] = self.document["services"]
        return services

    def enabled(self) -> list[str]:
        """Services that ``docker compose up`` starts: no profile, or an active one."""
        return [
            name
            for name, spec in self.services.items()
            if not spec.get("profiles") or self.profiles & set(spec["profiles"])
        ]

    def built(self) -> list[str]:
        """Services that run this repository's image (they have a ``build`` section)."""
        return [name for name, spec in self.services.items() if "build" in spec]

    def environment(self, service: str) -> dict[str, str | None]:
        """A service's environment as Compose hands it over (None: taken from the shell)."""
        env = self.services[service].get("environment", {})
        if not isinstance(env, dict):
            raise TypeError(f"{service}: write environment as a mapping")
        return {k: None if v is None else str(v) for k, v in env.items()}
