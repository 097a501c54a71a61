"""Short runs of every measuring tool against real servers on the tiny models: the
perf_analyzer sweep, the WebSocket load tool, the capacity search, the FunASR baseline
server, and the memory reading of tritonserver's processes. They check that each tool produces its files and that the numbers add up (one
final message per client, segments and partials as the probe saw them, no negative
latencies), not how fast anything is."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from perf import capacity, memory, ws_load
from twopass_asr import REPO_ROOT
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.kernels.decode_step import decode_step_library, products_use_avx512_vnni
from twopass_asr.serving.triton_launcher import free_port
from twopass_asr.store.export_cache import CACHE_ENV

pytestmark = pytest.mark.triton

LATENCIES = ("first_partial", "partial_lag", "second_pass", "second_pass_after_detection", "end_of_stream")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def frontend_url(triton_server, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("perf-frontend") / "frontend.log"
    with capacity.python_server(["frontend.server", "--triton-url", triton_server.grpc_url, "--host", "127.0.0.1",
                                 "--port", str(port)], port, log, "frontend", 60) as url:
        yield url


@pytest.fixture(scope="module")
def baseline_url(test_models, tmp_path_factory):
    with capacity.baseline(test_models, tmp_path_factory.mktemp("perf-baseline"), threads=1,
                            max_new_tokens=capacity.DEFAULT_MAX_NEW_TOKENS) as url:
        yield url


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def check_run(run: dict, clients: int, probe_partials: int, probe_segments: int) -> None:
    assert run["clients"] == clients
    assert run["finals"] == clients, run
    assert run["errors"] == run["failures"] == run["dropped"] == 0
    # The tiny models give the same partials and segments to every client.
    assert run["partials"] == clients * probe_partials
    assert run["segments"] == clients * probe_segments > 0
    assert run["partial_unmatched_streams"] == 0
    latency = run["latency_s"]
    assert latency["partial_lag"]["count"] == clients * probe_partials
    assert latency["second_pass"]["count"] == clients * probe_segments
    assert latency["end_of_stream"]["count"] == clients
    for key in LATENCIES:
        summary = latency[key]
        assert summary["count"] > 0, key
        assert 0 <= summary["p50"] <= summary["p95"] <= summary["max"] < 60, (key, summary)
    for name, process in run["processes"].items():
        assert process["cpu_percent"] >= 0 and process["peak_rss_mb"] > 10, (name, process)


def check_files(out, clients: list[int]) -> dict:
    data = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    for n in clients:
        assert f"\n| {n} | {n}/{n} |" in table
    assert (out / "latency.png").read_bytes().startswith(PNG_MAGIC)
    return data


def test_pa_sweep_quick_run(triton_server, speech_wav, tmp_path):
    inputs = tmp_path / "inputs"
    run_tool("perf.pa_inputs", "--out", str(inputs), str(speech_wav.path))
    out = tmp_path / "pa"
    run_tool("perf.pa_sweep", "--triton-url", triton_server.grpc_url, "--inputs", str(inputs), "--concurrency", "1",
             "--request-count", "10", "--out", str(out))
    rows = (out / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + one row per model
    for row in rows[1:]:
        model, concurrency, throughput, p50, p95 = row.split(",")[:5]
        assert concurrency == "1" and float(throughput) > 0 and 0 < float(p50) <= float(p95), row


def test_ws_load_two_clients(frontend_url, triton_server, speech_wav, test_models, tmp_path):
    out = tmp_path / "ws"
    run_tool("perf.ws_load", "--url", frontend_url, "--clients", "2", "--wav", str(speech_wav.path),
             "--vad-dir", str(test_models / "vad"), "--ramp-s", "0.5", "--speed", "3", "--out", str(out))
    data = check_files(out, [2])
    check_run(data["runs"][0], 2, data["probe_partials"], data["probe_segments"])
    # The service's processes were found: the frontend and tritonserver with its model stubs.
    processes = data["runs"][0]["processes"]
    assert set(processes) == {"frontend", "tritonserver"}
    assert {"stub:vad", "stub:paraformer_streaming"} <= set(processes["tritonserver"]["cpu_percent_by_process"])
    # And their counters: every segment the clients got went through the Nano's encoder, and
    # the first pass ran.
    served = data["runs"][0]["served"]
    assert served["frontend_segments"] == data["runs"][0]["segments"]
    assert 1 <= served["encoder_batch"] <= 2 and served["encoder_pass_s"] > 0 and served["encoder_wait_s"] >= 0
    assert 0 < served["frontend_second_pass_s"] < 60
    assert served["paraformer_streaming_pass_s"] > 0 and served["paraformer_streaming_batch"] >= 1
    assert served["vad_pass_s"] > 0 and served["vad_batch"] >= 1
    assert "Where the servers say the time went" in (out / "results.md").read_text()


def test_capacity_with_a_tiny_bound(frontend_url, speech_wav, test_models, tmp_path):
    out = tmp_path / "cap"
    run_tool("perf.capacity", "--url", frontend_url, "--max-clients", "2", "--wav", str(speech_wav.path),
             "--vad-dir", str(test_models / "vad"), "--ramp-s", "0.5", "--speed", "3", "--out", str(out))
    result = json.loads((out / "capacity.json").read_text())
    steps = result["steps"]
    assert [s["clients"] for s in steps] in ([1], [1, 2])
    passed = [s["clients"] for s in steps if s["failed_because"] is None]
    # The capacity is the largest passing N, and the search only stops early on a failure.
    assert result["capacity"] == max(passed, default=0)
    assert result["bounded_by_max_clients"] == (result["capacity"] == 2)
    check_files(out, [s["clients"] for s in steps])


def test_baseline_server_matches_the_service_and_carries_load(baseline_url, frontend_url, speech_wav, test_models,
                                                              tmp_path):
    """Same models, same audio: the FunASR baseline gives the same first-pass partials
    and segment times as the service (so both are measured on the same work), and
    serves two concurrent clients."""
    vad_dir = test_models / "vad"
    service_plan = ws_load.prepare_plan(frontend_url, speech_wav.pcm, "2pass", vad_dir, 5.0)
    baseline_plan = ws_load.prepare_plan(baseline_url, speech_wav.pcm, "2pass", vad_dir, 5.0)
    assert baseline_plan.partial_texts == service_plan.partial_texts
    assert baseline_plan.partial_frames == service_plan.partial_frames
    run = asyncio.run(ws_load.run_load(baseline_url, baseline_plan, 2, speed=3.0, ramp_s=0.5, progress=False))
    check_run(run, 2, len(baseline_plan.partial_frames), len(baseline_plan.detection_frames))
    assert set(run["processes"]) == {"server"}


def test_int8_baseline_serves_funasrs_int8_runtime(test_models, speech_wav, tmp_path, monkeypatch):
    """The int8 FunASR baseline's partials are FunASR's ONNX runtime's on its int8 export,
    chunk after chunk as the server cuts the stream (online mode: every decode but the
    final flush is a partial)."""
    from twopass_asr.first_pass.engines import FunasrOnnxStreamingParaformer
    from twopass_asr.first_pass.options import DecodeOptions

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "exports"))  # the server reuses this export
    runtime = FunasrOnnxStreamingParaformer.for_model_dir(test_models / "paraformer_streaming", precision="int8")
    config = ws_load.stream_config("online")
    stream = runtime.new_stream(DecodeOptions(chunk_size=tuple(config["chunk_size"]), encoder_look_back=0,
                                              decoder_look_back=0))
    step = config["chunk_size"][1] * 960
    steps = [speech_wav.pcm[i:i + step] for i in range(0, len(speech_wav.pcm), step)]
    whole = [runtime.process_batch([stream], [chunk], [False])[0] for chunk in steps if len(chunk) == step]
    with capacity.baseline(test_models, tmp_path, threads=1, max_new_tokens=capacity.DEFAULT_MAX_NEW_TOKENS,
                           first_pass_precision="int8") as url:
        plan = ws_load.prepare_plan(url, speech_wav.pcm, "online", None, 5.0)
    assert "".join(plan.partial_texts) == "".join(whole) != ""
    assert "first pass on FunASR's ONNX runtime in int8" in (tmp_path / "baseline-int8.log").read_text()


def test_first_pass_precision_bench_quick_run(test_models, paraformer_export, tmp_path):
    run = subprocess.run([sys.executable, "-m", "perf.bench_first_pass_precision", "--model-dir",
                          str(test_models / "paraformer_streaming"), "--export-dir", str(paraformer_export),
                          "--batches", "1,2", "--rounds", "1", "--out", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("CPU: ")
    table = (tmp_path / "first_pass_precision.md").read_text(encoding="utf-8")
    assert table.count("\n| 1 |") == 1 and table.count("\n| 2 |") == 1
    assert (tmp_path / "first_pass_precision.png").read_bytes().startswith(PNG_MAGIC)
    rows = (tmp_path / "first_pass_precision.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and all(float(value) > 0 for value in rows[1].split(",")[1:11])


def test_linear_kernels_bench_quick_run(test_models, tmp_path):
    run = subprocess.run([sys.executable, "-m", "perf.bench_linear", "--model-dir",
                          str(test_models / "paraformer_streaming"), "--rows", "4,20", "--repeats", "2",
                          "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("CPU: ")
    table = (tmp_path / "linear_kernels.md").read_text(encoding="utf-8")
    assert cpu_summary() in table
    # One total per row count, with each int8 kernel's ratio to the float32 engine's kernel.
    totals = re.findall(r"^\| (\d+) \| \*\*the encoder, one round \(ms\)\*\* \|(.*)$", table, re.MULTILINE)
    assert [rows for rows, _ in totals] == ["4", "20"], table
    assert all(re.search(r"\*\*\d+\.\d\dx\*\*", cells) for _, cells in totals), table
    assert "int8 fbgemm" in table and "int8 onnxruntime (FunASR's recipe)" in table
    rows = list(csv.DictReader((tmp_path / "linear_kernels.csv").read_text(encoding="utf-8").splitlines()))
    assert {row["rows"] for row in rows} == {"4", "20"} and len(rows) % 2 == 0
    assert all(float(value) > 0 for row in rows for key, value in row.items() if key.endswith(" us"))
    assert (tmp_path / "linear_kernels.png").read_bytes().startswith(PNG_MAGIC)


def test_first_pass_triton_bench_against_funasrs_int8_runtime(test_models, tmp_path):
    env = {**os.environ, CACHE_ENV: str(tmp_path / "exports")}
    run = subprocess.run([sys.executable, "-m", "perf.bench_first_pass_triton", "--paraformer-dir",
                          str(test_models / "paraformer_streaming"), "--engines", "funasr_onnx:int8,batched:int8",
                          "--look-back", "0", "--seconds", "2.4", "--max-streams", "2", "--out", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (tmp_path / "first_pass_triton.md").read_text(encoding="utf-8")
    assert table.startswith(cpu_summary()) and "look-back: 0" in table
    sustained = dict(re.findall(r"^\| (\S+) shipped \| (\d+) \|$", table, re.MULTILINE))
    assert set(sustained) == {"funasr_onnx:int8", "batched:int8"}, table
    ratio = re.search(r"^batched:int8 / funasr_onnx:int8, layout shipped: ([\d.]+)x$", table, re.MULTILINE)
    if int(sustained["funasr_onnx:int8"]):
        assert ratio and float(ratio[1]) == pytest.approx(int(sustained["batched:int8"]) /
                                                          int(sustained["funasr_onnx:int8"]), abs=0.01), table
    rows = (tmp_path / "first_pass_triton.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("engine,layout,streams,") and len(rows) >= 3


def test_memory_names_every_process_of_the_server(triton_server):
    usage = memory.tree_memory_mb(triton_server.process.pid)
    stubs = {"stub:vad", "stub:paraformer_streaming", "stub:funasr_nano_vllm"}
    assert stubs | {"tritonserver"} <= set(usage)
    assert all(usage[name]["pss"] > 50 for name in stubs), usage  # each holds torch and its model
    # The stubs map the same libraries (torch, FunASR): their shares of those pages are less
    # than the pages themselves.
    assert all(usage[name]["pss"] < usage[name]["rss"] for name in stubs), usage
    table = memory.markdown({"fp32": usage})
    assert "| process | fp32 RSS MB | fp32 PSS MB |" in table and "| stub:vad | " in table
    assert table.splitlines()[-1].startswith("| total | ")


def test_failover_tool_kills_a_replica_and_reports_the_moved_streams(test_models, speech_wav, tmp_path):
    out = tmp_path / "failover"
    result = run_tool("perf.failover", "--store", str(test_models), "--clients", "4", "--kill-at-s", "3",
                      "--server-env", "TWOPASS_ASR_LLM_ENGINE=torch", "--wav", str(speech_wav.path),
                      "--vad-dir", str(test_models / "vad"), "--ramp-s", "0.5", "--out", str(out), timeout=600)
    data = json.loads((out / "failover.json").read_text())
    assert result.stdout.startswith("CPU ")
    # The first replica held every other stream; each moved, and every stream ended as without the fault.
    assert len(data["moved_streams"]) == 2 and data["moves_before_fault"] == 0
    assert data["finals"] == 4 and not data["errors"] and data["streams_with_the_calm_runs_segments"] == 4
    assert data["extra_delay_s"]["moved streams"]["count"] > 0
    assert "| moved streams |" in (out / "failover.md").read_text()
    assert (out / "failover.png").read_bytes().startswith(PNG_MAGIC)


def test_fuzz_short_run_every_hostile_session_ends_as_the_protocol_says(test_models, speech_wav, tmp_path):
    out = tmp_path / "fuzz"
    run_tool("perf.fuzz", "--store", str(test_models), "--sessions", "300", "--parallel", "16",
             "--session-timeout-s", "30", "--server-env", "TWOPASS_ASR_LLM_ENGINE=torch", "--wav",
             str(speech_wav.path), "--out", str(out), timeout=900)
    data = json.loads((out / "fuzz.json").read_text())
    assert data["sessions"] == 300 and data["hangs"] == 0 and not data["unexpected"]
    assert data["normal_stream_after"]["ok"]
    # The seeded choice covers every kind, vanishing clients too.
    assert len(data["by_kind"]) == 11 and all(counts.get("ok") for counts in data["by_kind"].values())


def test_soak_short_run_samples_every_process(test_models, speech_wav, tmp_path):
    out = tmp_path / "soak"
    run_tool("perf.soak", "--store", str(test_models), "--clients", "2", "--duration-s", "20", "--sample-s", "2",
             "--server-env", "TWOPASS_ASR_LLM_ENGINE=torch", "--wav", str(speech_wav.path), "--vad-dir",
             str(test_models / "vad"), "--out", str(out), timeout=600)
    data = json.loads((out / "soak.json").read_text())
    assert data["streams"] >= 2 and data["normal_streams"] == data["streams"] and not data["abnormal_streams"]
    processes = {row["process"] for row in data["rss"]}
    assert {"tritonserver/tritonserver", "tritonserver/stub:vad",
            "tritonserver/stub:paraformer_streaming", "tritonserver/stub:funasr_nano_vllm"} <= processes, processes
    assert any(process.startswith("frontend/") for process in processes)
    assert all(row["start_mb"] > 10 and row["end_mb"] > 10 for row in data["rss"])
    assert len(data["samples"]) >= 5
    assert (out / "soak.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_second_pass_bench_on_torch(test_models, tmp_path, precision):
    """bench_second_pass on the tiny Nano, int8 or bf16 on torch only (no vLLM): its rows, the
    agreement of the served LLM with float32 and the CPU line."""
    run_tool("perf.bench_second_pass", "--model-dir", str(test_models / "funasr_nano"), "--precision", precision,
             "--encoder-precision", "fp32", "--vllm-modes=", "--torch-concurrency", "1,2", "--funasr-segments", "1",
             "--agreement-segments", "2", "--segments-per-client", "1", "--encoder-batches", "1",
             "--out", str(tmp_path))
    report = (tmp_path / "second_pass.md").read_text()
    rows = [line.split(" | ")[:3] for line in report.splitlines() if line.startswith(("| funasr", "| torch"))]
    assert rows == [["| funasr", "1", "1"], ["| torch", "1", "1"], ["| torch", "2", "2"]], report
    funasr = "fp32" if precision == "int8" else precision  # FunASR has no int8
    assert f"LLM in {precision} (precision {precision}; FunASR in {funasr})" in report and cpu_summary() in report
    assert re.search(rf"Agreement of {precision} \(torch, as served\) with fp32 .*\n\n.*\n.*\n\| \d/2 \(\d+%\) "
                     r"\| \d+/\d+ ", report), report
    # The cached prompt opening against whole prompts, per batch: the opening is the chat text
    # before the audio, so shorter than the prompt.
    openings = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| \d+ \| \d+ \| -?\d+ \| [\d.]+x \|$", report, re.MULTILINE)
    assert [batch for batch, _, _ in openings] == ["1", "2"], report
    assert all(0 < int(opening) < int(prompt) for _, prompt, opening in openings), report
    # One segment alone, part by part, in the C step (also reading the whole bf16 head, where it
    # reads it through its int8 screen) and HF's: the parts add up to its total.
    parts = re.findall(r"^\| (C step|C step, whole bf16 head|HF generate) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) "
                       r"\| ([\d.]+|-) \| [\d.]+ \| (\d+) \|$", report, re.MULTILINE)
    library = decode_step_library()
    screened = (precision == "bf16" and library is not None and bool(library.bf16_products_native())
                and products_use_avx512_vnni())
    assert [part[0] for part in parts] == ["C step", *(["C step, whole bf16 head"] if screened else []),
                                           "HF generate"], report
    tokens = int(re.search(r", (\d+) new tokens each", report).group(1))
    for _, *times in parts:
        prepare, encode, first, per_token, total = (float(times[i]) for i in (0, 1, 2, 3, 5))
        assert abs(prepare + encode + first + per_token * (tokens - 1) - total) <= 3, report
    in_products = parts[-1][5]
    assert parts[0][5] == "-" and float(in_products) <= float(parts[-1][4]) + 1, report  # a part of each token's time
    assert (tmp_path / "second_pass.png").read_bytes().startswith(PNG_MAGIC)


def test_audio_encoder_bench_times_every_kernel_and_bounds_its_prompts(test_models, tmp_path):
    """bench_audio_encoder on the tiny Nano: a row per batch with every kernel this CPU runs, each
    int8 kernel's prompts off float32's by more than nothing and less than int8's own bound, the
    table, the CSV and the plot."""
    from twopass_asr.kernels.int8_recipe import int8_kernels_on_this_cpu

    result = run_tool("perf.bench_audio_encoder", "--model-dir", str(test_models / "funasr_nano"), "--batches", "1,2",
                      "--rounds", "1", "--seconds", "1.5", "--out", str(tmp_path))
    assert result.stdout.startswith("CPU: ")
    table = (tmp_path / "audio_encoder.md").read_text(encoding="utf-8")
    assert cpu_summary() in table
    names = ["fp32", *(f"int8 {kernel}" for kernel in int8_kernels_on_this_cpu())]
    rows = list(csv.DictReader((tmp_path / "audio_encoder.csv").read_text(encoding="utf-8").splitlines()))
    assert [row["segments"] for row in rows] == ["1", "2"], table
    for row in rows:
        assert all(float(row[f"{name} ms"]) > 0 for name in names), row
        assert all(0 < float(row[f"{name} prompt error"]) < 0.1 for name in names[1:]), row
    assert (tmp_path / "audio_encoder.png").read_bytes().startswith(PNG_MAGIC)


def test_a_decode_steps_weights_in_int8_are_a_quarter_of_float32s():
    """bench_second_pass's count of the weights a decode step reads, on a small Qwen3 as loaded,
    prepacked in float32 (as float32 torch generation runs it) and after the torch int8 LLM's
    quantization (which fuses the projections that share an input)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from perf.bench_second_pass import decode_step_weight_bytes
    from twopass_asr.kernels.prepacked_linear import prepack_linear_layers
    from twopass_asr.second_pass.llm_on_torch import quantize_llm_for_torch

    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)

    def small_llm():
        torch.manual_seed(0)
        return Qwen3ForCausalLM(config).eval()

    llm = small_llm()
    linears = [module for module in llm.modules() if isinstance(module, torch.nn.Linear)]
    float32_bytes = decode_step_weight_bytes(llm)
    assert float32_bytes == 4 * sum(linear.weight.numel() for linear in linears)
    quantize_llm_for_torch(llm)
    assert decode_step_weight_bytes(llm) == float32_bytes // 4
    prepacked = small_llm()
    assert prepack_linear_layers(prepacked) == len(linears)
    assert decode_step_weight_bytes(prepacked) == float32_bytes
