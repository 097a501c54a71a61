"""The second pass's CPU priority: the cpu_nice setting, and lowering the priority of every
thread of a process and of what it starts afterwards (run in a child process, so the test
process keeps its own priority)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from twopass_asr.kernels.cpu_priority import DEFAULT_CPU_NICE, MAX_NICE, nice_setting

# Threads started before and after lower_priority, and a process started after it, report
# their nice values.
CHILD = r"""
import json, os, subprocess, sys, threading
from twopass_asr.kernels.cpu_priority import lower_priority

def nice_of_this_thread():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

seen, ready, done = {}, threading.Event(), threading.Event()

def earlier_thread():
    ready.set()
    done.wait()
    seen["earlier thread"] = nice_of_this_thread()

thread = threading.Thread(target=earlier_thread)
thread.start()
ready.wait()
seen["before"] = nice_of_this_thread()
lower_priority(int(sys.argv[1]))
seen["main thread"] = nice_of_this_thread()
done.set()
thread.join()
later = threading.Thread(target=lambda: seen.__setitem__("later thread", nice_of_this_thread()))
later.start()
later.join()
seen["later process"] = int(subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"],
                                           capture_output=True, text=True, check=True).stdout)
print(json.dumps(seen))
"""


def nice_values_after(increment: int) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(increment)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_lower_priority_reaches_every_thread_and_later_processes():
    seen = nice_values_after(5)
    expected = min(MAX_NICE, seen.pop("before") + 5)
    assert seen == {"main thread": expected, "earlier thread": expected, "later thread": expected,
                    "later process": expected}


def test_lower_priority_stops_at_the_lowest():
    seen = nice_values_after(30)
    seen.pop("before")
    assert set(seen.values()) == {MAX_NICE}


def test_nice_setting():
    assert nice_setting("", "cpu") == DEFAULT_CPU_NICE
    assert nice_setting(None, "cuda") == 0
    assert nice_setting("", "cuda:1") == 0
    assert nice_setting("0", "cpu") == 0
    assert nice_setting("19", "cuda") == 19
    for bad in ("-1", "20", "ten", "2.5"):
        with pytest.raises(ValueError, match="cpu_nice"):
            nice_setting(bad, "cpu")
