"""Triton adapter for the streaming Paraformer; the logic lives in twopass_asr.first_pass.engines."""

# First of all: FunASR without its import-everything __init__ (twopass_asr.funasr_classes).
from twopass_asr.funasr_classes import use_light_funasr

use_light_funasr()

import numpy as np
import triton_python_backend_utils as pb_utils

from twopass_asr.first_pass.engines import ENGINES
from twopass_asr.first_pass.options import INT8_KERNEL_ENV, PRECISION_ENV, PRECISIONS, DecodeOptions
from twopass_asr.kernels.int8_recipe import INT8_KERNEL_CHOICES, resolve_int8_precision
from twopass_asr.serving.triton_models import SequenceModel, choice, optional_scalar, optional_vector
from twopass_asr.store import model_store


class TritonPythonModel(SequenceModel):
    store_name = model_store.PARAFORMER
    validate_dir = staticmethod(model_store.validate_paraformer_dir)

    def load(self, model_dir, device, params):
        engine = params.get("engine", "batched")
        if engine not in ENGINES:
            raise pb_utils.TritonModelException(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
        configured = choice(params, "precision", PRECISION_ENV, PRECISIONS, "auto")
        if engine == "funasr":
            if configured not in ("fp32", "auto"):
                raise pb_utils.TritonModelException(f"engine funasr runs in fp32 only, got precision {configured!r}")
            description = "fp32"
            # FunASR's per-stream generate is not thread-safe: one copy of it per worker.
            self.paraformer = ENGINES[engine](model_dir, device=device, copies=self.workers)
        else:
            precision = resolve_int8_precision(configured, device)
            settings = {"precision": precision}
            if engine == "batched":
                settings["int8_kernel"] = choice(params, "int8_kernel", INT8_KERNEL_ENV, INT8_KERNEL_CHOICES, "auto")
            try:
                self.paraformer = ENGINES[engine](model_dir, device=device, **settings)
            except ValueError:
                raise  # a setting this engine cannot take (says which)
            except Exception as exc:  # the int8 export or its sessions; fp32 needs neither
                if configured != "auto" or precision == "fp32":
                    raise
                self.logger.log_warn(f"paraformer_streaming: int8 unavailable ({exc!r}); auto takes fp32")
                self.paraformer = ENGINES[engine](model_dir, device=device, precision="fp32")
            description = self.paraformer.precision_description
        chosen = f"{description} (auto)" if configured == "auto" else description
        self.logger.log_info(f"paraformer_streaming: {engine} engine in {chosen}")

    def new_state(self, request):
        defaults = self.paraformer.default_options
        chunk_size = optional_vector(request, "CHUNK_SIZE")
        encoder_look_back = optional_scalar(request, "ENCODER_LOOK_BACK")
        decoder_look_back = optional_scalar(request, "DECODER_LOOK_BACK")
        return self.paraformer.new_stream(
            DecodeOptions(
                chunk_size=defaults.chunk_size if chunk_size is None else tuple(int(v) for v in chunk_size),
                encoder_look_back=defaults.encoder_look_back if encoder_look_back is None else encoder_look_back,
                decoder_look_back=defaults.decoder_look_back if decoder_look_back is None else decoder_look_back,
            )
        )

    def process_batch(self, states, audios, finals):
        return self.paraformer.process_batch(states, audios, finals)

    def outputs(self, text):
        return [pb_utils.Tensor("TEXT", np.array([[(text or "").encode("utf-8")]], dtype=np.object_))]
