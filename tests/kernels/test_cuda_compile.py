"""Every Triton kernel, in every CUDA autotune config, compiles for an H100/H200 (sm_90).

No GPU needed: Triton's front end, its MLIR passes and the ptxas it ships run on the CPU.
What this catches before a (rarely lent) GPU does: code the interpreter runs but the compiler
refuses (a non-constexpr global, a type the interpreter lets through), configs whose shared
memory exceeds what an SM has or whose registers spill, and GEMM kernels that would not run
on INT8 tensor cores. The
launchers run for real on CPU tensors, with the kernel swapped for a recorder, so the
compiled signatures are those a launch would use.
"""

from __future__ import annotations

import re

import pytest
import torch

from gradq_fx.kernels import (
    common,
    conv,
    gemm,
    iqr,
    quantize,
    triton_installed,
    triton_interpreting,
)

pytestmark = pytest.mark.skipif(
    not triton_installed() or triton_interpreting(),
    reason="needs triton, and its CUDA configs (not the interpreter's)",
)

SM90_SHARED_MEMORY = 232_448  # bytes per block on H100 and H200 (227 KiB)
_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
}


_MISSING = object()


class _Recorder:
    """Stands in for an autotuned kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _launches(monkeypatch, module, kernel_name: str, launch) -> tuple[object, list]:
    recorder = _Recorder(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, recorder)
    monkeypatch.setattr(common, "use_triton", lambda tensor: True)
    launch()
    return recorder.kernel, recorder.calls


def _ptxas_spills(capfd) -> list[int]:
    """The spill-store bytes of each ptxas run printed since the last call (Triton prints
    ptxas's report with `knobs.nvidia.dump_ptxas_log`)."""
    return [int(n) for n in re.findall(r"(\d+) bytes spill stores", capfd.readouterr().out)]


def _compile_every_config(kernel, args, kwargs, ptx_pattern: str | None, capfd) -> list[str]:
    """Compile `kernel` with a launch's arguments in each CUDA config; return the failures
    (a compile error, too much shared memory, register spills, or PTX without
    `ptx_pattern`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    names = [p.name for p in fn.params]
    values = {**dict(zip(names, args, strict=False)), **kwargs}
    options = {k: v for k, v in values.items() if k not in names}  # enable_fp_fusion, ...
    failures = []
    for config in kernel.configs:
        sig, consts, given = {}, {}, {**values, **config.kwargs}
        for param in fn.params:
            value = given.get(param.name, _MISSING)
            if value is _MISSING:
                continue
            if param.is_constexpr or isinstance(value, bool):
                sig[param.name], consts[(param.num,)] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                sig[param.name] = "*" + _TYPES[value.dtype]
            elif isinstance(value, int):
                sig[param.name] = "i64" if abs(value) >= 2**31 else "i32"
            else:
                sig[param.name] = "fp32"
        missing = [name for name in names if name not in sig]
        if missing:
            raise AssertionError(f"{fn.__name__}: no value for {missing}")
        compile_options = {
            **options,
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
        }
        _ptxas_spills(capfd)  # drop what came before
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts),
                target=GPUTarget("cuda", 90, 32),
                options=compile_options,
            )
        except Exception as error:  # report every config's failure, not just the first
            failures.append(f"{config}: {type(error).__name__}: {str(error)[:400]}")
            continue
        if compiled.metadata.shared > SM90_SHARED_MEMORY:
            failures.append(f"{config}: {compiled.metadata.shared} bytes of shared memory")
        if ptx_pattern and not re.search(ptx_pattern, compiled.asm["ptx"]):
            failures.append(f"{config}: no {ptx_pattern!r} in the PTX")
        # Spilled registers go through local memory on every use: a tile that spills is a
        # tile to drop. (Checked with this Triton's ptxas; another version may allocate
        # otherwise, which this test then says.)
        spills = _ptxas_spills(capfd)
        if not spills:
            failures.append(f"{config}: no ptxas report (was the kernel cached?)")
        elif any(spills):
            failures.append(f"{config}: ptxas spills {max(spills)} bytes of registers")
    return failures


def _quantize_launch():
    x = torch.randn(197, 61, dtype=torch.bfloat16)
    quantize.quantize_rows(x, torch.ones(197), 8, True, torch.zeros(1, dtype=torch.int64), True)


def _iqr_launch():
    iqr.iqr_clip_rows(torch.randn(197, 61, dtype=torch.bfloat16).t(), 8)


def _gemm_launch():
    a, b = torch.zeros(197, 64, dtype=torch.int8), torch.zeros(64, 96, dtype=torch.int8).t().t()
    gemm.int8_scaled_mm(a, b, torch.ones(197), torch.ones(96), torch.ones(96), torch.bfloat16)


def _bmm_launch():
    a, b = torch.zeros(6, 197, 64, dtype=torch.int8), torch.zeros(6, 64, 197, dtype=torch.int8)
    gemm.int8_scaled_bmm(a, b, torch.ones(6, 197), torch.ones(6, 197), None, torch.float32)


def _conv_launch():
    x, w = torch.zeros(2, 16, 9, 9, dtype=torch.int8), torch.zeros(24, 16, 3, 3, dtype=torch.int8)
    conv.int8_scaled_conv2d(x, w, torch.ones(2), torch.ones(24), (2, 2), (1, 1), torch.ones(24))


# The GEMM-like kernels must multiply on INT8 tensor cores: Hopper's wgmma or mma.sync, int8
# operands into int32 (`wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8`, ...).
INT8_MMA = r"mma\S*\.s32\.s8\.s8"
LAUNCHES = {
    "quantize_rows": (quantize, "_quantize_rows_kernel", _quantize_launch, None),
    "iqr_clip_rows": (iqr, "_iqr_clip_kernel", _iqr_launch, None),
    "int8_scaled_mm": (gemm, "_int8_scaled_mm_kernel", _gemm_launch, INT8_MMA),
    "int8_scaled_bmm": (gemm, "_int8_scaled_mm_kernel", _bmm_launch, INT8_MMA),
    "int8_scaled_conv2d": (conv, "_int8_conv2d_kernel", _conv_launch, INT8_MMA),
}


@pytest.mark.parametrize("name", LAUNCHES)
def test_every_cuda_config_compiles_for_sm90(name, monkeypatch, tmp_path, capfd):
    import triton

    module, kernel_name, launch, ptx_pattern = LAUNCHES[name]
    kernel, calls = _launches(monkeypatch, module, kernel_name, launch)
    assert len(calls) == 1, f"{name} launched its kernel {len(calls)} times"
    assert len(kernel.configs) > 1  # the CUDA configs, not the interpreter's one
    # A fresh cache, so that ptxas runs (and reports) for every config.
    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path))
    monkeypatch.setattr(triton.knobs.nvidia, "dump_ptxas_log", True)
    failures = _compile_every_config(kernel, *calls[0], ptx_pattern, capfd)
    assert not failures, "\n".join(failures)
