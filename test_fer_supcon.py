"""Tests for fer_supcon.py, read as its specification: every vectorised formula against a naive
loop written from the paper, the edge cases, the loaders on fixtures in the published formats,
and the command line end to end on tiny synthetic runs. CPU only. No test needs a training run
to land a certain way: what must relabel is built so that it does.

Float tolerances: the naive loops run in float64 (1e-9 relative: a few ulps of sums of ~20
terms); float32 results are compared at 1e-5 to 1e-6 (a few hundred float32 ulps of values of
order 1, far below anything a wrong formula would give)."""
import contextlib
import copy
import csv
import inspect
import io
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fer_supcon as fs

HERE = Path(__file__).parent
TINY = ["--data", "synthetic", "--synthetic-train", "96", "--synthetic-test", "32",
        "--img-size", "64", "--batch-size", "16", "--workers", "0", "--log-every", "0"]
CPU = fs.autocast(torch.device("cpu"))  # plain float32


# ---- helpers ------------------------------------------------------------------------------

def unit(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)


def run_cli(args, **kw):
    """The command line in a subprocess: for what one process cannot do to itself (a signal,
    a crash, a worker's traceback, an import-free interpreter)."""
    return subprocess.run([sys.executable, str(HERE / "fer_supcon.py"), *args],
                          capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


def start_cli(args, **kw):
    return subprocess.Popen([sys.executable, str(HERE / "fer_supcon.py"), *args], text=True,
                            **kw)


def wait_for(path: Path, proc, timeout=300):
    """Poll (sleeping between looks) until `path` exists or the process ends."""
    end = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < end:
        time.sleep(0.05)


def run_main(args):
    """fs.main in this process, returning (result, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = fs.main(args)
    return res, out.getvalue()


def final_weights(path):
    return torch.load(path, weights_only=True)["model"]


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def save_faces(folder: Path, n, size=64, start=0):
    """n synthetic test faces as PNG files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    faces = fs.SyntheticFaces(start + n, "test", size)
    paths = []
    for i in range(start, start + n):
        paths.append(folder / f"face{i:04d}.png")
        Image.fromarray(faces[i][0].permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def full_queue(net, classes=7):
    """Fill the network's queue with random unit keys of every class."""
    K, D = net.queue.feats.shape
    net.queue.enqueue(F.normalize(torch.randn(K, D), dim=1), torch.arange(K) % classes)


# ---- Eq. (2): supervised contrastive loss --------------------------------------------------

def naive_supcon(q, q_labels, keys, key_labels, tau):
    """Eq. (2) literally: for each anchor i with positives P(i), the mean over p of
    -log(exp(s_ip) / (exp(s_ip) + sum_{a in A(i)} exp(s_ia))), then the mean over anchors with
    a positive."""
    per_anchor = []
    for i in range(len(q)):
        s = [float(q[i] @ keys[j]) / tau for j in range(len(keys))]
        P = [j for j in range(len(keys)) if key_labels[j] >= 0 and key_labels[j] == q_labels[i]]
        A = [j for j in range(len(keys)) if key_labels[j] >= 0 and key_labels[j] != q_labels[i]]
        if not P:
            continue
        terms = [-math.log(math.exp(s[p]) / (math.exp(s[p]) + sum(math.exp(s[a]) for a in A)))
                 for p in P]
        per_anchor.append(sum(terms) / len(P))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_supcon_matches_naive_eq2_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    q, keys = unit(6, 8, seed), unit(20, 8, seed + 100)
    q_labels = torch.randint(0, 4, (6,), generator=gen)
    key_labels = torch.randint(-1, 4, (20,), generator=gen)  # -1: empty slots
    got = fs.supcon_loss(q, q_labels, keys, key_labels, tau=0.1)
    assert got.item() == pytest.approx(naive_supcon(q, q_labels, keys, key_labels, 0.1), rel=1e-9)


EDGE_LABELS = {  # case: (query labels, key labels)
    "empty_slots": ([0, 1, 2, 0], [-1] * 10),
    "class_missing": ([3, 3, 0, 1], [0, 1, 1, 0, 2, -1, -1, 1, 0, 2]),  # 3 is not in the queue
    "no_negatives": ([1, 1, 1, 1], [1] * 8 + [-1, -1]),
    "no_positives": ([5, 6, 5, 6], [0, 1, 1, 0, 2, -1, -1, 1, 0, 2]),
    "all_agree": ([1, 1, 1, 1], [0, 1, 1, 0, 2, -1, -1, 1, 0, 2]),
}


@pytest.mark.parametrize("case", EDGE_LABELS)
def test_supcon_edge_cases_match_naive_and_have_finite_gradients(case):
    q, keys = unit(4, 8, 1).requires_grad_(), unit(10, 8, 2)
    q_labels, key_labels = (torch.tensor(v) for v in EDGE_LABELS[case])
    loss = fs.supcon_loss(q, q_labels, keys, key_labels, tau=0.1)
    expected = naive_supcon(q.detach(), q_labels, keys, key_labels, 0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()  # 0 losses stay in the graph
    assert torch.isfinite(q.grad).all()
    if case in ("empty_slots", "no_negatives", "no_positives"):
        assert loss.item() == 0.0


def test_supcon_other_positives_are_not_in_the_denominator():
    # one anchor, two identical positives, one negative: each l_ip sees only {p} + A
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = fs.supcon_loss(q, torch.tensor([0]), keys, torch.tensor([0, 0, 1]), tau=1.0)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1.0)))


# ---- CUEM (Sec. II-B) ---------------------------------------------------------------------

def naive_cuem(views, labels, queue, queue_labels, num_classes, theta):
    """Fig. 3 per sample and class: S_c = the mean cosine similarity to the queue entries of c,
    averaged over the sample's views; u = max_c S_c - S_label; relabel where u > theta."""
    new, us = [], []
    for i in range(len(labels)):
        S = {}
        for c in range(num_classes):
            members = [j for j in range(len(queue)) if queue_labels[j] == c]
            if members:
                S[c] = sum(float(F.cosine_similarity(v[i], queue[j], dim=0))
                           for v in views for j in members) / len(members) / len(views)
        y = int(labels[i])
        if y not in S:
            new.append(y)
            us.append(0.0)
            continue
        c_max = max(S, key=S.get)
        us.append(S[c_max] - S[y])
        new.append(c_max if S[c_max] - S[y] > theta else y)
    return new, us


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_cuem_matches_naive_loop_for_one_and_two_views(seed, views):
    gen = torch.Generator().manual_seed(seed)
    q = torch.stack([unit(12, 6, seed + 10 * v) for v in range(views)])  # (V, N, D)
    queue = unit(40, 6, seed + 7)
    labels = torch.randint(0, 5, (12,), generator=gen)
    queue_labels = torch.randint(-1, 4, (40,), generator=gen)  # class 4 never in it; -1 empty
    new, u = fs.cuem(q[0] if views == 1 else q, labels, queue, queue_labels, 5, theta=0.05)
    ref_new, ref_u = naive_cuem(q, labels, queue, queue_labels, 5, 0.05)
    assert new.tolist() == ref_new
    assert u.tolist() == pytest.approx(ref_u, abs=1e-6)  # float32: ~10 ulps of mean cosines


def test_cuem_relabels_only_past_theta():
    queue, queue_labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    def at(degrees):
        return torch.tensor([[math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]])
    # labelled 1 and nearer class 0: u = cos(d) - sin(d) = 0.124, 0.366, 0
    new, u = fs.cuem(torch.cat([at(40), at(30), at(45)]), torch.tensor([1, 1, 1]), queue,
                     queue_labels, 2, theta=0.2)
    assert new.tolist() == [1, 0, 1]
    assert u[2].item() == pytest.approx(0.0, abs=1e-6)


def test_cuem_keeps_label_when_own_class_absent_or_queue_empty():
    q = unit(3, 4, 0)
    new, u = fs.cuem(q, torch.tensor([2, 2, 2]), unit(5, 4, 1), torch.tensor([0, 1, 0, 1, -1]), 3)
    assert new.tolist() == [2, 2, 2] and u.abs().max() == 0
    new, u = fs.cuem(q, torch.tensor([0, 1, 2]), torch.zeros(5, 4), torch.full((5,), -1), 3)
    assert new.tolist() == [0, 1, 2] and u.abs().max() == 0


# ---- One training step (Eq. 1, 3; Sec. II-A, II-B) ----------------------------------------

