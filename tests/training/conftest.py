"""Fixtures shared by the end-to-end training tests (one per test module, as before)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._helpers import BASELINE_STEPS, make_corpus, run_cli, train_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory) -> Path:
    """One uninterrupted run of ``BASELINE_STEPS`` steps, shared by the tests that compare against it."""
    root = tmp_path_factory.mktemp("baseline")
    r = run_cli(train_args(corpus, root / "run", root / "cache", steps=BASELINE_STEPS))
    assert r.returncode == 0, r.stderr
    return root / "run"
