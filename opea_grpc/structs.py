"""``google.protobuf.Struct`` (document metadata, filter values) to and from plain JSON values.

Protobuf stores every number as a double, so a whole number sent as 3 comes back as 3.0:
:func:`value_to_json` turns such a number back into an int, so clients get what they sent.
These run for every document of every search and answer, so they walk the fields themselves
(``json_format.MessageToDict`` costs about three times as much).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

from google.protobuf import struct_pb2

#: A JSON value as Python holds it.
JSON: TypeAlias = bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None

#: Beyond this a double no longer holds every integer: such numbers stay floats.
_MAX_SAFE_INT = 2**53


def value_to_json(value: struct_pb2.Value) -> JSON:
    """A ``google.protobuf.Value`` as a JSON value; integral numbers become ints."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) < _MAX_SAFE_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [value_to_json(v) for v in value.list_value.values]
    return None


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, JSON]:
    """A ``Struct`` as a dict of JSON values."""
    return {key: value_to_json(v) for key, v in struct.fields.items()}


def dict_to_struct(metadata: Mapping[str, JSON], out: struct_pb2.Struct) -> None:
    """Fill ``out`` (a message's Struct field) with ``metadata``."""
    out.update(metadata)
