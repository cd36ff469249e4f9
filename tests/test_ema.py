"""The shard-local EMA's data path (ema.py): runs coalesced over contiguous sources and slices, and a
chunked blend bit-identical to torch's per-tensor foreach path."""
import torch

from d2v_scale.teacher import ema


def _layout(sizes, flat):
    out, start = [], 0
    for n in sizes:
        out.append(flat[start: start + n])
        start += n
    return out


def test_runs_coalesce_where_contiguous_and_the_blend_is_bitwise_foreach():
    torch.manual_seed(0)
    sizes = [5, 12, 3, 9, 4]
    base = torch.randn(70)                                     # two optimizer flat groups of masters, in
    groups = [base[:40], base[40:]]                            # one storage so their order is fixed
    # params 0, 1 and 3 in group 0 (3 after a gap: a parameter the teacher does not track), 2 and 4 in group 1
    sources = [groups[0][0:5], groups[0][5:17], groups[1][0:3], groups[0][20:29], groups[1][3:7]]
    order = ema.plan_layout(sources)
    assert order == [0, 1, 3, 2, 4]
    flat32 = torch.empty(sum(sizes))
    flat_low = torch.empty(sum(sizes), dtype=torch.bfloat16)
    views32, views_low, start = [None] * 5, [None] * 5, 0
    for i in order:
        views32[i] = flat32[start: start + sizes[i]]
        views_low[i] = flat_low[start: start + sizes[i]]
        start += sizes[i]
    init = [torch.randn(n) for n in sizes]
    for v, x in zip(views32, init):
        v.copy_(x)
    runs = ema.coalesce(sources, views32, views_low)
    assert [r.src.numel() for r in runs] == [17, 9, 7]          # 0+1 | 3 (gap before it) | 2+4
    ref = [x.clone() for x in init]
    for decay in (0.9, 0.99, 0.9999):
        ema.blend_host(runs, decay)
        torch._foreach_mul_(ref, decay)
        torch._foreach_add_(ref, sources, alpha=1.0 - decay)
    for v, low, r in zip(views32, views_low, ref):
        assert torch.equal(v, r)                               # bit for bit
        assert torch.equal(low, r.to(torch.bfloat16))


def test_a_padded_slice_ends_its_run():
    """A source shorter than its teacher slice (a replicated student's last chunk) cannot be followed."""
    src = torch.randn(10)
    sources = [src[0:3], src[3:10]]
    dst = torch.zeros(12)
    runs = ema.coalesce(sources, [dst[0:4], dst[4:12]], [None, None])
    assert [r.src.numel() for r in runs] == [3, 7]
    ema.blend_host(runs, 0.5)
    assert torch.equal(dst[0:3], 0.5 * src[0:3]) and dst[3] == 0
