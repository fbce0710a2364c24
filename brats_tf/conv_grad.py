"""The kernel gradient of a 3x3x3 stride-1 'same' convolution as one large
matrix product (issue 6: the training step's slowest op on AVX2 CPUs).

Profiling a 64^3 training step on a 2-core AMD EPYC (Zen 3, AVX2;
``benchmarks/profile_step.py``) put half of the step's op time in
``Conv3DBackpropFilterV2``: oneDNN has brgemm kernels for the forward pass and
the input gradient on AVX2 (104-109 GFLOP/s for a 64^3, 32-channel layer) but
for the kernel gradient of channels-last data it falls back to im2col + GEMM
(``x64:gemm:jit``, 45-48 GFLOP/s), while a float32 matrix product runs at
110-130 GFLOP/s on the same cores.

The kernel gradient of ``y = conv3d(x, k)`` ('same', stride 1) is

    dk[a, b, c, i, o] = sum_n x[n + (a, b, c) - 1, i] * dy[n, o]

(x zero outside the volume). Here x and dy are laid out on the same
zero-padded grid (D+2, H+2, W+2) and flattened, so that a shift of the kernel
window is a shift of the flat index: x at offset s is the slice
``x_flat[m + s]``. The 9 (D, W)-offsets go into x's channels (``x9[m] =
[x(m + s_dw)]``, 9 Cin columns) and the 3 H-offsets into dy's, moved to dy's
side of the product (``dy3[m] = [dy(m - s_h)]``, 3 Cout columns), and all 27
kernel taps come out of ONE product ``x9^T @ dy3`` of shape [9 Cin, 3 Cout]
over all voxels: for 32 channels a 288 x 96 output, which the CPU's GEMM runs
near its peak, instead of 27 thin 32 x 32 products. Padded positions of dy
are zero, so the flat shifts that wrap across rows or planes of the grid add
nothing.

The voxels are taken in slabs of depth planes, one after the other, so the
shifted copies (12x a slab of a tensor) stay small: at the paper crop's full
resolution a whole-volume x9 and dy3 would take 6 GB. With the depth offsets
on x's side, a slab's product runs over its own planes only, so thin slabs
waste no arithmetic (with them on dy's side a slab of n planes took n + 2).

Same result as ``tf.raw_ops.Conv3DBackpropFilterV2`` up to float32 summation
order (tests/test_conv_grad.py checks both against a float64 NumPy reference).
Used on x86 CPUs with AVX2 and without AVX-512 only (``kernel_gradient_mode``):
on GPUs cuDNN's kernel gradient is the fast one, and on a 2-core AVX-512 Xeon
(with AMX, model 207) oneDNN has a fast kernel gradient of its own (168
GFLOP/s against this product's 108 at 64^3 x 32 channels; the 64^3 training
step took 3.4-3.6 s with it, 4.1-4.4 s with this product).
"""

from __future__ import annotations

import functools
import os
import platform

import tensorflow as tf

from brats_tf.cpu import cpu_flags

# Shifted copies (x9 and dy3) per slab: at most SLAB_BYTES, and at most
# SLAB_ACTIVATIONS times the larger of the layer's input and output gradient
# (one batch element), so that they add about one activation to the working
# set of a backward pass (--recompute keeps 4-5). A slab's product sums over
# its own planes only, so thin slabs cost little: 64^3 x 32 channels in slabs
# of 5 planes took 214 ms, in 2 slabs 181 ms (timed with SLAB_BYTES set to
# 32 and 256 MiB, as benchmarks/kernel_grad.py times the default).
SLAB_BYTES = 128 * 2**20
SLAB_ACTIVATIONS = 1.0
# ... but at least this much (small volumes: no memory to save, and slabs of
# one or two planes made the 16^3 x 128-channel gradient slower than oneDNN's)
MIN_SLAB_BYTES = 32 * 2**20

MIN_CHANNELS = 16
MAX_GRID_RATIO = 1.5

MODES = ("auto", "matmul", "native")
_ENV = "BRATS_TF_KERNEL_GRADIENT"


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# oneDNN's AVX-512 ISA ("avx512_core"), which has brgemm kernel gradients.
AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


def cpu_prefers_matmul(machine: str, flags: frozenset | None) -> bool:
    """Whether this module's product beats oneDNN's kernel gradient on a CPU
    (``machine`` as ``platform.machine()``, ``flags`` as ``cpu_flags``):
    only where that was measured, an x86 CPU with AVX2 and without AVX-512
    (``benchmarks/kernel_grad.py``: 1.2-1.7x faster on an AMD EPYC, Zen 3;
    on an AVX-512 Xeon oneDNN's own was 1.5x faster than the product). Other
    CPUs, and CPUs whose flags cannot be read, keep TensorFlow's op."""
    return (machine.lower() in _X86 and flags is not None and "avx2" in flags
            and not AVX512_CORE <= flags)


@functools.lru_cache(maxsize=None)
def _this_cpu_prefers_matmul() -> bool:
    return cpu_prefers_matmul(platform.machine(), cpu_flags())


