"""Block-wise LFNN-l as DGL runs it (issue 23, item 2): a network cut into gradient-isolated blocks, each
with leader / follower workers inside (groups of its output channels, each read out by its own DGL-style aux
head); the global loss trains only what follows the last managed block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_benchmark

from egg_optim.errors import ConfigError
from egg_optim.lfnn import LeaderFollowerLoss

BLOCKS = {"b1": "layer1", "b2": "layer2", "b3": "layer3"}


def _worker_logits(head, h: torch.Tensor, workers: int, pool: int = 2) -> torch.Tensor:
    """Independent reference of AuxWorkerHeads: pool each channel to pool x pool, group by worker, per-worker MLP."""
    n = h.shape[0]
    z = F.adaptive_avg_pool2d(h, pool).reshape(n, workers, -1)
    w1, w2 = head.weights
    b1, b2 = head.biases
    out = []
    for w in range(workers):
        hid = torch.relu(z[:, w] @ w1[w] + b1[w])
        out.append(hid @ w2[w] + b2[w])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("target", ["probs", "output"])
def test_blocks_are_gradient_isolated_and_learn_from_their_own_workers(seed_net, target):
    """Three blocks of 2 workers each, LFNN-l, one leader per block: every block (and its heads) gets exactly
    the gradient of its own workers' terms, none from later blocks' losses or the global loss; the tail gets
    L_g only."""
    net = seed_net
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    lf = LeaderFollowerLoss(
        net, num_classes=4, blocks=BLOCKS, block_workers=2, mode="lfnn_l", delta=0.5, aux_hidden=8,
        follower_target=target,
    )  # fmt: skip
    assert lf.workers() == {"b1": (2, 10), "b2": (2, 10), "b3": (2, 5)}
    assert lf.block_names == ["b1", "b2", "b3"] and lf.layer_names == []
    with lf.targets(y):
        out = net(x)
    terms = lf.local_terms()
    assert set(terms) == set(BLOCKS)
    bodies = [net.layer1, net.layer2, net.layer3]
    heads = [lf.heads[f"block__{b}"] for b in BLOCKS]
    # a later block's loss reaches no parameter of an earlier block (nor of the tail)
    for k, name in enumerate(BLOCKS):
        others = [p for j, body in enumerate(bodies) if j != k for p in body.parameters()]
        others += [*net.fc1.parameters(), *net.fc2.parameters()]
        grads = torch.autograd.grad(terms[name], others, retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in grads), name
    stats = lf.last_stats()
    lf.loss(out).backward()
    lf.remove()
    # reference: each block on a detached input, its workers' logits by hand, leader CE + follower alignment
    h = x
    for name, body, head in zip(BLOCKS, bodies, heads):
        h = body(h.detach())
        logits = _worker_logits(head, h, 2)
        ce = torch.stack([F.cross_entropy(logits[:, w], y) for w in range(2)])
        st = stats[name]
        assert torch.allclose(torch.tensor(st["worker_losses"]), ce.detach(), atol=1e-5)
        lead, fol, best = st["leaders"][0], st["followers"][0], st["best"]
        if target == "probs":
            p = logits.softmax(-1)
            align = ((p[:, fol] - p[:, best].detach()) ** 2).mean()
        else:
            size = h.shape[1] // 2
            z = h.reshape(8, 2, size, *h.shape[2:])
            align = ((z[:, fol] - z[:, best].detach()) ** 2).mean()
        term = ce[lead] + align  # mean over one leader / one follower = the value itself
        params = [*body.parameters(), *head.parameters()]
        for prm, ref in zip(params, torch.autograd.grad(term, params)):
            assert prm.grad is not None and torch.allclose(prm.grad, ref, atol=1e-5), name
    tail = net.fc2(torch.relu(net.fc1(h.detach().mean(dim=(2, 3)))))
    params = [*net.fc1.parameters(), *net.fc2.parameters()]
    for prm, ref in zip(params, torch.autograd.grad(F.cross_entropy(tail, y), params)):
        assert torch.allclose(prm.grad, ref, atol=1e-5)


def test_block_workers_in_lfnn_mode_pass_the_global_gradient_through_leader_channels_only(seed_net):
    """LFNN (Eq. 1) with one block of 2 workers: the blocks below receive the global gradient through the
    leader's channels of the block output only (followers are not informed by the global error)."""
    net = seed_net
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    lf = LeaderFollowerLoss(net, num_classes=4, blocks={"b3": "layer3"}, block_workers=2, mode="lfnn", delta=0.5)
    with lf.targets(y):
        out = net(x)
    lead = lf.last_stats()["b3"]["leaders"][0]
    lf.loss(out).backward()
    got = net.layer2.conv1.weight.grad.clone()
    lf.remove()
    h3 = net.layer3(net.layer2(net.layer1(x)))
    mask = torch.zeros(1, 10, 1, 1)
    mask[:, lead * 5 : (lead + 1) * 5] = 1
    routed = h3 * mask + h3.detach() * (1 - mask)
    lg = F.cross_entropy(net.fc2(torch.relu(net.fc1(routed.mean(dim=(2, 3))))), y)
    (ref,) = torch.autograd.grad(lg, net.layer2.conv1.weight)
    assert ref.abs().sum() > 0 and torch.allclose(got, ref, atol=1e-6)


