"""Empirical privacy audit: a non-private over-fitted model vs DP-SGD models, on CPU.

    python benchmarks/audit.py               # Fashion-MNIST subsets, 17 min on 2 shared cores
    python benchmarks/audit.py --quick       # smaller and fewer epochs, about 6 min
    python benchmarks/audit.py --epsilons 1,3,8 --references 4
    python benchmarks/audit.py --dp-off-control   # + the DP recipe without noise/clipping

For each model (non-private, then DP-SGD at each target epsilon):
1. Canary audit (one training run): `--canaries` training images with a random wrong label,
   each included with probability 1/2, are added to the clean training images (`--train` for
   the over-fitted non-private model, `--dp-train` for the DP models: DP-SGD needs more data
   to learn anything at these budgets); the model is trained once; the canaries are scored
   (-loss, and the offline LiRA score) and the guesses become epsilon lower bounds at 95%
   confidence: the one-run bound of Steinke, Nasr, Jagielski (2023) and the Clopper-Pearson
   TPR/FPR bound (which assumes independent trials; shown for comparison).
2. Membership inference on the same model: members = the clean training images, non-members =
   `--non-members` held-out training images; loss attack and offline LiRA with `--references`
   (`--dp-references`) reference models trained with the same recipe on disjoint data (clean +
   their own mislabeled images, same sizes). ROC AUC and TPR at FPR 0.1% / 1%.
All models share the canaries, their inclusion draws and the non-members.
`--dp-off-control` adds the DP recipe with sigma 0 and no clipping: a positive control. A DP
row's bound is evidence only if this control's bound clearly exceeds the claimed epsilon;
with the default sizes it does not (0.00: 2.5 epochs over 10,000 images memorize nothing).
DP models use DPScaleModel + DPSGD + Poisson BatchSampler; the sampling rate q and the
normalizing batch size are fixed before the canaries are drawn, and sigma is calibrated by the
PLD accountant to the target epsilon at `--delta`. Results: benchmarks/results/audit.{md,json}
and audit_roc.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no "failed call to cuInit" error line

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_keras_scale as dks  # noqa: E402
from dp_keras_scale import audit  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
# Published pixel statistics (public constants: nothing is computed on the private data).
PIXEL_MEAN_STD = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
NUM_CLASSES = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=sorted(PIXEL_MEAN_STD))
    parser.add_argument("--train", type=int, default=1000,
                        help="clean training images (members) of the non-private model")
    parser.add_argument("--dp-train", type=int, default=10000,
                        help="clean training images (members) of the DP models")
    parser.add_argument("--canaries", type=int, default=500, help="mislabeled canaries (m)")
    parser.add_argument("--non-members", type=int, default=5000)
    parser.add_argument("--references", type=int, default=2,
                        help="LiRA reference models of the non-private model (0: loss attack)")
    parser.add_argument("--dp-references", type=int, default=1,
                        help="LiRA reference models of each DP model (0: loss attack only)")
    parser.add_argument("--epsilons", default="1,8", help="target epsilons of the DP models")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--widths", default="8,16,16,32", help="small_cnn conv widths")
    parser.add_argument("--epochs", type=int, default=40, help="non-private epochs (Adam)")
    parser.add_argument("--lr", type=float, default=3e-3, help="non-private Adam learning rate")
    parser.add_argument("--dp-steps", type=int, default=100)
    parser.add_argument("--dp-batch", type=int, default=250, help="expected Poisson batch")
    parser.add_argument("--dp-lr", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp-off-control", action="store_true",
                        help="also audit the DP recipe with DP switched off (sigma 0, no "
                             "clipping): the positive control that shows whether the DP rows' "
                             "bounds could have exposed a pipeline that adds no noise")
    parser.add_argument("--quick", action="store_true",
                        help="smaller data, 1 reference, fewer epochs and DP steps")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    args = parser.parse_args()
    if args.quick:
        args.train, args.dp_train, args.canaries, args.non_members = 500, 2500, 250, 2000
        args.references, args.dp_references = 1, 1
        args.epochs, args.dp_steps, args.dp_batch = 25, 40, 125
    return args


class Recipe:
    """Builds and trains one kind of model (non-private or DP at a target epsilon)."""

    def __init__(self, args: argparse.Namespace, epsilon: float | None, dp_off: bool = False):
        """`dp_off`: the DP recipe (sampler, steps, normalizer, lr) with sigma 0 and no
        clipping, a positive control for the DP rows (`epsilon` must then be None)."""
        self.args, self.epsilon, self.dp_off = args, epsilon, dp_off
        self.widths = tuple(int(w) for w in args.widths.split(","))
        self.mean, self.std = PIXEL_MEAN_STD[args.dataset]
        self.name = ("DP recipe, DP off" if dp_off else
                     "non-private" if epsilon is None else f"DP eps={epsilon:g}")
        private_recipe = epsilon is not None or dp_off
        self.train_size = args.dp_train if private_recipe else args.train
        self.references = args.dp_references if private_recipe else args.references
        self.calls = 0
        if private_recipe:
            # Public constants fixed before any canary is drawn: the training set has
            # dp_train + ~canaries/2 images, but q and the normalizer do not depend on it.
            self.q = args.dp_batch / (args.dp_train + args.canaries / 2)
            self.sigma, self.accounted = 0.0, None     # DP off: no guarantee at all
        if epsilon is not None:
            self.sigma = dks.accounting.calibrate_noise_multiplier(
                epsilon, self.q, args.dp_steps, args.delta)
            self.accounted = dks.accounting.epsilon(self.sigma, self.q, args.dp_steps,
                                                    args.delta)

    def train(self, x: np.ndarray, y: np.ndarray) -> keras.Model:
        args, seed = self.args, self.args.seed + 1000 * self.calls
        self.calls += 1
        keras.utils.set_random_seed(seed)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if self.epsilon is None and not self.dp_off:
            model = dks.models.small_cnn(x.shape[1:], NUM_CLASSES, mean=self.mean, std=self.std,
                                         widths=self.widths, model_class=keras.Model)
            model.compile(keras.optimizers.Adam(args.lr), loss, metrics=["accuracy"])
            model.fit(x, y, batch_size=64, epochs=args.epochs, verbose=0)
            return model
        sampler = dks.data.BatchSampler(len(x), self.q * len(x), microbatch_size=400, seed=seed)
        model = dks.models.small_cnn(x.shape[1:], NUM_CLASSES, mean=self.mean, std=self.std,
                                     widths=self.widths)
        # DP off: no clipping (and no unit-norm rescaling, which would divide by the clip).
        clip = dict(l2_norm_clip=1e9, rescale_to_unit_norm=False) if self.dp_off else dict(
            l2_norm_clip=1.0, rescale_to_unit_norm=True)
        model.compile(dks.DPSGD(args.dp_lr, noise_multiplier=self.sigma, **clip,
                                expected_batch_size=args.dp_batch,
                                gradient_accumulation_steps=sampler.accumulation_steps,
                                noise_seed=seed),
                      loss, metrics=["accuracy"])
        model.fit(sampler.dataset(x, y, steps=args.dp_steps), epochs=1, shuffle=False,
                  steps_per_epoch=args.dp_steps * sampler.accumulation_steps, verbose=0)
        if int(model.optimizer.iterations) != args.dp_steps:
            raise RuntimeError(f"DP training ran {int(model.optimizer.iterations)} steps, "
                               f"accounted for {args.dp_steps}.")
        return model


class Data:
    """Disjoint slices of one shuffled training split: non-members, canaries, then a pool
    whose prefix holds each model's members, followed by its reference models' data."""

    def __init__(self, args: argparse.Namespace):
        x, y = dks.data.load(args.dataset, "train")
        order = np.random.default_rng(args.seed).permutation(len(x))
        self.x, self.y = x[order], y[order]
        h, m = args.non_members, args.canaries
        self.non_members = (self.x[:h], self.y[:h])
        self.canaries = audit.mislabeled_canaries(self.x[h:h + m], self.y[h:h + m], NUM_CLASSES,
                                                  seed=args.seed)
        self.pool, self.args = h + m, args
        self.test = dks.data.load(args.dataset, "test")

    def members(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[self.pool:self.pool + n], self.y[self.pool:self.pool + n]

    def references(self, n: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """`count` disjoint training sets like the audited one: n clean + m/2 mislabeled."""
        extra = self.args.canaries // 2
        start, size = self.pool + n, n + extra
        if start + count * size > len(self.x):
            raise ValueError(f"Not enough {self.args.dataset} images for {count} reference "
                             f"models of {size} images; use fewer --references.")
        out = []
        for j in range(count):
            lo = start + j * size
            cx, cy = audit.mislabeled_canaries(self.x[lo + n:lo + size], self.y[lo + n:lo + size],
                                               NUM_CLASSES, seed=self.args.seed + 1 + j)
            out.append((np.concatenate([self.x[lo:lo + n], cx]),
                        np.concatenate([self.y[lo:lo + n], cy])))
        return out


def audit_model(recipe: Recipe, data: Data):
    args, start = recipe.args, time.time()
    members = data.members(recipe.train_size)
    cx, cy = data.canaries
    one_run = audit.canary_audit(recipe.train, *members, cx, cy, delta=args.delta,
                                 confidence=args.confidence, seed=args.seed)
    model = one_run.model
    refs = [recipe.train(*d) for d in data.references(recipe.train_size, recipe.references)]
    row = {"model": recipe.name, "train_images": recipe.train_size,
           "training_set_size": recipe.train_size + one_run.num_included,
           "reference_models": len(refs),
           "accounted_epsilon": getattr(recipe, "accounted", None),
           "noise_multiplier": getattr(recipe, "sigma", None),
           "sampling_rate": getattr(recipe, "q", None),
           "test_accuracy": float(model.evaluate(*data.test, batch_size=1000, verbose=0)[1]),
           "canary_loss": one_run.to_dict()}
    mia = {"loss": audit.membership_inference(model, members, data.non_members)}
    if refs:
        mia["lira"] = audit.membership_inference(model, members, data.non_members,
                                                 attack="lira", reference_models=refs)
        ref_stats = np.stack([audit.logit_confidence(r, cx, cy) for r in refs])
        lira_canary = audit.lira_offline_scores(audit.logit_confidence(model, cx, cy), ref_stats)
        row["canary_lira"] = audit.audit_canary_scores(
            lira_canary, one_run.included, args.delta, args.confidence).to_dict()
    row["mia"] = {k: v.to_dict() for k, v in mia.items()}
    row["seconds"] = time.time() - start
    return row, mia


def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(args, rows, command: str, load: str) -> str:
    lines = [
        "# Empirical privacy audit", "",
        f"`{command}` on {datetime.date.today()}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, load average at start {load}; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}.", "",
        f"{args.dataset}, small_cnn widths {args.widths}; {args.canaries} mislabeled canaries, "
        f"each included with probability 1/2; {args.non_members} held-out non-members. "
        f"Non-private: {args.train} clean training images (members), Adam lr {args.lr}, batch "
        f"64, {args.epochs} epochs, {args.references} LiRA reference model(s). DP: "
        f"{args.dp_train} clean training images, DP-SGD with Poisson expected batch "
        f"{args.dp_batch}, {args.dp_steps} steps, clip 1 (unit-norm rescaling), lr {args.dp_lr}, "
        f"sigma calibrated (PLD) to the target epsilon at delta={args.delta:g}, "
        f"{args.dp_references} LiRA reference model(s). "
        f"Bounds at {args.confidence:.0%} confidence, delta={args.delta:g}.", "",
        "## Canary audit (one training run)", "",
        "| model | members | accounted eps | test acc | canary AUC (loss) "
        "| eps lower bound, one-run (loss) | eps lower bound, one-run (LiRA) "
        "| eps lower bound, Clopper-Pearson (loss) | best guesses (loss): correct / r |",
        "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        c = row["canary_loss"]
        best = max(c["settings"], key=lambda s: (s["epsilon_one_run"], s["accuracy"]))
        lira = row.get("canary_lira", {}).get("epsilon_one_run")
        eps = row["accounted_epsilon"]
        lines.append(
            f"| {row['model']} | {row['train_images']} | "
            f"{'none (inf)' if eps is None else f'{eps:.3f}'} | "
            f"{row['test_accuracy']:.3f} | {c['canary_auc']:.3f} | {c['epsilon_one_run']:.3f} | "
            f"{fmt(lira)} | {c['epsilon_clopper_pearson']:.3f} | "
            f"{best['correct']} / {best['guesses']} |")
    lines += ["", "## Membership inference (clean members vs held-out non-members)", "",
              "| model | attack | AUC | TPR @ FPR 0.1% | TPR @ FPR 1% |", "|---|---|---|---|---|"]
    for row in rows:
        for attack, r in row["mia"].items():
            t = r["tpr_at_fpr"]
            lines.append(f"| {row['model']} | {attack} | {r['auc']:.3f} | {t['0.001']:.3f} | "
                         f"{t['0.01']:.3f} |")
    lines += ["", "Wall time per row (target + references, seconds): "
              + ", ".join(f"{r['model']} {r['seconds']:.0f}" for r in rows) + ".", "",
              "Each lower bound is its own test at the stated confidence (the guess settings "
              "within one bound are Bonferroni-corrected). A bound below the accounted epsilon "
              "does not prove the guarantee; a bound above it would disprove it. The "
              "Clopper-Pearson column treats canaries of one run as independent trials (a "
              "heuristic); the one-run bound is the rigorous one.", ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    command = " ".join(["python benchmarks/audit.py"] + sys.argv[1:])
    started = time.time()
    data = Data(args)
    recipes = [Recipe(args, None)] + [Recipe(args, float(e)) for e in args.epsilons.split(",")]
    if args.dp_off_control:
        recipes.append(Recipe(args, None, dp_off=True))
    rows, curves = [], {}
    for recipe in recipes:
        row, mia = audit_model(recipe, data)
        rows.append(row)
        for attack, result in mia.items():
            curves[f"{recipe.name}, {attack}"] = result
        print(f"{recipe.name}: accounted eps {fmt(row['accounted_epsilon'])}, test acc "
              f"{row['test_accuracy']:.3f}, MIA AUC {row['mia']['loss']['auc']:.3f}, canary "
              f"eps_lo one-run {row['canary_loss']['epsilon_one_run']:.3f} "
              f"({row['seconds']:.0f} s)", flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(args, rows, command, load)
    (out / "audit.md").write_text(text)
    (out / "audit.json").write_text(json.dumps(
        {"command": command, "config": {k: v for k, v in vars(args).items() if k != "out"},
         "load_average_at_start": load,
         "seconds": time.time() - started, "rows": rows}, indent=2))
    audit.plot_roc(curves, out / "audit_roc.png",
                   title=f"Membership inference on {args.dataset}")
    print()
    print(text)
    print(f"Total {time.time() - started:.0f} s; wrote {out}/audit.md, audit.json, audit_roc.png")


if __name__ == "__main__":
    main()
