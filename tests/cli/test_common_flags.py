"""Flags shared by the subcommands."""

import argparse
import os

import pytest

from isavar.cli._common import MAX_DEFAULT_WORKERS, add_executor_arguments, default_workers


def _parser():
    parser = argparse.ArgumentParser()
    add_executor_arguments(parser)
    return parser


def test_workers_default_to_the_available_cores_capped():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_workers() == max(1, min(cores, MAX_DEFAULT_WORKERS))
    assert _parser().parse_args([]).workers == default_workers()
    assert _parser().parse_args(["--workers", "3"]).workers == 3


def test_workers_below_one_are_refused(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--workers=0"])
    assert "at least 1" in capsys.readouterr().err
