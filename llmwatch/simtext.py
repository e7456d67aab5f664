"""Text rules of the simulated upstream: token counting, answers and directives.

The simulator in ``llmwatch.simulator`` imports these helpers. They need no
event loop and no HTTP, so tests can apply them directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A run of ASCII letters, or any single character that is neither whitespace nor
# an ASCII letter. Python's \s matches Unicode whitespace (str.isspace).
_TOKEN_RE = re.compile(r"[A-Za-z]+|[^\sA-Za-z]")

# Hiragana, katakana, CJK ideographs (base block, extension A, compatibility)
# and Hangul syllables.
_CJK_RE = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]"
)

MESSAGE_OVERHEAD_TOKENS = 3
PROMPT_OVERHEAD_TOKENS = 3
DEFAULT_ANSWER_TOKENS = 20
MAX_ANSWER_TOKENS = 100_000

FAULTS = (
    "rate_limit",
    "server_error",
    "unavailable",
    "hang",
    "malformed",
    "drop",
    "no_usage",
)

# Each word is a single run of ASCII letters, so each counts as one token.
_ENGLISH_WORDS = (
    "the",
    "model",
    "request",
    "latency",
    "token",
    "answer",
    "metric",
    "cost",
    "stream",
    "prompt",
    "cache",
    "window",
    "service",
    "counter",
    "histogram",
    "budget",
    "error",
    "retry",
    "upstream",
    "quickly",
    "measures",
    "returns",
    "reports",
    "keeps",
    "every",
    "small",
    "steady",
    "simulated",
    "and",
    "with",
    "for",
    "each",
)
# Each character is one token.
_CHINESE_CHARACTERS = (
    "模型请求回答延迟成本指标缓存服务计数时间数据结果我们这个一些可以没有问题"
)
_ENGLISH_FULL_STOP = "."
_CHINESE_FULL_STOP = "。"

# Directive values stop at the first character outside this set, so a directive
# may be followed directly by CJK text or punctuation.
_DIRECTIVE_RE = re.compile(r"#(fault|times|delay|answer_tokens)=([A-Za-z0-9_.+-]*)")


def count_tokens(text: str) -> int:
    """Count the tokens of ``text`` under the simulator's rule.

    The rule replaces a real tokenizer and is simple enough to apply by
    hand:

    - each run of ASCII letters (``[A-Za-z]+``) is 1 token;
    - each digit is 1 token, so ``2024`` is 4 tokens;
    - each other character that is not whitespace is 1 token: punctuation,
      CJK ideographs, emoji, one per Unicode code point;
    - whitespace (anything ``str.isspace`` accepts) is free.

    The prompt tokens of a chat request are the sum over its messages of
    ``count_tokens(content) + 3``, plus 3. For list-of-parts content only the
    ``text`` parts count, each on its own. Test directives such as
    ``#fault=hang`` are part of the prompt text and count like any other text.

    >>> count_tokens("Hello, world! 42")
    6
    >>> count_tokens("#fault=rate_limit")
    6
    """
    return len(_TOKEN_RE.findall(text))


def content_texts(content: object) -> list[str]:
    """Return the text of a message's content, one string per text part.

    Content is a string, a list of parts, or None. Parts other than text (images,
    audio, files) contribute no text.
    """
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ]
    return []


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Count a chat request's prompt tokens under the rule of ``count_tokens``."""
    total = PROMPT_OVERHEAD_TOKENS
    for message in messages:
        parts = content_texts(message.get("content"))
        total += sum(count_tokens(part) for part in parts) + MESSAGE_OVERHEAD_TOKENS
    return total


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Return the text of the last message with role "user", or "" if none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return "\n".join(content_texts(message.get("content")))
    return ""


def contains_cjk(text: str) -> bool:
    """Return whether ``text`` contains a kana, CJK ideograph or Hangul character."""
    return _CJK_RE.search(text) is not None


def messages_digest(messages: Sequence[Mapping[str, Any]]) -> bytes:
    """Hash the messages, so that requests with equal messages get equal digests."""
    canonical = json.dumps(
        messages, sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).digest()


