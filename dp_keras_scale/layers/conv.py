"""Convolutions whose kernel gradient vectorizes across examples.

`tf.vectorized_map` has no rule for `Conv2DBackpropFilter` when each example has its own input:
it falls back to a slow while-loop (DESIGN.md section 4). `conv2d` below computes the same
forward convolution, but writes the kernel gradient as a sum over kernel offsets: each offset's
strided slice of the padded input contracted with the output gradient in an einsum, which
`tf.vectorized_map` turns into a batched matrix product (fastest under XLA, Keras's default).
"""

from __future__ import annotations

import contextlib
import threading

import keras
import tensorflow as tf

_state = threading.local()


@contextlib.contextmanager
def per_example_convolutions():
    """While tracing inside this context, `WSConv2D` uses `conv2d`'s vectorizable kernel
    gradient (for code that `tf.vectorized_map` maps over examples); outside it, TensorFlow's
    native convolution gradient (faster for a whole batch).

    Example:
        >>> with per_example_convolutions():
        ...     grads = tf.vectorized_map(per_example_gradient, (x, y))
    """
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Padding (before, after) that TensorFlow's 'SAME' uses along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d(x: tf.Tensor, kernel: tf.Tensor, strides: tuple[int, int] = (1, 1),
           padding: str = "SAME") -> tf.Tensor:
    """2-D convolution (NHWC, no dilation) with a per-example-friendly kernel gradient.

    Numerically the same as `tf.nn.conv2d`; use it inside functions that
    `tf.vectorized_map` maps over examples.

    Example:
        >>> x = tf.random.normal([2, 8, 8, 3]); k = tf.random.normal([3, 3, 3, 4])
        >>> conv2d(x, k, (1, 1), "SAME").shape
        TensorShape([2, 8, 8, 4])
    """
    padding = padding.upper()
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    sh, sw = strides
    kh, kw, cin, cout = kernel.shape
    if None in (kh, kw, cin, cout):
        raise ValueError(f"conv2d needs a kernel of static shape, got {kernel.shape}")

    @tf.custom_gradient
    def _conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides=[1, sh, sw, 1], padding=padding)

        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                strides=[1, sh, sw, 1], padding=padding)
            h, w = x.shape[1], x.shape[2]
            if padding == "SAME":
                ph, pw = _same_padding(h, kh, sh), _same_padding(w, kw, sw)
                xp = tf.pad(x, [[0, 0], ph, pw, [0, 0]])
            else:
                xp = x
            ho, wo = dy.shape[1], dy.shape[2]
            # dk[a, b] = sum_{n,i,j} xp[n, i*sh + a, j*sw + b, :] (outer) dy[n, i, j, :]
            dk = tf.stack([
                tf.einsum("nhwc,nhwo->co",
                          xp[:, a:a + (ho - 1) * sh + 1:sh, b:b + (wo - 1) * sw + 1:sw, :], dy)
                for a in range(kh) for b in range(kw)])
            return dx, tf.reshape(dk, [kh, kw, cin, cout])

        return y, grad

    return _conv(x, kernel)


def padded_input(x: tf.Tensor, kernel_size: tuple[int, int], strides: tuple[int, int],
                 padding: str) -> tf.Tensor:
    """`x` padded as a 'SAME' convolution pads it (unchanged for 'VALID')."""
    if padding.upper() == "VALID":
        return x
    kh, kw = kernel_size
    ph = _same_padding(x.shape[1], kh, strides[0])
    pw = _same_padding(x.shape[2], kw, strides[1])
    return tf.pad(x, [[0, 0], ph, pw, [0, 0]])


def image_patches(x: tf.Tensor, kernel_size: tuple[int, int], strides: tuple[int, int],
                  padding: str) -> tf.Tensor:
    """[N, Ho, Wo, kh*kw*C]: the input patch each output position of the convolution sees,
    flattened in the kernel's (kh, kw, C) order.

    Example:
        >>> image_patches(tf.zeros([2, 8, 8, 3]), (3, 3), (2, 2), "SAME").shape
        TensorShape([2, 4, 4, 27])
    """
    kh, kw = kernel_size
    return tf.image.extract_patches(padded_input(x, kernel_size, strides, padding),
                                    sizes=[1, kh, kw, 1], strides=[1, *strides, 1],
                                    rates=[1, 1, 1, 1], padding="VALID")


