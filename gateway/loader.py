"""Documents from files and folders, sent to a gateway's ``POST /v1/ingest``.

>>> found = documents(["docs", "notes/faq.md"])       # reads files; no network
>>> summary = await ingest("http://127.0.0.1:8888", ["docs"], collection="manuals")
>>> print(summary.report())
ingested 12 documents (48 chunks) into collection 'manuals'

Folders are walked recursively, files taken in path order: ``.md``, ``.markdown``, ``.txt`` and
``.rst`` files are read as UTF-8 (a byte-order mark is dropped), other files are skipped and
counted, hidden files and folders (``.git``) are passed over. A document's id is its path
relative to the folder given (``guide/install.md``), or its name for a file given directly, so
ingesting the same folder again replaces its documents instead of adding copies. A file that
cannot be read, is not UTF-8, or whose id another file already has, is reported in ``failed``;
the rest goes on.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

from opea_grpc.config import ConfigError

#: File suffixes read as documents, and the format each is recorded as.
FORMATS = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".rst": "restructuredtext"}
#: Largest request body sent, in bytes (the gateway's default limit is 8 MiB); a larger single
#: document goes alone, and the gateway says if it is too large.
MAX_BATCH_BYTES = 4 * 1024 * 1024

_MARKDOWN_TITLE = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_RST_TITLE = re.compile(r"^(\S.*)\n([=\-~^\"'`#*+:.])\2+[ \t]*$", re.M)
Source = str | os.PathLike[str]


class IngestError(Exception):
    """Ingestion failed; the message says why (the gateway's own words when it refused)."""


class Document(NamedTuple):
    """One file's text, as sent to the gateway."""

    id: str
    text: str
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class Problem:
    """A file left out, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Found:
    """What :func:`documents` found: the documents, the files skipped and those that failed."""

    documents: list[Document]
    #: Files of other types, and empty ones.
    skipped: list[Problem]
    #: Files that could not be read or decoded, or whose id was taken.
    failed: list[Problem]


@dataclass(frozen=True, slots=True)
class Summary:
    """What :func:`ingest` did."""

    collection: str
    documents: int
    chunks: int
    skipped: int
    failed: tuple[Problem, ...] = ()
    #: Each ingested document's title (its first heading, else its file name), in order.
    titles: tuple[str, ...] = ()

    def report(self) -> str:
        """One line for people; the failures are listed in :attr:`failed`."""
        line = (
            f"ingested {_count(self.documents, 'document')} ({_count(self.chunks, 'chunk')}) "
            f"into collection {self.collection!r}"
        )
        if self.skipped:
            line += f"; skipped {_count(self.skipped, 'file')} of other types or empty"
        if self.failed:
            line += f"; {_count(len(self.failed), 'file')} could not be read"
        return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def documents(paths: Iterable[Source]) -> Found:
    """Read every document under ``paths`` (files or folders); never raises for a bad file."""
    found = Found([], [], [])
    ids: dict[str, str] = {}
    seen: set[Path] = set()
    for given in paths:
        root = Path(given)
        files: Iterator[tuple[Path, str]]
        if root.is_dir():
            files = iter(sorted((p, p.relative_to(root).as_posix()) for p in _walk(root, found)))
        elif root.exists() or root.is_symlink():
            files = iter([(root, root.name)])
        else:
            found.failed.append(Problem(str(root), "no such file or folder"))
            continue
        for path, doc_id in files:
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            _read(path, doc_id, ids, found)
    return found


def _walk(root: Path, found: Found) -> Iterator[Path]:
    """Files under ``root``, hidden ones and hidden folders left out."""

    def unreadable(exc: OSError) -> None:
        found.failed.append(Problem(str(exc.filename), f"cannot list it: {exc.strerror}"))

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder, name)


def _read(path: Path, doc_id: str, ids: dict[str, str], found: Found) -> None:
    suffix = path.suffix.lower()
    kind = FORMATS.get(suffix)
    if kind is None:
        found.skipped.append(Problem(str(path), f"not a document type ({suffix or 'no suffix'})"))
        return
    if path.exists() and not path.is_file():
        found.skipped.append(Problem(str(path), "not a regular file"))
        return
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        found.failed.append(
            Problem(
                str(path),
                f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                "convert it to UTF-8 first (e.g. iconv -f latin1 -t utf-8)",
            )
        )
        return
    except OSError as exc:
        found.failed.append(Problem(str(path), f"cannot read it: {exc.strerror or exc}"))
        return
    if not text.strip():
        found.skipped.append(Problem(str(path), "empty"))
        return
    if doc_id in ids:
        found.failed.append(
            Problem(
                str(path),
                f"its id {doc_id!r} is taken by {ids[doc_id]}: ingest the two folders "
                "separately, or into different collections",
            )
        )
        return
    ids[doc_id] = str(path)
    found.documents.append(
        Document(doc_id, text, {"title": _title(text, kind, path), "format": kind})
    )


def _title(text: str, kind: str, path: Path) -> str:
    """The document's first heading, else its file name without the suffix."""
    pattern = {"markdown": _MARKDOWN_TITLE, "restructuredtext": _RST_TITLE}.get(kind)
    match = pattern.search(text) if pattern is not None else None
    return match[1].strip() if match else path.stem


def batches(
    docs: Sequence[Document], size: int, max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[list[Document]]:
    """``docs`` in groups of at most ``size`` documents and about ``max_bytes`` of text."""
    group: list[Document] = []
    weight = 0
    for doc in docs:
        cost = len(doc.text.encode()) + len(doc.id) + 64
        if group and (len(group) == size or weight + cost > max_bytes):
            yield group
            group, weight = [], 0
        group.append(doc)
        weight += cost
    if group:
        yield group


async def ingest(
    url: str,
    paths: Iterable[Source],
    *,
    collection: str | None = None,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
    batch: int = 16,
    progress: bool = True,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> Summary:
    """Send the documents under ``paths`` to the gateway at ``url`` (``http://HOST:PORT``).

    ``collection``, ``chunk_size`` and ``chunk_overlap`` left None take the gateway's defaults.
    Requests carry ``batch`` documents at most, one after another over one connection pool,
    each allowed ``timeout`` seconds. With ``progress``, a bar on stderr counts files and
    chunks. Raises :class:`IngestError` when no document was found, the gateway cannot be
    reached, or it refuses a batch (with its error message); batches sent before stay ingested.
    Raises :class:`~opea_grpc.config.ConfigError` for a bad ``batch``, ``chunk_size`` or
    ``chunk_overlap``.
    """
    _check(batch >= 1, f"batch must be at least 1 document, got {batch}")
    _check(chunk_size is None or chunk_size >= 1, f"chunk size must be >= 1, got {chunk_size}")
    _check(
        chunk_overlap is None or 0 <= chunk_overlap < (chunk_size or sys.maxsize),
        f"chunk overlap must be >= 0 and below the chunk size, got {chunk_overlap}",
    )
    found = await asyncio.to_thread(documents, paths)
    if not found.documents:
        raise IngestError(_nothing_found(found))
    base = url.rstrip("/") if "://" in url else "http://" + url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    given = {"collection": collection, "chunk_size": chunk_size, "chunk_overlap": chunk_overlap}
    options = {k: v for k, v in given.items() if v is not None}
    chunks, name = 0, collection or ""
    limits = httpx.Timeout(timeout, connect=min(timeout, 10.0))
    bar = tqdm(
        total=len(found.documents), unit="file", desc="ingest", file=sys.stderr,
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(headers=headers, timeout=limits) as client:
            for group in batches(found.documents, batch):
                body = {
                    **options,
                    "documents": [
                        {"id": d.id, "text": d.text, "metadata": d.metadata} for d in group
                    ],
                }
                reply = await _post(client, f"{base}/v1/ingest", body, group)
                chunks += int(reply.get("chunks", 0))
                name = str(reply.get("collection", name))
                bar.update(len(group))
                bar.set_postfix(chunks=chunks)
    finally:
        bar.close()
    titles = tuple(d.metadata["title"] for d in found.documents)
    return Summary(
        name, len(found.documents), chunks, len(found.skipped), tuple(found.failed), titles
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _nothing_found(found: Found) -> str:
    looked = ", ".join(FORMATS)
    message = f"no documents to ingest (looked for {looked} files)"
    if found.skipped:
        message += f"; skipped {_count(len(found.skipped), 'file')}"
    if found.failed:
        message += "; " + "; ".join(map(str, found.failed))
    return message


async def _post(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], group: list[Document]
) -> dict[str, Any]:
    try:
        response = await client.post(url, json=body)
    except httpx.UnsupportedProtocol:
        raise IngestError(f"bad gateway URL {url!r}: give it as http://HOST:PORT") from None
    except httpx.ConnectError as exc:
        raise IngestError(
            f"cannot reach the gateway at {url}: {exc or 'connection failed'}; is it running? "
            "(start one with `opea-grpc up`, or give its address)"
        ) from None
    except httpx.TimeoutException:
        raise IngestError(
            f"the gateway at {url} did not answer in time ({_names(group)})"
        ) from None
    except httpx.HTTPError as exc:
        raise IngestError(f"ingest request to {url} failed: {exc}") from None
    if response.status_code >= 400:
        raise IngestError(
            f"the gateway refused {_names(group)} (HTTP {response.status_code}): "
            f"{_error_message(response)}"
        )
    try:
        reply = response.json()
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise IngestError(f"{url} answered 200 without an ingest result: is it the gateway?")
    return reply


def _names(group: list[Document]) -> str:
    shown = ", ".join(d.id for d in group[:3])
    return shown + (f" and {len(group) - 3} more" if len(group) > 3 else "")


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the body's text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(body.get("detail"), str):
            return str(body["detail"])
    return response.text.strip()[:500] or response.reason_phrase
