"""Triton adapter for the Fun-ASR-Nano second pass; the logic lives in twopass_asr.second_pass.

Decoupled: each request gets its text on a response stream whose last response carries
the final flag (tritonclient's asyncio stream never sees a separate empty final).
The prompt embeddings are built in torch, with one audio encoder pass over the segments
that wait together (SegmentBatcher). The LLM runs on vLLM's async engine (text streamed
as it is generated, or in one response when the request sets STREAM=false) or, with
engine=torch or when `auto` finds no vLLM, on torch: one generate call over the segments
that wait together (text in one response; on a CPU in int8 or bf16 on the compiled products,
twopass_asr.second_pass.llm_on_torch)."""

# First of all: FunASR without its import-everything __init__ (twopass_asr.funasr_classes).
from twopass_asr.funasr_classes import use_light_funasr

use_light_funasr()

import asyncio
from contextlib import aclosing

import numpy as np
import triton_python_backend_utils as pb_utils

from twopass_asr.hotwords import check_language, parse_hotwords
from twopass_asr.kernels.cpu_priority import lower_priority, nice_setting
from twopass_asr.kernels.int8_recipe import INT8_KERNEL_CHOICES, INT8_PRECISIONS
from twopass_asr.second_pass.batcher import PassReport, PassWorker, SegmentBatcher, settings_from_parameters
from twopass_asr.second_pass.drafts import DraftTally, draft_rows_setting
from twopass_asr.second_pass.llm_export import mapped_input_embeddings
from twopass_asr.second_pass.precision import (
    ENCODER_INT8_KERNEL_ENV,
    ENCODER_PRECISION_ENV,
    PRECISION_ENV,
    PRECISIONS,
    TORCH_DTYPES,
    resolve_precision,
)
from twopass_asr.second_pass.recognizer import (
    NanoRecognizer,
    NanoRequest,
    max_new_tokens_setting,
    tokens_per_second_setting,
)
from twopass_asr.second_pass.vllm_engine import (
    CANCELLED_IN_ENGINE,
    EngineUnavailable,
    engine_mode,
    prepare_process_for_vllm,
    start_engine,
)
from twopass_asr.serving.stream_store import StreamError
from twopass_asr.serving.triton_models import (
    InstanceMetric,
    choice,
    error_response,
    model_parameters,
    optional_scalar,
    required_audio,
    resolve_device,
    resolve_model_dir,
    return_freed_memory,
    use_utf8_locale,
)
from twopass_asr.store import model_store

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _optional_text(request, name):
    value = optional_scalar(request, name)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StreamError(f"{name} is not valid UTF-8") from exc
    return str(value)


def _text_response(text):
    out = pb_utils.Tensor("TEXT", np.array([text.encode("utf-8")], dtype=np.object_))
    return pb_utils.InferenceResponse(output_tensors=[out])


class _OnceFinalSender:
    """Sends nothing after the final response: a send after it crashes tritonserver
    (TRITONBACKEND_ResponseSend) instead of failing the one request."""

    def __init__(self, sender):
        self._sender = sender
        self.finished = False

    def send(self, response, final: bool) -> None:
        if self.finished:
            return
        self.finished = final
        if response is None:
            self._sender.send(flags=FINAL)
        else:
            self._sender.send(response, flags=FINAL if final else 0)


