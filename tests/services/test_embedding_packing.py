"""The embedding service's vectors go on the wire as packed float32 bytes parsed by the protobuf
runtime; they must be the messages building them float by float would give."""

from __future__ import annotations

import numpy as np
import pytest

from opea_grpc.pb.v1 import embedding_pb2
from services.embedding.servicer import packed


def by_hand(vectors: np.ndarray) -> embedding_pb2.EmbedResponse:
    return embedding_pb2.EmbedResponse(
        data=[
            embedding_pb2.Embedding(index=i, embedding=row)
            for i, row in enumerate(np.asarray(vectors, dtype=np.float32).tolist())
        ]
    )


@pytest.mark.parametrize(
    "shape",
    [(1, 768), (3, 5), (300, 4), (2, 0), (0, 8), (1, 40)],
    ids=["one", "few", "indices-past-127", "no-dimensions", "no-rows", "length-past-127"],
)
def test_packed_rows_parse_to_the_messages_built_by_hand(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal(shape).astype(np.float32)
    parsed = embedding_pb2.EmbedResponse.FromString(packed(vectors))
    assert parsed == by_hand(vectors)
    assert [e.index for e in parsed.data] == list(range(shape[0]))


def test_other_dtypes_layouts_and_special_values_survive() -> None:
    wide = np.array([[0.1, -0.0, 1e-40, 3.4e38], [np.inf, -np.inf, 2.0, -7.25]])  # float64
    parsed = embedding_pb2.EmbedResponse.FromString(packed(wide))
    assert parsed == by_hand(wide)
    assert np.signbit(parsed.data[0].embedding[1])  # -0.0 stays negative
    broadcast = np.broadcast_to(np.arange(6, dtype=np.float32), (4, 6))  # strides of 0
    assert embedding_pb2.EmbedResponse.FromString(packed(broadcast)) == by_hand(broadcast)
    columns = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert embedding_pb2.EmbedResponse.FromString(packed(columns)) == by_hand(columns)
    nan = embedding_pb2.EmbedResponse.FromString(packed(np.array([[np.nan, 1.0]])))
    assert np.isnan(nan.data[0].embedding[0])
    assert nan.data[0].embedding[1] == 1.0
