"""benchmarks/recipe.py --quick on a tiny subset writes its JSON, Markdown and plots."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_recipe_quick_writes_results(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, str(ROOT / "benchmarks" / "recipe.py"), "--quick",
               "--quick-parts", "batch_budget", "--no-jit", "--train-subset", "256",
               "--test-subset", "100", "--results", str(tmp_path), "--verbose", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "recipe_quick.json").read_text())
    runs = results["runs"]
    assert {(r["batch_size"], r["no_privacy"], r["noise_off"]) for r in runs} == {
        (64, False, False), (128, False, False), (128, True, False), (64, False, True)}
    for r in runs:
        for field in ("learning_rate", "seed", "steps", "noise_multiplier", "epsilon",
                      "test_accuracy", "ema_test_accuracy", "train_accuracy",
                      "ema_train_accuracy", "curve", "wall_time_s", "train_examples"):
            assert field in r, field
        assert r["train_examples"] == 256
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == r["steps"]
        assert {"test_accuracy", "ema_test_accuracy", "train_accuracy"} <= set(r["curve"][0])
        if r["no_privacy"] or r["noise_off"]:
            assert r["noise_multiplier"] == 0.0
        else:   # calibrated per run: the target is met, not exceeded
            assert 0 < r["noise_multiplier"] and 2.5 < r["epsilon"] <= 3.0 + 1e-6

    report = (tmp_path / "recipe_quick.md").read_text()
    assert "## batch_budget" in report and "lr grid" in report and "no noise" in report
    assert "| clip, no noise |" in report
    assert "Best budget per batch size" in report
    assert (tmp_path / "recipe_quick_batch_budget.png").stat().st_size > 1000
    assert not (tmp_path / "recipe.json").exists()      # a check never mixes into the study


def _append(results_dir: str, start: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recipe

    recipe.write_report = lambda *args: None     # the lock is under test, not the report
    for i in range(start, start + 15):
        recipe.add_results(pathlib.Path(results_dir), "shared", "runs", [{"part": "x", "i": i}])


def test_parts_running_at_once_keep_every_run(tmp_path):
    """Two processes appending to the same results file lose nothing (the file lock)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append, args=(str(tmp_path), start))
               for start in (0, 100)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    runs = json.loads((tmp_path / "shared.json").read_text())["runs"]
    assert sorted(r["i"] for r in runs) == list(range(15)) + list(range(100, 115))


def test_seeds_option_names_the_seeds_it_runs():
    """--seeds: a count, a list or a range; one that names no seed is refused, not run as
    nothing (a single seed k is the range k-k, not the count k)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from recipe import main, seed_list
    finally:
        sys.path.pop(0)
    assert seed_list("3") == [0, 1, 2]
    assert seed_list("1,2") == [1, 2]
    assert seed_list("2-2") == [2]
    assert seed_list("0-2") == [0, 1, 2]
    for text in ("0", "3-1", "-1", "two", ","):
        with pytest.raises(ValueError, match="names no seed"):
            seed_list(text)
    with pytest.raises(SystemExit):     # argparse error before any data is loaded
        main(["--seeds", "0", "--report-only"])
