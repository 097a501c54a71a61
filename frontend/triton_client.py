"""The frontend's only way to Triton: gRPC streaming through tritonclient.grpc.aio.

Sequence models (vad, paraformer_streaming) get one bidirectional stream per WebSocket
stream, carrying the requests of successive Triton sequences; the decoupled second pass
(funasr_nano_vllm) gets one stream per segment, so cancelling it cancels just that request.
The input/output names follow model_repository/*/config.pbtxt. TritonBackend is the
service's backend (backend.py) on top of these.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from frontend.backend import Backend, BackendLost, InferenceError, Result, StreamingModel, StreamModels
from frontend.protocol import SAMPLE_RATE, StreamConfig

log = logging.getLogger("frontend.triton")

VAD_MODEL = "vad"
FIRST_PASS_MODEL = "paraformer_streaming"
SECOND_PASS_MODEL = "funasr_nano_vllm"

# Ending a sequence for a client that vanished: a little silence with sequence_end.
_CLOSING_SILENCE = np.zeros(SAMPLE_RATE // 100, dtype=np.int16)
_CLOSE_TIMEOUT_S = 5.0
# A readiness probe that gets no answer in this time counts as not ready.
READY_TIMEOUT_S = 2.0
# A VAD or first-pass step unanswered for this long means the server stopped answering (a
# step takes milliseconds; seconds only on a server far past its capacity).
DEFAULT_STEP_TIMEOUT_S = 30.0

# Retry a lost channel quickly so service resumes within seconds once Triton is back
# (gRPC's default backoff grows to two minutes).
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class TritonUnavailable(BackendLost):
    """Triton cannot be reached (stopped, restarting, wrong address) or stopped answering."""


def _classify(exc: grpc.RpcError, model: str, url: str) -> InferenceError:
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return TritonUnavailable(f"inference server unreachable at {url} ({details})")
    if code == grpc.StatusCode.CANCELLED:
        return InferenceError(f"{model}: request cancelled by the inference server ({details})")
    return InferenceError(f"{model}: gRPC error {code.name if code else ''} ({details})")


def _response_error(model: str, message: str) -> InferenceError:
    if "Server is stopping" in message:
        return TritonUnavailable(f"inference server is shutting down ({model}: {message})")
    return InferenceError(f"{model}: {message}")


class SequenceIds:
    """CORRIDs unique across every connection of this process. The random start keeps two
    frontends sharing one Triton apart; 0 is reserved by Triton for "no sequence"."""

    def __init__(self):
        self._counter = itertools.count(secrets.randbits(62) + 1)

    def next(self) -> int:
        return next(self._counter)


def _tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _bytes(name: str, text: str) -> grpcclient.InferInput:
    return _tensor(name, np.array([text.encode("utf-8")], dtype=np.object_), "BYTES")


class SequenceStream:
    """One gRPC stream to one sequence-batched model. Requests go one at a time (the caller
    awaits each answer), so answers match requests first-in first-out; an answer to a
    request whose caller was cancelled is dropped."""

    def __init__(self, gateway: TritonGateway, model: str):
        self.model = model
        self._gateway = gateway
        self._requests: asyncio.Queue[dict | None] = asyncio.Queue()
        self._waiting: deque[asyncio.Future] = deque()
        self._lock = asyncio.Lock()
        self._failure: InferenceError | None = None
        self._responses = gateway.client.stream_infer(self._request_iterator())
        self._reader = asyncio.create_task(self._read())

    async def infer(
        self,
        inputs: list[grpcclient.InferInput],
        sequence_id: int,
        start: bool = False,
        end: bool = False,
        timeout: float | None = None,
    ) -> grpcclient.InferResult:
        async with self._lock:
            if self._failure is not None:
                raise self._failure
            answer = asyncio.get_running_loop().create_future()
            self._waiting.append(answer)
            self._requests.put_nowait({
                "model_name": self.model,
                "inputs": inputs,
                "sequence_id": sequence_id,
                "sequence_start": start,
                "sequence_end": end,
            })
            return await asyncio.wait_for(answer, timeout)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def cancel(self) -> None:
        """Drop the stream at once (its server is gone or no longer used)."""
        self._responses.cancel()
        self._reader.cancel()

    async def close(self) -> None:
        """Finish the stream after the answers already asked for."""
        self._requests.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), 10)
        except asyncio.TimeoutError:
            self._responses.cancel()
            self._reader.cancel()

    async def _request_iterator(self) -> AsyncIterator[dict]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        try:
            await self._deliver_answers()
        except asyncio.CancelledError:
            self._fail(InferenceError(f"{self.model}: stream closed"))
            raise

    async def _deliver_answers(self) -> None:
        try:
            async for result, error in self._responses:
                answer = self._waiting.popleft() if self._waiting else None
                if answer is None or answer.done():
                    continue
                if error is not None:
                    answer.set_exception(_response_error(self.model, error.message()))
                else:
                    answer.set_result(result)
        except grpc.RpcError as exc:
            self._fail(await self._gateway.rpc_failure(exc, self.model))
        else:
            self._fail(TritonUnavailable(f"{self.model}: the inference server at {self._gateway.url} ended the stream"))

    def _fail(self, failure: InferenceError) -> None:
        self._failure = failure
        while self._waiting:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_exception(failure)


class TritonGateway:
    """The shared gRPC channel and typed calls for the three models."""

    def __init__(self, url: str):
        self.url = url
        self.client = grpcclient_aio.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    def open_stream(self, model: str) -> SequenceStream:
        return SequenceStream(self, model)

    async def rpc_failure(self, exc: grpc.RpcError, model: str) -> InferenceError:
        """The error for a gRPC call that failed. A server killed mid-stream can end its streams
        with INTERNAL rather than UNAVAILABLE, so any other failure counts as the server lost
        when the server no longer answers ready."""
        failure = _classify(exc, model, self.url)
        if not isinstance(failure, BackendLost) and not await self.ready(READY_TIMEOUT_S):
            return TritonUnavailable(f"{failure}; the inference server at {self.url} no longer answers")
        return failure

    @staticmethod
    def audio_inputs(pcm: np.ndarray) -> list[grpcclient.InferInput]:
        """A chunk for either sequence model, with no per-sequence options."""
        return [_tensor("AUDIO", pcm.reshape(1, -1), "INT16")]

    @staticmethod
    def vad_inputs(pcm: np.ndarray, max_end_silence_ms: int | None = None, max_segment_ms: int | None = None,
                   energy_db: float | None = None) -> list[grpcclient.InferInput]:
        """Knobs go only on the first request of a sequence (the model reads them there)."""
        inputs = TritonGateway.audio_inputs(pcm)
        if max_end_silence_ms is not None:
            inputs.append(_tensor("MAX_END_SILENCE_MS", np.array([[max_end_silence_ms]], dtype=np.int32), "INT32"))
        if max_segment_ms is not None:
            inputs.append(_tensor("MAX_SEGMENT_MS", np.array([[max_segment_ms]], dtype=np.int32), "INT32"))
        if energy_db is not None:
            inputs.append(_tensor("ENERGY_DB", np.array([[energy_db]], dtype=np.float32), "FP32"))
        return inputs

    @staticmethod
    def first_pass_inputs(pcm: np.ndarray, chunk_size: tuple[int, int, int] | None = None,
                          encoder_look_back: int | None = None, decoder_look_back: int | None = None
                          ) -> list[grpcclient.InferInput]:
        inputs = TritonGateway.audio_inputs(pcm)
        if chunk_size is not None:
            inputs.append(_tensor("CHUNK_SIZE", np.array([chunk_size], dtype=np.int32), "INT32"))
        if encoder_look_back is not None:
            inputs.append(_tensor("ENCODER_LOOK_BACK", np.array([[encoder_look_back]], dtype=np.int32), "INT32"))
        if decoder_look_back is not None:
            inputs.append(_tensor("DECODER_LOOK_BACK", np.array([[decoder_look_back]], dtype=np.int32), "INT32"))
        return inputs

    @staticmethod
    def segments(result: grpcclient.InferResult) -> list[tuple[int, int]]:
        """VAD events [start_ms, end_ms], -1 where not known yet."""
        rows = result.as_numpy("SEGMENTS")
        return [] if rows is None else [(int(s), int(e)) for s, e in rows.reshape(-1, 2)]

    @staticmethod
    def text(result: grpcclient.InferResult) -> str:
        values = result.as_numpy("TEXT")
        if values is None or values.size == 0:
            return ""
        return b"".join(v if isinstance(v, bytes) else str(v).encode() for v in values.reshape(-1)).decode("utf-8")

    @staticmethod
    def segment_inputs(pcm: np.ndarray, hotwords: str, language: str, itn: bool, stream: bool = False,
                       draft: str = "") -> list[grpcclient.InferInput]:
        """A second-pass request; stream=True asks for text deltas instead of one response;
        draft: the first pass's text of the segment (none when empty)."""
        inputs = [_tensor("AUDIO", pcm.reshape(-1), "INT16"), _bytes("LANGUAGE", language),
                  _tensor("ITN", np.array([itn], dtype=bool), "BOOL"),
                  _tensor("STREAM", np.array([stream], dtype=bool), "BOOL")]
        if hotwords:
            inputs.append(_bytes("HOTWORDS", hotwords))
        if draft:
            inputs.append(_bytes("DRAFT", draft))
        return inputs

    async def recognize_segment(self, pcm: np.ndarray, hotwords: str, language: str, itn: bool,
                                draft: str = "") -> str:
        """Second pass on one segment: the TEXT of its response stream.
        Cancelling the caller cancels the gRPC stream, which Triton passes on to the model."""
        # One response per segment (not deltas): only the whole text is forwarded, and
        # tritonserver 2.51 can crash when a request is cancelled while deltas stream to it
        # (README "Known limitations"); cancelling this one response has not.
        inputs = self.segment_inputs(pcm, hotwords, language, itn, draft=draft)

        async def one_request():
            yield {"model_name": SECOND_PASS_MODEL, "inputs": inputs}

        responses = self.client.stream_infer(one_request())
        pieces = []
        completed = False
        try:
            # The request iterator is exhausted, so Triton ends the stream after the final
            # response; reading to the end (rather than cancelling) keeps that path clean.
            async for result, error in responses:
                if error is not None:
                    raise _response_error(SECOND_PASS_MODEL, error.message())
                pieces.append(self.text(result))
            completed = True
        except grpc.RpcError as exc:
            raise await self.rpc_failure(exc, SECOND_PASS_MODEL) from None
        finally:
            if not completed:
                # Cancelled or failed: Triton passes the cancellation on to the model.
                responses.cancel()
        return "".join(pieces)

    async def ready(self, timeout_s: float) -> bool:
        """Triton answers that it and every model the frontend uses are ready."""
        try:
            if not await self.client.is_server_ready(client_timeout=timeout_s):
                return False
            for model in (VAD_MODEL, FIRST_PASS_MODEL, SECOND_PASS_MODEL):
                if not await self.client.is_model_ready(model, client_timeout=timeout_s):
                    return False
        except InferenceServerException:
            return False  # unreachable, or no answer in time
        return True

    async def close(self) -> None:
        await self.client.close()


