"""The Dockerfile's instructions and the build context ``.dockerignore`` leaves, read in Python.

>>> stages = parse(ROOT / "Dockerfile")
>>> stages[-1].env()["OPEA_HOST"]
'0.0.0.0'
>>> "opea_grpc/cli.py" in context_files(ROOT)
True

The ``.dockerignore`` rules are BuildKit's: one pattern a line, ``#`` comments, ``!`` re-includes,
``*`` and ``?`` within a path segment, ``**`` across segments, a pattern that matches a
directory matches everything under it, and the last matching line decides.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_REFERENCE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    #: The rest of the (continued) line, continuation backslashes and newlines removed.
    text: str


@dataclass
class Stage:
    """One ``FROM`` and what follows it."""

    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)
    #: ARGs declared before the first FROM, with their defaults (they reach FROM lines only,
    #: and stages that declare them again).
    global_args: dict[str, str] = field(default_factory=dict)

    def of(self, keyword: str) -> list[str]:
        return [i.text for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """ARG defaults in this stage (a bare ``ARG X`` takes the global default)."""
        found: dict[str, str] = {}
        for text in self.of("ARG"):
            name, sep, default = text.partition("=")
            found[name] = default if sep else self.global_args.get(name, "")
        return found

    def env(self, inherited: dict[str, str] | None = None) -> dict[str, str]:
        """ENV values as the stage's last instruction sees them (``$VAR`` expanded)."""
        values: dict[str, str] = dict(inherited or {})
        scope = {**self.args()}
        for text in self.of("ENV"):
            for word in shlex.split(text):
                key, sep, value = word.partition("=")
                if not sep:
                    raise ValueError(f"ENV {text!r}: write ENV KEY=VALUE")
                values[key] = expand(value, {**scope, **values})
        return values


def expand(text: str, scope: dict[str, str]) -> str:
    """``$VAR``, ``${VAR}`` and ``${VAR:-default}`` replaced from ``scope``."""

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["bare"]
        value = scope.get(name, "")
        return value if value or match["default"] is None else match["default"]

    return _REFERENCE.sub(replace, text)


def instructions(path: Path) -> list[Instruction]:
    """Every instruction of a Dockerfile, comments and continuations handled."""
    found: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            found.append(Instruction(keyword.upper(), rest.strip()))
    if pending.strip():
        raise ValueError(f"{path}: the last instruction ends with a continuation")
    return found


def parse(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, in order."""
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            words = instruction.text.split()
            base = expand(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base, name, global_args=dict(global_args)))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"{path}: {instruction.keyword} before the first FROM")
            name, _, default = instruction.text.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(instruction)
    return stages


# -- .dockerignore ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[str]
    #: A ``!`` line: what it matches goes back into the context.
    include: bool
    text: str

    def matches(self, path: str) -> bool:
        """``path`` (slash-separated, relative) or one of its parent directories matches."""
        parts = path.split("/")
        return any(self.regex.match("/".join(parts[:n])) for n in range(len(parts), 0, -1))


def _regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:.*/)?", i + 1
            else:
                out += ".*"
            continue
        char = pattern[i]
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def ignore_patterns(path: Path) -> list[Pattern]:
    patterns: list[Pattern] = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        include = text.startswith("!")
        body = os.path.normpath(text[1:].strip() if include else text).lstrip("/")
        patterns.append(Pattern(_regex(body), include, text))
    return patterns


def ignored(path: str, patterns: list[Pattern]) -> bool:
    result = False
    for pattern in patterns:
        if pattern.matches(path):
            result = not pattern.include
    return result


def context_files(root: Path) -> set[str]:
    """Relative paths of the files the builder receives from ``root``."""
    patterns = ignore_patterns(root / ".dockerignore")
    includes = [p.text[1:].strip().lstrip("/") for p in patterns if p.include]
    files: set[str] = set()
    for directory, subdirs, names in os.walk(root):
        rel = Path(directory).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        # Skip a directory that is ignored and that no "!" line could reach into.
        subdirs[:] = [
            d
            for d in subdirs
            if not ignored(prefix + d, patterns)
            or any(inc.startswith(prefix + d) or inc.startswith("**") for inc in includes)
        ]
        files.update(prefix + n for n in names if not ignored(prefix + n, patterns))
    return files
