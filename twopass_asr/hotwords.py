"""Hotwords as the WebSocket protocol carries them -> the list of words the second pass biases,
and the bounds on what a client may put into the second pass's prompt.

Two forms exist in FunASR's clients: a JSON object string `{"word": weight, ...}` (the
weights tune Paraformer's contextual biasing; Fun-ASR-Nano takes plain words, so they are
dropped) or plain words separated by spaces and/or commas.

Fun-ASR-Nano writes the hotwords and the language into its LLM prompt beside the audio
(FunASR's get_prompt). Unbounded, one client's list would fill the context (2048 tokens in
the CPU preset) and the torch fallback's memory: a fuzzed 5,000-word list took its process
past 12 GB. The bounds keep them a small share of it.
"""

from __future__ import annotations

import json
import re

# ASCII and full-width commas: Chinese input methods produce the latter.
_SEPARATORS = re.compile(r"[\s,，]+")
MAX_HOTWORDS_CHARS = 1000  # of the words, counted with one separator between each two
MAX_LANGUAGE_CHARS = 32


def parse_hotwords(text: str) -> list[str]:
    """Words in first-seen order, duplicates and empty entries removed.

    Raises ValueError naming the problem for a string that starts like a JSON object but
    is not valid JSON, and for words longer in all than MAX_HOTWORDS_CHARS.
    """
    if not isinstance(text, str):
        raise ValueError(f"hotwords must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        return []
    if text.startswith("{"):
        try:
            table = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"hotwords start with '{{' but are not valid JSON: {exc.msg} at position {exc.pos}") from exc
        words = [word.strip() for word in table]
    else:
        words = _SEPARATORS.split(text)
    words = list(dict.fromkeys(word for word in words if word))
    length = sum(len(word) for word in words) + max(len(words) - 1, 0)
    if length > MAX_HOTWORDS_CHARS:
        raise ValueError(f"hotwords take {length} characters ({len(words)} words); the second pass's prompt "
                         f"takes at most {MAX_HOTWORDS_CHARS}")
    return words


def check_language(language: str | None) -> str | None:
    """`language` unchanged; ValueError when it is longer than a language's name may be."""
    if language is not None and len(language) > MAX_LANGUAGE_CHARS:
        raise ValueError(f"language must be at most {MAX_LANGUAGE_CHARS} characters, got {len(language)}")
    return language
