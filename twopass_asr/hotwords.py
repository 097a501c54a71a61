"""Hotwords as the WebSocket protocol carries them -> the list of words the second pass biases.

Two forms exist in FunASR's clients: a JSON object string `{"word": weight, ...}` (the
weights tune Paraformer's contextual biasing; Fun-ASR-Nano takes plain words, so they are
dropped) or plain words separated by spaces and/or commas.
"""

from __future__ import annotations

import json
import re

# ASCII and full-width commas: Chinese input methods produce the latter.
_SEPARATORS = re.compile(r"[\s,，]+")


def parse_hotwords(text: str) -> list[str]:
    """Words in first-seen order, duplicates and empty entries removed.

    Raises ValueError naming the problem for a string that starts like a JSON object but
    is not valid JSON.
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
    return list(dict.fromkeys(word for word in words if word))