class TritonStreamingModel(StreamingModel[Result]):
    """One stream's Triton sequences on one sequence-batched model, all over one gRPC
    stream opened at the first step."""

    def __init__(self, gateway: TritonGateway, sequence_ids: SequenceIds, model: str,
                 start_inputs: Callable[[np.ndarray, StreamConfig], list[grpcclient.InferInput]],
                 read: Callable[[grpcclient.InferResult], Result], step_timeout_s: float):
        super().__init__()
        self._gateway = gateway
        self._step_timeout_s = step_timeout_s
        self._ids = sequence_ids
        self._model = model
        self._start_inputs = start_inputs
        self._read = read
        self._stream: SequenceStream | None = None
        self._sequence_id = 0

    async def _run(self, pcm: np.ndarray, sequence_config: StreamConfig, start: bool, end: bool) -> Result:
        if self._stream is None:
            self._stream = self._gateway.open_stream(self._model)
        if start:
            self._sequence_id = self._ids.next()
            inputs = self._start_inputs(pcm, sequence_config)
        else:
            inputs = self._gateway.audio_inputs(pcm)
        try:
            answer = await self._stream.infer(inputs, self._sequence_id, start=start, end=end,
                                              timeout=self._step_timeout_s)
        except asyncio.TimeoutError:
            raise TritonUnavailable(f"{self._model}: no answer from {self._gateway.url} in "
                                    f"{self._step_timeout_s:g} s") from None
        return self._read(answer)

    def drop(self) -> None:
        """The stream left this server: forget the sequence without asking anything of it."""
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
            self._stream = None

    async def abort(self) -> None:
        if self._stream is None:
            return
        if self.is_open and not self._stream.failed:
            try:
                await self._stream.infer(self._gateway.audio_inputs(_CLOSING_SILENCE), self._sequence_id, end=True,
                                         timeout=_CLOSE_TIMEOUT_S)
            except Exception as exc:  # Triton down: its state is gone anyway
                log.info("could not end %s sequence %d: %s", self._model, self._sequence_id, exc)
        await self._stream.close()


