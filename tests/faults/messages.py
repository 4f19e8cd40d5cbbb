"""Hypothesis strategies for any protobuf message, built from its descriptor.

Every field may be set or left out; scalars range over their whole type (NaN and infinities
included, enum numbers the contract does not define too, as proto3 allows), strings are any
valid text, repeated and map fields hold a few entries, and messages nest a few levels deep
(``google.protobuf.Struct`` metadata and filters included).

>>> request = data.draw(message_of(rerank_pb2.RerankRequest.DESCRIPTOR))
>>> request = data.draw(mutant(valid_request))  # one or two fields of a valid one changed
"""

from __future__ import annotations

import typing
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor
#: How deep messages nest; deeper message fields are left unset.
DEPTH = 3
#: Entries of a repeated or map field.
ENTRIES = 4
#: Strings the services know (collections, models, metadata keys), drawn as often as any text,
#: so that requests get past the first checks and into the work.
WORDS = (
    "",
    "default",
    "source",
    "chunk",
    "extractive-answerer",
    "bm25-rrf",
    "hashing",
    "What does the gateway listen on?",
)

_INTS: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    kind = field.type
    if kind in _INTS:
        low, high = _INTS[kind]
        # Small numbers are where the edges are (0, 1, -1, a limit): draw them more often.
        return st.one_of(st.integers(-3, 1100), st.integers(low, high))
    if kind == F.TYPE_DOUBLE:
        return st.floats()
    if kind == F.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind == F.TYPE_STRING:
        return st.one_of(st.sampled_from(WORDS), st.text(max_size=40))
    if kind == F.TYPE_BYTES:
        return st.binary(max_size=40)
    if kind == F.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if kind == F.TYPE_MESSAGE:
        if depth >= DEPTH or field.message_type is None:
            return None
        return message_of(field.message_type, depth + 1)
    raise TypeError(f"no strategy for {field.full_name} (type {kind})")


def _repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf 7; older ones have label only
    return bool(flag) if flag is not None else getattr(field, "label", 0) == F.LABEL_REPEATED


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field, value_field = field.message_type.fields
        keys, values = _scalar(key_field, depth), _scalar(value_field, depth)
        if keys is None or values is None:
            return None
        return st.dictionaries(keys, values, max_size=ENTRIES)
    one = _scalar(field, depth)
    if one is None:
        return None
    if _repeated(field):
        return st.lists(one, max_size=ENTRIES)
    return one


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Set ``field`` of ``message`` to ``value`` (a scalar, a message, a list or a dict)."""
    name = field.name
    if isinstance(value, Message):
        getattr(message, name).CopyFrom(value)
    elif isinstance(value, dict):
        target = getattr(message, name)
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif isinstance(value, list):
        target = getattr(message, name)
        if field.type == F.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    else:
        setattr(message, name, value)


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    fields = typing.cast(dict[str, FieldDescriptor], message.DESCRIPTOR.fields_by_name)
    for name, value in values.items():
        _assign(message, fields[name], value)
    return message


def message_of(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of the type ``descriptor`` describes (fields set at random, or not)."""
    cls = GetMessageClass(descriptor)
    optional = {}
    for field in descriptor.fields:
        strategy = _field(field, depth)
        if strategy is not None:
            optional[field.name] = strategy
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


@st.composite
def mutant(draw: st.DrawFn, base: Message, depth: int = 0) -> Message:
    """``base`` (a valid request, say) with one or two of its fields changed to anything: a
    message field may instead be changed within, one of a list's messages too. Most of the
    request stays valid, so the change reaches past the first checks."""
    message = type(base)()
    message.CopyFrom(base)
    fields = list(typing.cast(list[FieldDescriptor], base.DESCRIPTOR.fields))
    if not fields:
        return message
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique=True)):
        name = field.name
        repeated = _repeated(field)
        nested = field.type == F.TYPE_MESSAGE and depth < DEPTH
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if nested and not repeated and message.HasField(name) and draw(st.booleans()):
            getattr(message, name).CopyFrom(draw(mutant(getattr(base, name), depth + 1)))
            continue
        items = getattr(message, name) if repeated and nested and not is_map else None
        if items and draw(st.booleans()):
            index = draw(st.integers(0, len(items) - 1))
            items[index].CopyFrom(draw(mutant(items[index], depth + 1)))
            continue
        strategy = _field(field, depth)
        if strategy is not None:
            message.ClearField(name)
            _assign(message, field, draw(strategy))
    return message
