"""The Triton log-prob kernels compiled ahead of time for sm_90 (H100) on a machine without a GPU: Triton's own
compiler and its bundled ptxas build the cubin, its bundled cuobjdump reports registers and stack per thread.
The default tiles must not spill (stack 0) and must fit 255 registers, in every input dtype the learner uses.

A spill moves values to local memory (off-chip, through L1/L2) inside the inner loop; the backward at the
forward's tiles did so on sm_90. This catches a tile change or a kernel edit that brings spills back, before any
GPU runs it. It does not run the kernels (tests/unit/test_fused_logprob.py checks their math under the Triton
interpreter)."""

import re
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow,  # ~2 s per compile on a cold Triton cache
              pytest.mark.skipif(find_spec("triton") is None, reason="triton is not installed")]

MAX_REGISTERS = 255  # per thread, sm_90
MAX_SHARED = 227 * 1024  # dynamic shared memory per block, sm_90
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _cuobjdump() -> str:
    import triton.knobs

    try:
        path = triton.knobs.nvidia.cuobjdump.path
    except Exception as exc:  # noqa: BLE001 - any failure to locate the tool is a skip, not an error
        pytest.skip(f"Triton's bundled cuobjdump is not available: {type(exc).__name__}: {exc}")
    if not path or not Path(path).is_file():
        pytest.skip(f"Triton's bundled cuobjdump is missing ({path!r})")
    return path


def _signature(kernel, dtype: torch.dtype, constexprs: dict) -> dict:
    """Argument types as the launcher would infer them: the two matrices in the input dtype, targets int64,
    every other pointer an fp32 buffer, sizes and strides int32, the temperature fp32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("h_ptr", "w_ptr"):
            sig[name] = "*" + _TRITON_TYPES[dtype]
        elif name == "tgt_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "temperature":
            sig[name] = "fp32"
        elif name in ("T", "V", "H") or name.startswith(("stride_", "v_per_split", "num_splits")):
            sig[name] = "i32"
        else:
            raise AssertionError(f"argument {name!r} of {kernel.fn.__name__} has no type here; add it")
    return sig


def _compile_sm90(which: str, dtype: torch.dtype):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from trainers import triton_logprob as tk

    fwd_tiles, bwd_tiles = tk._blocks(dtype, None, None, None)
    common = dict(PRECISION=tk._precision(dtype))
    if which == "forward":
        kernel, (bt, bv, bh, warps) = tk._forward_kernel, fwd_tiles
        constexprs = dict(common)
    else:  # the largest variant: both gradients and the entropy term
        kernel, (bt, bv, bh, warps) = tk._backward_kernel, bwd_tiles
        constexprs = dict(common, HAS_G2=True, NEED_DH=True, NEED_DW=True, GROUP_T=tk.BACKWARD_GROUP_T)
    constexprs.update(BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh)
    src = ASTSource(kernel, _signature(kernel, dtype, constexprs), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}), (bt, bv, bh, warps)


def _resources(compiled, tmp_path: Path) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the cubin's one function, from ``cuobjdump -res-usage``."""
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    out = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = re.findall(r"REG:(\d+)\s+STACK:(\d+)", out.stdout)
    assert len(found) == 1, out.stdout
    return int(found[0][0]), int(found[0][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_default_tiles_compile_for_sm90_without_spills(which, dtype, tmp_path):
    _cuobjdump()  # skip before compiling when the tool is missing
    compiled, tiles = _compile_sm90(which, dtype)
    regs, stack = _resources(compiled, tmp_path)
    where = f"{which} {dtype} tiles {tiles[:3]}, {tiles[3]} warps on sm_90: {regs} registers, {stack} B stack"
    assert stack == 0, f"spills: {where}"
    assert 0 < regs <= MAX_REGISTERS, where
    assert compiled.metadata.shared <= MAX_SHARED, f"{compiled.metadata.shared} B shared memory: {where}"
    if dtype != torch.float32:  # 16-bit tiles run on the Hopper tensor-core instructions
        assert "wgmma" in compiled.asm["ptx"], where
