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


def _run(seed, best, **variant):
    return {"part": "batch_budget", "dataset": "fashion_mnist", "model": "compact_cnn",
            "batch_size": 4096, "epochs": 64.0, "augmult": 0, "no_privacy": False,
            "noise_off": False, "seed": seed, "train_examples": 60000, "target_epsilon": 3.0,
            "learning_rate": 4.0, "ema_decay": 0.99, "steps": 938, "noise_multiplier": 3.04,
            "epsilon": 3.0, "test_accuracy": best - 0.01, "ema_test_accuracy": best,
            "train_accuracy": best, "ema_train_accuracy": best, "best": best,
            "wall_time_s": 1.0, "curve": [], **variant}


def test_optimizer_variants_are_rows_of_their_own(tmp_path):
    """A run with momentum, a cosine schedule or another EMA decay is never pooled with the
    study's default runs (as a seed of theirs, or in the best-budget summary and the plot); a
    run recorded before these options existed reads as the constant rate without momentum."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import recipe
    finally:
        sys.path.pop(0)
    old = _run(0, 0.876)                                          # no variant keys at all
    runs = [old, _run(1, 0.870, lr_schedule="constant", momentum=0.0),
            _run(0, 0.872, lr_schedule="cosine", momentum=0.0),
            _run(0, 0.874, lr_schedule="constant", momentum=0.9),
            _run(0, 0.871, ema_decay=0.998)]
    rows = recipe.rows_of(runs)
    assert sorted((r["variant"], r["seed"]) for r in rows) == [
        ("", 0), ("", 1), ("EMA 0.998", 0), ("cosine", 0), ("momentum 0.9", 0)]
    assert recipe.key(old) == recipe.key({**runs[1], "seed": 0})
    recipe.write_report({"runs": runs}, tmp_path, "variants")
    report = (tmp_path / "variants.md").read_text()
    summary = report[report.index("Best budget per batch size"):]
    assert "| compact_cnn | DP | 4096 | 64 | 87.3 (87.0-87.6) |" in summary
    assert "| compact_cnn (cosine) | DP | 4096 | 64 | 87.2 |" in summary
    assert "| compact_cnn (momentum 0.9) | DP | 4096 | 64 | 87.4 |" in summary
    assert "| compact_cnn (EMA 0.998) | DP | 4096 | 64 | 87.1 |" in summary
    assert (tmp_path / "variants_batch_budget.png").stat().st_size > 1000


def test_augmentation_padding_is_a_row_of_its_own(capsys):
    """--augment-pad P: the augmented runs (K >= 1) are rows labelled "pad P"; the K = 0 run of
    the same command is the study's no-augmentation row (padding means nothing there), and a
    padding that would leave MNIST's copies identical is refused before anything runs."""
    import argparse
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import recipe
    finally:
        sys.path.pop(0)
    args = argparse.Namespace(part="augmult", lrs="4", models="compact_cnn", model="compact_cnn",
                              augmult="0,1,4", seeds="1", batch_sizes="1024", epochs="8",
                              dataset="fashion_mnist", no_privacy=False, no_noise=False,
                              epsilon=3.0, delta=1e-5, train_n=60000, ema_decay=0.99,
                              lr_schedule="constant", momentum=0.0, augment_pad=0)
    specs = recipe.specs(args)
    assert [(s["augmult"], s["augment_pad"]) for s in specs] == [(0, 2), (1, 0), (4, 0)]
    assert [recipe.variant(s) for s in specs] == ["", "pad 0", "pad 0"]
    study = {**specs[1], "augment_pad": recipe.AUGMENT_PAD}
    assert recipe.key(specs[1]) != recipe.key(study)
    old = {k: v for k, v in study.items() if k != "augment_pad"}   # recorded before the option
    assert recipe.key(old) == recipe.key(study)
    for argv in (["--augment-pad", "-1"], ["--augment-pad", "0", "--dataset", "mnist"]):
        with pytest.raises(SystemExit):
            recipe.main([*argv, "--part", "augmult", "--report-only"])
        assert "--augment-pad" in capsys.readouterr().err