def build_answer(seed: bytes, length: int, *, chinese: bool) -> list[str]:
    """Build a deterministic answer of ``length`` tokens, one string per token.

    The pieces joined together count as ``length`` tokens under ``count_tokens``,
    and each piece alone counts as 1, so a stream can send one piece per chunk.
    English answers are sentences of words from a small vocabulary. Chinese
    answers are characters, with sentences ending in "。".
    """
    # random.random() is the one part of the module whose sequence for a given
    # seed is guaranteed to stay the same across Python versions.
    rng = random.Random(int.from_bytes(seed, "big"))
    vocabulary: Sequence[str] = _CHINESE_CHARACTERS if chinese else _ENGLISH_WORDS
    full_stop = _CHINESE_FULL_STOP if chinese else _ENGLISH_FULL_STOP

    pieces: list[str] = []
    words_in_sentence = 0
    sentence_length = 5 + int(rng.random() * 8)
    for position in range(length):
        remaining = length - position
        # A full stop ends the answer, or a sentence when enough tokens remain
        # for at least one more word and the final full stop.
        if words_in_sentence > 0 and (
            remaining == 1 or (words_in_sentence >= sentence_length and remaining >= 3)
        ):
            pieces.append(full_stop)
            words_in_sentence = 0
            sentence_length = 5 + int(rng.random() * 8)
            continue
        word = vocabulary[int(rng.random() * len(vocabulary))]
        if not chinese:
            if words_in_sentence == 0:
                word = word.capitalize()
            if pieces:
                word = " " + word
        pieces.append(word)
        words_in_sentence += 1
    return pieces


class DirectiveError(ValueError):
    """A directive in the prompt or the x-simulator-fault header is invalid."""


@dataclass(frozen=True)
class Directives:
    """Test directives found in the last user message."""

    fault: str | None = None
    times: int | None = None
    delay_s: float | None = None
    answer_tokens: int | None = None


def parse_fault(value: str, source: str) -> str:
    """Return ``value`` if it names a fault, else raise DirectiveError."""
    if value not in FAULTS:
        raise DirectiveError(
            f"Invalid value {value!r} for {source}. "
            f"Accepted values: {', '.join(FAULTS)}."
        )
    return value


def _parse_whole_number(name: str, value: str, minimum: int, maximum: int) -> int:
    accepted = f"a whole number from {minimum} to {maximum}"
    if not value.isdigit() or not minimum <= int(value) <= maximum:
        raise DirectiveError(
            f"Invalid value {value!r} for #{name}. Accepted values: {accepted}."
        )
    return int(value)


def _parse_seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise DirectiveError(
            f"Invalid value {value!r} for #{name}. "
            "Accepted values: a number of seconds of at least 0, such as 0.5."
        )
    return seconds


def parse_directives(text: str) -> Directives:
    """Parse the ``#name=value`` directives in ``text``.

    The names are fault, times, delay and answer_tokens, and each may appear at
    most once. Other ``#word=`` text is ordinary prompt text. A value ends at the
    first character other than an ASCII letter, digit or one of ``_.+-``, and a
    trailing full stop is dropped. Raises DirectiveError naming the directive and
    its accepted values.
    """
    values: dict[str, str] = {}
    for match in _DIRECTIVE_RE.finditer(text):
        name, value = match.group(1), match.group(2).rstrip(".")
        if name in values:
            raise DirectiveError(
                f"Directive #{name} appears more than once in the last user "
                "message. Give each directive at most once."
            )
        values[name] = value

    fault = values.get("fault")
    times = values.get("times")
    delay = values.get("delay")
    answer_tokens = values.get("answer_tokens")
    return Directives(
        fault=None if fault is None else parse_fault(fault, "#fault"),
        times=None if times is None else _parse_whole_number("times", times, 1, 10**6),
        delay_s=None if delay is None else _parse_seconds("delay", delay),
        answer_tokens=(
            None
            if answer_tokens is None
            else _parse_whole_number(
                "answer_tokens", answer_tokens, 0, MAX_ANSWER_TOKENS
            )
        ),
    )