def step_inputs(B=8, C=7, size=64, K=16):
    torch.manual_seed(0)
    net = fs.FERSupCon(C, size, queue_size=K, arm=False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    return net, opt, torch.randn(B, 3, size, size), torch.randint(0, C, (B,))


def step(net, opt, x, y, **kw):
    args = dict(lam=0.5, m=0.99, tau=0.1, theta=0.1, use_cuem=True, amp=CPU) | kw
    return fs.train_step(net, opt, x, x.flip(-1), y, **args)


def test_step_is_eq3_and_enqueues_its_keys_with_the_annotation():
    net, opt, x, y = step_inputs()
    full_queue(net)  # sup > 0
    out = step(net, opt, x, y, theta=10.0)  # u <= 2 < theta: no relabel
    assert torch.equal(out.loss, out.ce + 0.5 * out.supcon) and out.supcon > 0  # Eq. (3)
    assert bool(out.cuem_ran) and torch.equal(out.y_fer, y)
    assert torch.equal(net.queue.labels[:8], y)  # the annotation, not CUEM's labels
    assert torch.allclose(net.queue.feats[:8].norm(dim=1), torch.ones(8), atol=1e-6)  # float32


@pytest.fixture
def relabel_all(monkeypatch):
    """CUEM made to relabel every sample to the next class; records what Eq. (2) and CUEM get."""
    seen = dict(anchors=[], cuem_q=[])
    real_supcon = fs.supcon_loss
    def cuem(q, labels, *args):
        seen["cuem_q"].append(q)
        return (labels + 1) % 7, torch.ones(len(labels))
    def supcon(q, q_labels, *args):
        seen["anchors"].append(q_labels)
        return real_supcon(q, q_labels, *args)
    monkeypatch.setattr(fs, "cuem", cuem)
    monkeypatch.setattr(fs, "supcon_loss", supcon)
    return seen


def test_cross_entropy_uses_cuems_labels_and_the_queue_the_annotation(relabel_all):
    net, opt, x, y = step_inputs()
    full_queue(net)
    twin = copy.deepcopy(net)  # the same weights: what the step's forward pass computes
    logits = twin.classifier(twin.encoder_q(x)[0])
    out = step(net, opt, x, y)
    assert torch.equal(out.y_fer, (y + 1) % 7)
    # float32, the same operations on the same inputs: equal up to summation order
    assert out.ce.item() == pytest.approx(F.cross_entropy(logits, (y + 1) % 7).item(), rel=1e-5)
    assert abs(out.ce.item() - F.cross_entropy(logits, y).item()) > 1e-3
    assert torch.equal(net.queue.labels[:8], y)


@pytest.mark.parametrize("skip", [False, True])
def test_anchors_are_every_sample_with_its_annotation_unless_skipped(relabel_all, skip):
    net, opt, x, y = step_inputs()
    full_queue(net)
    step(net, opt, x, y, skip_relabelled_anchors=skip)
    anchors = relabel_all["anchors"][0]
    assert torch.equal(anchors, torch.full_like(y, -1) if skip else y)


@pytest.mark.parametrize("two_views", [False, True])
def test_cuem_reads_z_q_alone_unless_two_views(relabel_all, two_views):
    net, opt, x, y = step_inputs()
    full_queue(net)
    step(net, opt, x, y, cuem_two_views=two_views)
    q = relabel_all["cuem_q"][0]
    assert q.shape == ((2, 8, 128) if two_views else (8, 128))
    assert not q.requires_grad  # CUEM never back-propagates


def test_l_sup_gradient_reaches_the_query_encoder_and_only_through_lambda():
    grads = []
    for lam in (0.0, 0.5):
        net, opt, x, y = step_inputs()
        full_queue(net)
        opt.param_groups[0]["lr"] = 0.0  # keep the weights; look at the gradients only
        step(net, opt, x, y, lam=lam, use_cuem=False)
        grads.append({n: p.grad for n, p in net.encoder_q.named_parameters()})
    head = "head.6.weight"  # the projection head feeds z_q only: Eq. (2) is its one loss
    assert grads[0][head] is None or grads[0][head].abs().max() == 0
    assert grads[1][head].abs().max() > 0
    trunk = "trunk.conv1.weight"  # the trunk gets L_FER alone, then L_FER + lambda L_sup
    assert not torch.equal(grads[0][trunk], grads[1][trunk])


def test_cuem_waits_for_a_full_queue_and_the_baseline_skips_the_key_branch():
    net, opt, x, y = step_inputs()
    k0 = [p.clone() for p in net.encoder_k.parameters()]
    out = fs.train_step(net, opt, x, None, y, lam=0.0, m=0.5, tau=0.1, theta=-1.0,
                        use_cuem=False, amp=CPU)
    assert (net.queue.labels == -1).all() and torch.equal(out.y_fer, y)
    assert out.supcon.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(k0, net.encoder_k.parameters()))
    out = step(net, opt, x, y, lam=0.0, theta=-1.0)  # --no-scl; a half-empty queue
    assert not out.cuem_ran and torch.equal(out.y_fer, y)
    assert (net.queue.labels[:8] >= 0).all() and out.supcon.item() == 0.0


def test_compile_keeps_the_first_steps_loss_and_gradients():
    # Before any optimiser step (lr 0), compiled and eager must agree on the loss and on every
    # gradient. Fused kernels sum in another order: the loss agrees to ~1e-6 relative (limit
    # 1e-4). Gradients pass through the BatchNorm backward of a random-init ResNet-18 on 2 x 2
    # maps, which amplifies float32 rounding: each tensor's L2 norm differed by up to 1.3 %
    # (measured, x86-64); the limit is 20 % per tensor, while a missing or wrong term changes a
    # gradient by O(100 %). Gradients that are zero up to rounding are skipped.
    x = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    cfg0 = fs.Config(img_size=64, queue_size=16, no_arm=True)
    views = fs.two_views(x, cfg0, 1, 0, keys=True)
    results = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        cfg = fs.dataclasses.replace(cfg0, compile=compile_)
        net = fs.build_model(cfg, 7, "none", torch.device("cpu")).train()
        full_queue(net)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.0)
        out = fs.train_step(net, opt, *views, torch.arange(8) % 7, lam=0.5, m=0.9, tau=0.1,
                            theta=0.1, use_cuem=False, amp=CPU)
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((out.loss, grads))
    (loss_e, grad_e), (loss_c, grad_c) = results
    assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-4)
    assert grad_e.keys() == grad_c.keys() and len(grad_e) > 60
    total = torch.cat([g.flatten() for g in grad_e.values()]).norm()
    for n, g in grad_e.items():
        if g.norm() > 1e-6 * total:
            assert (grad_c[n] - g).norm() <= 0.2 * g.norm(), n


# ---- Eq. (4), the queue, the momentum encoder --------------------------------------------

def test_loss_weight_follows_eq4():
    assert fs.loss_weight(1) == pytest.approx(1 - 1 / 30)
    assert fs.loss_weight(15) == pytest.approx(0.5)
    assert fs.loss_weight(30) == 0.0  # as written: lambda(alpha) = 0
    assert fs.loss_weight(31) == 1e-4 and fs.loss_weight(100) == 1e-4
    assert fs.loss_weight(5, alpha=20, beta=0.1) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        fs.loss_weight(0)


def test_epoch_plan_gates_lambda_and_cuem():
    cfg = fs.Config(cuem_start=3)
    assert fs.epoch_plan(2, cfg) == (pytest.approx(1 - 2 / 30), False)
    assert fs.epoch_plan(3, cfg)[1] and not fs.epoch_plan(3, fs.Config(no_cuem=True))[1]
    assert fs.epoch_plan(3, fs.Config(no_scl=True))[0] == 0.0


def test_method_sizes_follow_the_rules():
    assert fs.key_momentum(256, 8192) == pytest.approx(0.96875)
    assert fs.queue_slots(8192, 256, 12271) == 8192  # RAF-DB: no cap
    assert fs.queue_slots(8192, 64, 1437) == 1408  # 22 whole batches
    cfg, notes = fs.method_sizes(fs.Config(batch_size=64), 1437)
    assert (cfg.batch_size, cfg.queue_size) == (64, 1408)
    assert cfg.momentum == pytest.approx(1 - 64 / 1408) and len(notes) == 2


def test_queue_wraps_around():
    Q = fs.LabeledQueue(5, 2)
    assert (Q.labels == -1).all() and not Q.is_full()
    for step_ in range(3):  # 3 batches of 2 into 5 slots: the third wraps
        Q.enqueue(torch.full((2, 2), float(step_)), torch.tensor([step_, step_]))
    assert Q.labels.tolist() == [2, 0, 1, 1, 2]
    assert Q.feats[:, 0].tolist() == [2.0, 0.0, 1.0, 1.0, 2.0]
    assert int(Q.ptr) == 1 and Q.is_full()


def test_queue_keeps_the_last_k_of_a_batch_larger_than_k():
    Q = fs.LabeledQueue(3, 1)
    Q.enqueue(torch.arange(5.0)[:, None], torch.arange(5))
    assert sorted(Q.labels.tolist()) == [2, 3, 4]
    assert all(Q.feats[i, 0] == Q.labels[i] for i in range(3))
    Q.enqueue(torch.tensor([[9.0]]), torch.tensor([9]))  # overwrites the oldest (2)
    assert sorted(Q.labels.tolist()) == [3, 4, 9]


