"""Triton adapter for the streaming FSMN-VAD; the logic lives in twopass_asr.vad."""

# First of all: FunASR without its import-everything __init__ (twopass_asr.funasr_classes).
from twopass_asr.funasr_classes import use_light_funasr

use_light_funasr()

import numpy as np
import triton_python_backend_utils as pb_utils

from twopass_asr.serving.triton_models import SequenceModel, optional_scalar
from twopass_asr.store import model_store
from twopass_asr.vad.batched import BatchedStreamingVad, VadOptions


def _positive_or_none(value):
    return None if value is None or value <= 0 else value


class TritonPythonModel(SequenceModel):
    store_name = model_store.VAD
    validate_dir = staticmethod(model_store.validate_vad_dir)
    # FunASR's VAD detection keeps per-call settings on the shared model (vad_opts), so two
    # passes at once break each other's frame bookkeeping (seen with decoupled workers).
    passes_may_overlap = False

    def load(self, model_dir, device, params):
        self.vad = BatchedStreamingVad(model_dir, device=device)

    def new_state(self, request):
        energy = optional_scalar(request, "ENERGY_DB")
        return self.vad.new_stream(
            VadOptions(
                max_end_silence_ms=_positive_or_none(optional_scalar(request, "MAX_END_SILENCE_MS")),
                max_segment_ms=_positive_or_none(optional_scalar(request, "MAX_SEGMENT_MS")),
                energy_db=None if energy is None else float(energy),
            )
        )

    def process_batch(self, states, audios, finals):
        return self.vad.process_batch(states, audios, finals)

    def outputs(self, segments):
        rows = np.asarray(segments or [], dtype=np.int64).reshape(1, -1, 2)
        return [pb_utils.Tensor("SEGMENTS", rows)]