def _gram_geometry(input_shape, kernel_size, strides, padding, copies):
    """(K x Hp x Wp padded positions, n = K x Ho x Wo output positions, patch length kh kw C)
    of one example."""
    (h, w, c), (kh, kw), (sh, sw) = input_shape, kernel_size, strides
    if padding.upper() == "SAME":
        h, w = h + sum(_same_padding(h, kh, sh)), w + sum(_same_padding(w, kw, sw))
    n = copies * ((h - kh) // sh + 1) * ((w - kw) // sw + 1)
    return copies * h * w, n, kh * kw * c


def _gram_ways(input_shape, kernel_size, strides, padding, copies) -> tuple[int, int]:
    """Flops per example of `patch_gram` from the padded input's Gram matrix and from the
    patches themselves."""
    padded, n, patch = _gram_geometry(input_shape, kernel_size, strides, padding, copies)
    return padded ** 2 * input_shape[-1], n * n * patch


def patch_gram_flops(input_shape, kernel_size: tuple[int, int], strides: tuple[int, int],
                     padding: str, copies: int) -> int:
    """Multiply-adds per example of `patch_gram` (input_shape: (H, W, C) of one image).

    Example:
        >>> patch_gram_flops((8, 8, 3), (3, 3), (1, 1), "SAME", 1)
        30000
    """
    return min(_gram_ways(input_shape, kernel_size, strides, padding, copies))


def patch_gram_elements(input_shape, kernel_size: tuple[int, int], strides: tuple[int, int],
                        padding: str, copies: int) -> int:
    """Entries per example of the largest matrices `patch_gram` forms (its memory).

    Example:
        >>> patch_gram_elements((8, 8, 3), (3, 3), (1, 1), "SAME", 1)
        10000
    """
    padded, n, patch = _gram_geometry(input_shape, kernel_size, strides, padding, copies)
    from_input, from_patches = _gram_ways(input_shape, kernel_size, strides, padding, copies)
    return n * n + n * patch if from_patches < from_input else padded ** 2


def patch_gram(x: tf.Tensor, kernel_size: tuple[int, int], strides: tuple[int, int],
               padding: str, copies: int) -> tf.Tensor:
    """[B, n, n]: dot products between the input patches of each example's n = K x Ho x Wo
    output positions (``P P^T`` per example, P its rows of `image_patches`).

    Rows i*K .. i*K + K - 1 of `x` [B*K, H, W, C] belong to example i (K = `copies`). Takes
    the cheaper of two ways (`patch_gram_flops`): the Gram matrix of the example's padded
    input positions (K x Hp x Wp of them, C channels each) with its kh x kw shifted strided
    blocks summed (Np^2 C flops, no patches in memory: stride 1), or the patches' own
    (n^2 kh kw C: large strides).

    Example:
        >>> patch_gram(tf.ones([4, 8, 8, 3]), (3, 3), (1, 1), "SAME", 2).shape
        TensorShape([2, 128, 128])
    """
    kh, kw = kernel_size
    sh, sw = strides
    from_input, from_patches = _gram_ways(x.shape[1:], kernel_size, strides, padding, copies)
    if from_patches < from_input:
        patches = image_patches(x, kernel_size, strides, padding)
        n = copies * patches.shape[1] * patches.shape[2]
        patches = tf.reshape(patches, [-1, n, patches.shape[-1]])
        return tf.matmul(patches, patches, transpose_b=True)
    xp = padded_input(x, kernel_size, strides, padding)
    hp, wp, c = xp.shape[1], xp.shape[2], xp.shape[3]
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    rows = tf.reshape(xp, [-1, copies * hp * wp, c])                     # [B, K*Hp*Wp, C]
    gram = tf.reshape(tf.matmul(rows, rows, transpose_b=True),
                      [-1, copies, hp, wp, copies, hp, wp])
    # the kernel rows' shifts, then its columns' (6 slices instead of 9 for 3 x 3)
    gram = tf.add_n([gram[:, :, a:a + (ho - 1) * sh + 1:sh, :, :, a:a + (ho - 1) * sh + 1:sh, :]
                     for a in range(kh)])
    gram = tf.add_n([gram[:, :, :, b:b + (wo - 1) * sw + 1:sw, :, :, b:b + (wo - 1) * sw + 1:sw]
                     for b in range(kw)])
    n = copies * ho * wo
    return tf.reshape(gram, [-1, n, n])


def ghost_channel_norms(x: tf.Tensor, dy: tf.Tensor, kernel_size: tuple[int, int],
                        strides: tuple[int, int], padding: str, copies: int,
                        examples) -> tf.Tensor:
    """[B, O]: the squared norm of each example's kernel gradient per output channel, from
    `patch_gram` and the output gradients (no per-example gradient formed).

    Same layout of `x` [B*K, H, W, C] and `dy` [B*K, Ho, Wo, O] as
    `per_example_kernel_gradients`.

    Example:
        >>> ghost_channel_norms(tf.ones([4, 8, 8, 3]), tf.ones([4, 8, 8, 5]),
        ...                     (3, 3), (1, 1), "SAME", 2, 2).shape
        TensorShape([2, 5])
    """
    g = tf.reshape(dy, [examples, -1, dy.shape[-1]])                        # [B, n, O]
    gram = patch_gram(x, kernel_size, strides, padding, copies)             # [B, n, n]
    return tf.reduce_sum(tf.matmul(gram, g) * g, axis=1)


def patch_sums(x: tf.Tensor, kernel_size: tuple[int, int], strides: tuple[int, int],
               padding: str) -> tf.Tensor:
    """[N, Ho, Wo, 1]: the sum of each input patch's entries (all channels).

    Example:
        >>> patch_sums(tf.ones([2, 8, 8, 3]), (3, 3), (1, 1), "VALID")[0, 0, 0, 0].numpy()
        27.0
    """
    kh, kw = kernel_size
    return tf.nn.conv2d(tf.reduce_sum(x, axis=-1, keepdims=True), tf.ones([kh, kw, 1, 1], x.dtype),
                        strides=[1, *strides, 1], padding=padding.upper())


def per_example_kernel_gradients(x: tf.Tensor, dy: tf.Tensor, kernel_size: tuple[int, int],
                                 strides: tuple[int, int], padding: str, examples) -> tf.Tensor:
    """[B, kh, kw, C, O]: each example's kernel gradient, its rows (copies) summed.

    `x` [B*K, H, W, C] is the convolution's input and `dy` [B*K, Ho, Wo, O] the gradient of
    its output; rows i*K .. i*K + K - 1 belong to example i (`examples` = B). One batched
    einsum per kernel offset, the same flops as the batch's kernel gradient.

    Example:
        >>> per_example_kernel_gradients(tf.ones([4, 8, 8, 3]), tf.ones([4, 8, 8, 5]),
        ...                              (3, 3), (1, 1), "SAME", 2).shape
        TensorShape([2, 3, 3, 3, 5])
    """
    kh, kw = kernel_size
    sh, sw = strides
    xp = padded_input(x, kernel_size, strides, padding)
    ho, wo = dy.shape[1], dy.shape[2]
    xp = tf.reshape(xp, tf.concat([[examples, -1], tf.shape(xp)[1:]], 0))
    dyb = tf.reshape(dy, tf.concat([[examples, -1], tf.shape(dy)[1:]], 0))
    dk = tf.stack([
        tf.einsum("bkhwc,bkhwo->bco",
                  xp[:, :, a:a + (ho - 1) * sh + 1:sh, b:b + (wo - 1) * sw + 1:sw, :], dyb)
        for a in range(kh) for b in range(kw)], axis=1)
    return tf.reshape(dk, [examples, kh, kw, x.shape[-1], dy.shape[-1]])


def patch_kernel_gradients(x: tf.Tensor, dy: tf.Tensor, kernel_size: tuple[int, int],
                           strides: tuple[int, int], padding: str, examples) -> tf.Tensor:
    """[B, kh*kw*C, O]: each example's kernel gradient (its copies summed), as one batched
    matrix product of the example's extracted input patches with its output gradients.

    Same layout of `x` [B*K, H, W, C] and `dy` [B*K, Ho, Wo, O] as
    `per_example_kernel_gradients`; the patches take kh kw / (sh sw) times the input's memory,
    so this suits strided layers and layers with few input channels.

    Example:
        >>> patch_kernel_gradients(tf.ones([4, 8, 8, 3]), tf.ones([4, 8, 8, 5]),
        ...                        (3, 3), (1, 1), "SAME", 2).shape
        TensorShape([2, 27, 5])
    """
    patches = image_patches(x, kernel_size, strides, padding)
    d_in, o = patches.shape[-1], dy.shape[-1]
    return tf.matmul(tf.reshape(patches, tf.stack([examples, -1, d_in])),
                     tf.reshape(dy, tf.stack([examples, -1, o])), transpose_a=True)


# Examples in flight at once in `looped_kernel_gradients` (one at a time ran 1.3-2x slower
# on the 2-core CPU; more was not timed).
LOOP_PARALLEL_EXAMPLES = 4


def looped_kernel_gradients(x: tf.Tensor, dy: tf.Tensor, kernel_size: tuple[int, int],
                            strides: tuple[int, int], padding: str, examples) -> tf.Tensor:
    """[B, kh, kw, C, O]: each example's kernel gradient (its copies summed) from TensorFlow's
    native kernel-gradient op run on that example's rows alone, the examples in a loop.

    Same layout of `x` [B*K, H, W, C] and `dy` [B*K, Ho, Wo, O] as
    `per_example_kernel_gradients`. One op per example keeps the native kernel's large
    matrix products (on a CPU without oneDNN, 1.2x the batch's kernel gradient for
    WRN-16-4's first stage, where the einsums' small batched products cost 2.3-2.6x).

    Example:
        >>> looped_kernel_gradients(tf.ones([4, 8, 8, 3]), tf.ones([4, 8, 8, 5]),
        ...                         (3, 3), (1, 1), "SAME", 2).shape
        TensorShape([2, 3, 3, 3, 5])
    """
    kh, kw = kernel_size
    xp = padded_input(x, kernel_size, strides, padding)          # then 'VALID' per example
    xb = tf.reshape(xp, tf.concat([[examples, -1], tf.shape(xp)[1:]], 0))
    dyb = tf.reshape(dy, tf.concat([[examples, -1], tf.shape(dy)[1:]], 0))
    shape = [kh, kw, x.shape[-1], dy.shape[-1]]

    def one_example(i):
        return tf.raw_ops.Conv2DBackpropFilter(
            input=xb[i], filter_sizes=shape, out_backprop=dyb[i],
            strides=[1, *strides, 1], padding="VALID")

    return tf.map_fn(one_example, tf.range(examples), fn_output_signature=x.dtype,
                     parallel_iterations=LOOP_PARALLEL_EXAMPLES)


def grouped_kernel_gradients_available() -> bool:
    """Whether this process runs `grouped_kernel_gradients`: TensorFlow's oneDNN CPU kernels
    do; its Eigen CPU kernels (``TF_ENABLE_ONEDNN_OPTS=0``, or builds without oneDNN) refuse
    a grouped kernel gradient, and on a GPU the einsum form is used.

    Example:
        >>> grouped_kernel_gradients_available()     # x86 Linux, TensorFlow's defaults
        True
    """
    from tensorflow.python.util import _pywrap_util_port
    return bool(_pywrap_util_port.IsMklEnabled()) and not tf.config.list_logical_devices("GPU")


def grouped_kernel_gradients(x: tf.Tensor, dy: tf.Tensor, kernel_size: tuple[int, int],
                             strides: tuple[int, int], padding: str, examples,
                             examples_first: bool = True) -> tf.Tensor:
    """`per_example_kernel_gradients` as ONE native kernel-gradient op with the examples as
    convolution groups: example i's channels are group i of the input and of the output
    gradient, its K copies the op's batch (summed, as the op sums its batch).

    Outside XLA (TensorFlow's oneDNN CPU kernels; see `grouped_kernel_gradients_available`)
    this costs 1.5x to more than 6x what the batch's kernel gradient costs, depending on the
    shape (`conv_routes` times it against the other forms); XLA compiles grouped kernel
    gradients into very slow code, so use `per_example_kernel_gradients` in XLA-compiled
    steps. `examples_first=False` returns the
    op's own layout [kh, kw, C, B, O] (saves a transpose of all B x parameters).

    Example:
        >>> grouped_kernel_gradients(tf.ones([4, 8, 8, 3]), tf.ones([4, 8, 8, 5]),
        ...                          (3, 3), (1, 1), "SAME", 2).shape
        TensorShape([2, 3, 3, 3, 5])
    """
    kh, kw = kernel_size
    c, o = x.shape[-1], dy.shape[-1]

    def examples_as_channels(t):        # [B*K, H, W, C] -> [K, H, W, B*C]
        t = tf.reshape(t, tf.concat([[examples, -1], tf.shape(t)[1:]], 0))
        t = tf.transpose(t, [1, 2, 3, 0, 4])
        return tf.reshape(t, tf.concat([tf.shape(t)[:3], [-1]], 0))

    dk = tf.raw_ops.Conv2DBackpropFilter(
        input=examples_as_channels(x), filter_sizes=tf.stack([kh, kw, c, examples * o]),
        out_backprop=examples_as_channels(dy), strides=[1, *strides, 1],
        padding=padding.upper())
    dk = tf.reshape(dk, tf.stack([kh, kw, c, examples, o]))
    if not examples_first:      # the op's own layout [kh, kw, C, B, O]: no transpose pass
        return tf.ensure_shape(dk, [kh, kw, c, None, o])
    return tf.ensure_shape(tf.transpose(dk, [3, 0, 1, 2, 4]), [None, kh, kw, c, o])


def batched_kernel_gradient(x: tf.Tensor, dy: tf.Tensor, kernel_shape, strides: tuple[int, int],
                            padding: str) -> tf.Tensor:
    """The kernel gradient summed over the batch (TensorFlow's native op)."""
    return tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=tf.constant(list(kernel_shape), tf.int32), out_backprop=dy,
        strides=[1, *strides, 1], padding=padding.upper())


