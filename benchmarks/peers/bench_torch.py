"""One benchmark row for PyTorch (eager, CPU): plain, Opacus, and torch.func.

    python benchmarks/peers/bench_torch.py --method func --batch 16 --copies 4 --out row.json

Methods:
- nonprivate: `nn.Module` forward/backward on the B*K images, `torch.optim.SGD`;
- opacus: Opacus `PrivacyEngine.make_private` (default hook-based per-sample gradients),
  `DPOptimizer` step. Opacus clips each ROW of the batch: with K > 1 it clips each of the B*K
  augmented images separately (it has no notion of copies of one example), which is a
  different (per-image) unit of privacy than the other DP rows; labelled as such;
- func: `torch.func.vmap(torch.func.grad(mean loss over the K copies))` over the B examples,
  clip each example's gradient to norm 1, sum, add N(0, sigma^2 C^2), SGD step: the same
  computation as the other DP rows, written with PyTorch's own per-example machinery.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("nonprivate", "opacus", "func")


def wide_resnet(depth: int, width: int, num_classes: int, groups: int):
    """Pre-activation WRN with GroupNorm, the same layers as dks.models.wide_resnet(WS off)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.norm1 = nn.GroupNorm(groups, cin, eps=1e-3)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
            self.norm2 = nn.GroupNorm(groups, cout, eps=1e-3)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
            self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                             if stride != 1 or cin != cout else None)

        def forward(self, x):
            pre = nn.functional.relu(self.norm1(x))
            shortcut = x if self.shortcut is None else self.shortcut(pre)
            y = self.conv1(pre)
            y = self.conv2(nn.functional.relu(self.norm2(y)))
            return shortcut + y

    class WRN(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 4) // 6
            channels = [16 * width, 32 * width, 64 * width]
            self.stem = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
            blocks, cin = [], 16
            for stage, cout in enumerate(channels):
                for block in range(n):
                    blocks.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.norm = nn.GroupNorm(groups, cin, eps=1e-3)
            self.logits = nn.Linear(cin, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(self.logits.weight)
            nn.init.zeros_(self.logits.bias)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            x = nn.functional.relu(self.norm(x))
            return self.logits(x.mean(dim=(2, 3)))

    return WRN()


def main() -> None:
    args = common.parse_args(METHODS)
    common.apply_threads(args.threads)

    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.manual_seed(0)

    x, y = common.synthetic_batch(args.batch, args.copies)
    # The data pipeline hands PyTorch channels-first tensors: converted once, outside the step.
    x5 = torch.from_numpy(x).permute(0, 1, 4, 2, 3).contiguous()      # [B, K, 3, 32, 32]
    y5 = torch.from_numpy(y).repeat_interleave(args.copies).view(args.batch, args.copies)
    x4, y4 = x5.reshape(-1, *x5.shape[2:]), y5.reshape(-1)              # [B*K, ...]

    model = wide_resnet(common.DEPTH, common.WIDTH, common.NUM_CLASSES, common.GROUPS)
    params = sum(p.numel() for p in model.parameters())
    versions = {"torch": torch.__version__}
    loss_fn = nn.functional.cross_entropy
    notes = ""

    if args.method == "nonprivate":
        optimizer = torch.optim.SGD(model.parameters(), lr=common.LEARNING_RATE)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x4), y4).backward()
            optimizer.step()

    elif args.method == "opacus":
        import opacus

        versions["opacus"] = opacus.__version__
        optimizer = torch.optim.SGD(model.parameters(), lr=common.LEARNING_RATE)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x4, y4),
                                             batch_size=len(x4))
        engine = opacus.PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=common.NOISE_MULTIPLIER, max_grad_norm=common.L2_NORM_CLIP,
            poisson_sampling=False)
        if args.copies > 1:
            notes = (f"per-row clipping: {args.batch * args.copies} rows of one image each "
                     "(Opacus has no augmentation-grouped clipping)")

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x4), y4).backward()
            optimizer.step()

    else:
        from torch.func import functional_call, grad, vmap

        weights = {k: v.detach() for k, v in model.named_parameters()}   # share storage

        def example_loss(w, xk, yk):                        # one example: [K, 3, 32, 32], [K]
            return loss_fn(functional_call(model, w, (xk,)), yk)

        per_example_grads = vmap(grad(example_loss), in_dims=(None, 0, 0))
        generator = torch.Generator().manual_seed(0)
        clip, std = common.L2_NORM_CLIP, common.NOISE_MULTIPLIER * common.L2_NORM_CLIP

        def step():
            g = per_example_grads(weights, x5, y5)          # {name: [B, *shape]}
            norms = torch.sqrt(sum(t.reshape(args.batch, -1).square().sum(1)
                                   for t in g.values()))
            factor = torch.clamp(clip / (norms + 1e-12), max=1.0)
            with torch.no_grad():
                for name, w in weights.items():
                    summed = torch.tensordot(factor, g[name], dims=1)
                    noise = torch.normal(0.0, std, w.shape, generator=generator)
                    w.sub_(common.LEARNING_RATE * (summed + noise) / args.batch)

    times = common.time_steps(step, args.steps, args.warmup)
    common.write_result(args, framework="torch", method=args.method, versions=versions,
                        params=params, times=times, notes=notes)


if __name__ == "__main__":
    main()
