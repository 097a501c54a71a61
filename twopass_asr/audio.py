"""PCM conventions shared by every model: the wire carries 16 kHz mono int16."""

from __future__ import annotations

import numpy as np
import torch

SAMPLE_RATE = 16000


def pcm16_to_float(pcm: np.ndarray) -> torch.Tensor:
    """int16 samples -> float32 in [-1, 1), the scale FunASR's loaders produce."""
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise ValueError(f"expected int16 PCM samples, got {pcm.dtype}")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)