def test_momentum_update_matches_a_naive_loop_copies_buffers_m0_copies_m1_freezes():
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    q(torch.randn(8, 3))  # non-trivial running stats
    k = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    k0 = {n: t.clone() for n, t in k.state_dict().items()}
    fs.momentum_update(q, k, 1.0)
    assert all(torch.equal(k0[n], p) for n, p in k.named_parameters())
    fs.momentum_update(q, k, 0.7)
    for (n, p_k), p_q in zip(k.named_parameters(), q.parameters()):
        assert torch.allclose(p_k, 0.7 * k0[n] + 0.3 * p_q, atol=1e-6)  # float32 lerp: ~10 ulps
    assert torch.equal(k[1].running_mean, q[1].running_mean)  # buffers copied
    fs.momentum_update(q, k, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(k.state_dict().values(), q.state_dict().values()))


@pytest.mark.parametrize("target", [
    nn.Linear(3, 5),  # another shape
    nn.Sequential(nn.Linear(3, 4)),  # other names
    nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)),  # the same parameters, no buffers
])
def test_momentum_update_refuses_modules_that_do_not_match(target):
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError):
        fs.momentum_update(online, target, 0.9)


# ---- Pieces that copy alone ----------------------------------------------------------------

PASTE_HEADER = "import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"


def paste(obj):
    """The source of `obj` alone in a fresh namespace that has only math, torch, nn and F."""
    ns = {}
    exec(PASTE_HEADER + inspect.getsource(obj), ns)
    return ns[obj.__name__]


def same(a, b):
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def queue_inputs():
    gen = torch.Generator().manual_seed(0)
    q, keys = unit(6, 8, 0).float(), unit(20, 8, 1).float()
    return q, torch.randint(0, 4, (6,), generator=gen), keys, torch.randint(-1, 4, (20,),
                                                                            generator=gen)


PIECES = {  # name: a call that gives the same result with the module's and the pasted piece
    "supcon_loss": lambda f: f(*queue_inputs()),
    "cuem": lambda f: f(*queue_inputs(), 4),
    "loss_weight": lambda f: f(12),
    "key_momentum": lambda f: f(256, 8192),
    "queue_slots": lambda f: f(8192, 64, 1437),
}


@pytest.mark.parametrize("name", PIECES)
def test_function_pasted_alone_gives_the_modules_result(name):
    assert same(PIECES[name](paste(getattr(fs, name))), PIECES[name](getattr(fs, name)))


def test_momentum_update_pasted_alone_gives_the_modules_result():
    nets = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    nets[2].load_state_dict(nets[1].state_dict())
    paste(fs.momentum_update)(nets[0], nets[1], 0.9)
    fs.momentum_update(nets[0], nets[2], 0.9)
    assert all(torch.equal(a, b) for a, b in zip(nets[1].state_dict().values(),
                                                 nets[2].state_dict().values()))


def enqueued(queue):
    queue.enqueue(*queue_inputs()[:2])
    return queue.feats, queue.labels, queue.ptr


@pytest.mark.parametrize("name,make,call", [
    ("LabeledQueue", lambda cls: cls(5, 8), enqueued),
    ("ARM", lambda cls: cls(7, 96), lambda m: m(torch.randn(4, 512, 3, 3))),
    ("projection_head", lambda f: f(), lambda m: m(torch.randn(5, 512))),
])
def test_module_pasted_alone_gives_the_modules_result(name, make, call):
    torch.manual_seed(3)
    pasted = make(paste(getattr(fs, name)))
    torch.manual_seed(3)
    module = make(getattr(fs, name))
    torch.manual_seed(4)
    a = call(pasted)
    torch.manual_seed(4)
    assert same(a, call(module))


@pytest.mark.parametrize("name,call", [
    ("supcon_loss", lambda f: f(unit(2, 4, 0), torch.tensor([0, 1]), unit(3, 5, 1),
                                torch.tensor([0, 1, 1]))),
    ("supcon_loss", lambda f: f(unit(2, 4, 0), torch.tensor([0, 1]), unit(3, 4, 1),
                                torch.tensor([0, 1, 1]), tau=0)),
    ("cuem", lambda f: f(unit(2, 4, 0), torch.tensor([0]), unit(3, 4, 1), torch.tensor([0, 1, 1]),
                         2)),
    ("loss_weight", lambda f: f(0)),
    ("momentum_update", lambda f: f(nn.Linear(2, 2), nn.Linear(2, 3), 0.5)),
    ("momentum_update", lambda f: f(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)),
    ("LabeledQueue", lambda f: f(0, 4)),
    ("LabeledQueue", lambda f: f(4, 2).enqueue(torch.zeros(3, 2), torch.zeros(2).long())),
    ("ARM", lambda f: f(7, 48)),
])
def test_pasted_pieces_raise_value_error_on_bad_arguments(name, call):
    with pytest.raises(ValueError):
        call(paste(getattr(fs, name)))


