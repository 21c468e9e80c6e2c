"""The command line's allocator settings: applied on glibc, left alone when the environment says so."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from isavar._allocator import tune_allocator


def test_defaults_can_be_kept_from_the_environment(monkeypatch):
    monkeypatch.setenv("ISAVAR_DEFAULT_MALLOC", "1")
    assert tune_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_settings_apply_on_glibc_and_memory_still_works(monkeypatch):
    monkeypatch.delenv("ISAVAR_DEFAULT_MALLOC", raising=False)
    import platform

    applied = tune_allocator()
    assert applied is (platform.libc_ver()[0] == "glibc")
    a = np.ones(5 << 20, np.float32)                 # 20 MB: from the heap now, freed and taken again
    del a
    b = np.full(5 << 20, 2.0, np.float32)
    assert float(b.sum()) == 2.0 * (5 << 20)
