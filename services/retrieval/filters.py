"""Metadata filters: the one definition of what a condition means, shared by every backend.

A filter is a list of :class:`Condition`; a document matches when **every** condition holds
(an empty list matches everything). Semantics, which every backend must reproduce exactly
(the ``pgvector`` backend translates them to SQL over ``jsonb``):

- **Keys**: ``"a.b.c"`` walks nested objects (``metadata["a"]["b"]["c"]``); a key is *missing*
  when any step is absent or not an object. There is no escaping: a literal dot in a top-level
  key cannot be addressed.
- **Values** of a condition are scalars (string, number, bool) — for ``IN`` / ``NOT_IN`` a list
  of scalars (possibly empty), for ``GT``/``GTE``/``LT``/``LTE`` a number or a string. Anything
  else is rejected by :func:`check_conditions` with INVALID_ARGUMENT.
- **Equality** (``EQ``, ``IN``) is equality of JSON kind and value: numbers compare numerically
  (``1 == 1.0``), strings exactly, bools only with bools (``true`` is not ``1``). A metadata value
  that is null, a list or an object equals no condition value.
- **Order** (``GT`` ...) compares numbers with numbers and strings with strings (by Unicode code
  point, i.e. ``COLLATE "C"``); a field of another kind, or missing, does not match.
- **Negations**: ``NE`` is exactly ``not EQ`` and ``NOT_IN`` exactly ``not IN``; so they *match*
  documents where the key is missing.

>>> matches({"year": 2021, "source": {"name": "wiki"}},
...         [Condition("year", Op.GTE, 2020), Condition("source.name", Op.IN, ["wiki", "web"])])
True
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import grpc

from opea_grpc.errors import ServiceError
from opea_grpc.structs import JSON as JSON  # re-exported: the backends take it from here

#: A value a condition compares with.
Scalar: TypeAlias = bool | int | float | str


class Op(enum.IntEnum):
    """Comparison operators; the values are those of ``opea.v1.Operator``."""

    EQ = 1
    NE = 2
    GT = 3
    GTE = 4
    LT = 5
    LTE = 6
    IN = 7
    NOT_IN = 8


ORDERED: frozenset[Op] = frozenset({Op.GT, Op.GTE, Op.LT, Op.LTE})
LISTED: frozenset[Op] = frozenset({Op.IN, Op.NOT_IN})


@dataclass(frozen=True, slots=True)
class Condition:
    """``metadata[key] <op> value``; ``value`` is a tuple/list of scalars for IN and NOT_IN."""

    key: str
    op: Op
    value: Scalar | Sequence[Scalar]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _check_scalar(value: object, where: str) -> None:
    if isinstance(value, bool | str):
        return
    if _is_number(value):
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {value} is not finite")
        return
    raise ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{where}: expects a string, a number or a bool, got {_kind(value)}",
    )


def check_conditions(conditions: Sequence[Condition], *, field: str = "filter") -> None:
    """Raise INVALID_ARGUMENT naming the first condition whose key or value is unusable."""
    for i, c in enumerate(conditions):
        where = f"{field}.conditions[{i}] (key {c.key!r}, {c.op.name})"
        if not c.key or any(part == "" for part in c.key.split(".")):
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field}.conditions[{i}].key {c.key!r}: give a metadata key such as "
                "'source' or 'source.name' (no empty parts)",
            )
        if c.op in LISTED:
            if not isinstance(c.value, list | tuple):
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{where}: expects a list of values, got {_kind(c.value)}",
                )
            for j, item in enumerate(c.value):
                _check_scalar(item, f"{where} value[{j}]")
        elif c.op in ORDERED:
            if not (isinstance(c.value, str) or _is_number(c.value)):
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{where}: expects a number or a string, got {_kind(c.value)}",
                )
            _check_scalar(c.value, where)
        else:
            _check_scalar(c.value, where)


def lookup(metadata: Mapping[str, JSON], key: str) -> tuple[bool, JSON]:
    """``(found, value)`` for a dotted ``key``."""
    node: JSON = metadata  # type: ignore[assignment]
    for part in key.split("."):
        if not isinstance(node, dict | Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _equal(field: JSON, value: Scalar) -> bool:
    if isinstance(value, bool) or isinstance(field, bool):
        return isinstance(value, bool) and isinstance(field, bool) and field is value
    if _is_number(value):
        return _is_number(field) and field == value
    return isinstance(field, str) and field == value


def _compare(field: JSON, op: Op, value: Scalar) -> bool:
    if _is_number(value) and _is_number(field):
        a, b = float(field), float(value)  # type: ignore[arg-type]
    elif isinstance(value, str) and isinstance(field, str):
        a2, b2 = field, value  # Python compares str by code point, like COLLATE "C"
        return _ordered(a2, op, b2)
    else:
        return False
    return _ordered(a, op, b)


def _ordered(a: float | str, op: Op, b: float | str) -> bool:
    if op is Op.GT:
        return a > b  # type: ignore[operator]
    if op is Op.GTE:
        return a >= b  # type: ignore[operator]
    if op is Op.LT:
        return a < b  # type: ignore[operator]
    return a <= b  # type: ignore[operator]


def holds(metadata: Mapping[str, JSON], condition: Condition) -> bool:
    """Whether one (already checked) condition holds for ``metadata``."""
    found, field = lookup(metadata, condition.key)
    op, value = condition.op, condition.value
    if op in LISTED:
        inside = found and any(_equal(field, v) for v in value)  # type: ignore[union-attr]
        return inside if op is Op.IN else not inside
    if op is Op.EQ or op is Op.NE:
        equal = found and _equal(field, value)  # type: ignore[arg-type]
        return equal if op is Op.EQ else not equal
    return found and _compare(field, op, value)  # type: ignore[arg-type]


def matches(metadata: Mapping[str, JSON], conditions: Sequence[Condition]) -> bool:
    """Whether every condition holds for ``metadata`` (True for no conditions)."""
    return all(holds(metadata, c) for c in conditions)
