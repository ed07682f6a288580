"""The 2-D RoPE of the vision encoder against an independent complex-number reference."""
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from mmpretrain.model.rope import text_rope, vision_rope


def reference_2d_rope(x: torch.Tensor, rows: int, cols: int, theta: float) -> torch.Tensor:
    """Mistral's 2-D RoPE written directly: pair j of a head is a complex number multiplied by
    exp(i * angle); the first d/4 pairs turn with the row at frequencies theta^(-4k/d), the last
    d/4 with the column at theta^(-(4k+2)/d)."""
    n, heads, d = x.shape
    out = torch.empty_like(x)
    for p in range(n):
        r, c = divmod(p, cols)
        for j in range(d // 2):
            if j < d // 4:
                angle = r * theta ** (-(4 * j) / d)
            else:
                angle = c * theta ** (-(4 * (j - d // 4) + 2) / d)
            rot = complex(torch.cos(torch.tensor(angle, dtype=torch.float64)),
                          torch.sin(torch.tensor(angle, dtype=torch.float64)))
            for h in range(heads):
                z = complex(x[p, h, 2 * j].item(), x[p, h, 2 * j + 1].item()) * rot
                out[p, h, 2 * j], out[p, h, 2 * j + 1] = z.real, z.imag
    return out


def grid_positions(rows: int, cols: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)


def test_vision_rope_matches_complex_reference():
    rows, cols, heads, d, theta = 3, 5, 2, 16, 10000.0
    x = torch.randn(rows * cols, heads, d, dtype=torch.float64)
    freqs = vision_rope(grid_positions(rows, cols), d, theta).double()  # [n, 1, 1, d]
    got = _apply_rotary_pos_emb_bshd(x[:, None], freqs, rotary_interleaved=True)[:, 0]
    want = reference_2d_rope(x, rows, cols, theta)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_vision_rope_is_relative_in_both_axes():
    """q.k after RoPE depends only on the row and column offsets between the two patches."""
    d = 32
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def score(pq, pk):
        f = vision_rope(torch.tensor([pq, pk]), d, 100.0).double()
        t = torch.stack([q, k])[:, None, None, :]
        rq, rk = _apply_rotary_pos_emb_bshd(t, f, rotary_interleaved=True)[:, 0, 0]
        return (rq * rk).sum()

    torch.testing.assert_close(score((1, 2), (3, 7)), score((4, 0), (6, 5)))
    assert not torch.allclose(score((1, 2), (3, 7)), score((1, 2), (7, 3)))


def test_text_rope_restarts_with_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    f = text_rope(pos, 8, 10000.0)  # [s, b, 1, d]
    assert f.shape == (5, 1, 1, 8)
    torch.testing.assert_close(f[3], f[0])
    torch.testing.assert_close(f[4], f[1])
    assert f[0].abs().sum() == 0
