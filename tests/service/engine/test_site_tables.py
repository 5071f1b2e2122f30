"""SiteTables: rows survive growth, a freed row is the identity again, and one gather serves every site."""

from __future__ import annotations

import torch

import ssf
from service.engine.mixed import SiteTables


def site(path: str, channels: int) -> ssf.Site:
    return ssf.Site(path=path, apply_at=path, channels=channels, channel_dim=-1, fold="weight_out")


def test_rows_survive_growth_and_gather_by_batch_order() -> None:
    sites = [site("a", 3), site("b", 5), site("c", 2)]
    tables = SiteTables(sites, torch.device("cpu"), torch.float32, capacity=2)
    written = {}
    for t in range(20):  # capacity 2 -> 32: four doublings
        rows = {
            s.path: (torch.full((s.channels,), t + 1.0), torch.full((s.channels,), -t - 1.0)) for s in sites
        }
        written[tables.add(rows)] = t + 1.0
    assert tables.capacity == 32 and tables.rows_used == 20
    order = [5, 0, 17, 5]  # repeats and the identity row
    tables.gather(torch.tensor(order))
    for i, s in enumerate(sites):
        expected = torch.tensor([written.get(r, 1.0) for r in order]).unsqueeze(1).expand(4, s.channels)
        assert torch.equal(tables.batch_scale[i], expected)
        assert torch.equal(tables.batch_shift[i], torch.where(expected == 1.0, 0.0, -expected))
    tables.release(17)
    tables.gather(torch.tensor([17]))
    assert all(torch.equal(x, torch.ones_like(x)) for x in tables.batch_scale)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in tables.batch_shift)
    assert tables.rows_used == 19 and tables.nbytes() == 2 * 32 * 10 * 4


def test_a_folded_norms_columns_hold_its_affine_with_the_site_folded_in() -> None:
    """A LayerNorm site's columns hold (scale*weight, scale*bias + shift); its identity, in row 0, in a freed
    row, in rows made by growth and for a delta that lacks the site, is the norm's own weight and bias."""
    norm = ssf.Site(path="n", apply_at="n", channels=3, channel_dim=-1, fold="affine")
    sites = [site("a", 2), norm]
    weight, bias = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0.5, -1.0, 0.0])
    tables = SiteTables(sites, torch.device("cpu"), torch.float32, capacity=2, folded={"n": (weight, bias)})
    scale, shift = torch.tensor([1.5, -1.0, 0.0]), torch.tensor([1.0, 2.0, 3.0])
    row = tables.add({"a": (torch.ones(2), torch.zeros(2)), "n": (scale, shift)})
    lacks = tables.add({"a": (torch.full((2,), 2.0), torch.zeros(2))})  # no "n": the bare norm
    grown = tables.add({"a": (torch.ones(2), torch.zeros(2))})  # capacity 2 -> 4
    assert tables.capacity == 4
    tables.select(row, batch=1)
    assert torch.equal(tables.vectors(1)[0], scale * weight)
    assert torch.equal(tables.vectors(1)[1], scale * bias + shift)
    tables.release(row)
    tables.gather(torch.tensor([0, row, lacks, grown, 3]))  # 3: made by growth, never used
    for i in range(5):
        assert torch.equal(tables.batch_scale[1][i], weight)
        assert torch.equal(tables.batch_shift[1][i], bias)
    assert torch.equal(tables.batch_scale[0][2], torch.full((2,), 2.0))


def test_gathers_of_changing_batch_sizes_read_their_own_rows() -> None:
    """On the CPU a gather lands in buffers kept across forwards (views made once per batch size): a smaller
    batch after a larger one, a larger one after that (new buffers) and a repeat all read the right rows."""
    sites = [site("a", 3), site("b", 2)]
    tables = SiteTables(sites, torch.device("cpu"), torch.float32, capacity=8)
    assert tables.reuse
    rows = [
        tables.add({s.path: (torch.full((s.channels,), t + 2.0), torch.zeros(s.channels)) for s in sites})
        for t in range(6)
    ]
    for order in ([rows[0], rows[1], rows[2]], [rows[4]], [rows[5], 0, rows[3], rows[1], rows[2]], [rows[2]]):
        tables.gather(torch.tensor(order))
        for i, s in enumerate(sites):
            x = torch.zeros(len(order), 4, s.channels)
            scale, _ = tables.rows_for(i, -1, x)
            want = torch.tensor([1.0 if r == 0 else r + 1.0 for r in order]).view(-1, 1, 1).expand_as(scale)
            assert torch.equal(scale, want), order


def test_a_bias_folded_site_rounds_once_into_a_half_precision_table() -> None:
    """A site whose op runs without its bias holds ``scale*bias + shift`` in its shift column, computed from
    the float32 bias and rounded once into the table's dtype (not from a bias already rounded to it)."""
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(64, generator=g) * 3
    scale, shift = 1 + torch.randn(64, generator=g) * 0.1, torch.randn(64, generator=g) * 1e-3
    tables = SiteTables([site("a", 64)], torch.device("cpu"), torch.bfloat16, biases={"a": bias})
    assert torch.equal(tables.shift["a"][0], bias.to(torch.bfloat16))  # the identity row: the bare op
    row = tables.add({"a": (scale, shift)})
    want = (scale.double() * bias.double() + shift.double()).to(torch.bfloat16)
    assert torch.equal(tables.shift["a"][row], want)
    assert torch.equal(tables.scale["a"][row], scale.to(torch.bfloat16))