def readme_block(title):
    """The first Python block after the README heading `title`."""
    text = (HERE / "README.md").read_text()
    section = text[text.index(f"## {title}"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_using_the_pieces_runs_and_prints_a_real_loss():
    # a subprocess: a clean interpreter in the repository, importing fer_supcon as a user would
    r = subprocess.run([sys.executable, "-c", readme_block("Using the pieces")],
                       capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr
    loss = float(re.search(r"L_sup ([\d.]+)", r.stdout).group(1))
    assert loss > 0 and "L_total" in r.stdout


# ---- ARM and the network --------------------------------------------------------------------

@pytest.mark.parametrize("img,side", [(96, 3), (112, 5), (224, 11)])
def test_arm_shapes(img, side):
    s, o = fs.ARM.sides(img)
    assert o == side
    arm = fs.ARM(7, img)
    assert arm(torch.randn(4, 512, s, s)).shape == (4, 7)
    assert arm.fc.in_features == side * side and arm.running_g.shape == (side, side)
    names = {n for n, _ in arm.named_parameters()}
    assert names == {"de_albino.weight", "bn.weight", "bn.bias", "affinity_weight", "fc.weight",
                     "fc.bias"}
    net = fs.FERSupCon(7, img, queue_size=16)
    assert net.encoder_q.trunk(torch.randn(2, 3, img, img)).shape == (2, 512, s, s)


def test_arm_matches_naive_reading_of_the_official_module():
    torch.manual_seed(0)
    arm = fs.ARM(7, 112)
    f = torch.randn(3, 512, 4, 4)
    x = torch.zeros(3, 2, 64, 64)  # by hand: channel 256c+16i+j at (h,w) -> (c, 16h+i, 16w+j)
    for c in range(2):
        for i in range(16):
            for j in range(16):
                x[:, c, i::16, j::16] = f[:, 256 * c + 16 * i + j]
    y = torch.cat([arm.de_albino(x[:, c:c + 1]) for c in range(2)], 1)  # the shared kernel
    y = arm.bn(y)
    z = y.mean(1) + arm.affinity_weight * y.mean((0, 1))
    assert torch.allclose(arm(f), arm.fc(z.flatten(1)), atol=1e-5)  # another summation order


def test_arm_eval_is_batch_independent_and_official_mode_is_not():
    torch.manual_seed(0)
    arm = fs.ARM(7, 96)
    arm.train()
    for _ in range(5):
        arm(torch.randn(8, 512, 3, 3) + 1.0)  # fills the running statistics and running g
    arm.eval()
    f = torch.randn(8, 512, 3, 3)
    alone = torch.cat([arm(f[i:i + 1]) for i in range(8)])
    assert torch.allclose(arm(f), alone, atol=1e-5)  # float32, another summation order
    arm.eval_batch_mean = True  # --arm-eval batch
    assert not torch.allclose(arm(f)[:4], arm(f[:4]), atol=1e-3)


def test_image_size_under_64_is_rejected():
    with pytest.raises(ValueError, match="at least 64"):
        fs.ARM.sides(60)


def norm_layers(net):  # the BatchNorms inference reads: the trunk's and ARM's
    return [m for part in (net.encoder_q.trunk, net.classifier) for m in part.modules()
            if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_precise_bn_is_the_mean_of_each_batchs_statistics_and_keeps_the_mode(mode):
    torch.manual_seed(0)
    net = fs.FERSupCon(3, 64, queue_size=16).train(mode == "train")
    for m in norm_layers(net):
        m.running_mean.fill_(5.0)  # stale statistics: none of them may survive
    net.classifier.running_g.fill_(5.0)
    x, order = torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8), torch.randperm(12)
    ref = copy.deepcopy(net).train()  # the naive loop: record every batch's statistics
    seen, g = [], []
    for i, m in enumerate(norm_layers(ref)):
        seen.append([])
        m.register_forward_hook(lambda m, inp, out, i=i: seen[i].append(inp[0]))
    ref.classifier.bn.register_forward_hook(lambda m, inp, out: g.append(out.mean((0, 1))))
    with torch.no_grad():
        for b in range(3):
            ref(fs.eval_transform(x[order[4 * b:4 * b + 4]], 64))
    weights = copy.deepcopy(dict(net.named_parameters()))
    fs.refresh_norm_stats(net, fs.Images(None, torch.device("cpu"), False, 0, x=x), order, 64, 4,
                          CPU)
    # float32 activations of channels_last vs contiguous convolutions (~1e-6 apart) and the
    # running-mean arithmetic; 1e-4 relative is far above that and far below a one-batch
    # error (batches differ by ~10 %)
    for m, stats in zip(norm_layers(net), seen):
        mean = torch.stack([a.mean((0, 2, 3)) for a in stats]).mean(0)
        var = torch.stack([a.var((0, 2, 3)) for a in stats]).mean(0)
        assert torch.allclose(m.running_mean, mean, 1e-4, 1e-5)
        assert torch.allclose(m.running_var, var, 1e-4, 1e-5)
        assert m.momentum == 0.1  # restored
    assert torch.allclose(net.classifier.running_g, torch.stack(g).mean(0), 1e-4, 1e-5)
    assert net.classifier.momentum == 0.1
    assert all(torch.equal(p, weights[k]) for k, p in net.named_parameters())
    assert net.training == (mode == "train") and net.classifier.training == (mode == "train")


def test_pretrained_path_loads_its_forms_and_fails_loudly(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18()
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "ok.pth")
    trunk = fs.build_trunk(str(tmp_path / "ok.pth"))
    assert torch.equal(trunk.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    old = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")  # PyTorch < 0.4.1
    assert torch.equal(fs.build_trunk(str(tmp_path / "old.pth")).bn1.running_var,
                       ref.bn1.running_var)
    del sd["module.layer3.0.conv1.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(fs.UserError, match="1 missing"):
        fs.build_trunk(str(tmp_path / "missing.pth"))
    torch.save({**ref.state_dict(), "feature.weight": torch.zeros(3)}, tmp_path / "unused.pth")
    with pytest.raises(fs.UserError, match="1 unused"):
        fs.build_trunk(str(tmp_path / "unused.pth"))


def test_key_encoder_starts_as_a_copy_and_has_no_gradients():
    net = fs.FERSupCon(7, 96, queue_size=8)
    for a, b in zip(net.encoder_q.state_dict().values(), net.encoder_k.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in net.encoder_k.parameters())


# ---- Augmentation ---------------------------------------------------------------------------

OFF = dict(rotate=0.0, scale=(1.0, 1.0), translate=0.0, noise_p=0.0, erase_p=0.0)


def test_augment_shapes_dtype_and_same_seed_same_views():
    x = torch.randint(0, 256, (6, 3, 50, 50), dtype=torch.uint8)
    a = fs.augment(x, 64, torch.Generator().manual_seed(3))
    b = fs.augment(x, 64, torch.Generator().manual_seed(3))
    c = fs.augment(x, 64, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(0)
    assert not torch.equal(fs.augment(x, 64, gen), fs.augment(x, 64, gen))  # two views


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_augment_flip_really_flips_and_identity_is_identity(flip):
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    y = fs.augment(x, 32, torch.Generator(), flip_p=flip, **OFF)
    expected = fs.eval_transform(x.flip(-1) if flip else x, 32)
    assert torch.allclose(y, expected, atol=1e-4)  # grid_sample at pixel centres: rounding


def test_augment_erasing_zeroes_a_rectangle():
    x = torch.full((4, 3, 40, 40), 200, dtype=torch.uint8)
    y = fs.augment(x, 40, torch.Generator().manual_seed(0), flip_p=0.0, **(OFF | {"erase_p": 1}))
    for img in y:
        zero = (img == 0).all(0)  # (H, W)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert 0.015 * 1600 <= zero.sum() <= 0.26 * 1600
        assert zero.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


# ---- Data -----------------------------------------------------------------------------------

def write_rafdb(root, n_train=6, n_test=3, size=30):
    (root / "EmoLabel").mkdir(parents=True)
    (root / "Image" / "aligned").mkdir(parents=True)
    lines = [f"train_{i:05d}.jpg {i % 7 + 1}" for i in range(1, n_train + 1)]
    lines += [f"test_{i:04d}.jpg {(i + 3) % 7 + 1}" for i in range(1, n_test + 1)]
    # no trailing newline, as shipped
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines))
    for k, line in enumerate(lines):
        name = line.split()[0].replace(".jpg", "_aligned.jpg")
        Image.new("RGB", (size, size), (k * 20, 100, 50)).save(root / "Image" / "aligned" / name)
    return lines


def test_rafdb_loader_reads_the_real_layout(tmp_path):
    write_rafdb(tmp_path)
    train = fs.load_dataset("rafdb", tmp_path, "train", 24)
    test = fs.load_dataset("rafdb", tmp_path, "test", 24)
    assert len(train) == 6 and len(test) == 3 and train.classes[0] == "surprise"
    assert train.labels.tolist() == [i % 7 for i in range(1, 7)]  # labels 1..7 -> 0..6
    assert test.labels.tolist() == [(i + 3) % 7 for i in range(1, 4)]
    img, label, index = train[2]
    assert img.shape == (3, 24, 24) and img.dtype == torch.uint8 and label == 3 and index == 2
    assert img[0, 0, 0] == 40  # the third file's red value


def test_rafdb_train_labels_file_replaces_training_labels(tmp_path):
    write_rafdb(tmp_path)
    noisy = tmp_path / "noise01.txt"
    labels = [2, 7, 4, 5, 6, 7]  # train_00002: 3 in the official file
    noisy.write_text("\n".join(f"train_{i:05d}.jpg {y}" for i, y in enumerate(labels, 1)) + "\n")
    train = fs.load_dataset("rafdb", tmp_path, "train", 24, train_labels=str(noisy))
    assert train.labels.tolist() == [1, 6, 3, 4, 5, 6]
    assert train.true_labels.tolist() == [1, 2, 3, 4, 5, 6]  # the official labels: the truth
    noisy.write_text("train_00001.jpg 1")
    with pytest.raises(fs.UserError, match="5 missing"):
        fs.load_dataset("rafdb", tmp_path, "train", 24, train_labels=str(noisy))


def test_rafdb_errors_name_the_expected_files(tmp_path):
    with pytest.raises(fs.UserError, match="list_patition_label.txt"):
        fs.load_dataset("rafdb", tmp_path, "train", 24)
    write_rafdb(tmp_path)
    (tmp_path / "Image" / "aligned" / "train_00003_aligned.jpg").unlink()
    with pytest.raises(fs.UserError, match="1 of 6 images missing, first .*train_00003_aligned"):
        fs.load_dataset("rafdb", tmp_path, "train", 24)
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 9")
    with pytest.raises(fs.UserError, match=r"list_patition_label.txt:1: expected"):
        fs.load_dataset("rafdb", tmp_path, "train", 24)


def test_imagefolder_loader(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("happy", "angry"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (20, 20), 9).save(tmp_path / split / c / f"{i}.png")
    train, test = (fs.load_dataset("imagefolder", tmp_path, s, 16) for s in ("train", "test"))
    assert train.classes == ["angry", "happy"] and len(train) == 6 and len(test) == 4
    assert train[0][0].shape == (3, 16, 16)  # grayscale -> 3 channels


def write_affectnet_csv(root):
    (root / "Manually_Annotated_file_lists").mkdir(parents=True)
    head = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
            "expression,valence,arousal")
    for name, codes in (("training.csv", [0, 1, 7, 8, 10, 3]), ("validation.csv", [7, 2, 9])):
        lines = [head]
        for i, code in enumerate(codes):
            rel = f"{i + 1}/{name[:3]}{i}.jpg"
            (root / "Manually_Annotated_Images" / str(i + 1)).mkdir(parents=True, exist_ok=True)
            img = Image.new("RGB", (60, 60), (0, 0, 255))
            img.paste((200, 30 * code, 10), (20, 10, 50, 40))  # the face box: x 20, y 10, 30 x 30
            img.save(root / "Manually_Annotated_Images" / rel)
            lines.append(f'{rel},20,10,30,30,"1.0;2.0;3.0",{code},0.1,-0.2')
        (root / "Manually_Annotated_file_lists" / name).write_text("\n".join(lines) + "\n")


def test_affectnet_csv_layout_crops_the_face_box_and_drops_codes_8_to_10(tmp_path):
    write_affectnet_csv(tmp_path)
    train = fs.load_dataset("affectnet", tmp_path, "train", 16)
    assert train.labels.tolist() == [0, 1, 7, 3] and train.classes[7] == "contempt"
    img = train[3][0]
    assert (img[:, 8, 8].int() - torch.tensor([200, 90, 10])).abs().max() <= 8  # JPEG
    assert (img[2, 2:-2, 2:-2] < 60).all()  # cropped to the box: no blue border left
    seven = fs.load_dataset("affectnet", tmp_path, "train", 16, classes=7)
    assert seven.labels.tolist() == [0, 1, 3] and len(seven.classes) == 7
    test = fs.load_dataset("affectnet", tmp_path, "test", 16)  # the validation set
    assert test.labels.tolist() == [7, 2]


def test_affectnet_npy_layout(tmp_path):
    for split, codes in (("train_set", [4, 10, 6]), ("val_set", [5])):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "annotations").mkdir()
        for i, code in enumerate(codes):
            Image.new("RGB", (40, 40), (i, 0, 0)).save(tmp_path / split / "images" / f"{i}.jpg")
            np.save(tmp_path / split / "annotations" / f"{i}_exp.npy", np.array(str(code)))
    train = fs.load_dataset("affectnet", tmp_path, "train", 32)
    assert train.labels.tolist() == [4, 6] and train[1][0].shape == (3, 32, 32)
    assert fs.load_dataset("affectnet", tmp_path, "test", 32).labels.tolist() == [5]


FERPLUS_HEAD = ("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,"
                "contempt,unknown,NF")
VOTES = {  # votes -> (majority, argmax)
    "6,0,0,0,0,0,0,0,4,0": (0, 0),
    "4,0,0,1,3,2,0,0,0,0": (-1, 0),   # 4 of 9 after dropping the single vote: no majority
    "1,0,0,0,0,0,0,0,0,9": (-1, -1),  # non-face wins
    "0,3,0,0,0,0,0,2,1,0": (1, 1),    # single votes dropped: 3 of 5
    "1,1,1,1,1,1,1,1,1,1": (-1, 0),   # all single votes
    "0,0,0,0,0,0,0,5,4,1": (7, 7),
    "2,0,3,0,0,0,0,0,5,0": (-1, -1),  # unknown wins
    "0,0,0,0,0,2,2,0,0,0": (-1, 5),   # a tie: no majority; argmax takes the first
}


@pytest.mark.parametrize("votes", VOTES)
def test_ferplus_label_rules(votes):
    v = [int(x) for x in votes.split(",")]
    assert (fs.label_from_votes(v, "majority"), fs.label_from_votes(v, "argmax")) == VOTES[votes]


def test_ferplus_csv_layout_row_for_row_with_empty_names_dropped(tmp_path):
    def pixels(k):
        return " ".join(str((k * 40 + i) % 256) for i in range(48 * 48))
    rows = [("Training", "fer0.png", "6,0,0,0,0,0,0,0,4,0"),
            ("Training", "", "0,9,0,0,0,0,0,0,0,0"),
            ("Training", "fer2.png", "4,0,0,1,3,2,0,0,0,0"),
            ("Training", "fer3.png", "0,3,0,0,0,0,0,2,1,0"),
            ("PublicTest", "fer4.png", "0,0,8,0,0,0,0,0,0,0"),
            ("PrivateTest", "fer5.png", "0,0,0,0,0,0,0,5,4,1")]
    (tmp_path / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "".join(
        f'0,"{pixels(k)}",{u}\n' for k, (u, _, _) in enumerate(rows)))
    (tmp_path / "fer2013new.csv").write_text(
        FERPLUS_HEAD + "\n" + "".join(f"{u},{n},{v}\n" for u, n, v in rows))
    train = fs.load_dataset("ferplus", tmp_path, "train", 48)
    assert train.labels.tolist() == [0, 1] and train.classes == fs.FERPLUS_CLASSES
    img = train[1][0]  # row 3 (fer3.png): grayscale replicated to 3 channels
    assert img.shape == (3, 48, 48) and torch.equal(img[0], img[2]) and img[0, 0, 0] == 120
    argmax = fs.load_dataset("ferplus", tmp_path, "train", 48, label_rule="argmax")
    assert argmax.labels.tolist() == [0, 0, 1]
    assert fs.load_dataset("ferplus", tmp_path, "test", 48).labels.tolist() == [7]  # PrivateTest
    (tmp_path / "fer2013new.csv").write_text(FERPLUS_HEAD + "\nTraining,fer0.png,1,2\n")
    with pytest.raises(fs.UserError, match="row for row"):
        fs.load_dataset("ferplus", tmp_path, "train", 48)


def write_ferplus_folders(root, train_votes, test_votes, size=48):
    for split, votes in (("FER2013Train", train_votes), ("FER2013Test", test_votes)):
        (root / split).mkdir(parents=True)
        lines = []
        for i, v in enumerate(votes):
            Image.fromarray(((np.arange(size * size).reshape(size, size) * (i + 3)) % 256)
                            .astype(np.uint8)).save(root / split / f"fer{i:07d}.png")
            lines.append(f'fer{i:07d}.png,"(0, 0, 48, 48)",{v}')
        (root / split / "label.csv").write_text("\n".join(lines) + "\n")


def test_ferplus_folder_layout(tmp_path):
    write_ferplus_folders(tmp_path, ["6,0,0,0,0,0,0,0,4,0", "4,0,0,1,3,2,0,0,0,0"],
                          ["0,0,8,0,0,0,0,0,0,0"])
    assert fs.load_dataset("ferplus", tmp_path, "train", 40).labels.tolist() == [0]
    argmax = fs.load_dataset("ferplus", tmp_path, "train", 40, label_rule="argmax")
    assert argmax.labels.tolist() == [0, 0]
    test = fs.load_dataset("ferplus", tmp_path, "test", 40)
    assert test.labels.tolist() == [2] and test[0][0].shape == (3, 40, 40)


@pytest.mark.parametrize("name,expected", [("rafdb", "list_patition_label.txt"),
                                           ("affectnet", "training.csv"),
                                           ("ferplus", "fer2013new.csv"),
                                           ("imagefolder", "train")])
def test_missing_layout_names_the_expected_files(tmp_path, name, expected):
    with pytest.raises(fs.UserError, match=expected) as e:
        fs.load_dataset(name, tmp_path, "train", 64)
    assert "expected" in str(e.value) and "ROOT/" in str(e.value)  # shows the layout


def test_balanced_sampler_equalises_class_frequencies():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = torch.cat([fs.epoch_order(labels, "balanced", 0, e) for e in range(1, 11)])
    freq = torch.bincount(labels[order], minlength=3) / len(order)
    assert len(fs.epoch_order(labels, "balanced", 0, 1)) == 1000  # as long as the training set
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)  # 10,000 draws: 3 sd
    assert sorted(fs.epoch_order(labels, "shuffle", 0, 1).tolist()) == list(range(1000))


def test_synthetic_faces_are_deterministic_per_index():
    a, b = fs.SyntheticFaces(20, "train", 64, seed=1), fs.SyntheticFaces(20, "train", 64, seed=1)
    assert torch.equal(a[7][0], b[7][0]) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a[7][0], fs.SyntheticFaces(20, "test", 64, seed=1)[7][0])
    assert a[7][0].shape == (3, 64, 64) and a[7][0].dtype == torch.uint8


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_label_noise_flips_the_requested_fraction_to_other_classes(p):
    labels = torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(0))
    noisy = fs.inject_label_noise(labels, p, 7, seed=0)
    changed = noisy != labels
    assert changed.sum().item() == round(p * 1000)  # every chosen label moved to another class
    assert torch.equal(noisy, fs.inject_label_noise(labels, p, 7, seed=0))
    counts = torch.bincount((noisy - labels)[changed] % 7, minlength=7)
    assert counts[0] == 0 and counts[1:].min() > 0  # all offsets used


