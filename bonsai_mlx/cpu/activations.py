"""SiLU, tanh-GELU and softmax exponentials for the CPU on a rational tanh the CPU JIT vectorizes.

MLX's CPU `exp`/`tanh` cost ~12-17 ns per element: at 240 prompt tokens the Qwen2.5-0.5B SiLUs alone take ~0.5 s of
the time to first token. `fast_tanh` is Eigen's rational float tanh (absolute error ≤ 4e-7) in plain arithmetic.
"""

from __future__ import annotations

import mlx.core as mx

# Eigen's float tanh (`generic_fast_tanh_float`): x·P(x²)/Q(x²) on x clamped to ±7.9053 (where tanh rounds to ±1).
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
# Evaluated in the Estrin form below, the rational is exactly ±1 at ±8.5 and within 4e-7 of tanh on [-8.5, 8.5]
# (at Eigen's ±7.9053 it gives ±(1 - 3.6e-7)); beyond, it diverges.
_TANH_CLAMP = 8.5
# the exponentials of the softmax clamp at Eigen's bound: exp(2·-7.9053) evaluates to 1.8e-7 (true 1.4e-7)
_EXP_CLAMP = 7.90531110763549805

# Why the functions below are written as they are: the JIT behind `mx.compile` on the CPU (g++ -O3, generic x86-64)
# - fuses at most 11 levels of ops into one kernel; a deeper graph is cut into several kernels that write full-size
#   intermediates and pass scalar constants as strided arrays (not vectorized). Hence P in Estrin form (depth 4, not
#   12 for Horner), each function compiled per shape (a shapeless trace adds broadcast levels to every op), and
#   sigmoid as 0.5 + (0.5·c·P)/Q with the 0.5 folded into P's coefficients (exact: a power of two);
# - does not vectorize a kernel with a comparison or select ahead of its arithmetic (GCC: "control flow in loop"),
#   so the clamp is its own small kernel. It also zeroes the factor that multiplies sigmoid / exp where the argument
#   is clamped from below, so that silu(g), gelu(x) and the softmax's exponentials are exactly 0 there whatever the
#   rounding of the rational at the bound; that test reads the input, not the clamp's intermediate (a shared
#   intermediate becomes a kernel of its own).
# `python bench/cpu_kernels.py` times SwiGLU, tanh-GELU and the attention against MLX's own.


def _clamp(a: mx.array, bound: float, upper: bool = True) -> mx.array:
    """a limited to ±bound (from below only if not upper); the gradient is 0 outside, as `mx.clip`'s."""
    a = mx.where(a < -bound, -bound, a)
    return mx.where(a > bound, bound, a) if upper else a


def _tanh_pq(c: mx.array, scale: float = 1.0):
    """(scale·c·P(c²), Q(c²)): tanh(c) = c·P/Q for |c| ≤ _TANH_CLAMP."""
    P = [scale * v for v in _TANH_P]
    y = c * c
    y2 = y * y
    y4 = y2 * y2
    p = (P[0] + P[1] * y) + y2 * (P[2] + P[3] * y) + y4 * ((P[4] + P[5] * y) + y2 * P[6])
    q = (_TANH_Q[0] + _TANH_Q[1] * y) + y2 * (_TANH_Q[2] + _TANH_Q[3] * y)
    return c * p, q


@mx.compile
def _tanh_clamped(c: mx.array) -> mx.array:
    cp, q = _tanh_pq(c)
    return cp / q


def fast_tanh(x: mx.array) -> mx.array:
    """tanh(x) with absolute error ≤ 4e-7 (Eigen's `generic_fast_tanh_float` rational)."""
    return _tanh_clamped(_clamp(x, _TANH_CLAMP))


@mx.compile
def _swiglu_clamped(g: mx.array):
    return _clamp(0.5 * g, _TANH_CLAMP), mx.where(g < -2 * _TANH_CLAMP, 0.0, g)


@mx.compile
def _swiglu_tail(c: mx.array, gate: mx.array, x: mx.array) -> mx.array:
    half_t_num, q = _tanh_pq(c, 0.5)
    return (gate * x) * (0.5 + half_t_num / q)  # sigmoid(g) = 0.5 + 0.5·tanh(g/2)


@mx.compile
def _sigmoid_tail(c: mx.array) -> mx.array:
    half_t_num, q = _tanh_pq(c, 0.5)
    return 0.5 + half_t_num / q


@mx.custom_function
def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x (mlx-lm's `swiglu`), sigmoid(g) = 0.5 + 0.5·tanh(g/2) on the rational tanh."""
    return _swiglu_tail(*_swiglu_clamped(gate), x)


@fast_swiglu.vjp
def _fast_swiglu_vjp(primals, cotangent, output):
    # The closed-form backward from the inputs alone: autodiff through the rational would keep ~10 intermediates of
    # [tokens, 4864] per layer until the backward pass (a 512-token 4-bit training step peaked at 7.3 GB, with this
    # 4.9 GB: `python bench/train_step.py`). d/dg silu(g)·x = x·σ(g)·(1 + g·(1 − σ(g))), d/dx = silu(g).
    g, x = primals
    sig = _sigmoid_tail(_clamp(0.5 * g, _TANH_CLAMP))
    silu = g * sig
    return cotangent * x * (sig + silu * (1.0 - sig)), cotangent * silu


@mx.compile
def _gelu_clamped(x: mx.array):
    # the argument reaches -_TANH_CLAMP at x ≈ -5.0; below x = -5.5, |gelu(x)| < 1e-8
    return _clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), _TANH_CLAMP), mx.where(x < -5.5, 0.0, x)


@mx.compile
def _gelu_tail(c: mx.array, x: mx.array) -> mx.array:
    half_t_num, q = _tanh_pq(c, 0.5)
    return x * (0.5 + half_t_num / q)  # 0.5·x·(1 + tanh(c))


def fast_gelu_tanh(x: mx.array) -> mx.array:
    """The tanh GELU (`gelu_pytorch_tanh`, MLX's `gelu_approx`) on the rational tanh."""
    return _gelu_tail(*_gelu_clamped(x))


@mx.compile
def _exp_clamped(s: mx.array, m: mx.array):
    return _clamp(0.5 * (s - m), _EXP_CLAMP, upper=False), mx.where(s < m - 2 * _EXP_CLAMP, 0.0, 1.0)


@mx.compile
def _exp_tail(c: mx.array, keep: mx.array) -> mx.array:
    cp, q = _tanh_pq(c)
    return keep * ((q + cp) / (q - cp))  # exp(2c) = (1 + tanh(c)) / (1 - tanh(c))


def _fast_exp_rows(scores: mx.array) -> mx.array:
    """exp(s - max over the last axis) with exp(s) = (1 + tanh(s/2)) / (1 - tanh(s/2)) for s ≤ 0; entries below
    e^-15.8 (≈1e-7 of the largest) become 0."""
    return _exp_tail(*_exp_clamped(scores, mx.max(scores, axis=-1, keepdims=True)))


def _row_sums(e: mx.array) -> mx.array:
    """e.sum(-1, keepdims=True) as a product with a ones vector: BLAS's GEMV reads e faster than MLX's CPU reduction
    (a throwaway timing of one 14 × 96 × 288 chunk: 0.27 → 0.04 ms; `python bench/cpu_kernels.py` times the
    attention that uses it)."""
    return e @ mx.ones((e.shape[-1], 1), e.dtype)


def _fast_softmax(scores: mx.array) -> mx.array:
    """softmax over the last axis with `_fast_exp_rows`."""
    e = _fast_exp_rows(scores)
    return e / _row_sums(e)

