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
