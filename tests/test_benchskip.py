"""CORRAL_BENCH_SKIP (launch/benchskip.py): bench-only, off unless set, typos refused."""

import pytest

from corral.launch import benchskip


def test_nothing_skipped_by_default(monkeypatch):
    monkeypatch.delenv("CORRAL_BENCH_SKIP", raising=False)
    assert benchskip.skipped() == frozenset()
    assert not any(benchskip.skips(name) for name in benchskip.KNOWN)


def test_names_are_read_and_typos_refused(monkeypatch):
    monkeypatch.setenv("CORRAL_BENCH_SKIP", " landlock, overlay ,")
    assert benchskip.skipped() == {"landlock", "overlay"}
    assert benchskip.skips("landlock") and not benchskip.skips("seccomp")
    # a typo must not silently measure the full containment under a lighter name
    monkeypatch.setenv("CORRAL_BENCH_SKIP", "landlok")
    with pytest.raises(ValueError, match="landlok"):
        benchskip.skipped()
