"""Session fixtures: tiny random models, synthesised speech, and a real tritonserver."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from twopass_asr import REPO_ROOT
from twopass_asr.first_pass.options import PRECISION_ENV as FIRST_PASS_PRECISION_ENV
from twopass_asr.kernels.cpu_features import cpu_summary
from twopass_asr.second_pass.precision import ENCODER_PRECISION_ENV as NANO_ENCODER_PRECISION_ENV
from twopass_asr.second_pass.precision import PRECISION_ENV as SECOND_PASS_PRECISION_ENV
from twopass_asr.serving.triton_launcher import TritonServer, TritonStartTimeout
from twopass_asr.speech_synth import ENGLISH_VOICE, MANDARIN_VOICE, speech_with_silences, write_wav

# Engines choose kernels by torch's thread count (prepacked_linear's auto), so a test's expected
# output and the server's come from the same kernels only while the suite keeps this count
# (torch_threads_kept).
SUITE_TORCH_THREADS = 1
torch.set_num_threads(SUITE_TORCH_THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The equivalence tests compare with FunASR's float32 runtime: every server and engine of the
# suite decodes both passes (the Nano's audio encoder too) in fp32, whatever auto would choose on
# this CPU, unless a test asks for another precision.
os.environ.update(dict.fromkeys((FIRST_PASS_PRECISION_ENV, SECOND_PASS_PRECISION_ENV, NANO_ENCODER_PRECISION_ENV),
                                "fp32"))

TEST_STORE = Path(os.environ.get("TWOPASS_ASR_TEST_MODELS", REPO_ROOT / ".test_models"))
# This process's name among pytest-xdist's workers ("main" when run without them).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
ARTIFACTS_ROOT = REPO_ROOT / ".cache" / "test-artifacts"
# Logs of the servers the tests start; one folder per worker, whose servers run at once.
ARTIFACTS = ARTIFACTS_ROOT / WORKER if "PYTEST_XDIST_WORKER" in os.environ else ARTIFACTS_ROOT


@pytest.fixture(scope="session")
def test_models() -> Path:
    """Tiny random Paraformer and Nano plus the real FSMN-VAD, prepared once (idempotent). The
    suite's workers (pytest-xdist) each ask: the first builds, the others wait and find it done."""
    TEST_STORE.parent.mkdir(parents=True, exist_ok=True)
    with open(TEST_STORE.with_name(f"{TEST_STORE.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([sys.executable, "-m", "twopass_asr.store.prepare", "--store", str(TEST_STORE), "--random",
                        "tiny", "--seed", "0"], check=True)
    return TEST_STORE


@pytest.fixture(scope="session")
def paraformer_export(test_models, tmp_path_factory) -> Path:
    """FunASR's own ONNX export (float32 and int8) of the tiny test Paraformer."""
    from twopass_asr.store.funasr_onnx_export import export_paraformer_onnx

    return export_paraformer_onnx(test_models / "paraformer_streaming", tmp_path_factory.mktemp("paraformer_onnx"))


@dataclass
class SpeechWav:
    path: Path
    pcm: np.ndarray


UTTERANCES = [
    ("jin1 tian1 tian1 qi4 hen3 hao3", MANDARIN_VOICE),
    ("the quick brown fox jumps over the lazy dog", ENGLISH_VOICE),
    ("wo3 men5 qu4 gong1 yuan2 san4 bu4 ba5", MANDARIN_VOICE),
]


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> SpeechWav:
    """About 9 s: three utterances separated by 1.2-1.5 s of silence."""
    pcm = speech_with_silences(UTTERANCES, [600, 1500, 1200, 900])
    path = write_wav(tmp_path_factory.mktemp("speech") / "speech.wav", pcm)
    return SpeechWav(path=path, pcm=pcm)


