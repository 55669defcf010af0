"""gradq_fx.lowerings: every lowering object computes the reference's numbers.

On the CPU the kernel ops run their pure-torch references, so triton and fused must give the
reference lowering's (and the quantizer's) numbers bit for bit with nearest rounding.
"""

from __future__ import annotations

import pytest
import torch

from gradq_fx import kernels, lowerings, quantizer
from gradq_fx.config import Clipping, Granularity, Lowering, QuantSpec, Role
from gradq_fx.lowerings import reference

SPECS = {
    "minmax": QuantSpec(),
    "iqr": QuantSpec(clipping=Clipping.IQR),
    "per_tensor": QuantSpec(granularity=Granularity.PER_TENSOR),
    "scaled": QuantSpec(scaling=True),
}
KERNEL_LOWERINGS = [lowerings.get(Lowering.TRITON), lowerings.get(Lowering.FUSED)]
EVERY_LOWERING = [lowerings.get(kind) for kind in Lowering if kind is not Lowering.AUTO]


def rows_with_outliers(shape, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(shape) * torch.rand(shape).pow(4)
    x[0] = 0.0  # an all-zero row
    x[1, 3] = 500.0  # an outlier
    return x


def test_every_lowering_is_registered_with_its_kind():
    for kind in Lowering:
        if kind is not Lowering.AUTO:
            assert lowerings.get(kind).kind is kind


def test_auto_resolves_per_device():
    assert lowerings.resolve(Lowering.AUTO, torch.device("cpu")).kind is Lowering.REFERENCE
    expected = Lowering.TRITON if kernels.triton_installed() else Lowering.REFERENCE
    assert lowerings.resolve(Lowering.AUTO, torch.device("cuda")).kind is expected
    assert lowerings.resolve(Lowering.TRITON, torch.device("cpu")).kind is Lowering.TRITON
    with pytest.raises(ValueError, match="lowering.*CUDA"):
        lowerings.resolve(Lowering.INDUCTOR_TEMPLATE, torch.device("cpu"))


def test_only_inductor_template_changes_inductors_config():
    for lowering in EVERY_LOWERING:
        config = lowering.inductor_config()
        if lowering.kind is Lowering.INDUCTOR_TEMPLATE:
            assert config == {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON"}
        else:
            assert config == {}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("lowering", EVERY_LOWERING, ids=lambda lo: lo.kind.value)
def test_quantize_rows_equals_the_quantizer(lowering, name):
    spec = SPECS[name]
    x = rows_with_outliers((37, 197))
    q, scale = lowering.quantize_rows(x, spec)
    want_q, want_scale = quantizer.quantize(x, spec, dim=-1)
    assert q.dtype is torch.int8 and scale.shape == (37,)
    assert torch.equal(q, want_q)
    torch.testing.assert_close(scale, want_scale.expand(37, 1).reshape(-1), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("lowering", KERNEL_LOWERINGS, ids=lambda lo: lo.kind.value)
@pytest.mark.parametrize(
    ("shape_a", "shape_b"), [((197, 64), (64, 37)), ((2, 3, 13, 16), (2, 3, 16, 11))], ids=str
)
def test_mm_equals_the_reference(lowering, name, shape_a, shape_b):
    spec = SPECS[name]
    torch.manual_seed(1)
    a, b = torch.randn(shape_a), torch.randn(shape_b)
    bias = torch.randn(shape_b[-1]) if len(shape_a) == 2 else None
    want = reference.REFERENCE.mm(a, b, bias, spec, spec)
    got = lowering.mm(a, b, bias, spec, spec)
    if spec.scaling:  # least-squares scales: equal up to float rounding of their sums
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("lowering", KERNEL_LOWERINGS, ids=lambda lo: lo.kind.value)
def test_conv2d_equals_the_reference(lowering, role):
    torch.manual_seed(2)
    x, w = torch.randn(2, 3, 11, 9), torch.randn(5, 3, 3, 3)
    stride, padding = (2, 2), (1, 1)
    dy = torch.randn(2, 5, 6, 5)
    a, b, size = {
        Role.FORWARD: (x, w, (6, 5)),
        Role.DGRAD: (dy, w, (11, 9)),
        Role.WGRAD: (x, dy, (3, 3)),
    }[role]
    spec = QuantSpec()
    want = reference.REFERENCE.conv2d(a, b, None, stride, padding, size, spec, spec, role)
    got = lowering.conv2d(a, b, None, stride, padding, size, spec, spec, role)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("lowering", EVERY_LOWERING, ids=lambda lo: lo.kind.value)
def test_stats_equal_the_quantizers(lowering, name):
    x = rows_with_outliers((53, 197), seed=3)
    want = quantizer.quantization_stats(x, SPECS[name], -1)
    assert torch.equal(lowering.stats(x, SPECS[name], -1), want)


def test_float_paths_are_the_gemms_gradq_replaced():
    torch.manual_seed(4)
    a, b, bias = torch.randn(7, 13), torch.randn(13, 5), torch.randn(5)
    torch.testing.assert_close(reference.float_mm(a, b, bias), a @ b + bias, rtol=0, atol=0)
    x, w = torch.randn(2, 3, 11, 9), torch.randn(5, 3, 3, 3)
    want = torch.nn.functional.conv2d(x, w, None, 2, 1)
    got = reference.float_conv2d(x, w, None, (2, 2), (1, 1), (6, 5), "forward")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert reference.exact_stats(a).tolist() == [1.0, 0.0, 1.0]
