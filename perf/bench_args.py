"""What the benchmarks share: stream counts and timed rounds on the command line, the
service's precision profiles, and the length of a real transcript."""

from __future__ import annotations

import argparse

from twopass_asr.serving.serve import precision_environment


def add_server_env_argument(parser: argparse.ArgumentParser, flag: str = "--server-env") -> None:
    parser.add_argument(flag, action="append", default=[], metavar="NAME=VALUE",
                        help="an environment setting of the tritonserver started, over the service's defaults "
                             "(e.g. TWOPASS_ASR_LLM_ENGINE=torch; an A/B run of one setting); repeatable")


def server_environment(parser: argparse.ArgumentParser, flag: str, settings: list[str]) -> dict[str, str]:
    """The NAME=VALUE settings of a repeatable flag; a malformed one is a usage error."""
    if not all("=" in setting for setting in settings):
        parser.error(f"{flag} takes NAME=VALUE, got {settings!r}")
    return dict(setting.split("=", 1) for setting in settings)


def add_batch_arguments(parser: argparse.ArgumentParser, batches: str, rounds: int) -> None:
    parser.add_argument("--batches", default=batches, help="comma-separated stream counts")
    parser.add_argument("--rounds", type=int, default=rounds, help="timed chunks per stream (median reported)")


def batch_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """--batches as integers; a usage error unless they and --rounds are positive."""
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(batches) < 1 or args.rounds < 1:
        parser.error("--batches and --rounds must be positive")
    return batches


# Fun-ASR-Nano's output for real Mandarin speech, in Qwen tokens per second of audio (silence
# included), punctuation and the end token counted: AISHELL-1's test set (7176 utterances,
# 10.03 h, from FunASR's runtime/triton_gpu/client/aishell_test.txt) gives 2.12 with one
# punctuation token per utterance, Fun-ASR's own punctuated example targets 2.16 (tokens
# counted with Qwen's BPE vocabulary). A random Nano never ends on its own: benchmarks cut it
# there (twopass_asr.second_pass.recognizer.generation_cap).
REAL_SPEECH_TOKENS_PER_S = 2.2


# The service's precision profiles: both passes auto (as each chooses on the machine), both fp32
# (FunASR's own precision), or both int8 (on a CPU; the LLM too, which auto keeps in bf16 where
# the CPU has native bf16).
PROFILES = ("auto", "fp32", "int8")


def comma_choices(parser: argparse.ArgumentParser, option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated option value (--profiles: PROFILES); a usage error for anything
    but `allowed`."""
    chosen = text.split(",")
    if not set(chosen) <= set(allowed):
        parser.error(f"{option} takes one or more of {', '.join(allowed)}, comma-separated, got {text!r}")
    return chosen


def profile_environment(profile: str) -> dict[str, str]:
    """The environment a tritonserver runs a profile in."""
    return precision_environment(profile, profile, profile)
