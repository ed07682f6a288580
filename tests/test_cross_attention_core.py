"""The cross-attention core (`attend_or_zero`): rows that see nothing, grouped heads as the kernel
gets them, bf16 precision, and the memory benchmark of its kernels."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mmpretrain.model import cross_attention
from mmpretrain.model.cross_attention import attend_or_zero


def test_fully_masked_rows_are_zero_and_finite():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g, requires_grad=True)
    k, v = torch.randn(1, 1, 4, 8, generator=g), torch.randn(1, 1, 4, 8, generator=g)
    mask = torch.tensor([[False, True, True, True], [True] * 4, [False] * 4])[None, None]
    out = attend_or_zero(q, k, v, mask)  # [1, 2, 3, 8]
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 8))
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0].expand(1, 2, 8))  # sees key 0 only
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, 1], torch.zeros(1, 2, 8))


def test_grouped_heads_reach_the_kernel_repeated(monkeypatch):
    """The masked attention gets as many key/value heads as query heads and no `enable_gqa`:
    on CUDA the memory-efficient kernel (the one that takes a mask) does not take grouped heads in
    every torch version, and the math kernel it falls back to keeps the [b, a, s, kr] fp32
    probabilities (6.7 GiB more over the 1b X model's six layers in fp32, 7.4 GiB in bf16,
    measured with benchmarks/cross_attention_memory.py). The result equals grouped-query
    attention."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def record(q, k, v, mask, **kwargs):
        calls.append((q.shape[1], k.shape[1], v.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, mask, **kwargs)

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g), \
        torch.randn(2, 2, 3, 8, generator=g)
    mask = torch.rand(2, 1, 5, 3, generator=g) > 0.5
    mask[:, :, :, 0] = False  # every query sees a key: no zeroed rows
    monkeypatch.setattr(cross_attention.F, "scaled_dot_product_attention", record)
    out = attend_or_zero(q, k, v, mask)
    assert calls == [(4, 4, 4, False)]
    torch.testing.assert_close(out, sdpa(q, k, v, ~mask, enable_gqa=True))

def test_bf16_attention_takes_the_softmax_in_fp32():
    """The layer attends in the activation dtype: in bf16 the fused kernel accumulates in fp32, so
    the output is fp32 attention over the same bf16 inputs to within the output's own rounding
    (2^-8 relative). Scores or a softmax in bf16 (torch's math kernel with reduced precision, or
    matmuls in bf16) miss by 8-11x that here."""
    g = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(2, 8, 300, 64, generator=g)).bfloat16()
    k = (3 * torch.randn(2, 4, 200, 64, generator=g)).bfloat16()
    v = torch.randn(2, 4, 200, 64, generator=g).bfloat16()
    mask = torch.rand(2, 1, 300, 200, generator=g) > 0.3
    reference = attend_or_zero(q.float(), k.float(), v.float(), mask)
    out = attend_or_zero(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 2 ** -8 * reference.abs().max()


def test_cross_attention_memory_benchmark_runs():
    """benchmarks/cross_attention_memory.py on small shapes: it prints both kernels' figures, and
    the math kernel keeps more than the fused one: the fp32 probabilities, less the output and the
    mask bias the fused kernel keeps and the math one does not."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cross_attention_memory.py"
    out = subprocess.run([sys.executable, str(script), "--keys", "128", "--seq", "512", "--heads",
                          "4", "--groups", "2", "--head-dim", "16", "--layers", "2"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    kept = dict(re.findall(r"kr 128: (\w+)\s+kernel keeps\s+([\d.]+) MiB", out.stdout))
    assert set(kept) == {"math", "fused"}, out.stdout
    probs = 4 * 512 * 128 * 4 / 2 ** 20  # [1, a, s, kr] fp32
    assert float(kept["math"]) - float(kept["fused"]) >= probs / 2, out.stdout
