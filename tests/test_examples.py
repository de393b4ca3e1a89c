"""The examples end to end at a tiny scale: real data, real subprocess, parsed output."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_trains_and_reports_accuracy_and_epsilon():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--train-subset", "6000",
         "--epochs", "3", "--batch-size", "600", "--microbatch-size", "400", "--widths", "8,16",
         "--epsilon", "8", "--learning-rate", "2", "--seed", "0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"Test accuracy: ([0-9.]+) on 10000 .*\(eps=([0-9.]+), delta=1e-05\)",
                      result.stdout)
    assert match, result.stdout[-3000:]
    accuracy, eps = float(match.group(1)), float(match.group(2))
    assert 0.15 < accuracy <= 1.0         # better than chance (0.1) after 30 noisy steps
    assert 0 < eps <= 8.0                  # within the target it was calibrated for
    assert "Poisson" in result.stdout and "DP-SGD" in result.stdout   # the privacy statement
