"""Role metrics, the leadership heat map and the offline W&B reader (egg_recipes.tracking)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import TinySeedNet
from egg_recipes import tracking

from egg_optim import LeaderCloneOptimizer, RolePlan
from egg_optim.errors import ConfigError

PLAN = RolePlan(per_layer={"layer1.conv*": (0.4, 0.2), "layer2.conv1": (0.5, 0.1)}, only_listed=True)


class _Wrapper:
    """Stands in for accelerate's AcceleratedOptimizer: the real optimizer is at ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


@pytest.fixture
def opt():
    torch.manual_seed(0)
    model = TinySeedNet()
    lco = LeaderCloneOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), PLAN, clone_every=2, seed=1)
    for step in range(6):
        x = torch.randn(4, 1, 5, 5)
        model(x).sum().backward()
        lco.step()
        lco.zero_grad()
        if step == 2:
            lco.elect_now()
    return lco


def test_find_through_wrappers(opt):
    assert tracking.find_leader_clone_optimizer(_Wrapper(_Wrapper(opt))) is opt
    assert tracking.find_leader_clone_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)])) is None
    with pytest.raises(ConfigError):
        tracking.role_metrics(_Wrapper(object()))


def test_role_metrics_match_stats(opt):
    m = tracking.role_metrics(_Wrapper(opt))
    stats = opt.stats()
    assert set(stats["layers"]) == {"layer1.conv1", "layer1.conv2", "layer1.conv3", "layer2.conv1"}
    for name, entry in stats["layers"].items():
        for key in ("leaders", "independents", "clones", "units", "updated_fraction", "cloned_units", "churn"):
            assert m[f"roles/{name}/{key}"] == pytest.approx(float(entry[key])), (name, key)
        assert m[f"roles/{name}/mean_tenure"] == pytest.approx(entry["mean_tenure"])
    # layer1.conv1: 10 units -> 4 leaders, 2 independents, 4 clones
    assert m["roles/layer1.conv1/leaders"] == 4 and m["roles/layer1.conv1/clones"] == 4
    assert m["roles/layer1.conv1/updated_fraction"] == pytest.approx(0.6)
    assert m["roles/layer1.conv1/cloned_units"] == 3 * 4  # cloned at steps 2, 4, 6
    assert m["roles/total/units"] == 10 + 10 + 20 + 10
    assert m["roles/total/clones"] == sum(e["clones"] for e in stats["layers"].values())
    assert m["roles/steps"] == 6 and m["roles/elections"] == 1 and m["roles/clone_events"] == 3
    assert all(isinstance(v, float) for v in m.values())


def test_active_units(opt):
    # managed layers: leaders + independents
    assert tracking.active_units(opt) == 6 + 6 + 12 + 6
    # an unmanaged layer listed counts all its units
    assert tracking.active_units(opt, ["layer1.conv1", "layer3.conv1"], model=opt.model) == 6 + 10
    with pytest.raises(ConfigError):
        tracking.active_units(opt, ["nope"], model=opt.model)


def test_leadership_heatmap(opt):
    fig = tracking.leadership_heatmap(_Wrapper(opt))
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    counts = opt.leadership_counts()
    assert grid.shape == (len(counts), max(c.numel() for c in counts.values()))
    for i, c in enumerate(counts.values()):
        row = np.ma.filled(grid[i].astype(float), np.nan)
        np.testing.assert_allclose(row[: c.numel()], c.double().numpy() / opt.steps)
        assert np.isnan(row[c.numel() :]).all()  # narrower layers are padded, not zero
    assert [t.get_text() for t in ax.get_yticklabels()] == list(counts)
    # fractions are in [0, 1] and every layer's leaders led for all 6 steps in total
    for name, c in counts.items():
        assert int(c.sum()) == opt.layer_plans[name].leaders * opt.steps


def test_log_role_metrics_without_tracker_logs_nothing(opt):
    class Acc:
        trackers = []
        logged = None

        def log(self, values, step=None):  # pragma: no cover - must not be called
            raise AssertionError("no tracker: nothing to log")

    m = tracking.log_role_metrics(Acc(), opt, step=3, **{"train/loss": 1.5})
    assert m["train/loss"] == 1.5 and "roles/total/leaders" in m
    assert tracking.log_leadership_heatmap(Acc(), opt) is None


# ---------------------------------------------------------------------------- offline W&B reader
def _write_leveldb_log(path, payloads, block=32768):
    """Write records the way W&B's datastore does (LevelDB log format with a 7-byte file header)."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for data in payloads:
        first = True
        while True:
            left = block - len(out) % block
            if left < 7:
                out += b"\x00" * left
                continue
            room = left - 7
            chunk, data = data[:room], data[room:]
            last = not data
            kind = 1 if first and last else 2 if first else 4 if last else 3
            crc = zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF
            out += struct.pack("<IHB", crc, len(chunk), kind) + chunk
            first = False
            if last:
                break
    path.write_bytes(bytes(out))


def test_read_offline_history_spanning_blocks(tmp_path):
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    payloads = []
    for step in range(3):
        rec = pb.Record()
        item = rec.history.item.add()
        item.key = "roles/total/leaders"
        item.value_json = json.dumps(step * 2.0)
        big = rec.history.item.add()
        big.key = "blob"
        big.value_json = json.dumps("x" * 50_000)  # larger than a 32 KiB block: FIRST/MIDDLE/LAST chunks
        nested = rec.history.item.add()
        nested.nested_key.extend(["roles", "leadership", "_type"])
        nested.value_json = json.dumps("image-file")
        payloads.append(rec.SerializeToString())
        other = pb.Record()
        other.run.run_id = "abc"
        payloads.append(other.SerializeToString())
    run_dir = tmp_path / "offline-run-x"
    run_dir.mkdir()
    _write_leveldb_log(run_dir / "run-x.wandb", payloads)
    rows = tracking.read_wandb_offline_history(tmp_path)
    assert [r["roles/total/leaders"] for r in rows] == [0.0, 2.0, 4.0]
    assert all(len(r["blob"]) == 50_000 for r in rows)
    assert rows[0]["roles/leadership/_type"] == "image-file"
    assert "roles/total/leaders" in tracking.history_keys(rows)


def test_read_offline_history_rejects_other_files(tmp_path):
    f = tmp_path / "run-y.wandb"
    f.write_bytes(b"not a wandb file at all")
    with pytest.raises(ConfigError, match="not a W&B run file"):
        tracking.read_wandb_offline_history(f)