class TritonStreamModels(StreamModels):
    """One stream's models, all on one Triton server at a time. `relocate(gateway)` is the
    backend's choice of another server when that one is lost (None: none is left);
    `released(gateway)` runs once when the stream closes or aborts."""

    second_pass_beside_first_pass = True

    def __init__(self, gateway: TritonGateway, sequence_ids: SequenceIds, step_timeout_s: float,
                 relocate: Callable[[TritonGateway], Awaitable[TritonGateway | None]],
                 released: Callable[[TritonGateway], None]):
        self._sequence_ids = sequence_ids
        self._step_timeout_s = step_timeout_s
        self._relocate = relocate
        self._released = released
        self._use(gateway)

    def _use(self, gateway: TritonGateway) -> None:
        self._gateway = gateway
        self.vad = TritonStreamingModel(
            gateway, self._sequence_ids, VAD_MODEL,
            lambda pcm, cfg: gateway.vad_inputs(pcm, cfg.vad_tail_sil, cfg.vad_max_len, cfg.vad_energy),
            gateway.segments, self._step_timeout_s)
        self.first_pass = TritonStreamingModel(
            gateway, self._sequence_ids, FIRST_PASS_MODEL,
            lambda pcm, cfg: gateway.first_pass_inputs(pcm, cfg.chunk_size, cfg.encoder_chunk_look_back,
                                                       cfg.decoder_chunk_look_back),
            gateway.text, self._step_timeout_s)

    async def move(self) -> bool:
        gateway = await self._relocate(self._gateway)
        if gateway is None:
            return False
        log.warning("stream moves from %s to %s", self._gateway.url, gateway.url)
        self.vad.drop()
        self.first_pass.drop()
        self._use(gateway)
        return True

    def start_recognition(self, pcm: np.ndarray, config: StreamConfig, draft: str = "") -> asyncio.Future[str]:
        return asyncio.ensure_future(self._gateway.recognize_segment(pcm, config.hotwords, config.svs_lang,
                                                                     config.itn, draft))

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._release()

    async def abort(self) -> None:
        try:
            await super().abort()
        finally:
            self._release()

    def _release(self) -> None:
        released, self._released = self._released, None
        if released is not None:
            released(self._gateway)


