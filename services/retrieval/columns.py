"""Filters evaluated a column at a time, so a filtered search over 100k documents stays cheap.

For each metadata key a filter uses, a :class:`Columns` cache holds that key's value for every
row, split by JSON kind into numpy arrays (a kind code, the number, the string, the bool); a
condition then becomes a few vectorised comparisons instead of a Python call per document.
Columns are built on first use and extended as rows are appended. The meaning of every
operator is :mod:`services.retrieval.filters`'; :func:`evaluate` must agree with
:func:`~services.retrieval.filters.matches` on every input (a test checks that at random).
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.retrieval.filters import JSON, LISTED, Condition, Op, Scalar, lookup

OTHER, NUMBER, STRING, BOOL = 0, 1, 2, 3  # OTHER: missing, null, list or object
#: Keep at most this many keys' columns; past it the cache starts afresh.
MAX_COLUMNS = 64

_ORDER: dict[Op, Callable[[Any, Any], Any]] = {
    Op.GT: operator.gt,
    Op.GTE: operator.ge,
    Op.LT: operator.lt,
    Op.LTE: operator.le,
}


@dataclass(frozen=True, slots=True)
class Column:
    """One key's values for rows ``[0, len(kind))``."""

    kind: np.ndarray  # int8 kind code
    number: np.ndarray  # float64, NaN unless NUMBER
    string: np.ndarray  # object: the str, or "" unless STRING
    flag: np.ndarray  # bool, False unless BOOL


def _column(metadata: Sequence[dict[str, JSON]], key: str, start: int, end: int) -> Column:
    size = end - start
    kind = np.zeros(size, dtype=np.int8)
    number = np.full(size, np.nan)
    string = np.full(size, "", dtype=object)
    flag = np.zeros(size, dtype=bool)
    for i in range(size):
        found, value = lookup(metadata[start + i], key)
        if not found:
            continue
        if isinstance(value, bool):
            kind[i], flag[i] = BOOL, value
        elif isinstance(value, int | float):
            kind[i], number[i] = NUMBER, value
        elif isinstance(value, str):
            kind[i], string[i] = STRING, value
    return Column(kind, number, string, flag)


class Columns:
    """Lazily built columns over one (append-only) list of metadata dicts."""

    def __init__(self, metadata: list[dict[str, JSON]]) -> None:
        self._metadata = metadata
        self._columns: dict[str, Column] = {}
        self._lock = threading.Lock()

    def get(self, key: str, n: int) -> Column:
        """The column of ``key`` covering at least rows ``[0, n)``."""
        with self._lock:
            column = self._columns.get(key)
            have = 0 if column is None else len(column.kind)
            if have >= n and column is not None:
                return column
            more = _column(self._metadata, key, have, n)
            if column is not None:
                more = Column(
                    *(
                        np.concatenate(pair)
                        for pair in zip(_parts(column), _parts(more), strict=True)
                    )
                )
            if len(self._columns) >= MAX_COLUMNS and key not in self._columns:
                self._columns.clear()
            self._columns[key] = more
            return more


def _parts(c: Column) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return c.kind, c.number, c.string, c.flag


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(c: Column, n: int, value: Scalar) -> np.ndarray:
    if isinstance(value, bool):
        out: np.ndarray = (c.kind[:n] == BOOL) & (c.flag[:n] == value)
    elif _is_number(value):
        out = (c.kind[:n] == NUMBER) & (c.number[:n] == float(value))
    else:
        out = (c.kind[:n] == STRING) & (c.string[:n] == value)
    return out


def _inside(c: Column, n: int, values: Sequence[Scalar]) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    numbers = [float(v) for v in values if _is_number(v)]
    strings = {v for v in values if isinstance(v, str)}
    flags = [v for v in values if isinstance(v, bool)]
    if numbers:
        out |= (c.kind[:n] == NUMBER) & np.isin(c.number[:n], numbers)
    if strings:
        hit = np.fromiter((s in strings for s in c.string[:n]), dtype=bool, count=n)
        out |= (c.kind[:n] == STRING) & hit
    if flags:
        out |= (c.kind[:n] == BOOL) & np.isin(c.flag[:n], flags)
    return out


def _holds(c: Column, n: int, cond: Condition) -> np.ndarray:
    op, value = cond.op, cond.value
    if op in LISTED:
        inside = _inside(c, n, value)  # type: ignore[arg-type]
        return inside if op is Op.IN else ~inside
    if op is Op.EQ or op is Op.NE:
        equal = _equal(c, n, value)  # type: ignore[arg-type]
        return equal if op is Op.EQ else ~equal
    compare = _ORDER[op]
    if isinstance(value, int | float) and not isinstance(value, bool):
        out: np.ndarray = (c.kind[:n] == NUMBER) & compare(c.number[:n], float(value))
    else:
        out = (c.kind[:n] == STRING) & compare(c.string[:n], value)
    return out


def evaluate(columns: Columns, n: int, conditions: Sequence[Condition]) -> np.ndarray:
    """Rows ``[0, n)`` for which every (checked) condition holds."""
    out = np.ones(n, dtype=bool)
    for cond in conditions:
        out &= _holds(columns.get(cond.key, n), n, cond)
    return out
