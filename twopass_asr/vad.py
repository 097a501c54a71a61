"""Streaming FSMN-VAD for the service. StreamingVad is the batched engine (one encoder
forward per process_batch call for all streams, results per stream equal to FunASR's
FsmnVADStreaming run alone); see twopass_asr.batched_vad."""

from __future__ import annotations

from twopass_asr.batched_vad import DEFAULT_VAD_STEP_MS, BatchedStreamingVad, VadOptions, VadStream

StreamingVad = BatchedStreamingVad

__all__ = ["DEFAULT_VAD_STEP_MS", "StreamingVad", "VadOptions", "VadStream"]
