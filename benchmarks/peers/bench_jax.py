"""One benchmark row for JAX (jit, CPU): plain, and jax_privacy's vmap-of-grad clipping.

    python benchmarks/peers/bench_jax.py --method dp --batch 16 --copies 4 --out row.json

Methods:
- nonprivate: `jax.grad` of the mean loss over the B*K images, SGD, one jitted step;
- dp: `jax_privacy.clipped_grad(..., keep_batch_dim=False)` over the B examples (each call of
  the loss sees one example's K copies, i.e. vmap over examples of grad of the mean loss over
  K), clipped to norm 1 and summed, noise from `jax_privacy.noise_addition.gaussian_privatizer`,
  SGD; one jitted step. Without jax_privacy installed it falls back to the same computation
  written with `jax.vmap(jax.grad(...))` (labelled in the notes).

The network is written with `jax.lax` directly (the convolutions and GroupNorm that a Flax
model lowers to), so no neural-network library is needed.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("nonprivate", "dp")


def init_wide_resnet(key, depth: int, width: int, num_classes: int):
    """Parameters of the pre-activation WRN (same layers as dks.models.wide_resnet, WS off)."""
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(key, 64))

    def conv(k, cin, cout):            # He-normal, HWIO
        std = (2.0 / (k * k * cin)) ** 0.5
        return std * jax.random.normal(next(keys), (k, k, cin, cout), jnp.float32)

    def norm(c):
        return {"scale": jnp.ones(c), "bias": jnp.zeros(c)}

    n = (depth - 4) // 6
    params = {"stem": conv(3, 3, 16), "blocks": []}
    cin = 16
    for stage, cout in enumerate([16 * width, 32 * width, 64 * width]):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            p = {"norm1": norm(cin), "conv1": conv(3, cin, cout), "norm2": norm(cout),
                 "conv2": conv(3, cout, cout)}
            if stride != 1 or cin != cout:
                p["shortcut"] = conv(1, cin, cout)
            params["blocks"].append(p)
            cin = cout
    params["norm"] = norm(cin)
    params["logits"] = {"kernel": jnp.zeros((cin, num_classes)), "bias": jnp.zeros(num_classes)}
    return params


def strides(depth: int) -> list[int]:
    n = (depth - 4) // 6
    return [2 if stage > 0 and block == 0 else 1 for stage in range(3) for block in range(n)]


def forward(params, x, depth: int, groups: int):
    """Logits [N, classes] for images x [N, 32, 32, 3] (NHWC)."""
    import jax

    def conv(w, h, stride):
        return jax.lax.conv_general_dilated(h, w, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def group_norm(p, h):
        n, hh, ww, c = h.shape
        g = h.reshape(n, hh, ww, groups, c // groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = g.var(axis=(1, 2, 4), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + 1e-3)
        return g.reshape(n, hh, ww, c) * p["scale"] + p["bias"]

    h = conv(params["stem"], x, 1)
    for p, stride in zip(params["blocks"], strides(depth)):
        pre = jax.nn.relu(group_norm(p["norm1"], h))
        shortcut = conv(p["shortcut"], pre, stride) if "shortcut" in p else h
        y = conv(p["conv1"], pre, stride)
        y = conv(p["conv2"], jax.nn.relu(group_norm(p["norm2"], y)), 1)
        h = shortcut + y
    h = jax.nn.relu(group_norm(params["norm"], h)).mean(axis=(1, 2))
    return h @ params["logits"]["kernel"] + params["logits"]["bias"]


def main() -> None:
    args = common.parse_args(METHODS)
    common.apply_threads(args.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlib

    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}

    depth, groups, lr = common.DEPTH, common.GROUPS, common.LEARNING_RATE
    params = init_wide_resnet(jax.random.key(0), depth, common.WIDTH, common.NUM_CLASSES)
    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    x, y = common.synthetic_batch(args.batch, args.copies)
    x5 = jnp.asarray(x)                                              # [B, K, 32, 32, 3]
    y5 = jnp.asarray(np.repeat(y, args.copies).reshape(args.batch, args.copies))
    notes = ""

    def mean_loss(p, xs, ys):                                       # xs [N, 32, 32, 3], ys [N]
        logits = forward(p, xs, depth, groups)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, ys[:, None], axis=1).mean()

    if args.method == "nonprivate":
        x4, y4 = x5.reshape(-1, *x5.shape[2:]), y5.reshape(-1)

        @jax.jit
        def train_step(p):
            g = jax.grad(mean_loss)(p, x4, y4)
            return jax.tree.map(lambda w, d: w - lr * d, p, g)

        state = params

        def step():
            nonlocal state
            state = jax.block_until_ready(train_step(state))

    else:
        std = common.NOISE_MULTIPLIER * common.L2_NORM_CLIP
        try:
            import jax_privacy
            from jax_privacy import noise_addition

            versions["jax-privacy"] = jax_privacy.__version__
            clipped_sum = jax_privacy.clipped_grad(
                mean_loss, l2_clip_norm=common.L2_NORM_CLIP, batch_argnums=(1, 2),
                keep_batch_dim=False)      # the loss sees one example: its K copies
            privatizer = noise_addition.gaussian_privatizer(stddev=std, prng_key=0)
            noise_state = privatizer.init(params)

            def private_gradient(p, ns):
                summed = clipped_sum(p, x5, y5)
                return privatizer.update(summed, ns)
        except ImportError as error:
            notes = f"jax_privacy unavailable ({error}); hand-written jax.vmap(jax.grad)"
            noise_state = jax.random.key(0)

            def private_gradient(p, key):
                g = jax.vmap(jax.grad(mean_loss), in_axes=(None, 0, 0))(p, x5, y5)
                leaves = jax.tree.leaves(g)
                norms = jnp.sqrt(sum(jnp.sum(t.reshape(args.batch, -1) ** 2, 1)
                                     for t in leaves))
                factor = jnp.minimum(1.0, common.L2_NORM_CLIP / (norms + 1e-12))
                summed = jax.tree.map(lambda t: jnp.tensordot(factor, t, 1), g)
                key, sub = jax.random.split(key)
                subs = jax.random.split(sub, len(leaves))
                noise = jax.tree.unflatten(jax.tree.structure(summed), [
                    std * jax.random.normal(k, t.shape) for k, t in
                    zip(subs, jax.tree.leaves(summed))])
                return jax.tree.map(jnp.add, summed, noise), key

        @jax.jit
        def train_step(p, ns):
            noisy, ns = private_gradient(p, ns)
            return jax.tree.map(lambda w, d: w - lr * d / args.batch, p, noisy), ns

        state = (params, noise_state)

        def step():
            nonlocal state
            state = jax.block_until_ready(train_step(*state))

    times = common.time_steps(step, args.steps, args.warmup)
    common.write_result(args, framework="jax", method=args.method, versions=versions,
                        params=n_params, times=times, notes=notes)


if __name__ == "__main__":
    main()
