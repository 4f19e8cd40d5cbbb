"""A BERT sentence encoder in numpy: tokenizer, float32 forward pass, mean pooling, L2 norm.

This is what sentence-transformers runs for all-MiniLM-L6-v2 (``Transformer`` -> ``Pooling``
with mean over the attention mask -> ``Normalize``), written against numpy and the
``tokenizers`` library so that no torch is needed. Weights come from a ``model.safetensors``
in Hugging Face's ``BertModel`` layout; GELU is the exact (erf) one BERT uses.

>>> model = SentenceBert.load(Path("model"), max_tokens=256)   # reads the files
>>> vectors, tokens = model.encode(["a sentence", "another one"])
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]

# Abramowitz & Stegun 7.1.26: erfc(z) = poly(t) * exp(-z^2), t = 1 / (1 + p z), for z >= 0,
# with absolute error below 1.5e-7 (under float32 resolution). Needs no scipy; the tanh
# approximation of GELU would be off by up to 5e-4. Constants pre-scaled for z = |x| / sqrt 2
# and for the 1/2 of Phi(x) = erfc(-x / sqrt 2) / 2.
_GELU_P = np.float32(0.3275911 / np.sqrt(2.0))
_GELU_A = tuple(
    np.float32(a / 2) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)
)
_HALF = np.float32(0.5)
_MASKED = np.float32(np.finfo(np.float32).min)
#: Rows per feed-forward block: (256, 1536) float32 activations are 1.5 MB, within L2.
_FFN_ROWS = 256
#: Attention scores computed at once, in bytes (a share of L2).
_SCORES_BYTES = 1 << 20


def gelu(x: Floats) -> Floats:
    """Exact GELU, ``x * Phi(x)``, with Phi from erf as BERT defines it; overwrites ``x``.

    For x >= 0, Phi(x) = 1 - h and for x < 0, Phi(x) = h, where h = erfc(|x| / sqrt 2) / 2;
    so Phi(x) = 1/2 + copysign(1/2 - h, x).
    """
    z = np.abs(x)
    t: Floats = z * _GELU_P
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    h: Floats = t * _GELU_A[0]
    for a in _GELU_A[1:]:
        h += a
        h *= t
    np.square(z, out=z)
    z *= -_HALF
    np.exp(z, out=z)
    h *= z
    np.subtract(_HALF, h, out=h)
    np.copysign(h, x, out=h)
    h += _HALF
    x *= h
    return x


def _layer_norm(x: Floats, weight: Floats, bias: Floats, eps: float) -> Floats:
    mean = x.mean(axis=-1, keepdims=True)
    x = x - mean
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    x *= 1.0 / np.sqrt(var + np.float32(eps))
    x *= weight
    x += bias
    return x


@dataclass(frozen=True, slots=True)
class BertConfig:
    """The parts of a Hugging Face ``config.json`` that the forward pass needs."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, text: str) -> BertConfig:
        raw = json.loads(text)
        if raw.get("model_type") != "bert" or raw.get("hidden_act") != "gelu":
            raise ValueError("config.json: expected model_type bert with hidden_act gelu")
        return cls(
            hidden_size=int(raw["hidden_size"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            layer_norm_eps=float(raw["layer_norm_eps"]),
        )


@dataclass(frozen=True, slots=True)
class _Layer:
    qkv_w: Floats  # (hidden, 3 * hidden); the query part pre-scaled by 1/sqrt(head size)
    qkv_b: Floats
    out_w: Floats
    out_b: Floats
    ln1_w: Floats
    ln1_b: Floats
    up_w: Floats
    up_b: Floats
    down_w: Floats
    down_b: Floats
    ln2_w: Floats
    ln2_b: Floats


def _linear_t(weights: Mapping[str, Floats], name: str) -> Floats:
    """A torch ``Linear`` weight (out, in) as a contiguous (in, out) matrix for ``x @ w``."""
    return np.ascontiguousarray(weights[name].T, dtype=np.float32)


class BertEncoder:
    """The BERT encoder stack: ids and attention mask in, last hidden states out."""

    def __init__(self, config: BertConfig, weights: Mapping[str, Floats]) -> None:
        self.config = config
        heads = config.num_attention_heads
        if config.hidden_size % heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self._heads = heads
        scale = np.float32(1.0 / np.sqrt(config.hidden_size // heads))
        f32 = np.float32
        self._word = np.asarray(weights["embeddings.word_embeddings.weight"], dtype=f32)
        self._position = np.asarray(weights["embeddings.position_embeddings.weight"], dtype=f32)
        self._token_type = np.asarray(weights["embeddings.token_type_embeddings.weight"][0], f32)
        self._ln_w = np.asarray(weights["embeddings.LayerNorm.weight"], dtype=f32)
        self._ln_b = np.asarray(weights["embeddings.LayerNorm.bias"], dtype=f32)
        self._layers: list[_Layer] = []
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            qkv_w = np.concatenate(
                [
                    _linear_t(weights, att + "self.query.weight") * scale,
                    _linear_t(weights, att + "self.key.weight"),
                    _linear_t(weights, att + "self.value.weight"),
                ],
                axis=1,
            )
            qkv_b = np.concatenate(
                [
                    weights[att + "self.query.bias"] * scale,
                    weights[att + "self.key.bias"],
                    weights[att + "self.value.bias"],
                ]
            ).astype(f32)
            self._layers.append(
                _Layer(
                    qkv_w=np.ascontiguousarray(qkv_w, dtype=f32),
                    qkv_b=qkv_b,
                    out_w=_linear_t(weights, att + "output.dense.weight"),
                    out_b=np.asarray(weights[att + "output.dense.bias"], dtype=f32),
                    ln1_w=np.asarray(weights[att + "output.LayerNorm.weight"], dtype=f32),
                    ln1_b=np.asarray(weights[att + "output.LayerNorm.bias"], dtype=f32),
                    up_w=_linear_t(weights, p + "intermediate.dense.weight"),
                    up_b=np.asarray(weights[p + "intermediate.dense.bias"], dtype=f32),
                    down_w=_linear_t(weights, p + "output.dense.weight"),
                    down_b=np.asarray(weights[p + "output.dense.bias"], dtype=f32),
                    ln2_w=np.asarray(weights[p + "output.LayerNorm.weight"], dtype=f32),
                    ln2_b=np.asarray(weights[p + "output.LayerNorm.bias"], dtype=f32),
                )
            )

    @classmethod
    def load(cls, directory: Path) -> BertEncoder:
        """Read ``config.json`` and ``model.safetensors`` from ``directory``."""
        config = BertConfig.from_json((directory / "config.json").read_text(encoding="utf-8"))
        return cls(config, load_file(str(directory / "model.safetensors")))

    def __call__(self, ids: Ints, mask: Ints) -> Floats:
        """Last hidden states, shape (batch, length, hidden), for padded ``ids`` and ``mask``."""
        batch, length = ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {length} tokens exceeds the position embeddings")
        hidden = self.config.hidden_size
        eps = self.config.layer_norm_eps
        x = self._word[ids]
        x += self._position[:length]
        x += self._token_type
        x = _layer_norm(x.reshape(batch * length, hidden), self._ln_w, self._ln_b, eps)
        lengths = mask.sum(axis=1)
        bias = (1 - mask).astype(np.float32) * _MASKED  # on padded keys, as transformers does
        for layer in self._layers:
            qkv = x @ layer.qkv_w
            qkv += layer.qkv_b
            context = self._attention(qkv.reshape(batch, length, 3 * hidden), bias, lengths)
            attended = context.reshape(batch * length, hidden) @ layer.out_w
            attended += layer.out_b
            attended += x
            x = _layer_norm(attended, layer.ln1_w, layer.ln1_b, eps)
            x = self._feed_forward(x, layer)
        return x.reshape(batch, length, hidden)

    def _attention(self, qkv: Floats, bias: Floats, lengths: Ints) -> Floats:
        """Multi-head self-attention of (batch, length, 3 * hidden) projections.

        Sequences go in groups whose (heads, length, length) scores stay within L2 cache, each
        group cut to its own longest sequence. ``bias`` (batch, length) is added to the scores
        of each key: 0, or the most negative float for padding. Padded query rows get zeros
        (pooling ignores them).
        """
        batch, length, _ = qkv.shape
        hidden = self.config.hidden_size
        heads = self._heads
        context = np.zeros((batch, length, hidden), dtype=np.float32)
        group = max(1, _SCORES_BYTES // (heads * length * length * 4))
        for start in range(0, batch, group):
            stop = min(start + group, batch)
            n = int(lengths[start:stop].max())
            g = stop - start
            # (3, group, heads, n, head size), contiguous so that matmul runs on BLAS
            parts = np.ascontiguousarray(
                qkv[start:stop, :n]
                .reshape(g, n, 3, heads, hidden // heads)
                .transpose(2, 0, 3, 1, 4)
            )
            scores = parts[0] @ parts[1].transpose(0, 1, 3, 2)
            if int(lengths[start:stop].min()) < n:
                scores += bias[start:stop, None, None, :n]
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            heads_out = scores @ parts[2]  # (group, heads, n, head size)
            context[start:stop, :n] = heads_out.transpose(0, 2, 1, 3).reshape(g, n, hidden)
        return context

    def _feed_forward(self, x: Floats, layer: _Layer) -> Floats:
        # In blocks of rows, so that the (rows, intermediate) activations stay in cache
        # between the two matmuls and GELU's elementwise passes.
        out = np.empty_like(x)
        for start in range(0, len(x), _FFN_ROWS):
            rows = x[start : start + _FFN_ROWS]
            up = rows @ layer.up_w
            up += layer.up_b
            down = np.matmul(gelu(up), layer.down_w, out=out[start : start + _FFN_ROWS])
            down += layer.down_b
            down += rows
        return _layer_norm(out, layer.ln2_w, layer.ln2_b, self.config.layer_norm_eps)


class SentenceBert:
    """Texts to unit vectors: tokenize (truncated), encode, mean-pool over the mask, normalise.

    ``encode`` sorts the texts by length and runs them in chunks of at most ``chunk_tokens``
    padded tokens, so that padding and the attention matrices stay small.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        encoder: BertEncoder,
        *,
        max_tokens: int,
        chunk_tokens: int = 4096,
    ) -> None:
        if not 2 <= max_tokens <= encoder.config.max_position_embeddings:
            raise ValueError(
                f"max_tokens must be 2..{encoder.config.max_position_embeddings}, got {max_tokens}"
            )
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_tokens = max_tokens
        self.chunk_tokens = max(chunk_tokens, max_tokens)
        tokenizer.enable_truncation(max_tokens)
        tokenizer.no_padding()

    @classmethod
    def load(cls, directory: Path, *, max_tokens: int, chunk_tokens: int = 4096) -> SentenceBert:
        """Read ``tokenizer.json``, ``config.json`` and ``model.safetensors`` from ``directory``."""
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        encoder = BertEncoder.load(directory)
        return cls(tokenizer, encoder, max_tokens=max_tokens, chunk_tokens=chunk_tokens)

    @property
    def dimensions(self) -> int:
        return self.encoder.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, with [CLS] and [SEP], truncated to ``max_tokens``."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str]) -> tuple[Floats, Ints]:
        """Unit vectors (n, hidden) and the token count of each text (special tokens included)."""
        ids = self.tokenize(texts)
        counts = np.array([len(i) for i in ids], dtype=np.int64)
        out = np.empty((len(ids), self.dimensions), dtype=np.float32)
        order = np.argsort(counts, kind="stable")
        start = 0
        while start < len(order):
            # Sorted ascending, so the last row of a chunk sets its padded length.
            stop = start + 1
            while stop < len(order) and (stop - start + 1) * counts[order[stop]] <= (
                self.chunk_tokens
            ):
                stop += 1
            rows = order[start:stop]
            out[rows] = self._embed_chunk([ids[r] for r in rows])
            start = stop
        return out, counts

    def _embed_chunk(self, ids: list[list[int]]) -> Floats:
        length = max(len(i) for i in ids)
        batch = np.zeros((len(ids), length), dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.int64)
        for row, seq in enumerate(ids):
            batch[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        hidden = self.encoder(batch, mask)
        weights = mask.astype(np.float32)[:, :, None]
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: Floats = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit
