"""``Format.quantize_weight`` (what sensitivity scores use) equals the real module's weight.

Some formats compute the dequantized weight without building the kernel's module (no packing,
no prepack): this checks, for every registered format this machine can run, on aligned and
ragged shapes, fp32 and bf16, that the tensor is exactly the one the module built by
``make_module`` uses, and that a layer the module path refuses is refused the same way.
"""
from __future__ import annotations

import pytest
import torch

from mpsearch.errors import MpsError
from mpsearch.formats import FORMATS, get_format

SHAPES = [(64, 128), (96, 576), (48, 200), (16, 64)]


def _module_weight(fmt, w: torch.Tensor) -> torch.Tensor:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return fmt.dequantized(fmt.make_module(lin).inner).to(torch.float32)


def _runnable(name: str) -> bool:
    try:
        get_format(name).check_device("cpu")
        get_format(name).make_module(torch.nn.Linear(128, 64))
    except (MpsError, ImportError):
        return False
    return True


CPU_FORMATS = [n for n in FORMATS if _runnable(n)]


def test_the_cpu_formats_are_covered():
    # the fast paths (cast, int8dyn, rtn.*) and the module paths (torch.int*wo, rtn sym) are all here
    for name in ("bf16", "torch.int8dyn", "rtn.int4", "rtn.int3", "rtn.int2", "torch.int8wo", "torch.int4wo", "rtn.int8ch"):
        assert name in CPU_FORMATS


@pytest.mark.parametrize("name", CPU_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_weight_is_the_modules_weight(name, dtype):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype)
        w[0, : in_f // 3] *= 40  # one outlier row: scales differ per channel and group
        try:
            ref = _module_weight(fmt, w)
        except MpsError as exc:
            with pytest.raises(MpsError) as got:
                fmt.quantize_weight(w)
            assert str(got.value) == str(exc)
            continue
        q = fmt.quantize_weight(w)
        assert q.dtype == torch.float32 and q.shape == w.shape
        assert torch.equal(q, ref), f"{name} {dtype} {out_f}x{in_f}: max diff {(q - ref).abs().max().item():.3g}"


def test_quantize_weight_does_not_touch_its_input():
    w = torch.randn(64, 128)
    before = w.clone()
    for name in CPU_FORMATS:
        get_format(name).quantize_weight(w)
    assert torch.equal(w, before)