# ---- The numbers people quote ---------------------------------------------------------------

def test_scores_match_a_confusion_matrix_worked_by_hand():
    conf = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]])  # rows: true class
    s = fs.scores(conf)
    # precision / recall per class: 5/7, 5/6; 3/4, 3/6; 4/5, 4/4 -> F1 = 10/13, 6/10, 8/9
    assert s["test_acc"] == pytest.approx(12 / 16)
    assert s["mean_class_acc"] == pytest.approx((5 / 6 + 3 / 6 + 4 / 4) / 3)
    assert s["macro_f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert s["per_class_acc"] == pytest.approx([5 / 6, 3 / 6, 1.0])
    s = fs.scores(torch.tensor([[2, 0, 1], [0, 0, 0], [0, 0, 3]]))  # class 1: no test sample
    assert s["mean_class_acc"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["macro_f1"] == pytest.approx((0.8 + 6 / 7) / 2)


def test_summary_takes_final_best_and_the_mean_of_the_last_five_epochs():
    accs = [0.5, 0.9, 0.6, 0.7, 0.9, 0.75, 0.65]
    history = [dict(epoch=e + 1, test_acc=a, mean_class_acc=a, macro_f1=a, per_class_acc=[a])
               for e, a in enumerate(accs)]
    s = fs.summarize(history, ["x"], fs.Config())
    assert (s["final_epoch"], s["final_acc"], s["best_epoch"], s["best_acc"]) == (7, 0.65, 2, 0.9)
    assert s["last5_epochs"] == [3, 4, 5, 6, 7]
    assert s["last5_mean_acc"] == pytest.approx(sum(accs[2:]) / 5)


# ---- CUEM's relabel accounting on a run built to relabel, and its alarm --------------------

def noisy_tiny_labels():
    return fs.inject_label_noise(fs.SyntheticFaces(96, "train", 64).labels, 0.3, 7, 0)


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    """2 epochs, 30 % noise, CUEM from epoch 1 made to relabel every sample to the next class:
    the queue (96 slots, batches of 16) is full from the first step of epoch 2 on, so epoch 2
    relabels each of the 96 samples once and epoch 1 none."""
    out = tmp_path_factory.mktemp("shifted") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fs, "cuem", lambda q, labels, *a: ((labels + 1) % 7, torch.ones(len(labels))))
        res, text = run_main(TINY + ["--epochs", "2", "--cuem-start", "1", "--label-noise", "0.3",
                                     "--out", str(out)])
    return dict(out=out, text=text, rows=read_rows(out / "metrics.jsonl"))


def test_relabel_counts_precision_and_recall_are_exact(shifted_run):
    first, second = shifted_run["rows"]
    y = noisy_tiny_labels()
    truth = fs.SyntheticFaces(96, "train", 64).labels
    right = ((y + 1) % 7 == truth).sum().item()  # relabels that restored the true label
    noisy = (y != truth).sum().item()
    assert first["relabelled"] == 0 and first["relabel_precision"] is None
    assert second["relabelled"] == 96 and second["relabel_share"] == 1.0
    assert second["relabel_precision"] == pytest.approx(right / 96)
    assert second["relabel_recall"] == pytest.approx(right / noisy)
    assert second["relabelled_to"] == torch.bincount((y + 1) % 7, minlength=7).tolist()


def test_relabels_csv_and_png_list_every_relabelled_sample(shifted_run):
    head, *rows = read_csv(shifted_run["out"] / "relabels.csv")
    assert head == ["index", "path", "label", "cuem_label", "relabelled", "seen", "last_u"]
    y = noisy_tiny_labels()
    assert sorted(int(r[0]) for r in rows) == list(range(96))
    for index, path, label, cuem_label, moved, seen, u in rows:
        assert label == fs.RAFDB_CLASSES[y[int(index)]]
        assert cuem_label == fs.RAFDB_CLASSES[(y[int(index)] + 1) % 7]
        assert (path, moved, seen, float(u)) == ("", "1", "1", 1.0)
    img = Image.open(shifted_run["out"] / "relabels.png")
    assert img.size == (8 * 150 + 20, 50 + 6 * (112 + 52))  # 48 tiles: 6 rows of 8


def test_alarm_fires_when_one_class_takes_the_relabels(tmp_path, monkeypatch):
    monkeypatch.setattr(fs, "cuem", lambda q, labels, *a: (torch.zeros_like(labels),
                                                            torch.ones(len(labels))))
    _, text = run_main(TINY + ["--epochs", "2", "--cuem-start", "1", "--out", str(tmp_path)])
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["relabel_alarm"] for r in rows] == [False, True]
    assert "UNUSUAL: surprise received" in text


