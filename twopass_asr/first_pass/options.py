"""Decode options of the streaming Paraformer and the one statement of their ranges, which
the Triton model and the WebSocket protocol both check requests against."""

from __future__ import annotations

from dataclasses import dataclass

from twopass_asr.audio import SAMPLE_RATE
from twopass_asr.kernels.int8_recipe import INT8_PRECISIONS

# FunASR measures chunk_size in 60 ms units.
SAMPLES_PER_CHUNK_UNIT = SAMPLE_RATE * 60 // 1000
# Inclusive bounds of chunk_size's three parts (left context, decode step, look-ahead) and of
# the look-backs, all in chunks.
CHUNK_SIZE_BOUNDS = ((0, 100), (1, 100), (0, 100))
LOOK_BACK_BOUNDS = (0, 100)
# How the batched engine computes: float32, int8, or auto, and int8's kernel
# (twopass_asr.kernels.int8_recipe). The environment variables, when set, override the Triton
# model's `precision` and `int8_kernel` parameters.
PRECISIONS = INT8_PRECISIONS
PRECISION_ENV = "TWOPASS_ASR_FIRST_PASS_PRECISION"
INT8_KERNEL_ENV = "TWOPASS_ASR_FIRST_PASS_INT8_KERNEL"


@dataclass(frozen=True)
class DecodeOptions:
    chunk_size: tuple[int, int, int] = (0, 10, 5)
    encoder_look_back: int = 4
    decoder_look_back: int = 1

    def __post_init__(self):
        if len(self.chunk_size) != 3 or any(int(v) != v for v in self.chunk_size):
            raise ValueError(f"chunk_size must be three integers, got {list(self.chunk_size)}")
        for part, (value, (low, high)) in enumerate(zip(self.chunk_size, CHUNK_SIZE_BOUNDS)):
            if not low <= value <= high:
                raise ValueError(f"chunk_size[{part}] must be between {low} and {high} (units of 60 ms), "
                                 f"got {list(self.chunk_size)}")
        low, high = LOOK_BACK_BOUNDS
        for name in ("encoder_look_back", "decoder_look_back"):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be between {low} and {high} chunks, got {getattr(self, name)}")

    @property
    def step_samples(self) -> int:
        """Samples the first pass decodes per step: chunk_size[1] units of 60 ms."""
        return self.chunk_size[1] * SAMPLES_PER_CHUNK_UNIT


# The decode step every client of ours uses (chunk_size [*, 10, *]): 600 ms.
DEFAULT_STEP_SAMPLES = DecodeOptions().step_samples
