"""The LLM's keys and values of the text that opens a segment's prompt, kept between segments.

Every Fun-ASR-Nano prompt starts with the same chat text before the audio (system turn, user
turn, the task: "语音转写：", or its hotword and language variants, which a stream keeps for
all its segments). On the torch path that text is more than half of a short segment's prompt,
and prefilling it again for every segment is a large part of the segment's LLM time on a CPU.
So the recognizer notes each prompt's text prefix as it builds the prompt (remember), computes
its keys and values once, at the first generation that starts with it, and later generations
whose prompts start with the same rows continue from them (perf/RESULTS.md, 2026-12-05).

The prefix is matched on the prompt's rows themselves (equal embeddings), so a caller passes
prompts as before. Held entries are bounded by their rows, oldest use dropped first.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Prefix rows held at most, summed over the entries: the default prompt's is 20 rows (about 4.6 MB
# of float32 keys and values on Fun-ASR-Nano's Qwen3-0.6B), a long hotword list's a few hundred.
DEFAULT_MAX_ROWS = 512


@dataclass(eq=False)
class PromptPrefix:
    """One prompt prefix: its embeddings [rows, hidden] and, once computed, the LLM's cache of them
    for one sequence."""

    embeds: torch.Tensor
    cache: object | None = None

    @property
    def rows(self) -> int:
        return self.embeds.shape[0]

    def opens(self, prompt: torch.Tensor) -> bool:
        """Whether `prompt` ([tokens, hidden]) starts with this prefix and goes on past it."""
        return prompt.shape[0] > self.rows and torch.equal(prompt[:self.rows], self.embeds)


class PromptPrefixCache:
    """Prompt prefixes by their token ids; `compute(embeds)` gives the LLM's cache of a prefix
    (a transformers Cache over one sequence), called at most once per prefix while it is held."""

    def __init__(self, compute: Callable[[torch.Tensor], object], max_rows: int = DEFAULT_MAX_ROWS):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.compute = compute
        self.max_rows = max_rows
        self._entries: OrderedDict[tuple[int, ...], PromptPrefix] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, token_ids: Sequence[int], embeds: torch.Tensor) -> None:
        """Notes a prefix (its token ids and their embeddings, [rows, hidden]) prompts start with."""
        key = tuple(int(token) for token in token_ids)
        if not key or len(key) > self.max_rows:
            return
        if len(key) != embeds.shape[0]:
            raise ValueError(f"{len(key)} token ids for {embeds.shape[0]} embedding rows")
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = PromptPrefix(embeds.detach().clone())
            while sum(entry.rows for entry in self._entries.values()) > self.max_rows:
                self._entries.popitem(last=False)

    def prefix_of(self, prompts: Sequence[torch.Tensor]) -> PromptPrefix | None:
        """The longest held prefix every one of `prompts` starts with, or None."""
        with self._lock:
            matches = [(key, entry) for key, entry in self._entries.items()
                       if all(entry.opens(prompt) for prompt in prompts)]
            if not matches:
                return None
            key, entry = max(matches, key=lambda match: match[1].rows)
            self._entries.move_to_end(key)
            return entry

    def cache_for(self, prefix: PromptPrefix, batch: int):
        """A fresh copy of the prefix's cache for `batch` sequences (generation extends it in
        place), computing the cache at its first use."""
        with self._lock:
            if prefix.cache is None:
                prefix.cache = self.compute(prefix.embeds)
            cache = copy.deepcopy(prefix.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    def clear(self) -> None:
        """Forgets every prefix (the LLM's layers changed: their caches are stale)."""
        with self._lock:
            self._entries.clear()


__all__ = ["DEFAULT_MAX_ROWS", "PromptPrefix", "PromptPrefixCache"]
