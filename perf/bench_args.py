"""Command-line options the in-process benchmarks share: stream counts and timed rounds."""

from __future__ import annotations

import argparse


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