def test_block_workers_validation_leaves_the_model_unhooked(seed_net):
    bad = [
        ({"block_workers": 3}, "equal workers"),  # 20 channels into 3
        ({"block_workers": {"b1": 2}}, "missing"),
        ({"block_workers": 0}, "positive int"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ConfigError, match=match):
            LeaderFollowerLoss(seed_net, num_classes=4, blocks=BLOCKS, **kwargs)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in seed_net.modules())
    with pytest.raises(ConfigError, match="needs blocks"):
        LeaderFollowerLoss(seed_net, ["fc1"], num_classes=4, worker_size=4, readout="head", block_workers=2)


@pytest.mark.parametrize("pool", [1, 3, 4])
def test_aux_pool_sets_what_each_worker_head_reads(seed_net, pool):
    """``aux_pool``: the aux heads pool each block output to ``pool x pool`` (DGL's 2x2 by default), so a
    worker's head reads ``channels * pool**2`` features; the logits match the reference at that size."""
    lf = LeaderFollowerLoss(seed_net, num_classes=4, blocks=BLOCKS, block_workers=2, mode="lfnn_l", aux_hidden=8,
                            aux_pool=pool)  # fmt: skip
    head = lf.heads["block__b1"]
    assert head.weights[0].shape == (2, 10 * pool**2, 8)
    h = torch.randn(3, 20, 6, 6)
    torch.testing.assert_close(head(h.reshape(3, 2, 10, 6, 6)), _worker_logits(head, h, 2, pool))
    one = LeaderFollowerLoss(seed_net, num_classes=4, blocks={"b1": "layer1"}, aux_hidden=0, aux_pool=pool)
    assert one.heads["block__b1"].mlp[0].in_features == 20 * pool**2
    for bad in (0, True, 2.0):
        with pytest.raises(ConfigError, match="aux_pool"):
            LeaderFollowerLoss(seed_net, num_classes=4, blocks=BLOCKS, aux_pool=bad)


def test_blockwise_lfnn_l_trains_a_small_resnet_on_digits():
    """The study's BlockResNet (3 blocks: the first two local, the last trained by L_g alone) on 8x8 digits,
    4 workers per block, 2 epochs: the network and each local block's best worker (its aux head alone)
    read the classes far above chance (0.1)."""
    from sklearn.datasets import load_digits

    study = load_benchmark("lfnn_study")
    xs, ys = load_digits(return_X_y=True)
    xs = torch.tensor(xs / 8.0 - 1.0, dtype=torch.float32).view(-1, 1, 8, 8)
    ys = torch.tensor(ys)
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))
    xtr, ytr, xte, yte = xs[perm[:1297]], ys[perm[:1297]], xs[perm[1297:]], ys[perm[1297:]]
    torch.manual_seed(0)
    net = study.BlockResNet(1, 10, widths=(16, 16, 32))
    blocks = net.local_blocks()
    assert blocks == {"b1": ["stem", "stage1"], "b2": ["stage2"]}
    lf = LeaderFollowerLoss(
        net, num_classes=10, blocks=blocks, block_workers=4, mode="lfnn_l", delta=0.5, aux_hidden=32
    )
    opt = torch.optim.Adam([*net.parameters(), *lf.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            with lf.targets(ytr[idx]):
                out = net(xtr[idx])
            loss = lf.loss(out)
            opt.zero_grad()
            loss.backward()
            opt.step()
    best = {b: lf.last_stats()[b]["best"] for b in blocks}
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
        h1 = net.stage1(net.stem(xte))
        h2 = net.stage2(h1)
        worker_acc = {}
        for b, h in (("b1", h1), ("b2", h2)):
            z = h.reshape(h.shape[0], 4, -1, *h.shape[2:])
            logits = lf.heads[f"block__{b}"](z)[:, best[b]]
            worker_acc[b] = (logits.argmax(1) == yte).float().mean().item()
    lf.remove()
    assert acc > 0.7, acc
    assert min(worker_acc.values()) > 0.5, worker_acc
