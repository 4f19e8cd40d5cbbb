"""gateway.chunking: properties checked over random texts, then the boundaries it prefers."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from gateway.chunking import chunk, spans

WORDS = [
    "grpc", "service", "gateway", "retrieval", "embedding", "rerank", "chat", "port", "health",
    "deadline", "retry", "stream", "a", "an", "of", "to", "is", "it", "in", "on", "opea-grpc",
    "50051", "x", "ünïcode", "naïve", "東京", "data_dir", "OPEA_PORT",
]  # fmt: skip
HEADING_LINE = re.compile(r" {0,3}#{1,6}(?:[ \t]|$)")


def sentence(rng: random.Random, long_words: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
    if long_words and rng.random() < 0.1:
        words.insert(rng.randrange(len(words)), "L" * rng.randint(30, 120))
    spaces = [rng.choice([" ", " ", " ", "  ", "\t", "\n"]) for _ in words]
    body = "".join(w + s for w, s in zip(words, spaces, strict=True)).rstrip()
    return body + rng.choice([".", ".", "!", "?", "", ":", ".)", '."'])


def paragraph(rng: random.Random, long_words: bool) -> str:
    kind = rng.random()
    if kind < 0.15:
        return "#" * rng.randint(1, 4) + " " + " ".join(rng.sample(WORDS, rng.randint(1, 4)))
    if kind < 0.25:
        return "\n".join(f"- {sentence(rng, long_words)}" for _ in range(rng.randint(1, 5)))
    if kind < 0.3:
        return "```sh\n# " + sentence(rng, False) + "\nopea-grpc up\n```"
    return " ".join(sentence(rng, long_words) for _ in range(rng.randint(1, 8)))


def random_text(rng: random.Random, *, long_words: bool = True) -> str:
    separators = ["\n\n", "\n\n", "\n", "\n\n\n", "\r\n\r\n", "\n \n"]
    parts = [paragraph(rng, long_words) for _ in range(rng.randint(0, 12))]
    body = "".join(p + rng.choice(separators) for p in parts)
    return rng.choice(["", " ", "\n", "\t "]) + body + rng.choice(["", " ", "\n\n"])


def settings(rng: random.Random) -> tuple[int, int]:
    size = rng.choice([1, 2, 5, 17, 40, 80, 200, 500, 1000])
    overlap = rng.choice([0, 0, rng.randrange(size), size // 5, size - 1])
    return size, overlap


def check_invariants(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    found = spans(text, size, overlap)
    assert chunk(text, size, overlap) == [text[s:e] for s, e in found]
    if not text.strip():
        assert found == []
        return found
    first = len(text) - len(text.lstrip())
    assert found[0][0] == first, "the first chunk starts where the text does"
    assert found[-1][1] == len(text.rstrip()), "the last chunk ends where the text does"
    for start, end in found:
        piece = text[start:end]
        assert 0 < len(piece) <= size
        assert piece == piece.strip(), "no chunk starts or ends with whitespace"
    for (s1, e1), (s2, e2) in itertools.pairwise(found):
        assert s1 < s2, "chunks are in order"
        assert e1 < e2, "every chunk adds text"
        if s2 >= e1:
            assert not text[e1:s2].strip(), "only whitespace falls between two chunks"
        else:
            assert e1 - s2 <= overlap, "neighbours share at most overlap characters"
            assert text[s2 - 1].isspace(), "the shared text starts at a word"
    return found


@pytest.mark.parametrize("seed", range(300))
def test_chunks_are_bounded_ordered_and_cover_the_text(seed: int) -> None:
    rng = random.Random(seed)
    text = random_text(rng)
    size, overlap = settings(rng)
    check_invariants(text, size, overlap)


@pytest.mark.parametrize("seed", range(100))
def test_neighbours_share_about_overlap_characters(seed: int) -> None:
    rng = random.Random(seed)
    text = random_text(rng, long_words=False)
    size = rng.choice([200, 500, 1000])
    overlap = rng.choice([size // 10, size // 5, size // 3])
    found = check_invariants(text, size, overlap)
    longest_word = max(map(len, text.split()), default=0)
    widest_space = max(map(len, re.findall(r"\s+", text)), default=0)
    slack = longest_word + widest_space
    for (s1, e1), (s2, _) in itertools.pairwise(found):
        if HEADING_LINE.match(text, s2):
            continue  # a new section: no overlap by design
        if e1 - s1 >= overlap + slack:
            assert e1 - s2 >= overlap - slack, (text[s1:e1], text[s2:])


@pytest.mark.parametrize("seed", range(100))
def test_a_chunk_never_ends_on_a_heading_line(seed: int) -> None:
    rng = random.Random(seed)
    text = random_text(rng, long_words=False)
    size, overlap = rng.choice([200, 500]), rng.choice([0, 40])
    found = check_invariants(text, size, overlap)
    fences = 0
    headings: set[int] = set()  # where each heading line ends
    offset = 0
    for line in text.splitlines(keepends=True):
        fences += line.lstrip(" ").startswith(("```", "~~~"))
        if fences % 2 == 0 and HEADING_LINE.match(line):
            headings.add(offset + len(line.rstrip()))
        offset += len(line)
    for _, end in found[:-1]:
        assert end not in headings, "a heading is kept with the text after it"


def test_same_input_same_chunks() -> None:
    text = random_text(random.Random(7))
    assert chunk(text, 120, 30) == chunk("".join(list(text)), 120, 30)


@pytest.mark.parametrize("text", ["", " ", "\n\n\t ", "\u00a0\u2003\n"])
def test_whitespace_only_text_has_no_chunks(text: str) -> None:
    assert chunk(text, 10, 0) == []


def test_short_text_is_one_chunk_without_surrounding_whitespace() -> None:
    assert chunk("\n  Hello, gateway.  \n", 100, 20) == ["Hello, gateway."]
    assert chunk("exactly ten", 11, 0) == ["exactly ten"]


def test_a_word_longer_than_size_is_cut() -> None:
    assert chunk("a" * 25, 10, 3) == ["a" * 10, "a" * 10, "a" * 5]
    assert chunk("ab c", 1, 0) == ["a", "b", "c"]
    assert chunk("go " + "x" * 12 + " now", 10, 4) == ["go", "x" * 10, "xx now"]


def test_paragraph_boundaries_come_first() -> None:
    paragraphs = ["Alpha one. Alpha two.", "Beta one. Beta two.", "Gamma one. Gamma two."]
    text = "\n\n".join(paragraphs)
    assert chunk(text, 45, 0) == ["\n\n".join(paragraphs[:2]), paragraphs[2]]


def test_then_sentence_boundaries() -> None:
    text = "The first sentence is here. The second one, longer, follows it."
    assert chunk(text, 40, 0) == [
        "The first sentence is here.",
        "The second one, longer, follows it.",
    ]


def test_abbreviations_do_not_end_sentences() -> None:
    text = "Call it with a tool, e.g. grpcurl or buf curl. Then read the reply."
    assert chunk(text, 50, 0)[0] == "Call it with a tool, e.g. grpcurl or buf curl."


def test_then_words_and_overlap_in_whole_words() -> None:
    text = "one two three four five six seven eight nine ten"
    found = chunk(text, 20, 8)
    assert found == ["one two three four", "four five six seven", "seven eight nine ten"]


def test_a_heading_stays_with_its_section() -> None:
    text = "# Ports\n\nThe gateway listens on 8888. Chat is on 50054."
    assert chunk(text, 40, 10) == [
        "# Ports\n\nThe gateway listens on 8888.",
        "on 8888. Chat is on 50054.",
    ]


def test_a_new_section_starts_a_chunk_without_overlap() -> None:
    text = (
        "## Health\n\nEvery server answers health checks.\n\n## Streaming\n\nAnswers arrive as SSE."
    )
    assert chunk(text, 60, 20) == [
        "## Health\n\nEvery server answers health checks.",
        "## Streaming\n\nAnswers arrive as SSE.",
    ]


def test_a_short_paragraph_is_merged_with_what_follows() -> None:
    text = "Short.\n\n" + " ".join(["A longer paragraph sentence."] * 6)
    first = chunk(text, 100, 0)[0]
    assert first.startswith("Short.\n\nA longer paragraph sentence.")


def test_hash_lines_in_code_fences_are_not_headings() -> None:
    text = "Run it:\n\n```sh\n# start everything\nopea-grpc up\n```"
    assert chunk(text, 30, 0) == ["Run it:", "```sh\n# start everything", "opea-grpc up\n```"]


def test_windows_line_endings_are_paragraphs_too() -> None:
    assert chunk("First part.\r\n\r\nSecond part.", 20, 0) == ["First part.", "Second part."]


@pytest.mark.parametrize(
    ("size", "overlap", "message"),
    [
        (0, 0, "chunk size must be at least 1"),
        (-5, 0, "chunk size must be at least 1"),
        (10, 10, "chunk overlap must be within 0..9"),
        (10, -1, "chunk overlap must be within 0..9"),
    ],
)
def test_bad_settings_say_what_to_fix(size: int, overlap: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        chunk("some text", size, overlap)
