"""The launcher: start-up progress read from a scripted tritonserver log, the report of a
process that ended, the stacks of one that never became ready, the ports it picks, and (with a
real tritonserver) a start whose model load tritonserver never confirms."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from twopass_asr.serving.triton_launcher import (LOWEST_FREE_PORT, TritonLoadUnconfirmed, TritonServer,
                                                TritonStartTimeout, free_port, load_progress, metric_samples,
                                                port_in_use, unconfirmed_loads)

EARLIER_RUN = '''I1129 05:00:00.000001 1 model_lifecycle.cc:472] "loading: old_model:1"
I1129 05:00:09.000001 1 model_lifecycle.cc:839] "successfully loaded 'old_model'"
'''
THIS_RUN = '''I1129 05:11:13.756243 18791 model_lifecycle.cc:472] "loading: vad:1"
I1129 05:11:13.756901 18791 model_lifecycle.cc:472] "loading: funasr_nano_vllm:1"
I1129 05:11:13.757001 18791 model_lifecycle.cc:472] "loading: paraformer_streaming:1"
I1129 05:11:20.771890 18791 model_lifecycle.cc:839] "successfully loaded 'vad'"
I1129 05:11:40.771890 18791 model_lifecycle.cc:839] "successfully loaded 'paraformer_streaming'"
'''


def test_load_progress_names_loaded_and_loading_models():
    assert load_progress(THIS_RUN) == (["vad", "paraformer_streaming"], ["funasr_nano_vllm"])
    assert load_progress("") == ([], [])


def test_progress_line_reads_only_this_start_of_an_appended_log(tmp_path):
    log = tmp_path / "tritonserver.log"
    log.write_text(EARLIER_RUN)
    server = TritonServer(None, log_path=log)
    server._log_start = log.stat().st_size  # what start() records before launching
    assert server.progress_line(3.2) == "tritonserver starting (3 s): loaded nothing yet"
    with open(log, "a") as handle:
        handle.write(THIS_RUN)
    assert server.progress_line(31) == ("tritonserver starting (31 s): loaded vad, paraformer_streaming; "
                                        "loading funasr_nano_vllm")


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    start = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(LOWEST_FREE_PORT <= port < start for port in ports)
    for port in ports[:5]:
        assert not port_in_use("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))
        sock.listen()
        assert port_in_use("127.0.0.1", ports[0])


def test_exit_report_names_the_signal_or_code_and_ends_with_the_log(tmp_path):
    log = tmp_path / "tritonserver.log"
    log.write_text(EARLIER_RUN)
    server = TritonServer(None, log_path=log)
    server._log_start = log.stat().st_size
    log.write_text(EARLIER_RUN + THIS_RUN)
    assert server.exit_status() is None and server.exit_report() is None  # never started
    server.process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert server.exit_status() is None  # running
    server.process.send_signal(signal.SIGSEGV)
    server.process.wait()
    assert server.exit_status() == "killed by SIGSEGV"
    report = server.exit_report(" during the tests")
    assert report.startswith(f"tritonserver killed by SIGSEGV during the tests; last log lines ({log}):\n")
    assert report.endswith(THIS_RUN.rstrip("\n")) and "old_model" not in report
    server.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    server.process.wait()
    assert server.exit_status() == "exited with code 3"


# A stand-in for a server that hangs at start: a process (and a child of it, in its process
# group) waiting in functions whose names its stacks must show.
HANGING_SERVER = """
import subprocess, sys, time

def waiting_for_the_model_to_load():
    child = subprocess.Popen([sys.executable, "-c", "def child_waiting():\\n    import time; time.sleep(600)\\nchild_waiting()"])
    time.sleep(600)