def kernel_gradient_mode(recompute: bool = False) -> str:
    """Which kernel gradient 3x3x3 'same' convolutions use in training.

    ``BRATS_TF_KERNEL_GRADIENT`` = ``matmul`` (this module), ``native``
    (TensorFlow's ``Conv3DBackpropFilterV2``) or ``auto`` (the default:
    ``matmul`` when TensorFlow sees no GPU and the CPU is one where the
    product is faster (``cpu_prefers_matmul``: x86 with AVX2, without
    AVX-512), else ``native``; and ``native`` in the recomputed blocks of
    ``--recompute`` (``recompute=True``), whose point is memory: with
    ``matmul`` there the paper crop's step took 122 instead of 142 s but its
    peak RSS rose from 6.7 to 8.1 GiB, the live tensors' peak unchanged at
    4.6 GiB: the slabs' copies fragment TensorFlow's CPU memory pool). Read
    when a training step is traced.
    """
    mode = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        if recompute or tf.config.list_logical_devices("GPU"):
            return "native"
        return "matmul" if _this_cpu_prefers_matmul() else "native"
    return mode


def applies(x: tf.Tensor, kernel_shape) -> bool:
    """Whether ``conv3d_kernel_grad`` is used for this case: a float32 input
    of static shape, a 3x3x3 kernel, 16+ input channels and a volume whose
    padded grid adds at most 50% (16^3 and up). Measured on the AVX2 EPYC
    (``benchmarks/kernel_grad.py``): with 4 input channels (the stem) the
    product has only 36 rows and is 2x slower than oneDNN's; at 8^3 the
    grid's padding (1.95x the volume) costs more than the product gains."""
    if not (x.dtype == tf.float32 and x.shape.rank == 5 and x.shape.is_fully_defined()
            and tuple(kernel_shape[:3]) == (3, 3, 3) and x.shape[-1] >= MIN_CHANNELS):
        return False
    _, depth, height, width, _ = x.shape
    grid = (depth + 2) * (height + 2) * (width + 2)
    return grid <= MAX_GRID_RATIO * depth * height * width


def use_matmul(x: tf.Tensor, kernel_shape, recompute: bool = False) -> bool:
    """Whether a 3x3x3 'same' convolution of x takes its kernel gradient from
    ``conv3d_kernel_grad``: the mode (``kernel_gradient_mode``) says
    ``matmul`` and the case is one it handles (``applies``)."""
    return kernel_gradient_mode(recompute) == "matmul" and applies(x, kernel_shape)


def _slab_planes(shape, out_channels: int) -> int:
    """Output depth planes per slab (SLAB_BYTES, SLAB_ACTIVATIONS, MIN_SLAB_BYTES)."""
    _, depth, height, width, in_channels = shape
    plane = (height + 2) * (width + 2) * (9 * in_channels + 3 * out_channels) * 4
    activation = depth * height * width * max(in_channels, out_channels) * 4
    budget = min(SLAB_BYTES, max(MIN_SLAB_BYTES, SLAB_ACTIVATIONS * activation))
    return max(1, int(budget // plane))


def _slab_grad(x, dy, start: int, stop: int):
    """[9 Cin, 3 Cout] product of the output planes [start, stop) of one batch
    element (x, dy: [D, H, W, C]); rows (kd, kw, i), columns (kh, o)."""
    depth, height, width, _ = x.shape
    wp = width + 2
    plane = (height + 2) * wp
    # x and dy on the padded grid of these planes plus one plane each side:
    # for x the volume's neighbouring planes where there are any, else
    # zeros; for dy zeros.
    lo, hi = max(start - 1, 0), min(stop + 1, depth)
    xp = tf.pad(x[lo:hi], [[lo - (start - 1), (stop + 1) - hi], [1, 1], [1, 1], [0, 0]])
    xp = tf.reshape(xp, [-1, x.shape[-1]])
    dyp = tf.reshape(tf.pad(dy[start:stop], [[1, 1], [1, 1], [1, 1], [0, 0]]),
                     [-1, dy.shape[-1]])
    # Rows m of the slab's own planes but their first and last cells (padding
    # cells, whose dy and shifted dy are all zero): m = first + r.
    first, rows = plane + 1, (stop - start) * plane - 2
    # x9[r] = [x(m + (kd - 1) plane + kw - 1)] over (kd, kw); stacking on a
    # new axis 1 then reshaping is a concat on axis 1, 2-3x faster in
    # TensorFlow's CPU kernels.
    x9 = tf.stack([xp[first + s: first + s + rows]
                   for s in ((kd - 1) * plane + kw - 1 for kd in range(3) for kw in range(3))],
                  axis=1)
    # dy3[r] = [dy(m - (kh - 1) wp)] over kh.
    dy3 = tf.stack([dyp[first - s: first - s + rows] for s in ((kh - 1) * wp for kh in range(3))],
                   axis=1)
    return tf.matmul(tf.reshape(x9, [rows, -1]), tf.reshape(dy3, [rows, -1]), transpose_a=True)


def conv3d_kernel_grad(x: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """Kernel gradient [3, 3, 3, Cin, Cout] of a 3x3x3 stride-1 'same'
    convolution of x ([B, D, H, W, Cin], float32, static shape) whose output
    gradient is dy ([B, D, H, W, Cout])."""
    batch, depth, _, _, in_channels = x.shape
    out_channels = dy.shape[-1]
    step = _slab_planes(x.shape, out_channels)
    total = None
    for b in range(batch):
        for start in range(0, depth, step):
            # One slab at a time: its copies are made only after the previous
            # slab's product, so at most one slab's copies are alive.
            deps = [] if total is None else [total]
            with tf.control_dependencies(deps):
                part = _slab_grad(x[b], dy[b], start, min(start + step, depth))
            total = part if total is None else total + part
    grad = tf.reshape(total, [3, 3, in_channels, 3, out_channels])  # kd, kw, i, kh, o
    return tf.transpose(grad, [0, 3, 1, 2, 4])
