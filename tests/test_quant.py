"""Tests of lowrank_optim.quant: block-wise integer quantization, nibble packing,
stochastic rounding, NF4 (bitsandbytes) and the flat put/get storage."""
import io
import math
import re

import pytest
import torch
from hypothesis import given, strategies as st

from lowrank_optim import quant
from registry import generator

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bitsandbytes' generic NF4 dequantize (used on CPU for odd shapes) is wrapped in
    # torch.compile; compiling it costs seconds per new shape on two cores. Eager mode
    # computes the same values.
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _make(seed: int, shape, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A test tensor: Gaussian with random scale and shift, constant, or few-valued."""
    gen = generator(seed)
    n = math.prod(shape)
    if kind == "gauss":
        scale = 10 ** (torch.rand((), generator=gen).item() * 4 - 2)  # 1e-2 .. 1e2
        shift = torch.randn((), generator=gen).item() * scale * 3
        x = torch.randn(n, generator=gen) * scale + shift
    elif kind == "const":
        x = torch.full((n,), torch.randn((), generator=gen).item())
    elif kind == "zeros":
        x = torch.zeros(n)
    else:  # "few": a handful of distinct values, some groups may be constant
        vals = torch.randn(3, generator=gen)
        x = vals[torch.randint(0, 3, (n,), generator=gen)]
    return x.reshape(shape).to(dtype)


def _per_element(t: torch.Tensor, group_size: int, numel: int) -> torch.Tensor:
    """Expand a per-group tensor to one value per element of the flattened input."""
    return t.repeat_interleave(group_size)[:numel]


def _group_absmax(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.reshape(-1).double()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size).abs().amax(dim=1)


shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).filter(
    lambda s: math.prod(s) <= 3000)
group_sizes = st.sampled_from([1, 2, 3, 7, 16, 32, 64, 100, 128, 256, 1000])


# ---------------------------------------------------------------------------------------
# quantize / dequantize round trip
# ---------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, bits=st.integers(2, 8),
       group_size=group_sizes, symmetric=st.booleans(),
       kind=st.sampled_from(["gauss", "gauss", "const", "zeros", "few"]),
       dtype=st.sampled_from(DTYPES))
def test_round_trip_within_half_step(seed, shape, bits, group_size, symmetric, kind, dtype):
    x = _make(seed, shape, kind, dtype)
    n = x.numel()
    q = quant.quantize(x, bits=bits, group_size=group_size, symmetric=symmetric)

    n_groups = -(-n // group_size)
    assert q.scale.shape == (n_groups,) and q.scale.dtype == torch.float32
    assert bool((q.scale > 0).all())
    assert (q.offset is None) == symmetric
    if not symmetric:
        assert q.offset.shape == (n_groups,) and q.offset.dtype == torch.float32
    assert q.shape == x.shape and q.bits == bits and q.group_size == group_size
    assert q.fmt == ("sym" if symmetric else "asym")

    xhat = quant.dequantize(q)
    assert xhat.shape == x.shape and xhat.dtype == torch.float32
    assert q.dequantize(torch.float64).dtype == torch.float64

    # |x - x_hat| <= s_g / 2 for every element, with s_g read from the QTensor's scale
    err = (x.double() - xhat.double()).reshape(-1).abs()
    half_step = _per_element(q.scale.double(), group_size, n) / 2
    slack = 4e-6 * _per_element(_group_absmax(x, group_size), group_size, n)  # fp32 rounding
    assert bool((err <= half_step * (1 + 1e-5) + slack).all()), float((err - half_step).max())

    # codes live in the documented integer range
    codes = quant.unpack_nibbles(q.codes, n) if bits <= 4 else q.codes
    if symmetric:
        assert int(codes.min()) >= 1 and int(codes.max()) <= 2 ** bits - 1
    else:
        assert int(codes.max()) <= 2 ** bits - 1


@given(seed=st.integers(0, 2**31 - 1), shape=shapes, bits=st.integers(2, 8),
       group_size=group_sizes, symmetric=st.booleans())
def test_codes_are_uint8_and_packed(seed, shape, bits, group_size, symmetric):
    x = _make(seed, shape, "gauss", torch.float32)
    q = quant.quantize(x, bits=bits, group_size=group_size, symmetric=symmetric)
    assert q.codes.dtype == torch.uint8 and q.codes.dim() == 1
    n = x.numel()
    assert q.codes.numel() == (-(-n // 2) if bits <= 4 else n)
    assert quant.nbytes(q) == (q.codes.numel() + 4 * q.scale.numel()
                               + (0 if symmetric else 4 * q.offset.numel()))


def test_exactly_representable_values_are_exact():
    # Values on the grid of their group come back exactly (min and max always do).
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 15.0, -1.0, 0.5, 1.0])
    q = quant.quantize(x, bits=4, group_size=5)
    assert torch.equal(q.dequantize()[:5], x[:5])
    # constant groups: asymmetric exact for any value, symmetric exact for 0
    c = torch.full((10,), -3.25)
    assert torch.equal(quant.quantize(c, bits=3, group_size=4).dequantize(), c)
    z = torch.zeros(9)
    assert torch.equal(quant.quantize(z, bits=3, group_size=4, symmetric=True).dequantize(), z)


def test_group_padding_does_not_change_last_group_range():
    # A short last group is padded by repeating its final element: its range (and so its
    # step) is that of its real elements only.
    x = torch.tensor([0.0, 10.0, 0.0, 10.0, 1.0, 2.0])  # last group [1, 2] (+ pad 2, 2)
    q = quant.quantize(x, bits=8, group_size=4)
    assert q.scale[1].item() == pytest.approx(1.0 / 255)
    assert q.offset[1].item() == 1.0


# ---------------------------------------------------------------------------------------
# nibble packing
# ---------------------------------------------------------------------------------------
@given(st.lists(st.integers(0, 15), min_size=0, max_size=301))
def test_pack_unpack_inverse(values):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = quant.pack_nibbles(codes)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-len(values) // 2)
    assert torch.equal(quant.unpack_nibbles(packed, len(values)), codes)
    # layout: element 2i in the low nibble of byte i, 2i+1 in the high nibble
    for i, byte in enumerate(packed.tolist()[:20]):
        assert byte & 0x0F == values[2 * i]
        assert byte >> 4 == (values[2 * i + 1] if 2 * i + 1 < len(values) else 0)


def test_pack_accepts_2d_codes():
    codes = torch.randint(0, 16, (5, 7), dtype=torch.uint8)
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(codes), 35), codes.reshape(-1))


# ---------------------------------------------------------------------------------------
# stochastic rounding
# ---------------------------------------------------------------------------------------
def test_stochastic_round_unbiased_and_within_one_step():
    values = torch.tensor([0.1, 0.5, 0.75, 0.999, -1.3, 2.9, -0.01, 7.25], dtype=torch.float64)
    reps = 25_000  # 200k samples in all
    y = values.repeat(reps)
    gen = generator(1234)
    q = quant.stochastic_round(y, generator=gen)

    # integers, and never more than one step away: q in {floor(y), floor(y) + 1}
    assert torch.equal(q, torch.round(q))
    fl = torch.floor(y)
    assert bool(((q == fl) | (q == fl + 1)).all())
    assert bool(((q - y).abs() < 1).all())

    mean = q.view(reps, -1).mean(dim=0)
    p = values - torch.floor(values)
    se = torch.sqrt(p * (1 - p) / reps)
    assert bool(((mean - values).abs() <= 3.5 * se + 1e-12).all()), (mean - values, se)


def test_stochastic_round_integers_fixed():
    y = torch.tensor([-3.0, 0.0, 5.0, 12.0])
    for _ in range(5):
        assert torch.equal(quant.stochastic_round(y), y)


def test_stochastic_round_generator_reproducible():
    y = torch.rand(1000) * 10
    a = quant.stochastic_round(y, generator=generator(7))
    b = quant.stochastic_round(y, generator=generator(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_leaves_input_and_uses_stochastic_round_draws(symmetric, stochastic):
    # quantize rounds a temporary in place: the caller's tensor must stay as it was, and
    # the codes must be those of the public rounding functions applied to the same values
    x = torch.randn(8, 64, generator=generator(3))
    before = x.clone()
    q = quant.quantize(x, bits=8, group_size=64, symmetric=symmetric, stochastic=stochastic,
                       generator=generator(5))
    assert torch.equal(x, before)
    y = x / q.scale[:, None] if symmetric else (x - q.offset[:, None]) / q.scale[:, None]
    r = quant.stochastic_round(y, generator(5)) if stochastic else y.round()
    k = r.clamp(-127, 127) + 128 if symmetric else r.clamp(0, 255)
    assert torch.equal(q.codes.view(8, 64), k.to(torch.uint8))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_stochastic_unbiased_after_dequantize(symmetric, bits):
    gen = generator(99)
    x = torch.randn(64, generator=gen)
    reps = 16000
    # every group is one copy of x, so all groups share one scale and offset
    q = quant.quantize(x.repeat(reps), bits=bits, group_size=64, symmetric=symmetric,
                       stochastic=True, generator=gen)
    assert torch.equal(q.scale, q.scale[:1].expand_as(q.scale))
    xhat = q.dequantize().view(reps, 64).double()
    step = q.scale[0].double()

    # never more than one step from x
    assert bool(((xhat - x.double()).abs() <= step * (1 + 1e-5)).all())

    # unbiased: per element, (mean over the copies - x) / step is the mean of `reps`
    # independent Bernoulli(p) draws (rounded up or not) minus p. Bernstein's inequality,
    # P(|mean - p| >= t) <= 2 exp(-reps t^2 / (2 p(1-p) + 2t/3)), solved for t at
    # ALPHA / 64 per element, bounds the chance that the test fails although the rounding
    # is unbiased by ALPHA, for the 64 elements together, any p and any random stream
    # (the CUDA generator draws other numbers than the CPU's). The former bound, 3.5
    # standard errors of 4000 copies per element, failed so with probability 3-6% per
    # case, up to 9% (exact binomial tails, random x, float64); this one is tighter too: at
    # p = 1/2, 0.0245 steps instead of 0.0277. 1e-5 steps: dequantize's float32 rounding.
    ALPHA = 1e-6
    if symmetric:
        y = x.double() / step
    else:
        y = (x.double() - q.offset[0].double()) / step
    p = (y - torch.floor(y)).clamp(0, 1)
    log_k = math.log(2 * x.numel() / ALPHA)
    t = (log_k / 3 + torch.sqrt(log_k ** 2 / 9 + 2 * reps * p * (1 - p) * log_k)) / reps
    bias = (xhat.mean(dim=0) - x.double()).abs() / step
    assert bool((bias <= t + 1e-5).all()), (bias / t).max()

    # round-to-nearest, by contrast, is biased for values off the grid
    det = quant.quantize(x, bits=bits, group_size=64, symmetric=symmetric).dequantize()
    assert float((det.double() - x.double()).abs().max()) > 5 * float(step * t.max())


# ---------------------------------------------------------------------------------------
# NF4 through bitsandbytes
# ---------------------------------------------------------------------------------------
def _nf4_levels() -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu").float()


@given(seed=st.integers(0, 2**31 - 1),
       shape=st.lists(st.integers(1, 70), min_size=1, max_size=2).filter(
           lambda s: math.prod(s) <= 3000),
       blocksize=st.sampled_from([64, 128, 256]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_nf4_round_trip_error_bounded(seed, shape, blocksize, dtype):
    x = _make(seed, shape, "gauss", dtype)
    n = x.numel()
    q = quant.nf4_quantize(x, blocksize=blocksize)
    assert q.fmt == "nf4" and q.bits == 4 and q.offset is None
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == -(-n // 2)

    # scale is the per-block absmax
    flat = x.reshape(-1).float()
    pad = (-n) % blocksize
    absmax = torch.cat([flat.abs(), flat.new_zeros(pad)]).view(-1, blocksize).amax(dim=1)
    assert torch.allclose(q.scale, absmax, rtol=1e-6, atol=0)

    levels = _nf4_levels()
    max_gap = float((levels[1:] - levels[:-1]).max())
    xhat = quant.dequantize(q).reshape(-1)  # shape checked in test_nf4_dequantize_keeps_shape
    assert xhat.numel() == n
    bound = _per_element(absmax, blocksize, n) * max_gap / 2
    err = (flat - xhat).abs()
    assert bool((err <= bound * (1 + 1e-4) + 1e-7).all()), float((err - bound).max())


@given(seed=st.integers(0, 2**31 - 1),
       n=st.integers(1, 40000),
       blocksize=st.sampled_from([32, 64]))
def test_nf4_double_quant_absmax_close_and_storage_flat(seed, n, blocksize):
    """Double quantization stores the absmax as 8-bit codes in groups of DQ_GROUP blocks:
    it dequantizes within half a step of its group, the NF4 codes are the same, and put/get
    round-trip it through flat keys (tensors only)."""
    x = _make(seed, [n], "gauss", torch.float32)
    plain, dq = quant.nf4_quantize(x, blocksize), quant.nf4_quantize(x, blocksize, True)
    assert torch.equal(plain.codes, dq.codes)
    assert isinstance(dq.scale, quant.QTensor) and dq.scale.bits == 8
    assert dq.scale.group_size == quant.DQ_GROUP
    groups = -(-n // blocksize)
    absmax = dq.scale.dequantize()
    step = _per_element(dq.scale.scale, quant.DQ_GROUP, groups)
    assert bool(((absmax - plain.scale).abs() <= step / 2 * (1 + 1e-4) + 1e-12).all())
    assert quant.nbytes(dq) == plain.codes.numel() + groups + 8 * (-(-groups // quant.DQ_GROUP))
    store = {}
    quant.put(store, "w", dq)
    assert set(store) == {"w_codes", "w_scale_codes", "w_scale_scale", "w_scale_offset"}
    back = quant.get(store, "w", (n,), 4, blocksize, "nf4")
    assert torch.equal(back.dequantize(), dq.dequantize())
    # the weights move by at most what the absmax moved, scaled by the largest |level| (1)
    assert float((dq.dequantize() - plain.dequantize()).abs().max()) <= \
        float((absmax - plain.scale).abs().max()) * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize("shape", [(64,), (128,), (100,), (7,), (129,), (3, 40), (4, 64)])
def test_nf4_dequantize_keeps_shape(shape):
    x = torch.randn(shape)
    q = quant.nf4_quantize(x)
    assert q.shape == x.shape
    xhat = q.dequantize()
    assert xhat.shape == x.shape, f"nf4 dequantize of {shape} returned {tuple(xhat.shape)}"
    assert xhat.dtype == torch.float32
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(3, 32), (6, 16), (2, 48), (5, 64), (4, 80)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_blocks_may_straddle_rows(shape, blocksize):
    # Blocks run over the flattened tensor, so a 2-D tensor and its flat view have the
    # same codes and must dequantize to the same values (and within the NF4 bound).
    x = torch.randn(shape)
    q2 = quant.nf4_quantize(x, blocksize=blocksize)
    q1 = quant.nf4_quantize(x.reshape(-1), blocksize=blocksize)
    assert torch.equal(q2.codes, q1.codes) and torch.equal(q2.scale, q1.scale)
    flat = q1.dequantize().reshape(-1)
    assert bool((flat - x.reshape(-1)).abs().max() <= q1.scale.max() * 0.31 / 2)
    assert torch.equal(q2.dequantize().reshape(-1), flat), (
        f"nf4 dequantize of a {shape} tensor (blocksize {blocksize}) differs from its flat view")


# ---------------------------------------------------------------------------------------
# put / get, checkpoints
# ---------------------------------------------------------------------------------------
CASES = [("asym", 8, 64), ("asym", 4, 32), ("asym", 3, 5), ("sym", 8, 100), ("sym", 2, 7),
         ("nf4", 4, 64)]


def _quantize(x, fmt, bits, group_size):
    if fmt == "nf4":
        return quant.nf4_quantize(x, blocksize=group_size)
    return quant.quantize(x, bits=bits, group_size=group_size, symmetric=fmt == "sym")


@pytest.mark.parametrize("fmt,bits,group_size", CASES)
def test_put_get_round_trip(fmt, bits, group_size):
    x = torch.randn(13, 21)
    q = _quantize(x, fmt, bits, group_size)
    store = {}
    quant.put(store, "w", q)
    expected = {"w_codes", "w_scale"} | ({"w_offset"} if fmt == "asym" else set())
    assert set(store) == expected
    assert all(isinstance(v, torch.Tensor) for v in store.values())

    back = quant.get(store, "w", x.shape, bits, group_size, fmt)
    assert torch.equal(back.dequantize(), q.dequantize())

    # through torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(store, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert set(loaded) == expected
    back = quant.get(loaded, "w", list(x.shape), bits, group_size, fmt)
    assert back.codes.dtype == torch.uint8
    assert torch.equal(back.dequantize(), q.dequantize())


def test_put_symmetric_over_asymmetric_drops_stale_offset():
    store = {"other": torch.ones(1)}
    x = torch.randn(50)
    quant.put(store, "m", quant.quantize(x, bits=8, group_size=16))
    assert "m_offset" in store
    q = quant.quantize(x, bits=8, group_size=16, symmetric=True)
    quant.put(store, "m", q)
    assert "m_offset" not in store and "other" in store
    back = quant.get(store, "m", x.shape, 8, 16, "sym")
    assert torch.equal(back.dequantize(), q.dequantize())


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
def _names(value):
    return re.escape(repr(value))


@pytest.mark.parametrize("bits", [0, -3, 1, 9, 16, 4.0, "8", True])
def test_invalid_bits(bits):
    with pytest.raises(ValueError, match=_names(bits)):
        quant.quantize(torch.randn(10), bits=bits)


@pytest.mark.parametrize("group_size", [0, -3, 2.5, "64", True])
def test_invalid_group_size(group_size):
    with pytest.raises(ValueError, match=_names(group_size)):
        quant.quantize(torch.randn(10), bits=8, group_size=group_size)


@pytest.mark.parametrize("blocksize", [0, -3])
def test_invalid_nf4_blocksize(blocksize):
    with pytest.raises(ValueError, match=_names(blocksize)):
        quant.nf4_quantize(torch.randn(128), blocksize=blocksize)


@pytest.mark.parametrize("fmt", ["int4", "fp4", "", "NF4"])
def test_invalid_format(fmt):
    with pytest.raises(ValueError, match=_names(fmt)):
        quant._check(4, 64, fmt)


def test_nf4_format_requires_4_bits():
    with pytest.raises(ValueError, match="8"):
        quant._check(8, 64, "nf4")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_input_raises_type_error(dtype):
    with pytest.raises(TypeError, match="complex"):
        quant.quantize(torch.randn(8, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_integer_input_raises_type_error(dtype):
    with pytest.raises(TypeError):
        quant.quantize(torch.zeros(8, dtype=dtype))