waiting_for_the_model_to_load()
"""


def test_a_server_that_never_becomes_ready_reports_its_processes_stacks(tmp_path):
    log = tmp_path / "tritonserver.log"
    log.write_text(THIS_RUN)
    server = TritonServer(None, log_path=log)
    server._log_start = 0
    server.process = subprocess.Popen([sys.executable, "-c", HANGING_SERVER], start_new_session=True)
    try:
        time.sleep(2)  # the child started
        with pytest.raises(TritonStartTimeout, match="tritonserver not ready after 1 s; the Python stacks of its "
                                                     "processes are in .*tritonserver.log.stacks") as hang:
            server.wait_ready(1)
    finally:
        server.stop()
    stacks = (tmp_path / "tritonserver.log.stacks").read_text()
    assert stacks.strip() == hang.value.stacks.strip()
    assert stacks.count("=== pid ") == 2, stacks
    assert "waiting_for_the_model_to_load" in stacks and "child_waiting" in stacks
    assert "successfully loaded 'paraformer_streaming'" in str(hang.value)  # the log's tail follows


def instance_lines(model: str, instances: int, loaded: int) -> str:
    started = "".join(f'I1129 05:11:14.000001 18791 python_be.cc:2249] "TRITONBACKEND_ModelInstanceInitialize: '
                      f'{model}_0_{index} (CPU device 0)"\n' for index in range(instances))
    return started + "".join(f'I1129 05:11:30.000001 18791 model.py:161] "{model}: loaded /models/{model} on cpu"\n'
                             for _ in range(loaded))


def test_a_load_is_unconfirmed_once_every_started_instance_logged_its_end():
    assert unconfirmed_loads(THIS_RUN) == []  # the Nano's stub has not said it finished
    assert unconfirmed_loads(THIS_RUN + instance_lines("funasr_nano_vllm", 1, 1)) == ["funasr_nano_vllm"]
    # One of two instances still loading; and a model tritonserver confirmed.
    assert unconfirmed_loads(THIS_RUN + instance_lines("funasr_nano_vllm", 2, 1)) == []
    assert unconfirmed_loads(THIS_RUN + instance_lines("paraformer_streaming", 1, 1)) == []
    # A model whose name another one's begins with is told apart.
    assert unconfirmed_loads(THIS_RUN + instance_lines("funasr_nano_vllm_copy", 1, 1)) == []


# A Python model that logs this project's end-of-load line and then never returns from
# initialize: to tritonserver, what a stub whose "initialized" message it lost looks like.
LOST_LOAD_MODEL = """
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pb_utils.Logger.log_info(f"{args['model_name']}: loaded nothing, and never returns")
        time.sleep(3600)

    def execute(self, requests):
        return []
"""
LOST_LOAD_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_INT16 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT16 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


@pytest.mark.triton
def test_a_start_whose_load_is_never_confirmed_is_made_again_then_named(tmp_path, capsys):
    model = tmp_path / "repository" / "lost_load"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(LOST_LOAD_MODEL)
    (model / "config.pbtxt").write_text(LOST_LOAD_CONFIG)
    log = tmp_path / "tritonserver.log"
    server = TritonServer(None, tmp_path / "repository", log_path=log, unconfirmed_load_s=2)
    with pytest.raises(TritonLoadUnconfirmed, match="tritonserver never confirmed loading lost_load 2 s after its "
                                                    "stub had finished"):
        server.start(timeout=120, attempts=2)
    assert "; starting tritonserver again (2 of 2)" in capsys.readouterr().err
    assert log.read_text().count('"loading: lost_load:1"') == 2
    assert server.exit_status() is not None, "the last start is stopped too"


def test_metric_samples_sum_each_name_by_model_over_the_other_labels():
    text = """# HELP nv_inference_exec_count Number of model executions performed
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="vad",version="1"} 501
nv_inference_exec_count{model="paraformer_streaming",version="1"} 63
twopass_asr_sequence_passes_total{instance="vad_0_0",model="vad"} 10
twopass_asr_sequence_passes_total{instance="vad_0_1",model="vad"} 5.5
twopass_frontend_second_pass_seconds_bucket{le="+Inf"} 3.0
twopass_frontend_second_pass_seconds_sum 4.5e+00
twopass_frontend_second_pass_seconds_count 3.0
"""
    samples = metric_samples(text)
    assert samples["nv_inference_exec_count"] == {"vad": 501.0, "paraformer_streaming": 63.0}
    assert samples["twopass_asr_sequence_passes_total"] == {"vad": 15.5}
    assert samples["twopass_frontend_second_pass_seconds_sum"] == {"": 4.5}
    assert samples["twopass_frontend_second_pass_seconds_bucket"] == {"": 3.0}
    assert "HELP" not in str(samples) and len(samples) == 5
