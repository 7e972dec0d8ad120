import pytest
import torch

from rl.algorithms import AGG_MODES, aggregate_loss

# Two responses with per-token losses o1 = [1, 1], o2 = [2, 2, 2, 2] (docs/algorithms.md "Loss aggregation").
LOSS = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
SEQ = torch.tensor([0, 0, 1, 1, 1, 1])
MASK = torch.ones(6)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 10 / 6),
        ("seq-mean-token-mean", 1.5),
        ("seq-mean-token-sum", 5.0),
        ("seq-mean-token-sum-norm", 2.5),
    ],
)
def test_reference_values(mode, expected):
    out = aggregate_loss(LOSS, MASK, SEQ, mode, global_num_tokens=6, global_num_seqs=2, const_len=4)
    assert out.item() == pytest.approx(expected)
    assert round(out.item(), 4) == {"token-mean": 1.6667, "seq-mean-token-mean": 1.5,
                                    "seq-mean-token-sum": 5.0, "seq-mean-token-sum-norm": 2.5}[mode]


def test_mask_excludes_tokens():
    # masking the last two tokens of o2 leaves o1 = [1, 1], o2 = [2, 2]
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    kw = dict(global_num_tokens=4, global_num_seqs=2, const_len=4)
    assert aggregate_loss(LOSS, mask, SEQ, "token-mean", **kw).item() == pytest.approx(1.5)
    assert aggregate_loss(LOSS, mask, SEQ, "seq-mean-token-mean", **kw).item() == pytest.approx(1.5)
    assert aggregate_loss(LOSS, mask, SEQ, "seq-mean-token-sum", **kw).item() == pytest.approx(3.0)


def _random_batch(seed=0, num_seqs=8):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 6, (num_seqs,), generator=g)
    seq = torch.repeat_interleave(torch.arange(num_seqs), lens)
    loss = torch.randn(seq.numel(), generator=g, dtype=torch.float64)
    mask = (torch.rand(seq.numel(), generator=g) > 0.25).double()
    return loss, mask, seq


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("num_micro", [2, 8])
def test_grad_accumulation_invariance(mode, num_micro):
    """Summing micro-batch losses with step-global normalizers equals the one-piece batch (1x8 == 8x1)."""
    loss, mask, seq = _random_batch()
    loss.requires_grad_(True)
    kw = dict(global_num_tokens=float(mask.sum()), global_num_seqs=8.0, const_len=16)
    full = aggregate_loss(loss, mask, seq, mode, **kw)
    (g_full,) = torch.autograd.grad(full, loss)

    total = torch.zeros((), dtype=torch.float64)
    per = 8 // num_micro
    for k in range(num_micro):
        sel = (seq >= k * per) & (seq < (k + 1) * per)
        local_seq = seq[sel] - k * per  # each micro-batch re-indexes its sequences from 0
        total = total + aggregate_loss(loss[sel], mask[sel], local_seq, mode, **kw)
    (g_total,) = torch.autograd.grad(total, loss)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_total, g_full)


def test_empty_step_is_zero_not_nan():
    z = torch.zeros(3)
    for mode in AGG_MODES:
        seq = torch.zeros(3, dtype=torch.long)
        out = aggregate_loss(z, z, seq, mode, global_num_tokens=0, global_num_seqs=0, const_len=4)
        assert out.item() == 0.0


def test_errors():
    with pytest.raises(ValueError, match="valid modes"):
        aggregate_loss(LOSS, MASK, SEQ, "mean", global_num_tokens=6, global_num_seqs=2)
    with pytest.raises(ValueError, match="const_len"):
        aggregate_loss(LOSS, MASK, SEQ, "seq-mean-token-sum-norm", global_num_tokens=6, global_num_seqs=2)