class TritonBackend(Backend):
    """The service: every model call is a request to a Triton server over its gateway's
    channel. With several servers (replicas of one model repository) each new stream goes to
    the ready one holding the fewest open streams, and stays there; readiness is as last
    checked (all count as ready before the first check, and when none is). A stream whose server
    is lost moves to the ready one holding the fewest, once it answers ready."""

    def __init__(self, gateways: list[TritonGateway], step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        if not gateways:
            raise ValueError("at least one Triton server is needed")
        self._gateways = gateways
        self._step_timeout_s = step_timeout_s
        self._sequence_ids = SequenceIds()
        self._ready = {gateway.url: True for gateway in gateways}
        self._open_streams = {gateway.url: 0 for gateway in gateways}
        self.description = "Triton gRPC " + ", ".join(gateway.url for gateway in gateways)

    def open_stream(self) -> TritonStreamModels:
        ready = [gateway for gateway in self._gateways if self._ready[gateway.url]] or self._gateways
        gateway = min(ready, key=lambda candidate: self._open_streams[candidate.url])
        self._open_streams[gateway.url] += 1
        return TritonStreamModels(gateway, self._sequence_ids, self._step_timeout_s, self._relocate, self._release)

    async def _relocate(self, lost: TritonGateway) -> TritonGateway | None:
        """Another server for a stream whose server was lost: the ready one with the fewest open
        streams that answers ready now; None when none does."""
        self._ready[lost.url] = False
        candidates = [gateway for gateway in self._gateways if gateway is not lost and self._ready[gateway.url]]
        for gateway in sorted(candidates, key=lambda candidate: self._open_streams[candidate.url]):
            if await gateway.ready(READY_TIMEOUT_S):
                self._open_streams[lost.url] -= 1
                self._open_streams[gateway.url] += 1
                return gateway
            self._ready[gateway.url] = False
        return None

    def _release(self, gateway: TritonGateway) -> None:
        self._open_streams[gateway.url] -= 1

    async def readiness(self) -> dict[str, bool]:
        answers = await asyncio.gather(*(gateway.ready(READY_TIMEOUT_S) for gateway in self._gateways))
        self._ready = {gateway.url: answer for gateway, answer in zip(self._gateways, answers)}
        return dict(self._ready)

    async def close(self) -> None:
        await asyncio.gather(*(gateway.close() for gateway in self._gateways))
