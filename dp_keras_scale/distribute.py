"""Scaling DP-SGD out with `tf.distribute`, with the privacy accounting kept true.

What happens under a strategy (`MirroredStrategy`, `MultiWorkerMirroredStrategy`,
`TPUStrategy`): build and compile the `DPScaleModel` inside ``strategy.scope()`` and call
``fit`` as usual. Each replica clips the per-example gradients of its own rows. On the
micro-batch that closes a logical step, replica 0 alone adds the Gaussian noise (std
sigma * C, drawn from the mirrored noise key: the very draw one device would make) to its
local clipped sum; the local sums are then all-reduced (SUM) once, and every replica applies
the identical noisy sum. So the noise on the global sum has std exactly sigma * C for any
number of replicas (never lost, doubled or reused), the noise key advances identically on
every replica, and ``DPSGD(expected_batch_size=...)`` is the GLOBAL expected batch size
q * N. Metrics in the logs cover the global batch.

How batches are sampled, and what q is:

* One process (`MirroredStrategy`, one TPU host): sample exactly as on one device. Every
  logical step is ONE Poisson sample of rate q = expected_batch_size / N over the whole
  dataset (`dks.data.BatchSampler`), padded with a mask; Keras splits the rows of each
  micro-batch between the replicas, masks travelling with their rows. The accountant's q is
  unchanged. `DistributedBatchSampler` below does the same with a micro-batch that divides
  evenly between the replicas.
* Several processes (`MultiWorkerMirroredStrategy`): `DistributedBatchSampler` splits the
  example indices into disjoint shards, one per worker (shard p holds the indices
  i = p (mod P)), and each worker Poisson-samples ITS shard with the same rate q from its own
  independent random stream. This is exact, not an approximation: Poisson sampling of rate q
  means every example is included independently with probability q; examples of different
  shards are decided by independent streams, examples of one shard independently by that
  shard's Poisson draw, so the union over workers includes every example of the dataset
  independently with probability q, which is a Poisson sample of rate q of the whole dataset
  (its size is Binomial(N, q), as for one global draw). The accountant is therefore called
  with q = expected_batch_size / N and the number of logical steps, as on one device.
  Every worker pads its sample to the same size (same micro-batch count), and a sample that
  would not fit raises instead of dropping examples.

What is refused: letting Keras auto-shard an ordinary per-worker dataset across workers.
Each worker would draw its own Poisson sample over the WHOLE dataset and a logical step would
mix W such draws (an inclusion rate near W * q, not q); `DPScaleModel.fit` raises for it.

Example:
    >>> strategy = dks.distribute.auto_strategy()
    >>> sampler = dks.distribute.DistributedBatchSampler(len(x), 1024, strategy,
    ...                                                  per_replica_microbatch_size=64)
    >>> with strategy.scope():
    ...     model = dks.models.small_cnn((28, 28, 1), 10)
    ...     model.compile(optimizer=dks.DPSGD(
    ...         2.0, noise_multiplier=sigma, l2_norm_clip=1.0,
    ...         gradient_accumulation_steps=sampler.accumulation_steps,
    ...         expected_batch_size=sampler.expected_batch_size), loss=...)
    >>> model.fit(sampler.dataset(x, y), epochs=3, steps_per_epoch=sampler.steps_per_epoch)
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import tensorflow as tf

from dp_keras_scale._keras_compat import num_workers  # public here (uses private TF API)
from dp_keras_scale.data.sampling import SamplerCore, masked_microbatches


def auto_strategy(tpu: str | None = None, verbose: bool = True) -> tf.distribute.Strategy:
    """A `TPUStrategy` when a TPU is reachable, else `MirroredStrategy` over several GPUs, else
    the default (one-device) strategy.

    Args:
        tpu: TPU name or address for `TPUClusterResolver` (``"local"`` on a TPU VM). By
            default it is found from the environment (Colab's ``COLAB_TPU_ADDR``,
            ``TPU_NAME``), or ``"local"`` when this machine has TPU devices.
        verbose: print which strategy was chosen.

    Example:
        >>> strategy = auto_strategy()
        >>> with strategy.scope():
        ...     model = dks.models.small_cnn((28, 28, 1), 10)
    """
    strategy = _tpu_strategy(tpu)
    if strategy is None:
        gpus = tf.config.list_logical_devices("GPU")
        strategy = (tf.distribute.MirroredStrategy() if len(gpus) > 1
                    else tf.distribute.get_strategy())
    if verbose:
        try:
            devices = ", ".join(map(str, strategy.extended.worker_devices))
        except RuntimeError:   # the default strategy has no device list
            devices = "the default device"
        print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replica(s) on "
              f"{devices}")
    return strategy


def _tpu_strategy(tpu: str | None) -> tf.distribute.Strategy | None:
    if tpu is None:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        except ValueError:     # no TPU named by the environment
            if not (tf.config.list_physical_devices("TPU") or os.path.exists("/dev/accel0")):
                return None
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
    else:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


class DistributedBatchSampler(SamplerCore):
    """Poisson batches for `tf.distribute`: each worker samples its own shard with rate q.

    Every logical step includes each of the N examples independently with probability
    q = expected_batch_size / N (see the module docstring for why per-shard sampling is
    exact). Each worker pads its sample to a fixed size with a 0/1 mask and cuts it into
    ``accumulation_steps`` micro-batches of ``per_replica_microbatch_size`` rows for each of
    its replicas, so all replicas see the same shapes and all workers take the same number
    of Keras steps per logical step. The sampling law, the padding bound, the overflow check
    and ``steps_per_epoch`` are those of `dks.data.sampling.SamplerCore`, shared with
    `dks.data.BatchSampler`.

    Args:
        num_examples: dataset size N (every worker holds the same N examples).
        expected_batch_size: q * N, the expected GLOBAL number of examples per logical step;
            pass it to ``DPSGD(expected_batch_size=...)`` and q (``sampling_rate``) to the
            accountant.
        strategy: the strategy training runs under (default: the current one).
        per_replica_microbatch_size: the most rows a replica processes per Keras step (memory
            bound); default: the whole padded batch in one micro-batch.
        overflow_probability: bound on the chance that any worker's sample exceeds its padded
            size at a step (then sampling raises rather than drop examples).
        seed: integer seed (tests); each worker derives its own independent stream from it.
            By default every worker seeds from the operating system's RNG.
        row_multiple: round the per-replica micro-batch up to a multiple of this (e.g. 8 on
            TPUs, whose matrix units work on blocks of 8 rows); more padding, same sampling.
        num_replicas, num_input_pipelines: the layout, to plan sizes without a strategy
            (taken from ``strategy`` when it is given).

    Example:
        >>> sampler = DistributedBatchSampler(60000, 1024, strategy,
        ...                                   per_replica_microbatch_size=128)
        >>> opt = dks.DPSGD(2.0, noise_multiplier=3.0,
        ...                 gradient_accumulation_steps=sampler.accumulation_steps,
        ...                 expected_batch_size=sampler.expected_batch_size)
        >>> model.fit(sampler.dataset(x, y), steps_per_epoch=sampler.steps_per_epoch)
    """

    def __init__(self, num_examples: int, expected_batch_size: float,
                 strategy: tf.distribute.Strategy | None = None, *,
                 per_replica_microbatch_size: int | None = None,
                 overflow_probability: float = 1e-12, seed: int | None = None,
                 row_multiple: int = 1, num_replicas: int | None = None,
                 num_input_pipelines: int | None = None):
        super().__init__(num_examples, expected_batch_size, "poisson", overflow_probability)
        if strategy is None and num_replicas is None:
            strategy = tf.distribute.get_strategy()
        self.strategy = strategy
        if strategy is not None:
            num_replicas = strategy.num_replicas_in_sync
            num_input_pipelines = num_workers(strategy)
        num_input_pipelines = num_input_pipelines or 1
        if num_replicas < 1 or num_input_pipelines < 1 or num_replicas % num_input_pipelines:
            raise ValueError(f"{num_replicas} replicas cannot be shared evenly by "
                             f"{num_input_pipelines} workers.")
        if num_input_pipelines > num_examples:
            raise ValueError(f"{num_input_pipelines} workers need at least as many examples, "
                             f"got {num_examples}")
        self.num_replicas = int(num_replicas)
        self.num_input_pipelines = int(num_input_pipelines)
        self.local_replicas = self.num_replicas // self.num_input_pipelines
        largest_shard = math.ceil(self.num_examples / self.num_input_pipelines)
        # The per-worker bound makes P(any worker overflows) <= overflow_probability.
        need = self.sample_size_bound(largest_shard,
                                      self.overflow_probability / self.num_input_pipelines)
        self.accumulation_steps, self.per_replica_microbatch_size = self.plan_microbatches(
            need, per_replica_microbatch_size, name="per_replica_microbatch_size",
            parts=self.local_replicas, row_multiple=row_multiple)
        self.worker_padded_size = (self.accumulation_steps * self.local_replicas
                                   * self.per_replica_microbatch_size)
        self.padded_batch_size = self.worker_padded_size * self.num_input_pipelines
        self.global_microbatch_size = self.num_replicas * self.per_replica_microbatch_size
        self.seed = seed
        self._rngs: dict[int, np.random.Generator] = {}

    def shard(self, pipeline_id: int) -> np.ndarray:
        """The example indices worker ``pipeline_id`` samples from (disjoint across workers)."""
        if not 0 <= pipeline_id < self.num_input_pipelines:
            raise ValueError(f"pipeline_id must be in [0, {self.num_input_pipelines}), got "
                             f"{pipeline_id}")
        return np.arange(pipeline_id, self.num_examples, self.num_input_pipelines)

    def _rng(self, pipeline_id: int) -> np.random.Generator:
        if pipeline_id not in self._rngs:
            entropy = ([self.seed, pipeline_id] if self.seed is not None
                       else int.from_bytes(os.urandom(16), "little"))
            self._rngs[pipeline_id] = np.random.default_rng(entropy)
        return self._rngs[pipeline_id]

    def sample_indices(self, pipeline_id: int = 0) -> np.ndarray:
        """One logical step's sample of worker ``pipeline_id``'s shard, in random order,
        padded with -1 to ``worker_padded_size``."""
        shard = self.shard(pipeline_id)
        return self.draw(self._rng(pipeline_id), self.worker_padded_size, shard)

    def worker_dataset(self, x, y, pipeline_id: int = 0, steps: int | None = None,
                       map_fn: Callable | None = None) -> tf.data.Dataset:
        """Worker ``pipeline_id``'s (x, y, mask) per-replica micro-batches, in the order the
        strategy deals them: for each logical step, ``accumulation_steps`` rounds of one
        micro-batch per local replica."""
        return masked_microbatches(
            x, y, self.num_examples, lambda: self.sample_indices(pipeline_id),
            self.worker_padded_size, self.per_replica_microbatch_size, steps, map_fn)

    def dataset(self, x, y, steps: int | None = None,
                map_fn: Callable | None = None) -> tf.distribute.DistributedDataset:
        """The distributed dataset for ``model.fit``: every worker feeds its replicas from its
        own shard's Poisson samples (endless, or ``steps`` logical steps long).

        `map_fn(x, y, mask) -> (x, y, mask)`, e.g. augmentation, runs on each per-replica
        micro-batch.
        """
        if self.strategy is None:
            raise ValueError("DistributedBatchSampler.dataset needs the strategy: construct "
                             "the sampler with strategy=...")
        layout = (self.strategy.num_replicas_in_sync, num_workers(self.strategy))
        if layout != (self.num_replicas, self.num_input_pipelines):
            raise ValueError(f"The strategy now has {layout[0]} replicas on {layout[1]} "
                             f"workers; the sampler was planned for {self.num_replicas} on "
                             f"{self.num_input_pipelines}. Build a new sampler.")

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            if context.num_input_pipelines != self.num_input_pipelines:
                raise ValueError(f"Expected {self.num_input_pipelines} input pipelines, got "
                                 f"{context.num_input_pipelines}.")
            return self.worker_dataset(x, y, context.input_pipeline_id, steps, map_fn)

        return self.strategy.distribute_datasets_from_function(dataset_fn)
