"""Benchmark numbers name the code they were measured with (issue 18, item 6)."""

from __future__ import annotations

import subprocess

from benchmarks._measure import code_version
from benchmarks.mnist_runner import table


def _git(root, *args):
    who = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", *who, *args], cwd=root, check=True, capture_output=True)


def test_code_version_follows_src_and_benchmarks_not_the_docs(tmp_path):
    for part in ("src", "benchmarks", "docs"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "a.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    first = code_version(tmp_path)
    assert first.startswith("src ") and ", benchmarks " in first and "+changes" not in first
    (tmp_path / "docs" / "a.py").write_text("x = 2\n")  # a docs edit, committed
    _git(tmp_path, "commit", "-qam", "docs")
    assert code_version(tmp_path) == first
    (tmp_path / "src" / "a.py").write_text("x = 3\n")  # code edited, not committed
    assert code_version(tmp_path) == first + " +changes"
    _git(tmp_path, "commit", "-qam", "code")
    assert code_version(tmp_path) not in (first, first + " +changes")
    assert code_version(tmp_path / "nowhere") == "unknown"


def _row(code):
    cost = {
        "train_pixels_per_image": {"full_resolution": 25e3, "low_resolution": 32e3},
        "seconds_per_sample": 0.03,
        "cpu_seconds_per_sample": 0.03,
        "peak_rss_added_mb": 10.0,
    }
    row = {"model": "Zoom-In", "test_error_sample": 0.1, "test_error_topk": 0.05}
    return {**row, "epoch_loss": [0.3], "train_seconds": 100.0, "cost": cost, "code": code}


def test_a_row_reused_from_other_code_is_marked_in_the_table():
    today, other = _row(code_version()), _row("src 000000000000, benchmarks 000000000000")
    lines = table([today, other]).splitlines()
    assert lines[2].startswith("| Zoom-In | 10.0% | 5.0% |")
    assert lines[3].startswith("| Zoom-In (trained on other code†) | 10.0% |")