def fast_convolution_op(layer: keras.layers.Conv2D, inputs, kernel):
    """A drop-in `convolution_op` for a Keras `Conv2D` using `conv2d` above."""
    return conv2d(inputs, kernel, tuple(layer.strides), layer.padding)


def supports_fast_convolution(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a plain 2-D convolution that `fast_convolution_op` computes exactly."""
    return (isinstance(layer, keras.layers.Conv2D)
            and type(layer).convolution_op is keras.layers.Conv2D.convolution_op
            and layer.data_format == "channels_last"
            and tuple(layer.dilation_rate) == (1, 1)
            and getattr(layer, "groups", 1) == 1)


@keras.saving.register_keras_serializable(package="dp_keras_scale")
class WSConv2D(keras.layers.Conv2D):
    """Conv2D with scaled weight standardization and a learnable gain (De et al. 2022).

    The kernel used is `gain * (W - mean(W)) / sqrt(var(W) * fan_in)`, statistics taken per
    output channel; inside `per_example_convolutions()` its kernel gradient vectorizes across
    examples.

    Example:
        >>> layer = WSConv2D(16, 3, padding="same")
        >>> layer(tf.zeros([2, 32, 32, 3])).shape
        TensorShape([2, 32, 32, 16])
    """

    def __init__(self, filters: int, kernel_size, strides=(1, 1), padding: str = "same",
                 use_bias: bool = False, epsilon: float = 1e-4, **kwargs):
        super().__init__(filters, kernel_size, strides=strides, padding=padding,
                         use_bias=use_bias, **kwargs)
        if self.data_format != "channels_last" or tuple(self.dilation_rate) != (1, 1):
            raise ValueError("WSConv2D supports data_format='channels_last' and no dilation")
        self.epsilon = epsilon

    def build(self, input_shape):
        super().build(input_shape)
        self.gain = self.add_weight(name="gain", shape=(self.filters,), initializer="ones")

    def standardized_kernel(self, with_gain: bool = True) -> tf.Tensor:
        """The kernel the convolution uses (`with_gain=False`: before the gain)."""
        kernel = tf.convert_to_tensor(self.kernel)
        mean, var = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
        fan_in = float(kernel.shape[0] * kernel.shape[1] * kernel.shape[2])
        scale = tf.math.rsqrt(tf.maximum(var * fan_in, self.epsilon))
        if with_gain:
            scale = scale * self.gain
        return (kernel - mean) * scale

    def convolution_op(self, inputs, kernel):
        if getattr(_state, "active", False):
            return conv2d(inputs, self.standardized_kernel(), tuple(self.strides), self.padding)
        return tf.nn.conv2d(inputs, self.standardized_kernel(), strides=[1, *self.strides, 1],
                            padding=self.padding.upper())

    # Conv2D saves only kernel and bias; the generic Layer methods also save the gain.
    save_own_variables = keras.layers.Layer.save_own_variables
    load_own_variables = keras.layers.Layer.load_own_variables

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