@pytest.mark.parametrize("relabelled_to,alarm", [
    ([180, 147, 91, 33, 19, 37, 33, 106, 49, 55], True),   # the old routing's collapse, epoch 5
    ([30, 33, 39, 32, 33, 27, 29, 43, 24, 36], False),     # a working run, 20 % noise
    ([9, 0, 0, 0, 0, 0, 0, 0, 0, 0], False),               # too few to say
    ([141, 0, 0, 0, 0, 0, 0, 0, 0, 0], True),               # one more than its annotated 140
    ([140, 0, 0, 0, 0, 0, 0, 0, 0, 0], False),
])
def test_alarm_fires_when_a_class_would_more_than_double(relabelled_to, alarm):
    labelled = [140] * 10  # the samples annotated with each class in the epoch
    assert bool(fs.relabel_alarm(relabelled_to, labelled, [str(c) for c in range(10)])) == alarm


# ---- The command line end to end: one tiny run, checked guarantee by guarantee --------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """3 epochs with 30 % label noise, CUEM from epoch 2, lambda 0.5 / 0 / beta (alpha 2)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    res, text = run_main(TINY + ["--epochs", "3", "--cuem-start", "2", "--alpha", "2",
                                 "--label-noise", "0.3", "--out", str(out)])
    return dict(out=out, res=res, text=text, rows=read_rows(out / "metrics.jsonl"))


def test_run_writes_every_output(tiny_run):
    for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "curves.png",
                 "relabels.csv", "relabels.png", "noisy_labels.txt", "confusion.png",
                 "confusion.txt"):
        assert (tiny_run["out"] / name).is_file(), name
    assert not list(tiny_run["out"].glob(".*tmp*"))  # no temporary file left
    for name in ("curves.png", "confusion.png", "relabels.png"):
        img = Image.open(tiny_run["out"] / name)
        assert img.size[0] > 600 and img.mode == "RGB"


def test_run_follows_eq4_and_the_lr_decay(tiny_run):
    rows = tiny_run["rows"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["lam"] for r in rows] == [pytest.approx(0.5), 0.0, 1e-4]
    assert rows[1]["lr"] == pytest.approx(rows[0]["lr"] * 0.9)


def test_metrics_rows_carry_the_quoted_numbers_whatever_cuem_did(tiny_run):
    for row in tiny_run["rows"]:
        keys = {"loss", "ce", "supcon", "relabelled", "relabel_share", "relabelled_to",
                "relabel_alarm", "relabel_precision", "relabel_recall", "test_acc",
                "mean_class_acc", "macro_f1", "per_class_acc", "seconds", "samples_per_s",
                "eval_seconds", "confusion"}
        assert keys <= row.keys() and len(row["per_class_acc"]) == 7
        assert row["relabel_share"] == pytest.approx(row["relabelled"] / 96)
        assert sum(row["relabelled_to"]) == row["relabelled"]
        assert fs.scores(torch.tensor(row["confusion"]))["macro_f1"] == pytest.approx(
            row["macro_f1"])
        assert row["relabel_precision"] is None or 0 <= row["relabel_precision"] <= 1
        assert 0 <= row["relabel_recall"] <= 1
    assert tiny_run["rows"][0]["relabelled"] == 0  # CUEM starts in epoch 2


def test_relabels_csv_agrees_with_the_per_epoch_counts(tiny_run):
    head, *rows = read_csv(tiny_run["out"] / "relabels.csv")
    assert sum(int(r[4]) for r in rows) == sum(r["relabelled"] for r in tiny_run["rows"])
    labels = noisy_tiny_labels()
    for index, path, label, cuem_label, moved, seen, u in rows:
        assert path == "" and label == fs.RAFDB_CLASSES[labels[int(index)]]
        assert cuem_label != label and 1 <= int(moved) <= int(seen) <= 2  # epochs 2 and 3
    assert len({r[0] for r in rows}) == len(rows)


def test_summary_json_agrees_with_metrics_jsonl(tiny_run):
    s, rows = json.loads((tiny_run["out"] / "summary.json").read_text()), tiny_run["rows"]
    assert s["final_acc"] == rows[-1]["test_acc"] and s["final_macro_f1"] == rows[-1]["macro_f1"]
    assert s["last5_mean_acc"] == pytest.approx(sum(r["test_acc"] for r in rows) / 3)
    best = max(rows, key=lambda r: r["test_acc"])
    assert (s["best_epoch"], s["best_acc"]) == (best["epoch"], best["test_acc"])
    assert list(s["final_per_class_acc"]) == fs.RAFDB_CLASSES and s["config"]["label_noise"] == 0.3


def test_noisy_labels_txt_is_the_runs_training_labels(tiny_run):
    lines = (tiny_run["out"] / "noisy_labels.txt").read_text().split()
    assert [int(v) for v in lines[1::2]] == noisy_tiny_labels().tolist()
    assert [int(v) for v in lines[::2]] == list(range(96))


def test_run_prints_banner_progress_and_the_three_quoted_numbers(tiny_run):
    text = tiny_run["text"]
    assert f"torch {torch.__version__}" in text and "seed 0" in text
    assert "config: data=synthetic" in text and "eval mode with PyTorch's running" in text
    assert re.search(r"train: 96 images, surprise \d+, fear \d+", text)
    assert "test: 32 images" in text
    assert "queue size 8192 capped to 96" in text and "m = 0.8333 = 1 - 16/96" in text
    assert "samples/s" in text and "ETA" in text and "relabelled" in text
    final = text.strip().splitlines()[-1]
    assert final.startswith("final epoch 3") and "best epoch" in final
    assert "mean of the last 3 epochs" in final
    ckpt = torch.load(tiny_run["out"] / "last.pt", weights_only=True)
    assert ckpt["model"]["queue.labels"].min() >= 0  # the queue filled
    assert ckpt["card"]["statistics"].startswith("eval mode with PyTorch's running")


