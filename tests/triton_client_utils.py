"""Small synchronous gRPC helpers for tests that drive the Triton models directly."""

from __future__ import annotations

import itertools

import numpy as np
import tritonclient.grpc as grpcclient

_sequence_ids = itertools.count(1_000_000)


def next_sequence_id() -> int:
    return next(_sequence_ids)


def tensor(name: str, value: np.ndarray, datatype: str) -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, list(value.shape), datatype)
    item.set_data_from_numpy(value)
    return item


def chunks_of(pcm: np.ndarray, sizes: list[int] | int) -> list[np.ndarray]:
    if isinstance(sizes, int):
        return [pcm[i : i + sizes] for i in range(0, len(pcm), sizes)]
    out, pos = [], 0
    for size in itertools.cycle(sizes):
        if pos >= len(pcm):
            return out
        out.append(pcm[pos : pos + size])
        pos += size


def run_sequence(client, model: str, chunks: list[np.ndarray], start_inputs=(), sequence_id=None, output="TEXT"):
    """Send each chunk as one request of a sequence on a gRPC stream (the only way to the
    decoupled paraformer_streaming), each after the answer to the one before; returns the
    output of every chunk. Raises the first error answer."""
    import queue

    sequence_id = sequence_id or next_sequence_id()
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    results = []
    try:
        for index, chunk in enumerate(chunks):
            inputs = [tensor("AUDIO", chunk.astype(np.int16).reshape(1, -1), "INT16")]
            if index == 0:
                inputs += list(start_inputs)
            client.async_stream_infer(
                model,
                inputs,
                sequence_id=sequence_id,
                sequence_start=index == 0,
                sequence_end=index == len(chunks) - 1,
            )
            result, error = answers.get(timeout=300)
            if error is not None:
                raise error
            results.append(result.as_numpy(output))
    finally:
        client.stop_stream()
    return results


def text_of(output: np.ndarray) -> str:
    return output.reshape(-1)[0].decode("utf-8")


def decoupled_responses(url: str, model: str, requests: list[list[grpcclient.InferInput]],
                        timeout: float = 300) -> list[list[str]]:
    """Send requests on one gRPC stream to a decoupled model; each request's TEXT responses
    in order, until its final response. Raises the first error response."""
    import queue

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for index, inputs in enumerate(requests):
            client.async_stream_infer(model, inputs, request_id=str(index), enable_empty_final_response=True)
        texts: dict[str, list[str]] = {str(i): [] for i in range(len(requests))}
        done = set()
        while len(done) < len(requests):
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            text = result.as_numpy("TEXT")
            if text is not None:
                texts[response.id].append(b"".join(text.reshape(-1)).decode("utf-8"))
            if response.parameters["triton_final_response"].bool_param:
                done.add(response.id)
        return [texts[str(i)] for i in range(len(requests))]
    finally:
        client.stop_stream()


def decoupled_texts(url: str, model: str, requests: list[list[grpcclient.InferInput]], timeout: float = 300) -> list[str]:
    """Each request's TEXT deltas concatenated (see decoupled_responses)."""
    return ["".join(pieces) for pieces in decoupled_responses(url, model, requests, timeout)]