class TritonPythonModel:
    def initialize(self, args):
        use_utf8_locale()
        prepare_process_for_vllm()
        _, params = model_parameters(args)
        model_dir = resolve_model_dir(args, params, model_store.NANO)
        device = resolve_device(params, args)
        try:
            mode = engine_mode(params.get("engine"))
            configured_precision = choice(params, "precision", PRECISION_ENV, PRECISIONS, "auto")
            precision = resolve_precision(configured_precision, device)
            configured_encoder = choice(params, "encoder_precision", ENCODER_PRECISION_ENV, INT8_PRECISIONS, "auto")
            encoder_kernel = choice(params, "encoder_int8_kernel", ENCODER_INT8_KERNEL_ENV, INT8_KERNEL_CHOICES,
                                    "auto")
            max_new_tokens = max_new_tokens_setting(params.get("max_new_tokens"))
            tokens_per_second = tokens_per_second_setting(params.get("max_new_tokens_per_second"))
            draft_rows = draft_rows_setting(params.get("draft_rows"))
            embed_batching = settings_from_parameters(params, "embed")
            generate_batching = settings_from_parameters(params, "torch")
            cpu_nice = nice_setting(params.get("cpu_nice"), device)
            # Before any torch thread or vLLM process exists: they inherit it.
            lower_priority(cpu_nice)
            self.recognizer = NanoRecognizer(model_dir, device=device, max_new_tokens=max_new_tokens,
                                             tokens_per_second=tokens_per_second, encoder_precision=configured_encoder,
                                             encoder_int8_kernel=encoder_kernel, draft_rows=draft_rows)
        except (model_store.ModelDirError, ValueError) as exc:
            raise pb_utils.TritonModelException(str(exc)) from exc
        # One worker for the torch work: embeddings, and generation on the torch path.
        self.worker = PassWorker(thread_name_prefix="nano")
        count_encoded = self._pass_counter(args, "encoder", "encoded_segments", "audio encoder")
        self.embedder = SegmentBatcher(self.recognizer.embed_prepared, self.worker, prepare=self.recognizer.prepare,
                                       on_pass=count_encoded, **embed_batching)
        try:
            self.engine = start_engine(mode, self.recognizer, device, params, precision, warn=pb_utils.Logger.log_warn)
        except (EngineUnavailable, ValueError) as exc:
            raise pb_utils.TritonModelException(f"funasr_nano_vllm: engine={mode}, precision {precision}, but {exc}"
                                                ) from exc
        self.generator = None
        if self.engine is not None:
            # vLLM holds its own copy; prompts are built from its file's table, mapped.
            self.recognizer.release_generation_layers(mapped_input_embeddings(self.engine.llm_dir))
        # Prompts are built in the precision the LLM decodes in (with vLLM: the same values
        # vLLM's cast would give).
        if self.engine is None:
            self.recognizer.use_torch_generation(precision)
        else:
            self.recognizer.use_dtype(TORCH_DTYPES[precision])
        if self.engine is None:
            count_generated = self._pass_counter(args, "torch_generate", "torch_generated_segments",
                                                 "torch generation")
            # Generation before encoding when both wait: it finishes a segment already started.
            self.generator = SegmentBatcher(self._generate_batch, self.worker, on_pass=count_generated, priority=1,
                                            **generate_batching)
            family = pb_utils.MetricFamily.COUNTER
            self.draft_tokens_proposed = InstanceMetric(
                args, "twopass_asr_nano_draft_tokens_proposed_total",
                "Tokens of the first pass's drafts the second pass's decode steps checked", family)
            self.draft_tokens_accepted = InstanceMetric(
                args, "twopass_asr_nano_draft_tokens_accepted_total",
                "Tokens of the first pass's drafts the second pass kept (each a decode step saved)", family)
        return_freed_memory()
        generation = ("vLLM" if self.engine else "torch") + " generation"
        if self.recognizer.native_decoder is not None:
            generation += ", decode steps in C"
        rows = self.recognizer.draft_pass_rows
        drafts = f", the first pass's drafts checked in passes of up to {rows} rows" if rows else ""
        chosen = f"{precision} (auto)" if configured_precision == "auto" else precision
        encoder = self.recognizer.encoder_description
        encoder_chosen = f"{encoder} (auto)" if configured_encoder == "auto" else encoder
        length_cap = "" if tokens_per_second is None else f" or {tokens_per_second:g} per second of audio"
        # Named as Triton names this model: the launcher reads the line as the end of its load.
        pb_utils.Logger.log_info(f"{args['model_name']}: loaded {model_store.served_path(model_dir)} on {device} "
                                 f"({generation}), LLM in {chosen}, audio encoder in {encoder_chosen}, "
                                 f"CPU nice +{cpu_nice}, at most {self.recognizer.max_new_tokens} new tokens"
                                 f"{length_cap}{drafts}")

    def _generate_batch(self, items):
        """Torch generation of (prompt embeddings, token cap, draft) triples in one call."""
        prompts, caps, drafts = zip(*items) if items else ((), (), ())
        tally = DraftTally()
        texts = self.recognizer.generate_batch(prompts, caps, drafts, tally)
        self.draft_tokens_proposed.increment(tally.proposed)
        self.draft_tokens_accepted.increment(tally.accepted)
        return texts

    @staticmethod
    def _pass_counter(args, stage, segments_name, what):
        """on_pass for a SegmentBatcher: counts its passes, the segments through them, the
        seconds the segments waited for their pass and the seconds the passes ran."""
        family = pb_utils.MetricFamily.COUNTER
        passes = InstanceMetric(args, f"twopass_asr_nano_{stage}_passes_total",
                                f"Passes of the second pass's {what} (each over one or more segments)", family)
        segments = InstanceMetric(args, f"twopass_asr_nano_{segments_name}_total",
                                  f"Segments through the second pass's {what}", family)
        waited = InstanceMetric(args, f"twopass_asr_nano_{stage}_wait_seconds_total",
                                f"Seconds segments waited for a pass of the second pass's {what}, summed over "
                                "the segments (the batching window, and the worker busy with other passes)", family)
        busy = InstanceMetric(args, f"twopass_asr_nano_{stage}_pass_seconds_total",
                              f"Seconds the passes of the second pass's {what} ran", family)

        def count_pass(report: PassReport) -> None:
            passes.increment(1)
            segments.increment(report.size)
            waited.increment(report.waited_s)
            busy.increment(report.busy_s)

        return count_pass

    async def execute(self, requests):
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    async def _serve(self, request):
        sender = _OnceFinalSender(request.get_response_sender())
        try:
            audio = required_audio(request)
            if audio.dtype != np.int16:
                raise StreamError(f"AUDIO must be int16 PCM, got {audio.dtype}")
            hotwords = parse_hotwords(_optional_text(request, "HOTWORDS") or "")
            language = check_language(_optional_text(request, "LANGUAGE"))
            itn = optional_scalar(request, "ITN")
            itn = True if itn is None else bool(itn)
            stream = optional_scalar(request, "STREAM")
            stream = True if stream is None else bool(stream)
            draft = _optional_text(request, "DRAFT") or ""
            if request.is_cancelled():
                sender.send(error_response("request cancelled"), final=True)
                return
            embeds = await self.embedder.submit(NanoRequest(audio, tuple(hotwords), language, itn))
            cap = self.recognizer.generation_cap(len(audio))
            if self.generator is not None:
                drafted = (embeds, cap, self.recognizer.draft_ids(draft, cap))
                sender.send(_text_response(await self.generator.submit(drafted)), final=True)
                return
            # Leaving the loop early closes the stream, which aborts the request in vLLM.
            pieces = []
            async with aclosing(self.engine.stream(embeds, max_tokens=cap)) as deltas:
                async for delta, is_last in deltas:
                    if request.is_cancelled():
                        pb_utils.Logger.log_info(f"funasr_nano_vllm: {CANCELLED_IN_ENGINE}")
                        sender.send(error_response("request cancelled"), final=True)
                        return
                    if stream:
                        sender.send(_text_response(delta), final=is_last)
                    else:
                        pieces.append(delta)
            if not stream:
                sender.send(_text_response("".join(pieces)), final=True)
        except (StreamError, ValueError) as exc:
            sender.send(error_response(str(exc)), final=True)
        except Exception as exc:  # one bad segment must not take the model down
            pb_utils.Logger.log_error(f"funasr_nano_vllm: request failed: {exc!r}")
            sender.send(error_response(f"internal error in funasr_nano_vllm: {exc}"), final=True)
        finally:
            # Every request ends with exactly one final response, whatever happened.
            sender.send(None, final=True)

    def finalize(self):
        self.worker.shutdown()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        InstanceMetric.release_all()