# What the end of the run prints about each worker's shared tritonserver, where CI's excerpt of
# the output shows it: how it ended when it ended before the session did, and a start that hung
# with the stacks of its processes (a load tritonserver never confirms, the hang seen so far, the
# launcher itself starts again). Workers write them to files; the controlling process prints them.
SERVER_REPORTS = ARTIFACTS_ROOT / "server-reports"


def report_at_the_end(title: str, text: str) -> None:
    SERVER_REPORTS.mkdir(parents=True, exist_ok=True)
    with open(SERVER_REPORTS / f"{WORKER}.jsonl", "a", encoding="utf-8") as reports:
        reports.write(json.dumps({"title": f"{title} ({WORKER})", "text": text}) + "\n")


# The tiny models load in about a minute even with cold caches.
SHARED_SERVER_START_S = 300.0


@pytest.fixture(scope="session")
def triton_server(test_models):
    def new_server() -> TritonServer:
        return TritonServer(test_models, log_path=ARTIFACTS / "tritonserver.log",
                            log_verbose=int(os.environ.get("TWOPASS_ASR_TRITON_LOG_VERBOSE", "0")))

    server = new_server()
    try:
        server.start(SHARED_SERVER_START_S)
    except TritonStartTimeout as hang:
        # Reported at the end of the run, not hidden; the tests then run on a second start.
        report_at_the_end("shared tritonserver: a start that hung, retried once", f"{hang}\n{hang.stacks}")
        server = new_server()
        server.start(SHARED_SERVER_START_S)
    yield server
    if (report := server.exit_report(" during the tests")) is not None:
        report_at_the_end("shared tritonserver", report)
    server.stop()
    # Every process of the server shuts down cleanly: a model whose stub crashed on the way
    # out (Python backend stubs print this) fails the run.
    crashes = server.log_text().count("Segfault encountered")
    if crashes:
        pytest.fail(f"{crashes} process(es) of the shared tritonserver crashed while it shut down; "
                    f"see {server.log_path}")


@pytest.fixture(autouse=True)
def _shared_server_is_up(request):
    """A test of the shared server fails first of all if the server is gone, naming how it
    ended, rather than with whatever a client makes of a closed port."""
    if "triton_server" in request.fixturenames:
        status = request.getfixturevalue("triton_server").exit_status()
        if status is not None:
            pytest.fail(f"the shared tritonserver {status} before this test (its last log lines are printed "
                        "after the test summary)", pytrace=False)
    yield


@pytest.fixture(autouse=True)
def torch_threads_kept(request):
    """A test runs and ends on its file's torch thread count: the `torch_threads` mark's, else
    the suite's. A fixture or test that changes it (FunASR's AutoModel sets 4 unless given
    `ncpu`) fails here, naming the count, instead of changing which float kernel later engines
    build on."""
    mark = request.node.get_closest_marker("torch_threads")
    expected = mark.args[0] if mark else SUITE_TORCH_THREADS
    if torch.get_num_threads() != expected:
        found = torch.get_num_threads()
        torch.set_num_threads(expected)  # the tests after this one run on the right count
        pytest.fail(f"torch runs {found} thread(s) before this test, not {expected}: a fixture (or an earlier "
                    "test) changed the count", pytrace=False)
    yield
    if torch.get_num_threads() != expected:
        found = torch.get_num_threads()
        torch.set_num_threads(expected)
        pytest.fail(f"this test left torch on {found} thread(s), not {expected}", pytrace=False)


def is_controller(config) -> bool:
    """The process that prints the run's summary (pytest-xdist's workers have workerinput)."""
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session):
    if is_controller(session.config):
        shutil.rmtree(SERVER_REPORTS, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, config):
    if not is_controller(config):
        return
    # Where the run's times come from (machines differ between runs), at the end where CI's
    # excerpt of the output shows it.
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    terminalreporter.write_line(f"machine: {cpu_summary()}; {memory_gib:.0f} GiB of memory")
    for path in sorted(SERVER_REPORTS.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            report = json.loads(line)
            terminalreporter.section(report["title"])
            terminalreporter.write_line(report["text"])