def test_precise_bn_checkpoint_holds_statistics_refreshed_for_its_weights(tmp_path):
    run_main(TINY + ["--epochs", "1", "--precise-bn", "--out", str(tmp_path)])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["card"]["statistics"].startswith("BatchNorm statistics recomputed")
    cfg = fs.checkpoint_config(ckpt, {}, ())
    net = fs.build_model(cfg, 7, "none", torch.device("cpu"))
    net.load_state_dict(ckpt["model"])
    saved = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    train = fs.load_dataset("synthetic", "", "train", 64, synthetic_train=96, seed=cfg.seed)
    order = fs.epoch_order(train.labels, "shuffle", cfg.seed, 0)
    fs.refresh_norm_stats(net, fs.Images(train, torch.device("cpu"), True, 0), order, 64, 16, CPU)
    again = {k: v for k, v in net.state_dict().items() if "running" in k}
    assert all(torch.allclose(saved[k], again[k], 1e-5, 1e-6) for k in saved)  # same ops, data


def test_help_shows_the_defaults_a_run_uses(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    text = " ".join(fs.build_parser().format_help().split())
    for f in fs.dataclasses.fields(fs.Config)[1:]:  # [0] is --data, which selects the column
        flag = f.name.replace("_", "-")  # its line in the options list, not the usage line
        m = re.search(rf"\s--{flag}(?= )(?! \S*\])(.*?)\(default ([^;)]*)((?:; \w+: [^;)]*)*)\)",
                      text)
        assert m, f.name
        per_data = dict(p.split(": ") for p in m.group(3).split("; ")[1:])
        for data in fs.DATASETS:
            expected = per_data.get(data, m.group(2))
            assert str(getattr(fs.make_config({"data": data}), f.name)) == expected, (f.name, data)
    assert "(default 100; synthetic: 8)" in text


def test_rafdb_run_writes_noisy_labels_that_train_labels_reads_back(tmp_path):
    write_rafdb(tmp_path / "raf", n_train=12)
    run_main(["--data", "rafdb", "--root", str(tmp_path / "raf"), "--img-size", "64",
              "--pretrained", "none", "--batch-size", "4", "--epochs", "1", "--workers", "0",
              "--label-noise", "0.5", "--out", str(tmp_path / "o")])
    noisy = tmp_path / "o" / "noisy_labels.txt"
    assert noisy.read_text().startswith("train_00001.jpg ")
    again = fs.load_dataset("rafdb", tmp_path / "raf", "train", 24, train_labels=str(noisy))
    official = fs.load_dataset("rafdb", tmp_path / "raf", "train", 24).labels
    assert torch.equal(again.labels, fs.inject_label_noise(official, 0.5, 7, 0))


def test_worker_decoding_path_trains_exactly_like_the_cache(tmp_path):
    args = TINY + ["--epochs", "2", "--cuem-start", "1"]
    run_main(args + ["--cache", "on", "--out", str(tmp_path / "on")])
    run_main(args + ["--cache", "off", "--workers", "2", "--out", str(tmp_path / "off")])
    a, b = final_weights(tmp_path / "on" / "last.pt"), final_weights(tmp_path / "off" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill_gives_bitwise_equal_weights(tmp_path):
    args = TINY + ["--epochs", "4", "--cuem-start", "2", "--alpha", "3", "--seed", "5",
                   "--label-noise", "0.2"]
    assert run_cli(args + ["--out", str(tmp_path / "whole")]).returncode == 0
    proc = start_cli(args + ["--out", str(tmp_path / "cut")], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    last = tmp_path / "cut" / "last.pt"
    wait_for(last, proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert epoch < 4
    done = run_cli(["--resume", str(last)])
    assert done.returncode == 0, done.stderr
    assert f"resumed from {last} after epoch {epoch}" in done.stdout
    a, b = final_weights(tmp_path / "whole" / "last.pt"), final_weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def without_times(path):
        return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s",
                                                         "eval_seconds")} for r in read_rows(path)]
    assert without_times(tmp_path / "whole" / "metrics.jsonl") == without_times(
        tmp_path / "cut" / "metrics.jsonl")
    assert ((tmp_path / "whole" / "relabels.csv").read_text()
            == (tmp_path / "cut" / "relabels.csv").read_text())


def test_ctrl_c_stops_cleanly_and_names_the_last_checkpoint(tmp_path):
    # SIGINT back to its default in the child: a shell's background job inherits it ignored
    proc = start_cli(TINY + ["--epochs", "50", "--out", str(tmp_path)], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(tmp_path / "last.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert f"last complete checkpoint: {tmp_path / 'last.pt'}" in err
    torch.load(tmp_path / "last.pt", weights_only=True)  # complete, loadable
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_nan_guard_stops_with_epoch_and_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fs.main(TINY + ["--epochs", "2", "--lr", "1e30", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(r"non-finite loss in epoch 1, step \d+", err)
    assert "last good checkpoint: none written yet" in err and not (tmp_path / "last.pt").exists()


# ---- A trained model in use: --eval, --predict, --export ------------------------------------

@pytest.fixture(scope="module")
def arm_ckpt(tmp_path_factory):
    """One epoch with ARM on (so both of ARM's test-time modes exist)."""
    out = tmp_path_factory.mktemp("arm") / "run"
    run_main(TINY + ["--epochs", "1", "--arm", "--out", str(out)])
    return out / "best.pt"


def test_checkpoint_says_how_to_feed_it(arm_ckpt):
    card = torch.load(arm_ckpt, weights_only=True)["card"]
    assert card["classes"] == fs.RAFDB_CLASSES and card["dataset"] == "synthetic"
    assert card["decode_size"] == card["img_size"] == 64
    assert card["normalisation"]["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert card["crops"] and card["torch"] == torch.__version__


@pytest.mark.parametrize("arm_eval", ["running", "batch"])
def test_eval_reports_the_batch_dependence_and_writes_eval_json(arm_ckpt, arm_eval):
    res, text = run_main(["--eval", str(arm_ckpt), "--arm-eval", arm_eval, "--workers", "0"])
    assert text.startswith(f"{arm_ckpt}: epoch 1 of a synthetic run")
    assert "read at 64x64, network 64x64" in text
    batching = res["batching"]
    assert set(batching) == {"batch_1", "batch_64", "batch_256", "batch_256_shuffled",
                             "float_noise"}
    saved = json.loads(arm_ckpt.with_name("best_eval.json").read_text())
    assert {"test_acc", "mean_class_acc", "macro_f1", "per_class_acc", "batching", "protocol",
            "config", "epoch"} <= saved.keys()
    assert (arm_ckpt.parent / "best_confusion.png").is_file()
    if arm_eval == "running":
        assert batching["float_noise"] and "float noise: no prediction depends" in text
        metrics = read_rows(arm_ckpt.parent / "metrics.jsonl")[-1]
        assert saved["test_acc"] == pytest.approx(metrics["test_acc"])  # as in training
    else:
        assert "ARM's g from each test batch of 16" in saved["protocol"]


def test_batch_size_one_logits_equal_full_batch_logits_under_the_running_mean(arm_ckpt):
    ckpt, card, cfg, device, model = fs.open_checkpoint(arm_ckpt, {}, "eval")
    x = torch.stack([fs.SyntheticFaces(16, "test", 64)[i][0] for i in range(16)])
    whole, alone = fs.logits_of(model, x, 64, 16), fs.logits_of(model, x, 64, 1)
    assert torch.allclose(whole, alone, atol=1e-5)  # float32 of another batch size: rounding


def test_predict_folders_globs_and_a_corrupt_file(tmp_path, arm_ckpt):
    save_faces(tmp_path / "faces" / "a" / "b", 2)
    save_faces(tmp_path / "faces", 1, start=2)
    bad = tmp_path / "faces" / "a" / "bad.jpg"
    bad.write_bytes(b"not an image")
    csv_path = tmp_path / "p.csv"
    # subprocesses: the exit status is part of what is checked
    r = run_cli(["--predict", str(tmp_path / "faces"), "--checkpoint", str(arm_ckpt),
                 "--csv", str(csv_path), "--top", "2"])
    assert r.returncode == 1 and f"skipped: cannot read image {bad}" in r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"{arm_ckpt}: epoch 1")
    assert lines[-1] == f"classified 3 images, skipped 1; wrote {csv_path}"
    assert len(lines) == 5 and all(len(line.split(", ")) == 2 for line in lines[1:4])  # --top 2
    head, *rows = read_csv(csv_path)
    assert head == ["path", "predicted", *fs.RAFDB_CLASSES] and len(rows) == 3
    for row in rows:
        p = [float(v) for v in row[2:]]
        assert sum(p) == pytest.approx(1, abs=1e-5)  # 7 values written with 6 decimals
        assert row[1] == fs.RAFDB_CLASSES[int(np.argmax(p))]
    g = run_cli(["--predict", str(tmp_path / "faces" / "**" / "*.png"), "--checkpoint",
                 str(arm_ckpt)])
    assert g.returncode == 0
    assert g.stdout.strip().splitlines()[-1] == "classified 3 images, skipped 0"
    none = run_cli(["--predict", str(tmp_path / "nothing*"), "--checkpoint", str(arm_ckpt)])
    assert none.returncode == 2 and "no images found in" in none.stderr
    assert len(none.stderr.splitlines()) == 1


def test_predict_does_not_depend_on_the_other_images(tmp_path, arm_ckpt):
    paths = save_faces(tmp_path / "many", 301)
    one, _ = run_main(["--predict", str(paths[7]), "--checkpoint", str(arm_ckpt)])
    among, _ = run_main(["--predict", str(tmp_path / "many"), "--checkpoint", str(arm_ckpt),
                         "--workers", "2"])
    a, b = one["probabilities"][str(paths[7])], among["probabilities"][str(paths[7])]
    assert np.allclose(a, b, atol=1e-6)  # float32 in batches of 1 and 256: rounding


@pytest.fixture(scope="module")
def ferplus_ckpt(tmp_path_factory):
    """One epoch on a FERPlus folder fixture: 48 px files, a 64 px network, so that the test
    images are decoded at 48 and resized on the way in."""
    root = tmp_path_factory.mktemp("ferplus")
    votes = [",".join(str(10 * (c == i % 8)) for c in range(8)) + ",0,0" for i in range(24)]
    write_ferplus_folders(root, votes, votes[:12])
    out = root / "run"
    run_main(["--data", "ferplus", "--root", str(root), "--img-size", "64", "--pretrained",
              "none", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--out", str(out)])
    return root, out / "last.pt"


def test_predict_export_and_evaluation_see_the_same_test_images(ferplus_ckpt, tmp_path):
    root, ckpt_path = ferplus_ckpt
    files = sorted((root / "FER2013Test").glob("*.png"))
    ckpt, card, cfg, device, model = fs.open_checkpoint(ckpt_path, {}, "eval")
    assert (card["decode_size"], card["img_size"]) == (48, 64)
    test = fs.load_dataset("ferplus", root, "test", 48)
    x = fs.Images(test, device, cache=True, workers=0).x
    evaluated = fs.logits_of(model, x, 64, 8).softmax(1)  # the evaluation's batches of 8
    res, _ = run_main(["--predict", *map(str, files), "--checkpoint", str(ckpt_path)])
    predicted = torch.tensor([res["probabilities"][str(f)] for f in files])
    fs.main(["--export", str(tmp_path / "m.pt2"), "--checkpoint", str(ckpt_path)])
    exported = torch.export.load(tmp_path / "m.pt2").module()(
        torch.stack([fs.pil_to_uint8(Image.open(f), 48) for f in files]))
    # float32 with other batch sizes and kernels (eager vs exported): ~1e-7 apart; a resize
    # done differently (48 -> 64 by PIL instead of on the device) moved them by 3.5e-3
    assert torch.allclose(predicted, evaluated, atol=1e-5)
    assert torch.allclose(exported.detach(), evaluated, atol=1e-5)


def test_export_runs_without_fer_supcon_and_matches_predict(tmp_path, arm_ckpt):
    paths = save_faces(tmp_path / "faces", 5)
    res = fs.main(["--export", str(tmp_path / "m.pt2"), "--checkpoint", str(arm_ckpt)])
    assert res["max_diff"] < 1e-5 and res["card"]["decode_size"] == 64  # eager vs exported
    predicted, _ = run_main(["--predict", str(tmp_path / "faces"), "--checkpoint", str(arm_ckpt)])
    script = f"""
import json, sys, numpy as np, torch
from PIL import Image
extra = {{"fer_supcon.json": ""}}
model = torch.export.load({str(tmp_path / 'm.pt2')!r}, extra_files=extra).module()
card = json.loads(extra["fer_supcon.json"])
S = card["decode_size"]
x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")
                 .resize((S, S), Image.BILINEAR)).copy()).permute(2, 0, 1) for p in sys.argv[1:]])
print(json.dumps(dict(probs=model(x).tolist(), classes=card["classes"],
                      imported="fer_supcon" in sys.modules)))
"""
    # a subprocess: an interpreter that has never imported fer_supcon
    r = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert not got["imported"] and got["classes"] == fs.RAFDB_CLASSES
    expected = [predicted["probabilities"][str(p)] for p in paths]
    assert np.allclose(got["probs"], expected, atol=1e-5)  # float32, other kernels


# ---- One-line errors ------------------------------------------------------------------------

@pytest.fixture
def bad_input(tmp_path, arm_ckpt):
    """The files the bad-input cases point at; returns a function from a case to its args."""
    (tmp_path / "empty").mkdir()
    for c in ("a", "b"):
        (tmp_path / "noimg" / "train" / c).mkdir(parents=True)
        (tmp_path / "noimg" / "test" / c).mkdir(parents=True)
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04garbage")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "fp" / "FER2013Test").mkdir(parents=True)
    Image.new("L", (48, 48)).save(tmp_path / "fp" / "FER2013Test" / "a.png")
    (tmp_path / "fp" / "FER2013Test" / "label.csv").write_text(
        'a.png,"(0, 0, 48, 48)",0,9,0,0,0,0,0,0,0,0\n')
    return lambda args: [a.format(tmp=tmp_path, ckpt=arm_ckpt) for a in args]


RAF_EMPTY = ["--data", "rafdb", "--root", "{tmp}/empty"]
BAD_INPUT = {  # case: (arguments, the message's key part)
    "rafdb root missing": (["--data", "rafdb", "--root", "{tmp}/nope"], "is not a folder"),
    "rafdb root wrong": (RAF_EMPTY, "list_patition_label.txt"),
    "affectnet root wrong": (["--data", "affectnet", "--root", "{tmp}/empty"],
                             "Manually_Annotated_file_lists"),
    "ferplus root wrong": (["--data", "ferplus", "--root", "{tmp}/empty"], "fer2013new.csv"),
    "imagefolder root wrong": (["--data", "imagefolder", "--root", "{tmp}/empty"],
                               "ROOT/train/<class>"),
    "no root": (["--data", "rafdb"], "needs --root"),
    "image size": (["--img-size", "48"], "at least 64"),
    "label noise": (["--label-noise", "1.0"], "expected a fraction in [0, 1)"),
    "batch size": (["--batch-size", "0"], "expected at least 1"),
    "momentum": (["--momentum", "1.5"], "expected a value in [0, 1]"),
    "folder without images": (["--data", "imagefolder", "--root", "{tmp}/noimg"], "no images"),
    "missing checkpoint": (["--eval", "{tmp}/none.pt"], "does not exist"),
    "truncated checkpoint": (["--eval", "{tmp}/truncated.pt"], "not a readable torch file"),
    "foreign checkpoint": (["--resume", "{tmp}/foreign.pt"], "not a fer_supcon checkpoint"),
    "unknown dataset": (["--data", "ckplus"], "invalid choice: 'ckplus'"),
    "train labels elsewhere": (["--train-labels", "x.txt"], "applies to --data rafdb only"),
    "classes elsewhere": (RAF_EMPTY + ["--classes", "7"], "applies to --data affectnet only"),
    "ferplus rule elsewhere": (["--ferplus-label", "argmax"], "applies to --data ferplus only"),
    "root with synthetic": (["--root", "{tmp}/empty"], "--root applies to --data rafdb |"),
    "noise and label file": (RAF_EMPTY + ["--train-labels", "x", "--label-noise", "0.2"],
                             "give one"),
    "arm-eval without ARM": (["--arm-eval", "batch"], "--arm-eval needs ARM"),
    "two commands": (["--eval", "{ckpt}", "--benchmark"], "give one command at a time"),
    "csv without predict": (["--csv", "x.csv"], "--csv applies to --predict only"),
    "predict without checkpoint": (["--predict", "x.jpg"], "needs --checkpoint"),
    "checkpoint missing": (["--predict", "{tmp}/bad.jpg", "--checkpoint", "{tmp}/no.pt"],
                           "does not exist"),
    "checkpoint does not fit": (["--eval", "{ckpt}", "--img-size", "96"],
                                "--img-size 96 (checkpoint: 64)"),
    "flag for another command": (["--eval", "{ckpt}", "--lr", "0.1"],
                                 "--lr does not apply to --eval"),
    "other classes": (["--eval", "{ckpt}", "--data", "ferplus", "--root", "{tmp}/fp"],
                      "has 7 classes"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_gives_one_line_and_exit_2(case, bad_input, capsys):
    args, message = BAD_INPUT[case]
    with pytest.raises(SystemExit) as e:
        fs.main(bad_input(args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("fer_supcon: error: ") and message in err


def test_corrupt_image_in_a_dataset_is_reported_with_its_path(tmp_path):
    write_rafdb(tmp_path / "raf")
    bad = tmp_path / "raf" / "Image" / "aligned" / "train_00004_aligned.jpg"
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    # a subprocess: the error is raised in a DataLoader worker and must arrive as one line
    r = run_cli(["--data", "rafdb", "--root", str(tmp_path / "raf"), "--img-size", "64",
                 "--pretrained", "none", "--batch-size", "2", "--epochs", "1", "--workers", "2",
                 "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"fer_supcon: error: cannot read image {bad}: "
                                             + r.stderr.split(f"{bad}: ")[1].strip()]
