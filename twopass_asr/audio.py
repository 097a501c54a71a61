"""PCM conventions shared by every model: the wire carries 16 kHz mono int16."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 16000


def pcm16_to_float(pcm: np.ndarray) -> torch.Tensor:
    """int16 samples -> float32 in [-1, 1), the scale FunASR's loaders produce."""
    import torch  # here, so that the frontend can share SAMPLE_RATE without loading torch

    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise ValueError(f"expected int16 PCM samples, got {pcm.dtype}")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)
