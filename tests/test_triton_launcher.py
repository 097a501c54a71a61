"""The launcher's start-up progress, read from a scripted tritonserver log (no server)."""

from __future__ import annotations

from twopass_asr.triton_launcher import TritonServer, load_progress

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
