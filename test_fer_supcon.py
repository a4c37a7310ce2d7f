"""Tests for fer_supcon.py, read as its specification: every vectorised formula against a naive
loop written from the paper, the wiring of one training step, the loaders on fixtures in the
published formats, and the command line end to end on tiny synthetic runs. No test needs a
training run to land a certain way: what must relabel is built so that it does.

    python -m pytest -q test_fer_supcon.py                  # all
    python -m pytest -q -m "not slow" test_fer_supcon.py    # the formulas and pieces: seconds
    python -m pytest -q -k "cuda or fake" test_fer_supcon.py

Devices: every test runs on the CPU (CPU and TINY's --device cpu below), except those named
`cuda` (skipped without a CUDA device) and those named `fake`, which run the CUDA code paths
on a fake CUDA device made of FakeTensors (shapes and devices, no data) on the CPU.

Float tolerances: the naive loops run in float64 (1e-9 relative: a few ulps of sums of ~20
terms); float32 results are compared at 1e-5 to 1e-6 (a few hundred float32 ulps of values of
order 1, far below anything a wrong formula gives). Comparisons of two code paths run on the
CPU in float32, so no TF32 enters them."""
import contextlib
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
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fer_supcon as fs

warnings.filterwarnings("ignore", "Unknown pytest.mark.slow", pytest.PytestUnknownMarkWarning)
slow = pytest.mark.slow  # end-to-end runs, fresh interpreters, variants: `-m "not slow"` skips them
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HERE = Path(__file__).parent
CPU = torch.device("cpu")  # where every test but the cuda and fake ones runs
TINY = ["--data", "synthetic", "--synthetic-train", "96", "--synthetic-test", "32",
        "--img-size", "64", "--batch-size", "16", "--workers", "0", "--log-every", "0",
        "--device", "cpu"]
FLOAT32 = fs.autocast(CPU)  # the step's precision on the CPU: plain float32


# ---- helpers ------------------------------------------------------------------------------

def unit_vectors(n, d, seed):
    """n random L2-normalised float64 vectors of size d."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)


def run_cli(args, **kw):
    """The command line in a subprocess: for what one process cannot do to itself (a signal,
    a crash, a worker's traceback, an interpreter that never imported fer_supcon)."""
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
    """fs.main in this process: (its result, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = fs.main(args)
    return res, out.getvalue()


def saved_weights(path):
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


def fill_queue(net, classes=7):
    """Fill the network's queue with random unit keys of every class (CUEM then runs)."""
    K, D = net.queue.feats.shape
    device = net.queue.feats.device
    net.queue.enqueue(F.normalize(torch.randn(K, D, device=device), dim=1),
                      torch.arange(K, device=device) % classes)


def small_network(B=8, C=7, size=32, K=16, arm=False):
    """A seeded network (GAP head unless arm), its Adam, a float batch (B, 3, S, S), labels;
    32 px: the smallest input the GAP head takes, so the step's wiring is checked in a blink."""
    torch.manual_seed(0)
    net = fs.FERSupCon(C, size, queue_size=K, arm=arm)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    return net, opt, torch.randn(B, 3, size, size), torch.randint(0, C, (B,))


def take_step(net, opt, x, y, **overrides):
    """One train_step on views x and x flipped: lambda 0.5, m 0.99, CUEM on, float32."""
    options = dict(lam=0.5, m=0.99, tau=0.1, theta=0.1, use_cuem=True, amp=FLOAT32) | overrides
    return fs.train_step(net, opt, x, x.flip(-1), y, **options)


# ---- Eq. (2): supervised contrastive loss --------------------------------------------------

def naive_supcon(q, q_labels, keys, key_labels, tau, reduction="mean"):
    """Eq. (2) literally: for each anchor i with positives P(i), the mean over p of
    -log(exp(s_ip) / (exp(s_ip) + sum_{a in A(i)} exp(s_ia))); then the sum over the anchors
    with a positive (Eq. 2 as written), or its mean (SupContrast)."""
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
    if reduction == "sum":
        return sum(per_anchor)
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", range(5))
def test_supcon_matches_naive_eq2_on_random_inputs(seed, reduction):
    gen = torch.Generator().manual_seed(seed)
    q, keys = unit_vectors(6, 8, seed), unit_vectors(20, 8, seed + 100)
    q_labels = torch.randint(0, 4, (6,), generator=gen)
    key_labels = torch.randint(-1, 4, (20,), generator=gen)  # -1: empty slots
    got = fs.supcon_loss(q, q_labels, keys, key_labels, tau=0.1, reduction=reduction)
    expected = naive_supcon(q, q_labels, keys, key_labels, 0.1, reduction)
    assert got.item() == pytest.approx(expected, rel=1e-9)


EDGE_LABELS = {  # case: (query labels, key labels)
    "empty_slots": ([0, 1, 2, 0], [-1] * 10),
    "class_missing": ([3, 3, 0, 1], [0, 1, 1, 0, 2, -1, -1, 1, 0, 2]),  # 3 is not in the queue
    "no_negatives": ([1, 1, 1, 1], [1] * 8 + [-1, -1]),
    "no_positives": ([5, 6, 5, 6], [0, 1, 1, 0, 2, -1, -1, 1, 0, 2]),
    "all_agree": ([1, 1, 1, 1], [0, 1, 1, 0, 2, -1, -1, 1, 0, 2]),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", EDGE_LABELS)
def test_supcon_edge_cases_match_naive_eq2(case, reduction):
    q, keys = unit_vectors(4, 8, 1), unit_vectors(10, 8, 2)
    q_labels, key_labels = (torch.tensor(v) for v in EDGE_LABELS[case])
    loss = fs.supcon_loss(q, q_labels, keys, key_labels, tau=0.1, reduction=reduction)
    expected = naive_supcon(q, q_labels, keys, key_labels, 0.1, reduction)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("case", EDGE_LABELS)
def test_supcon_edge_cases_have_finite_gradients(case):
    q, keys = unit_vectors(4, 8, 1).requires_grad_(), unit_vectors(10, 8, 2)
    q_labels, key_labels = (torch.tensor(v) for v in EDGE_LABELS[case])
    fs.supcon_loss(q, q_labels, keys, key_labels, tau=0.1).backward()  # 0 stays in the graph
    assert torch.isfinite(q.grad).all()


def test_supcon_other_positives_are_not_in_the_denominator():
    # one anchor, two identical positives, one negative: each l_ip sees only {p} + A
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = fs.supcon_loss(q, torch.tensor([0]), keys, torch.tensor([0, 0, 1]), tau=1.0)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1.0)))


# ---- CUEM (Sec. II-B) ---------------------------------------------------------------------

def naive_cuem(q, labels, queue, queue_labels, num_classes, theta):
    """Fig. 3 per sample and class: S_c = the mean cosine similarity to the queue entries of c;
    u = max_c S_c - S_label; relabel where u > theta."""
    new, us = [], []
    for i in range(len(labels)):
        S = {}
        for c in range(num_classes):
            members = [j for j in range(len(queue)) if queue_labels[j] == c]
            if members:
                S[c] = sum(float(F.cosine_similarity(q[i], queue[j], dim=0))
                           for j in members) / len(members)
        y = int(labels[i])
        if y not in S:
            new.append(y)
            us.append(0.0)
            continue
        c_max = max(S, key=S.get)
        us.append(S[c_max] - S[y])
        new.append(c_max if S[c_max] - S[y] > theta else y)
    return new, us


@pytest.mark.parametrize("seed", range(4))
def test_cuem_matches_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    q = unit_vectors(12, 6, seed + 10)
    queue = unit_vectors(40, 6, seed + 7)
    labels = torch.randint(0, 5, (12,), generator=gen)
    queue_labels = torch.randint(-1, 4, (40,), generator=gen)  # class 4 never in it; -1 empty
    new, u = fs.cuem(q, labels, queue, queue_labels, 5, theta=0.05)
    ref_new, ref_u = naive_cuem(q, labels, queue, queue_labels, 5, 0.05)
    assert new.tolist() == ref_new
    assert u.tolist() == pytest.approx(ref_u, abs=1e-6)  # float32: ~10 ulps of mean cosines


def two_class_queue_and_queries(degrees):
    """A queue of one key per class, (1, 0) and (0, 1), and queries at these angles, all
    labelled 1: u = cos(d) - sin(d)."""
    q = torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])
    return q, torch.ones(len(degrees), dtype=torch.int64), torch.eye(2), torch.tensor([0, 1])


def test_cuem_relabels_only_past_theta():
    q, labels, queue, queue_labels = two_class_queue_and_queries([40, 30, 45])  # u .12 .37 0
    new, _ = fs.cuem(q, labels, queue, queue_labels, 2, theta=0.2)
    assert new.tolist() == [1, 0, 1]


def test_cuem_keeps_the_label_at_u_exactly_theta():
    # "If u is higher than a preset threshold": theta = u itself keeps the label, the float32
    # just below it relabels (the same arithmetic both times, so u is exactly that float;
    # theta meets the float32 u as a float32)
    q, labels, queue, queue_labels = two_class_queue_and_queries([30])
    u = fs.cuem(q, labels, queue, queue_labels, 2, theta=0.0)[1].item()
    kept, _ = fs.cuem(q, labels, queue, queue_labels, 2, theta=u)
    below = float(np.nextafter(np.float32(u), np.float32(-np.inf)))
    moved, _ = fs.cuem(q, labels, queue, queue_labels, 2, theta=below)
    assert (kept.tolist(), moved.tolist()) == ([1], [0])


def test_cuem_keeps_the_label_when_its_class_is_absent_from_the_queue():
    q = unit_vectors(3, 4, 0)
    new, u = fs.cuem(q, torch.tensor([2, 2, 2]), unit_vectors(5, 4, 1),
                     torch.tensor([0, 1, 0, 1, -1]), 3)
    assert new.tolist() == [2, 2, 2] and u.abs().max() == 0


def test_cuem_keeps_every_label_on_an_empty_queue():
    new, u = fs.cuem(unit_vectors(3, 4, 0), torch.tensor([0, 1, 2]), torch.zeros(5, 4),
                     torch.full((5,), -1), 3)
    assert new.tolist() == [0, 1, 2] and u.abs().max() == 0


# ---- One training step: Eq. (1), (3), Sec. II-A, II-B ------------------------------------

def test_step_loss_is_eq3():
    net, opt, x, y = small_network()
    fill_queue(net)  # L_sup > 0
    out = take_step(net, opt, x, y, theta=10.0)
    assert torch.equal(out.loss, out.ce + 0.5 * out.supcon) and out.supcon > 0


def test_step_enqueues_its_keys_with_the_annotation():
    net, opt, x, y = small_network()
    fill_queue(net)
    take_step(net, opt, x, y, theta=10.0)  # u <= 2 < theta: nothing relabelled
    assert torch.equal(net.queue.labels[:8], y)


@pytest.fixture
def step_spy(monkeypatch):
    """What Eq. (2) and CUEM receive (copied at the call), and CUEM made to relabel every
    sample to the next class."""
    seen = dict(anchors=[], cuem_q=[], supcon_keys=[], cuem_keys=[])
    real_supcon = fs.supcon_loss
    def cuem(q, labels, queue, queue_labels, *args):
        seen["cuem_q"].append(q)
        seen["cuem_keys"].append((queue.clone(), queue_labels.clone()))
        return (labels + 1) % 7, torch.ones(len(labels))
    def supcon(q, q_labels, keys, key_labels, *args):
        seen["anchors"].append(q_labels)
        seen["supcon_keys"].append((keys.clone(), key_labels.clone()))
        return real_supcon(q, q_labels, keys, key_labels, *args)
    monkeypatch.setattr(fs, "cuem", cuem)
    monkeypatch.setattr(fs, "supcon_loss", supcon)
    return seen


@pytest.mark.parametrize("reader", ["supcon_keys", "cuem_keys"])
def test_contrast_set_is_the_queue_before_this_steps_keys(step_spy, reader):
    net, opt, x, y = small_network(K=24)
    fill_queue(net)
    before = net.queue.feats.clone(), net.queue.labels.clone()
    take_step(net, opt, x, y)
    keys, key_labels = step_spy[reader][0]
    assert torch.equal(keys, before[0]) and torch.equal(key_labels, before[1])


def test_cross_entropy_uses_cuems_labels(step_spy):
    net, opt, x, y = small_network()
    fill_queue(net)
    with torch.no_grad():  # the same weights and input: the step's forward pass
        logits = net.classifier(net.encoder_q(x)[0])
    out = take_step(net, opt, x, y)
    # float32, the same operations on the same inputs: equal up to summation order
    assert out.ce.item() == pytest.approx(F.cross_entropy(logits, (y + 1) % 7).item(), rel=1e-5)


def test_queue_keeps_the_annotation_when_cuem_relabels(step_spy):
    net, opt, x, y = small_network()
    fill_queue(net)
    take_step(net, opt, x, y)
    assert torch.equal(net.queue.labels[:8], y)


@pytest.mark.parametrize("skip", [False, True])
def test_anchors_are_every_sample_with_its_annotation_unless_skipped(step_spy, skip):
    net, opt, x, y = small_network()
    fill_queue(net)
    take_step(net, opt, x, y, skip_relabelled_anchors=skip)
    assert torch.equal(step_spy["anchors"][0], torch.full_like(y, -1) if skip else y)


def test_cuem_reads_the_query_view_alone(step_spy):  # Fig. 3: S_cos from z^q
    net, opt, x, y = small_network()
    fill_queue(net)
    with torch.no_grad():
        z_q = net.encoder_q(x)[1]  # the same weights and input: the step's z_q
    take_step(net, opt, x, y)
    # float32, the same operations on the same inputs
    assert torch.allclose(step_spy["cuem_q"][0], z_q, atol=1e-6)


def test_cuem_never_back_propagates(step_spy):
    net, opt, x, y = small_network()
    fill_queue(net)
    take_step(net, opt, x, y)
    assert not step_spy["cuem_q"][0].requires_grad


def test_momentum_update_happens_before_the_keys_are_computed():
    net, opt, x, y = small_network()
    fill_queue(net)
    with torch.no_grad():  # the query encoder is not yet the key encoder's copy: m matters
        for p in net.encoder_q.parameters():
            p.add_(0.01)
        expected = {n: 0.5 * k + 0.5 * q for (n, k), q in
                    zip(net.encoder_k.named_parameters(), net.encoder_q.parameters())}
    seen = {}
    net.encoder_k.register_forward_pre_hook(
        lambda module, args: seen.update({n: p.clone() for n, p in module.named_parameters()}))
    take_step(net, opt, x, y, m=0.5)
    # float32 lerp against 0.5 k + 0.5 q: a few ulps
    assert all(torch.allclose(seen[n], expected[n], atol=1e-6) for n in expected)


def test_the_baseline_step_has_no_key_branch():
    net, opt, x, y = small_network()
    calls = []
    net.encoder_k.register_forward_pre_hook(lambda module, args: calls.append(1))
    k0 = [p.clone() for p in net.encoder_k.parameters()]
    out = fs.train_step(net, opt, x, None, y, lam=0.0, m=0.5, tau=0.1, theta=-1.0,
                        use_cuem=False, amp=FLOAT32)
    assert calls == [] and (net.queue.labels == -1).all() and out.supcon.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(k0, net.encoder_k.parameters()))


def test_cuem_waits_for_a_full_queue():
    net, opt, x, y = small_network()  # an empty queue of 16 slots, a batch of 8
    out = take_step(net, opt, x, y, theta=-1.0)  # theta < 0 would relabel anything it saw
    assert not out.cuem_ran and torch.equal(out.y_fer, y)


def test_l_sup_gradient_reaches_the_projection_head_only_through_lambda():
    grads = []
    for lam in (0.0, 0.5):
        net, opt, x, y = small_network()
        fill_queue(net)
        opt.param_groups[0]["lr"] = 0.0  # keep the weights; look at the gradients only
        take_step(net, opt, x, y, lam=lam, use_cuem=False)
        grad = net.encoder_q.head[-1].weight.grad  # the head feeds z_q only
        grads.append(0.0 if grad is None else grad.abs().max().item())
    assert grads[0] == 0.0 and grads[1] > 0


def test_the_trunk_gets_l_fer_plus_lambda_l_sup():
    grads = []
    for lam in (0.0, 0.5):
        net, opt, x, y = small_network()
        fill_queue(net)
        opt.param_groups[0]["lr"] = 0.0
        take_step(net, opt, x, y, lam=lam, use_cuem=False)
        grads.append(net.encoder_q.trunk.conv1.weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])


# ---- Eq. (4), the queue, the momentum encoder, the run's sizes ----------------------------

def test_loss_weight_follows_eq4():
    assert fs.loss_weight(1) == pytest.approx(1 - 1 / 30)
    assert fs.loss_weight(15) == pytest.approx(0.5)
    assert fs.loss_weight(30) == 0.0  # as written: lambda(alpha) = 0
    assert fs.loss_weight(31) == 1e-4 and fs.loss_weight(100) == 1e-4
    assert fs.loss_weight(5, alpha=20, beta=0.1) == pytest.approx(0.75)


def test_loss_weight_counts_epochs_from_1():
    with pytest.raises(ValueError):
        fs.loss_weight(0)


@pytest.mark.parametrize("flags,epoch,plan", [
    (dict(cuem_start=3), 2, (1 - 2 / 30, False)),
    (dict(cuem_start=3), 3, (1 - 3 / 30, True)),
    (dict(cuem_start=3, cuem=False), 3, (1 - 3 / 30, False)),
    (dict(cuem_start=3, scl=False), 3, (0.0, True)),
])
def test_epoch_plan_gives_lambda_and_whether_cuem_runs(flags, epoch, plan):
    lam, use_cuem = fs.epoch_plan(epoch, fs.Config(**flags))
    assert (lam, use_cuem) == (pytest.approx(plan[0]), plan[1])


def test_queue_wraps_around():
    Q = fs.LabeledQueue(5, 2)
    for step in range(3):  # 3 batches of 2 into 5 slots: the third wraps
        Q.enqueue(torch.full((2, 2), float(step)), torch.tensor([step, step]))
    assert Q.labels.tolist() == [2, 0, 1, 1, 2] and Q.feats[:, 0].tolist() == [2, 0, 1, 1, 2]
    assert int(Q.ptr) == 1 and Q.is_full()


def test_queue_keeps_the_last_k_of_a_batch_larger_than_k():
    Q = fs.LabeledQueue(3, 1)
    Q.enqueue(torch.arange(5.0)[:, None], torch.arange(5))
    Q.enqueue(torch.tensor([[9.0]]), torch.tensor([9]))  # overwrites the oldest (2)
    assert sorted(Q.labels.tolist()) == [3, 4, 9]
    assert all(Q.feats[i, 0] == Q.labels[i] for i in range(3))


def bn_pair():
    """Two Linear + BatchNorm modules with different weights; the first has running stats."""
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    q(torch.randn(8, 3))
    return q, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_momentum_update_matches_a_naive_loop():
    q, k = bn_pair()
    k0 = {n: p.clone() for n, p in k.named_parameters()}
    fs.momentum_update(q, k, 0.7)
    for (n, p_k), p_q in zip(k.named_parameters(), q.parameters()):
        assert torch.allclose(p_k, 0.7 * k0[n] + 0.3 * p_q, atol=1e-6)  # float32 lerp: ~10 ulps


def test_momentum_update_leaves_buffers_alone():  # MoCo updates parameters only
    q, k = bn_pair()
    fs.momentum_update(q, k, 0.7)
    assert torch.equal(k[1].running_mean, torch.zeros(4))


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_update_m0_copies_m1_freezes(m):
    q, k = bn_pair()
    k0 = [p.clone() for p in k.parameters()]
    fs.momentum_update(q, k, m)
    expected = list(q.parameters()) if m == 0 else k0
    assert all(torch.equal(a, b) for a, b in zip(k.parameters(), expected))


@pytest.mark.parametrize("target", [
    nn.Linear(3, 5),  # another shape
    nn.Sequential(nn.Linear(3, 4)),  # other names
])
def test_momentum_update_refuses_modules_that_do_not_match(target):
    with pytest.raises(ValueError):
        fs.momentum_update(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), target, 0.9)


def test_key_momentum_is_one_minus_batch_over_queue():
    assert fs.key_momentum(256, 8192) == pytest.approx(0.96875)


@pytest.mark.parametrize("n_train,K", [(12271, 8192), (1437, 1408)])  # RAF-DB; 22 batches
def test_queue_slots_are_capped_at_the_whole_batches_of_the_training_set(n_train, K):
    assert fs.queue_slots(8192, 64 if n_train < 8192 else 256, n_train) == K


@pytest.mark.parametrize("n,batch,trained", [(12271, 256, 12271), (100, 16, 100),
                                             (97, 16, 96), (96, 16, 96)])
def test_an_epoch_trains_its_partial_batch_but_never_a_single_image(n, batch, trained):
    assert fs.trained_images(n, batch) == trained


# ---- Pieces that copy alone ----------------------------------------------------------------

PASTE_HEADER = "import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"


def paste(obj):
    """The source of `obj` alone in a fresh namespace that has only math, torch, nn and F."""
    ns = {}
    exec(PASTE_HEADER + inspect.getsource(obj), ns)
    return ns[obj.__name__]


def results_equal(a, b):
    if isinstance(a, tuple):
        return all(results_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def queue_inputs():
    gen = torch.Generator().manual_seed(0)
    q, keys = unit_vectors(6, 8, 0).float(), unit_vectors(20, 8, 1).float()
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
    assert results_equal(PIECES[name](paste(getattr(fs, name))), PIECES[name](getattr(fs, name)))


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
    assert results_equal(a, call(module))


@pytest.mark.parametrize("name,call", [
    ("supcon_loss", lambda f: f(unit_vectors(2, 4, 0), torch.tensor([0, 1]), unit_vectors(3, 5, 1),
                                torch.tensor([0, 1, 1]))),
    ("supcon_loss", lambda f: f(unit_vectors(2, 4, 0), torch.tensor([0, 1]), unit_vectors(3, 4, 1),
                                torch.tensor([0, 1, 1]), tau=0)),
    ("supcon_loss", lambda f: f(unit_vectors(2, 4, 0), torch.tensor([0, 1]), unit_vectors(3, 4, 1),
                                torch.tensor([0, 1, 1]), reduction="max")),
    ("cuem", lambda f: f(unit_vectors(2, 4, 0), torch.tensor([0]), unit_vectors(3, 4, 1),
                         torch.tensor([0, 1, 1]), 2)),
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


def readme_section(title):
    text = (HERE / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_pieces_the_readme_lists_use_public_torch_apis_only():
    listed = readme_section("Using the pieces").split("```")[0].split(" each run ")[0]
    names = re.findall(r"`(\w+)`", listed)
    assert set(names) >= {"supcon_loss", "cuem", "momentum_update", "ARM"}, names
    for name in names:  # torch._foreach_lerp_, F._canonical_mask, ...: internals that may change
        source = inspect.getsource(getattr(fs, name))
        private = re.findall(r"\b(?:torch|nn|F)(?:\.\w+)*\._\w+", source)
        assert not private, (name, private)


@slow  # a fresh interpreter
def test_readme_snippet_prints_what_the_readme_says():
    section = readme_section("Using the pieces")
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    quoted = re.search(r"It prints `([^`]+)`", section).group(1)
    # a clean interpreter in the repository, importing fer_supcon as a user would
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip()
    assert re.sub(r"[\d.]+", "#", printed) == re.sub(r"[\d.]+", "#", quoted)
    # the numbers as printed (4 decimals): float32 sums in another order on another x86-64
    # CPU move them by ~1e-6, so they may differ in the last printed digit at most
    numbers = [float(v) for v in re.findall(r"\d+\.\d+|\d+", printed)]
    expected = [float(v) for v in re.findall(r"\d+\.\d+|\d+", quoted)]
    assert numbers == pytest.approx(expected, abs=1.5e-4)


# ---- ARM, the network, the two test protocols ----------------------------------------------

@pytest.mark.parametrize("img,side", [(96, 3), (112, 5), (224, 11)])
def test_arm_output_side_follows_the_input_side(img, side):
    s, o = fs.ARM.sides(img)
    arm = fs.ARM(7, img)
    assert o == side and arm(torch.randn(4, 512, s, s)).shape == (4, 7)
    assert arm.fc.in_features == side * side


def test_arm_has_the_official_modules():
    names = {n for n, _ in fs.ARM(7, 224).named_parameters()}
    assert names == {"de_albino.weight", "bn.weight", "bn.bias", "affinity_weight", "fc.weight",
                     "fc.bias"}


def naive_arm(arm, f, g=None):
    """The official module read by hand: channel 256c+16i+j at (h, w) -> map c, pixel
    (16h+i, 16w+j); one shared de-albino kernel per map; BatchNorm; mean over the maps plus
    alpha times g (the batch's mean map unless given); fc."""
    x = torch.zeros(len(f), 2, 16 * f.shape[2], 16 * f.shape[3])
    for c in range(2):
        for i in range(16):
            for j in range(16):
                x[:, c, i::16, j::16] = f[:, 256 * c + 16 * i + j]
    y = arm.bn(torch.cat([arm.de_albino(x[:, c:c + 1]) for c in range(2)], 1))
    z = y.mean(1) + arm.affinity_weight * (y.mean((0, 1)) if g is None else g)
    return arm.fc(z.flatten(1))


def test_arm_matches_a_naive_reading_of_the_official_module():
    torch.manual_seed(0)
    arm, f = fs.ARM(7, 112), torch.randn(3, 512, 4, 4)
    assert torch.allclose(arm(f), naive_arm(arm, f), atol=1e-5)  # another summation order


def trained_arm():
    """An ARM in eval mode whose running statistics and running g were filled in training."""
    torch.manual_seed(0)
    arm = fs.ARM(7, 96).train()
    for _ in range(5):
        arm(torch.randn(8, 512, 3, 3) + 1.0)
    return arm.eval()


def test_arm_running_g_makes_an_answer_independent_of_its_batch():
    arm, f = trained_arm(), torch.randn(8, 512, 3, 3)
    alone = torch.cat([arm(f[i:i + 1]) for i in range(8)])
    assert torch.allclose(arm(f), alone, atol=1e-5)  # float32, another summation order


def test_arm_official_test_time_g_depends_on_the_batch():
    arm, f = trained_arm(), torch.randn(8, 512, 3, 3)
    assert not torch.allclose(arm(f, batch_g=True)[:4], arm(f[:4], batch_g=True), atol=1e-3)


def test_arm_rejects_an_input_side_under_64():
    with pytest.raises(ValueError, match="at least 64"):
        fs.ARM.sides(60)


@pytest.fixture(scope="module")
def arm_network_and_test_images():
    """A seeded ARM network (statistics from 2 training batches) and 70 uint8 test images:
    batches of 64 and 6 under the official protocol."""
    torch.manual_seed(0)
    net = fs.FERSupCon(7, 64, queue_size=16, arm=True)
    x = torch.randint(0, 256, (70, 3, 64, 64), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for b in range(2):
            net(fs.eval_transform(x[35 * b:35 * b + 35], 64))
    return net.eval(), x


def test_official_protocol_is_g_from_each_test_batch_of_64_in_file_order(
        arm_network_and_test_images):
    net, x = arm_network_and_test_images
    logits = fs.logits_of(net, x, 64, 64)["official"]
    with torch.no_grad():  # the hand-written loop: batches of 64 in file order, the last kept
        expected = torch.cat([naive_arm(net.classifier,
                                        net.encoder_q.trunk(fs.eval_transform(x[i:i + 64], 64)))
                              for i in range(0, 70, 64)])
    assert torch.allclose(logits, expected, atol=1e-4)  # float32 of two orders of summation


def test_batch_independent_protocol_is_arms_running_g(arm_network_and_test_images):
    net, x = arm_network_and_test_images
    logits = fs.logits_of(net, x, 64, 64)["batch_independent"]
    with torch.no_grad():
        f = net.encoder_q.trunk(fs.eval_transform(x, 64))
        expected = naive_arm(net.classifier, f, g=net.classifier.running_g)
    assert torch.allclose(logits, expected, atol=1e-4)  # float32 of two orders of summation


def test_evaluate_counts_both_protocols_in_one_confusion_matrix_each(
        arm_network_and_test_images):
    net, x = arm_network_and_test_images
    y = torch.arange(70) % 7
    conf = fs.evaluate(net, fs.Images(None, CPU, "device", 0, x=x), y, 64, 64, 7)
    logits = fs.logits_of(net, x, 64, 64)
    for name in ("official", "batch_independent"):
        expected = torch.zeros(7, 7, dtype=torch.int64)
        for t, p in zip(y.tolist(), logits[name].argmax(1).tolist()):
            expected[t, p] += 1
        assert torch.equal(conf[name], expected), name


def test_projection_head_is_three_linear_layers_with_batchnorm_after_the_hidden_two():
    layers = [type(m).__name__ for m in fs.projection_head(128)]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_projection_head_without_batchnorm_is_moco_v2s_mlp_grown_to_three_layers():
    layers = [type(m).__name__ for m in fs.projection_head(128, batch_norm=False)]
    assert layers == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_key_encoder_starts_as_a_copy_without_gradients():
    net = fs.FERSupCon(7, 96, queue_size=8)
    assert all(torch.equal(a, b) for a, b in zip(net.encoder_q.state_dict().values(),
                                                 net.encoder_k.state_dict().values()))
    assert not any(p.requires_grad for p in net.encoder_k.parameters())


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    import torchvision
    ref = torchvision.models.resnet18()
    return ref, tmp_path_factory.mktemp("weights")


def test_pretrained_path_loads_a_state_dict_under_module_prefixes(resnet_weights):
    ref, folder = resnet_weights
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": sd}, folder / "ok.pth")
    trunk = fs.build_trunk(str(folder / "ok.pth"))
    assert torch.equal(trunk.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_pretrained_path_loads_files_older_than_batchnorm_counts(resnet_weights):
    ref, folder = resnet_weights  # PyTorch < 0.4.1 saved no num_batches_tracked
    old = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, folder / "old.pth")
    assert torch.equal(fs.build_trunk(str(folder / "old.pth")).bn1.running_var,
                       ref.bn1.running_var)


@pytest.mark.parametrize("change,message", [("missing", "1 missing"), ("unused", "1 unused")])
def test_pretrained_path_fails_loudly_on_a_missing_or_unused_tensor(resnet_weights, change,
                                                                   message):
    ref, folder = resnet_weights
    sd = dict(ref.state_dict())
    if change == "missing":
        del sd["layer3.0.conv1.weight"]
    else:
        sd["feature.weight"] = torch.zeros(3)
    torch.save(sd, folder / f"{change}.pth")
    with pytest.raises(fs.UserError, match=message):
        fs.build_trunk(str(folder / f"{change}.pth"))


# ---- Augmentation: ARM's recipe -------------------------------------------------------------

def classify_views(x, views):
    """For each view of the same uint8 image x (3, S, S): 'flip', 'noise', 'none' or 'other',
    judged on its pixels outside the erased rectangle (exact zeros: no pixel of x normalises
    to 0), and the erased share of the image."""
    S = x.shape[-1]
    plain, flipped = fs.eval_transform(x[None], S)[0], fs.eval_transform(x.flip(-1)[None], S)[0]
    kinds, erased = [], []
    for v in views:
        kept = (v != 0).any(0)  # (S, S)
        erased.append(1 - kept.double().mean().item())
        if torch.equal(v[:, kept], flipped[:, kept]):
            kinds.append("flip")
        elif torch.equal(v[:, kept], plain[:, kept]):
            kinds.append("none")
        elif (v[:, kept] - plain[:, kept]).abs().max() < 40 / 58:  # noise: std 5.5 of 255
            kinds.append("noise")  # (58: ImageNet's smallest std on the 0..255 scale)
        else:
            kinds.append("other")
    return kinds, erased


@pytest.fixture(scope="module")
def arm_views():
    """4,000 views of one left-right asymmetric image (its pixels 40..215: none normalises to
    0), drawn by ARM's recipe from a seeded generator."""
    x = (40 + torch.arange(3 * 24 * 24) % 176).view(3, 24, 24).to(torch.uint8)
    views = fs.arm_augment(x[None].expand(4000, -1, -1, -1), 24,
                           torch.Generator().manual_seed(0))
    return classify_views(x, views)


def test_arm_augment_flips_or_adds_noise_never_both(arm_views):
    assert "other" not in arm_views[0]


@pytest.mark.parametrize("kind,share", [("flip", 0.25), ("noise", 0.25), ("none", 0.5)])
def test_arm_augment_flips_a_quarter_adds_noise_to_a_quarter(arm_views, kind, share):
    # 4,000 draws: the standard deviation of a share near 0.25-0.5 is <= 0.008; 0.03 is ~4 sd
    assert arm_views[0].count(kind) / 4000 == pytest.approx(share, abs=0.03)


def test_arm_augment_erases_half_of_the_views(arm_views):
    erased = [e > 0 for e in arm_views[1]]
    assert sum(erased) / 4000 == pytest.approx(0.5, abs=0.03)  # 4,000 draws: ~4 sd


def test_arm_augment_erases_a_tenth_of_the_image_at_most():
    x = torch.full((500, 3, 100, 100), 200, dtype=torch.uint8)  # no noise changes a pixel to 0
    views = fs.arm_augment(x, 100, torch.Generator().manual_seed(1))
    areas = [(v == 0).all(0).double().mean().item() for v in views]
    # torchvision's area U(0.02, 0.1) of 100 x 100, sides rounded to whole pixels: at most
    # 0.5 (57 + 17) + 0.25 = 37 pixels off, 0.0037 of the image
    assert all(0.02 - 0.0037 <= a <= 0.1 + 0.0037 for a in areas if a > 0)


def test_arm_augment_erases_rectangles():
    x = torch.full((200, 3, 40, 40), 200, dtype=torch.uint8)
    for v in fs.arm_augment(x, 40, torch.Generator().manual_seed(2)):
        zero = (v == 0).all(0)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        if len(rows):
            assert zero.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_arm_augment_adds_the_noise_before_the_resize():
    # noise drawn at the decoded size (16 px), then resized to 64: neighbouring output pixels
    # share their noise; drawn after the resize it would be independent per pixel
    x = torch.full((400, 3, 16, 16), 128, dtype=torch.uint8)
    views = fs.arm_augment(x, 64, torch.Generator().manual_seed(3))
    plain = fs.eval_transform(x[:1], 64)[0]
    noisy = [v - plain for v in views if (v - plain).abs().max() > 0 and (v != 0).all()]
    d = torch.stack(noisy)[:, 0]  # (n, 64, 64): red channel of views with noise, unerased
    corr = F.cosine_similarity((d[:, :, 1:] - d.mean()).flatten(1),
                               (d[:, :, :-1] - d.mean()).flatten(1)).mean()
    assert len(noisy) > 20 and corr > 0.5  # bilinear x4: ~0.9; independent noise: ~0


def test_two_views_are_independent_draws_repeatable_from_the_seed():
    x = torch.randint(0, 256, (6, 3, 50, 50), dtype=torch.uint8)
    cfg = fs.Config(img_size=64)
    q1, k1 = fs.two_views(x, cfg, 1, 0, keys=True)
    q2, k2 = fs.two_views(x, cfg, 1, 0, keys=True)
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and not torch.equal(q1, k1)


def test_affine_augment_keeps_shape_and_repeats_from_the_seed():
    x = torch.randint(0, 256, (6, 3, 50, 50), dtype=torch.uint8)
    a = fs.affine_augment(x, 64, torch.Generator().manual_seed(3))
    b = fs.affine_augment(x, 64, torch.Generator().manual_seed(3))
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32 and torch.equal(a, b)


# ---- Data ----------------------------------------------------------------------------------

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


def test_rafdb_loader_splits_by_prefix_and_maps_labels_1_to_7_to_0_to_6(tmp_path):
    write_rafdb(tmp_path)
    train = fs.load_dataset("rafdb", tmp_path, "train", 24)
    test = fs.load_dataset("rafdb", tmp_path, "test", 24)
    assert train.labels.tolist() == [i % 7 for i in range(1, 7)]
    assert test.labels.tolist() == [(i + 3) % 7 for i in range(1, 4)]


def test_rafdb_items_are_uint8_images_label_and_index(tmp_path):
    write_rafdb(tmp_path)
    img, label, index = fs.load_dataset("rafdb", tmp_path, "train", 24)[2]
    assert img.shape == (3, 24, 24) and img.dtype == torch.uint8 and (label, index) == (3, 2)
    assert img[0, 0, 0] == 40  # the third file's red value


def test_rafdb_train_labels_file_replaces_the_training_labels(tmp_path):
    write_rafdb(tmp_path)
    noisy = tmp_path / "noise01.txt"
    labels = [2, 7, 4, 5, 6, 7]  # train_00002: 3 in the official file
    noisy.write_text("\n".join(f"train_{i:05d}.jpg {y}" for i, y in enumerate(labels, 1)) + "\n")
    train = fs.load_dataset("rafdb", tmp_path, "train", 24, train_labels=str(noisy))
    assert train.labels.tolist() == [1, 6, 3, 4, 5, 6]
    assert train.true_labels.tolist() == [1, 2, 3, 4, 5, 6]  # the official labels: the truth


def test_rafdb_train_labels_file_must_list_every_training_image(tmp_path):
    write_rafdb(tmp_path)
    (tmp_path / "noise01.txt").write_text("train_00001.jpg 1")
    with pytest.raises(fs.UserError, match="5 missing"):
        fs.load_dataset("rafdb", tmp_path, "train", 24, train_labels=str(tmp_path / "noise01.txt"))


def test_rafdb_names_a_missing_image(tmp_path):
    write_rafdb(tmp_path)
    missing = tmp_path / "Image" / "aligned" / "train_00003_aligned.jpg"
    missing.unlink()
    _, unreadable = fs.decode_all(fs.load_dataset("rafdb", tmp_path, "train", 24), 0)
    assert len(unreadable) == 1 and unreadable[0].startswith(f"cannot read image {missing}: ")


def test_rafdb_names_a_malformed_label_line(tmp_path):
    write_rafdb(tmp_path)
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 9")
    with pytest.raises(fs.UserError, match=r"list_patition_label.txt:1: expected"):
        fs.load_dataset("rafdb", tmp_path, "train", 24)


def test_imagefolder_loader_reads_sorted_class_folders_and_val_as_test(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("happy", "angry"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (20, 20), 9).save(tmp_path / split / c / f"{i}.png")
    train, test = (fs.load_dataset("imagefolder", tmp_path, s, 16) for s in ("train", "test"))
    assert train.classes == ["angry", "happy"] and (len(train), len(test)) == (6, 4)


def test_grayscale_images_become_three_channels(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a").mkdir(parents=True)
    Image.new("L", (20, 20), 9).save(tmp_path / "train" / "a" / "0.png")
    Image.new("L", (20, 20), 9).save(tmp_path / "test" / "a" / "0.png")
    assert fs.load_dataset("imagefolder", tmp_path, "train", 16)[0][0].shape == (3, 16, 16)


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


def test_affectnet_csv_layout_drops_codes_8_to_10(tmp_path):
    write_affectnet_csv(tmp_path)
    train = fs.load_dataset("affectnet", tmp_path, "train", 16)
    assert train.labels.tolist() == [0, 1, 7, 3] and train.classes[7] == "contempt"


def test_affectnet_csv_layout_crops_the_face_box(tmp_path):
    write_affectnet_csv(tmp_path)
    img = fs.load_dataset("affectnet", tmp_path, "train", 16)[3][0]
    assert (img[:, 8, 8].int() - torch.tensor([200, 90, 10])).abs().max() <= 8  # JPEG
    assert (img[2, 2:-2, 2:-2] < 60).all()  # no blue border left


def test_affectnet_seven_classes_drop_contempt_and_test_is_the_validation_set(tmp_path):
    write_affectnet_csv(tmp_path)
    seven = fs.load_dataset("affectnet", tmp_path, "train", 16, classes=7)
    test = fs.load_dataset("affectnet", tmp_path, "test", 16)
    assert seven.labels.tolist() == [0, 1, 3] and test.labels.tolist() == [7, 2]


def test_affectnet_npy_layout(tmp_path):
    for split, codes in (("train_set", [4, 10, 6]), ("val_set", [5])):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "annotations").mkdir()
        for i, code in enumerate(codes):
            Image.new("RGB", (40, 40), (i, 0, 0)).save(tmp_path / split / "images" / f"{i}.jpg")
            np.save(tmp_path / split / "annotations" / f"{i}_exp.npy", np.array(str(code)))
    train = fs.load_dataset("affectnet", tmp_path, "train", 32)
    assert train.labels.tolist() == [4, 6]
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


def write_ferplus_csv(root):
    def pixels(k):
        return " ".join(str((k * 40 + i) % 256) for i in range(48 * 48))
    rows = [("Training", "fer0.png", "6,0,0,0,0,0,0,0,4,0"),
            ("Training", "", "0,9,0,0,0,0,0,0,0,0"),
            ("Training", "fer2.png", "4,0,0,1,3,2,0,0,0,0"),
            ("Training", "fer3.png", "0,3,0,0,0,0,0,2,1,0"),
            ("PublicTest", "fer4.png", "0,0,8,0,0,0,0,0,0,0"),
            ("PrivateTest", "fer5.png", "0,0,0,0,0,0,0,5,4,1")]
    (root / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "".join(
        f'0,"{pixels(k)}",{u}\n' for k, (u, _, _) in enumerate(rows)))
    (root / "fer2013new.csv").write_text(
        FERPLUS_HEAD + "\n" + "".join(f"{u},{n},{v}\n" for u, n, v in rows))


@pytest.mark.parametrize("rule,labels", [("majority", [0, 1]), ("argmax", [0, 0, 1])])
def test_ferplus_csv_layout_drops_empty_names_and_applies_the_rule(tmp_path, rule, labels):
    write_ferplus_csv(tmp_path)
    assert fs.load_dataset("ferplus", tmp_path, "train", 48, label_rule=rule).labels.tolist() \
        == labels


def test_ferplus_csv_pixels_are_grayscale_replicated_to_three_channels(tmp_path):
    write_ferplus_csv(tmp_path)
    img = fs.load_dataset("ferplus", tmp_path, "train", 48)[1][0]  # row 3 (fer3.png)
    assert torch.equal(img[0], img[2]) and img[0, 0, 0] == 120


def test_ferplus_csv_test_split_is_private_test(tmp_path):
    write_ferplus_csv(tmp_path)
    assert fs.load_dataset("ferplus", tmp_path, "test", 48).labels.tolist() == [7]


def test_ferplus_csv_files_must_match_row_for_row(tmp_path):
    write_ferplus_csv(tmp_path)
    (tmp_path / "fer2013new.csv").write_text(FERPLUS_HEAD + "\nTraining,fer0.png,1,2\n")
    with pytest.raises(fs.UserError, match="row for row"):
        fs.load_dataset("ferplus", tmp_path, "train", 48)


def test_ferplus_csv_names_the_row_of_a_malformed_pixel_string(tmp_path):
    write_ferplus_csv(tmp_path)
    text = (tmp_path / "fer2013.csv").read_text().splitlines()
    text[4] = '0,"1 2 300",Training'  # fer3.png's row, file row 5: 3 values, one above 255
    (tmp_path / "fer2013.csv").write_text("\n".join(text) + "\n")
    ds = fs.load_dataset("ferplus", tmp_path, "train", 48)
    with pytest.raises(fs.UserError, match="fer2013.csv:5: expected 48 x 48 pixel values"):
        ds[1]


def write_ferplus_folders(root, train_votes, test_votes, size=48):
    for split, votes in (("FER2013Train", train_votes), ("FER2013Test", test_votes)):
        (root / split).mkdir(parents=True)
        lines = []
        for i, v in enumerate(votes):
            Image.fromarray(((np.arange(size * size).reshape(size, size) * (i + 3)) % 256)
                            .astype(np.uint8)).save(root / split / f"fer{i:07d}.png")
            lines.append(f'fer{i:07d}.png,"(0, 0, 48, 48)",{v}')
        (root / split / "label.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("rule,labels", [("majority", [0]), ("argmax", [0, 0])])
def test_ferplus_folder_layout(tmp_path, rule, labels):
    write_ferplus_folders(tmp_path, ["6,0,0,0,0,0,0,0,4,0", "4,0,0,1,3,2,0,0,0,0"],
                          ["0,0,8,0,0,0,0,0,0,0"])
    train = fs.load_dataset("ferplus", tmp_path, "train", 40, label_rule=rule)
    assert train.labels.tolist() == labels


@pytest.mark.parametrize("name,expected", [("rafdb", "list_patition_label.txt"),
                                           ("affectnet", "training.csv"),
                                           ("ferplus", "fer2013new.csv"),
                                           ("imagefolder", "train")])
def test_missing_layout_names_the_expected_files_and_shows_the_layout(tmp_path, name, expected):
    with pytest.raises(fs.UserError, match=expected) as e:
        fs.load_dataset(name, tmp_path, "train", 64)
    assert "ROOT/" in str(e.value)


def test_balanced_sampler_equalises_class_frequencies():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = torch.cat([fs.epoch_order(labels, "balanced", 0, e) for e in range(1, 11)])
    freq = torch.bincount(labels[order], minlength=3) / len(order)
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)  # 10,000 draws: 3 sd


def test_an_epoch_is_as_long_as_the_training_set_under_either_sampler():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    assert len(fs.epoch_order(labels, "balanced", 0, 1)) == 1000
    assert sorted(fs.epoch_order(labels, "shuffle", 0, 1).tolist()) == list(range(1000))


def test_synthetic_faces_are_deterministic_per_seed_split_and_index():
    a, b = fs.SyntheticFaces(20, "train", 64, seed=1), fs.SyntheticFaces(20, "train", 64, seed=1)
    assert torch.equal(a[7][0], b[7][0]) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a[7][0], fs.SyntheticFaces(20, "test", 64, seed=1)[7][0])


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_label_noise_moves_the_requested_share_to_other_classes(p):
    labels = torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(0))
    noisy = fs.inject_label_noise(labels, p, 7, seed=0)
    changed = noisy != labels
    assert changed.sum().item() == round(p * 1000)
    counts = torch.bincount((noisy - labels)[changed] % 7, minlength=7)
    assert counts[1:].min() > 0  # every other class is reachable


def test_cache_placement_follows_the_memory_there_is(monkeypatch):
    monkeypatch.setattr(fs, "host_memory_available", lambda: 40 * 2 ** 30)  # 30 GiB usable
    assert fs.cache_placement("auto", CPU, 29 * 2 ** 30) == "device"
    assert fs.cache_placement("auto", CPU, 31 * 2 ** 30) == "workers"
    assert fs.cache_placement("off", CPU, 1) == "workers"
    with pytest.raises(fs.UserError, match="--cache on"):
        fs.cache_placement("on", CPU, 31 * 2 ** 30)


def test_cache_placement_on_a_gpu_takes_its_free_memory_then_pinned_host(monkeypatch):
    monkeypatch.setattr(fs, "host_memory_available", lambda: 100 * 2 ** 30)  # 75 GiB usable
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * 2 ** 30, 80 * 2 ** 30))
    cuda = torch.device("cuda")  # 60 GiB free less 16 GiB of headroom: 44 GiB
    assert fs.cache_placement("auto", cuda, 40 * 2 ** 30) == "device"
    assert fs.cache_placement("auto", cuda, 50 * 2 ** 30) == "host"
    assert fs.cache_placement("auto", cuda, 80 * 2 ** 30) == "workers"


@pytest.mark.parametrize("placement", ["host", "workers"])
def test_every_image_placement_yields_the_cached_batches_in_order(placement, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # pinning needs a GPU
    ds = fs.SyntheticFaces(10, "test", 32)
    order = torch.tensor([3, 1, 4, 0, 9, 2, 6])
    cached = list(fs.Images(ds, CPU, "device", 0).batches(order, 3))
    batches = list(fs.Images(ds, CPU, placement, 0).batches(order, 3))
    assert [idx.tolist() for _, idx in batches] == [[3, 1, 4], [0, 9, 2], [6]]
    assert all(torch.equal(x, x_cached) for (x, _), (x_cached, _) in zip(batches, cached))


# ---- The numbers people quote ---------------------------------------------------------------

def test_scores_match_a_confusion_matrix_worked_by_hand():
    conf = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]])  # rows: true class
    s = fs.scores(conf)
    # precision / recall per class: 5/7, 5/6; 3/4, 3/6; 4/5, 4/4 -> F1 = 10/13, 6/10, 8/9
    assert s["test_acc"] == pytest.approx(12 / 16)
    assert s["mean_class_acc"] == pytest.approx((5 / 6 + 3 / 6 + 4 / 4) / 3)
    assert s["macro_f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert s["per_class_acc"] == pytest.approx([5 / 6, 3 / 6, 1.0])


def test_scores_leave_out_a_class_without_test_samples():
    s = fs.scores(torch.tensor([[2, 0, 1], [0, 0, 0], [0, 0, 3]]))
    assert s["mean_class_acc"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["macro_f1"] == pytest.approx((0.8 + 6 / 7) / 2)


def test_summary_takes_final_best_and_the_mean_of_the_last_five_epochs():
    accs = [0.5, 0.9, 0.6, 0.7, 0.9, 0.75, 0.65]
    history = [dict(epoch=e + 1, test_acc=a, mean_class_acc=a, macro_f1=a, per_class_acc=[a])
               for e, a in enumerate(accs)]
    s = fs.summarize(history, ["x"], fs.Config())
    assert (s["final_epoch"], s["final_acc"], s["best_epoch"], s["best_acc"]) == (7, 0.65, 2, 0.9)
    assert s["last5_mean_acc"] == pytest.approx(sum(accs[2:]) / 5)


def test_summary_puts_the_batch_independent_accuracy_beside_each_figure():
    history = [dict(epoch=e + 1, test_acc=a, test_acc_batch_independent=b, mean_class_acc=a,
                    macro_f1=a, per_class_acc=[a])
               for e, (a, b) in enumerate([(0.5, 0.4), (0.9, 0.7), (0.6, 0.65)])]
    s = fs.summarize(history, ["x"], fs.Config())
    assert (s["final_acc_batch_independent"], s["best_acc_batch_independent"]) == (0.65, 0.7)


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


def test_relabel_log_keeps_the_larger_u_of_a_sample_drawn_twice_in_a_batch():
    log = fs.RelabelLog(4, 3, CPU)
    y = torch.tensor([0, 1, 1, 2])
    out = fs.StepOut(*[torch.zeros(())] * 3, y_fer=y, u=torch.tensor([0.1, 0.3, 0.2, 0.0]),
                     cuem_ran=torch.tensor(True))
    log.add(torch.tensor([0, 2, 2, 3]), y, out)  # sample 2 twice: u 0.3 and 0.2
    assert log.last_u.tolist() == pytest.approx([0.1, 0.0, 0.3, 0.0])
    assert log.seen.tolist() == [1, 0, 2, 1]


# ---- The command line, the config ----------------------------------------------------------

def test_every_config_field_has_a_help_line():
    helps = fs.field_help()
    assert [f.name for f in fs.dataclasses.fields(fs.Config) if not helps.get(f.name)] == []


@pytest.mark.parametrize("args,field,value", [
    (["--no-arm"], "arm", False), (["--arm"], "arm", True), (["--no-scl"], "scl", False),
    (["--no-cuem"], "cuem", False), (["--no-head-bn"], "head_bn", False)])
def test_switches_read_positively_and_the_no_names_keep_working(args, field, value):
    parsed = vars(fs.build_parser().parse_args(args))
    assert parsed[field] is value


@pytest.mark.parametrize("data", fs.DATASETS)
def test_a_datasets_own_defaults_apply_unless_a_flag_is_given(data):
    cfg = fs.make_config({"data": data, "epochs": 3})
    own = fs.DATA_DEFAULTS.get(data, {})
    assert cfg.epochs == 3
    assert all(getattr(cfg, k) == v for k, v in own.items() if k != "epochs")


def test_the_banner_lists_only_settings_that_apply(tmp_path, capsys):
    cfg = fs.make_config({"data": "rafdb", "root": str(tmp_path)})
    ds = fs.SyntheticFaces(4, "train", 64)
    fs.banner(cfg, CPU, ds, ds, [])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("config:"))
    assert "root=" in line and "synthetic_train" not in line and "ferplus_label" not in line


# ---- CUEM's relabel accounting on runs built to relabel, and its alarm (slow) --------------

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


@slow
def test_relabel_counts_precision_and_recall_are_exact(shifted_run):
    first, second = shifted_run["rows"]
    y, truth = noisy_tiny_labels(), fs.SyntheticFaces(96, "train", 64).labels
    right = ((y + 1) % 7 == truth).sum().item()  # relabels that restored the true label
    assert (first["relabelled"], first["relabel_precision"]) == (0, None)
    assert (second["relabelled"], second["relabel_share"]) == (96, 1.0)
    assert second["relabel_precision"] == pytest.approx(right / 96)
    assert second["relabel_recall"] == pytest.approx(right / (y != truth).sum().item())
    assert second["relabelled_to"] == torch.bincount((y + 1) % 7, minlength=7).tolist()


@slow
def test_relabels_csv_lists_every_relabelled_sample(shifted_run):
    head, *rows = read_csv(shifted_run["out"] / "relabels.csv")
    y = noisy_tiny_labels()
    assert head == ["index", "path", "label", "cuem_label", "relabelled", "seen", "last_u"]
    assert sorted(int(r[0]) for r in rows) == list(range(96))
    for index, path, label, cuem_label, moved, seen, u in rows:
        assert label == fs.RAFDB_CLASSES[y[int(index)]]
        assert cuem_label == fs.RAFDB_CLASSES[(y[int(index)] + 1) % 7]
        assert (path, moved, seen, float(u)) == ("", "1", "1", 1.0)


@slow
def test_alarm_fires_when_one_class_takes_the_relabels(tmp_path, monkeypatch):
    monkeypatch.setattr(fs, "cuem", lambda q, labels, *a: (torch.zeros_like(labels),
                                                            torch.ones(len(labels))))
    _, text = run_main(TINY + ["--epochs", "2", "--cuem-start", "1", "--out", str(tmp_path)])
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["relabel_alarm"] for r in rows] == [False, True]
    assert "UNUSUAL: surprise received" in text


# ---- The command line end to end: one tiny run, checked guarantee by guarantee (slow) ------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """3 epochs with 30 % label noise, CUEM from epoch 2, lambda 0.5 / 0 / beta (alpha 2)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    res, text = run_main(TINY + ["--epochs", "3", "--cuem-start", "2", "--alpha", "2",
                                 "--label-noise", "0.3", "--out", str(out)])
    return dict(out=out, res=res, text=text, rows=read_rows(out / "metrics.jsonl"))


@slow
@pytest.mark.parametrize("name", ["last.pt", "best.pt", "metrics.jsonl", "summary.json",
                                  "curves.png", "relabels.csv", "relabels.png",
                                  "noisy_labels.txt", "confusion.png", "confusion.txt"])
def test_run_writes_its_outputs(tiny_run, name):
    assert (tiny_run["out"] / name).is_file()


@slow
def test_run_leaves_no_temporary_file(tiny_run):
    assert not list(tiny_run["out"].glob(".*tmp*"))


@slow
def test_best_pt_holds_the_best_epoch(tiny_run):
    summary = json.loads((tiny_run["out"] / "summary.json").read_text())
    assert torch.load(tiny_run["out"] / "best.pt", weights_only=True)["epoch"] == \
        summary["best_epoch"]


@slow
def test_run_follows_eq4_and_the_lr_decay(tiny_run):
    rows = tiny_run["rows"]
    assert [r["lam"] for r in rows] == [pytest.approx(0.5), 0.0, 1e-4]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 9e-4, 8.1e-4])


@slow
def test_metrics_rows_carry_the_quoted_numbers(tiny_run):
    keys = {"loss", "ce", "supcon", "relabelled", "relabel_share", "relabelled_to",
            "relabel_alarm", "relabel_precision", "relabel_recall", "test_acc",
            "mean_class_acc", "macro_f1", "per_class_acc", "samples_per_s", "train_seconds",
            "data_wait_seconds", "test_seconds", "output_seconds", "confusion"}
    assert all(keys <= row.keys() for row in tiny_run["rows"])


@slow
def test_metrics_rows_agree_with_their_confusion_matrix_and_relabel_counts(tiny_run):
    for row in tiny_run["rows"]:
        assert fs.scores(torch.tensor(row["confusion"]))["macro_f1"] == pytest.approx(
            row["macro_f1"])
        assert row["relabel_share"] == pytest.approx(row["relabelled"] / 96)
        assert sum(row["relabelled_to"]) == row["relabelled"]


@slow
def test_cuem_starts_in_its_first_epoch(tiny_run):
    assert tiny_run["rows"][0]["relabelled"] == 0


@slow
def test_relabels_csv_agrees_with_the_per_epoch_counts(tiny_run):
    head, *rows = read_csv(tiny_run["out"] / "relabels.csv")
    assert sum(int(r[4]) for r in rows) == sum(r["relabelled"] for r in tiny_run["rows"])
    assert all(r[3] != r[2] and 1 <= int(r[4]) <= int(r[5]) <= 2 for r in rows)  # epochs 2, 3


@slow
def test_summary_json_agrees_with_metrics_jsonl(tiny_run):
    s, rows = json.loads((tiny_run["out"] / "summary.json").read_text()), tiny_run["rows"]
    best = max(rows, key=lambda r: r["test_acc"])
    assert (s["final_acc"], s["best_epoch"], s["best_acc"]) == (rows[-1]["test_acc"],
                                                                best["epoch"], best["test_acc"])
    assert s["last5_mean_acc"] == pytest.approx(sum(r["test_acc"] for r in rows) / 3)


@slow
def test_noisy_labels_txt_is_the_runs_training_labels(tiny_run):
    lines = (tiny_run["out"] / "noisy_labels.txt").read_text().split()
    assert [int(v) for v in lines[1::2]] == noisy_tiny_labels().tolist()


@slow
def test_run_prints_the_sizes_it_derived(tiny_run):
    assert "queue size 8192 capped to 96" in tiny_run["text"]
    assert "m = 0.8333 = 1 - 16/96" in tiny_run["text"]


@slow
def test_run_ends_with_final_best_and_last_five(tiny_run):
    final = tiny_run["text"].strip().splitlines()[-1]
    assert re.match(r"final epoch 3: test acc [\d.]+% \| best epoch \d: [\d.]+% \| mean of the "
                    r"last 3 epochs: [\d.]+%", final)


@slow
def test_resume_after_sigkill_gives_bitwise_equal_weights_and_rows(tmp_path):
    args = TINY + ["--epochs", "4", "--cuem-start", "2", "--alpha", "3", "--seed", "5",
                   "--label-noise", "0.2"]
    assert run_cli(args + ["--out", str(tmp_path / "whole")]).returncode == 0
    proc = start_cli(args + ["--out", str(tmp_path / "cut")], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    last = tmp_path / "cut" / "last.pt"
    wait_for(last, proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert torch.load(last, weights_only=True)["epoch"] < 4
    done = run_cli(["--resume", str(last)])
    assert done.returncode == 0, done.stderr
    a, b = saved_weights(tmp_path / "whole" / "last.pt"), saved_weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def without_times(path):
        return [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "samples_per_s"}
                for r in read_rows(path)]
    assert without_times(tmp_path / "whole" / "metrics.jsonl") == without_times(
        tmp_path / "cut" / "metrics.jsonl")
    assert ((tmp_path / "whole" / "relabels.csv").read_text()
            == (tmp_path / "cut" / "relabels.csv").read_text())


@slow
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
    assert not list(tmp_path.glob(".*tmp*"))


@slow
def test_nan_guard_stops_with_epoch_and_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fs.main(TINY + ["--epochs", "2", "--lr", "1e30", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(r"non-finite loss in epoch 1, step \d+", err)
    assert "last good checkpoint: none written yet" in err


@slow
def test_worker_decoding_path_trains_exactly_like_the_cache(tmp_path):
    args = TINY + ["--epochs", "2", "--cuem-start", "1"]
    run_main(args + ["--cache", "on", "--out", str(tmp_path / "on")])
    run_main(args + ["--cache", "off", "--workers", "2", "--out", str(tmp_path / "off")])
    a, b = saved_weights(tmp_path / "on" / "last.pt"), saved_weights(tmp_path / "off" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@slow
def test_rafdb_run_writes_noisy_labels_that_train_labels_reads_back(tmp_path):
    write_rafdb(tmp_path / "raf", n_train=12)
    run_main(["--data", "rafdb", "--root", str(tmp_path / "raf"), "--img-size", "64",
              "--pretrained", "none", "--batch-size", "4", "--epochs", "1", "--workers", "0",
              "--label-noise", "0.5", "--device", "cpu", "--out", str(tmp_path / "o")])
    again = fs.load_dataset("rafdb", tmp_path / "raf", "train", 24,
                            train_labels=str(tmp_path / "o" / "noisy_labels.txt"))
    official = fs.load_dataset("rafdb", tmp_path / "raf", "train", 24).labels
    assert torch.equal(again.labels, fs.inject_label_noise(official, 0.5, 7, 0))


# ---- What reaches the step: every method flag, every batch (slow) ---------------------------

def recording_step(calls):
    """A train_step stand-in that records its arguments and changes nothing: the loop around
    it runs as it would."""
    def step(model, opt, x_q, x_k, y, **kw):
        calls.append(dict(kw, batch=len(y), has_keys=x_k is not None, y=y.clone(),
                          queue_size=len(model.queue.labels)))
        zero = torch.zeros((), device=y.device)
        return fs.StepOut(zero, zero, zero, y, torch.zeros(len(y)), torch.tensor(False))
    return step


FLAG_RUNS = {  # a run's flags at non-default values (3 epochs of 96 images, batches of 16)
    "options": ["--theta", "0.3", "--tau", "0.2", "--alpha", "2", "--beta", "0.05",
                "--queue-size", "32", "--momentum", "0.7", "--supcon-reduction", "sum",
                "--skip-relabelled-anchors", "--sampler", "balanced",
                "--cuem-start", "2"],
    "no_scl": ["--no-scl"],
    "no_cuem": ["--no-cuem"],
    "baseline": ["--no-scl", "--no-cuem"],
}


@pytest.fixture(scope="module")
def flag_runs(tmp_path_factory):
    calls = {}
    for name, flags in FLAG_RUNS.items():
        calls[name] = []
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")  # no opt.step
            mp.setattr(fs, "train_step", recording_step(calls[name]))
            run_main(TINY + ["--epochs", "3", *flags,
                             "--out", str(tmp_path_factory.mktemp(name))])
    return calls


@slow
@pytest.mark.parametrize("flag,key,value", [
    ("--theta", "theta", 0.3), ("--tau", "tau", 0.2), ("--momentum", "m", 0.7),
    ("--queue-size", "queue_size", 32), ("--supcon-reduction", "supcon_reduction", "sum"),
    ("--skip-relabelled-anchors", "skip_relabelled_anchors", True)])
def test_a_method_flag_reaches_every_step(flag_runs, flag, key, value):
    assert {call[key] for call in flag_runs["options"]} == {value}


@slow
def test_alpha_and_beta_reach_the_steps_lambda(flag_runs):
    lams = [call["lam"] for call in flag_runs["options"][::6]]  # the first step of each epoch
    assert lams == [pytest.approx(0.5), 0.0, 0.05]  # 1 - 1/2, 1 - 2/2, beta


@slow
def test_cuem_start_reaches_the_step(flag_runs):
    assert [call["use_cuem"] for call in flag_runs["options"][::6]] == [False, True, True]


@slow
def test_the_sampler_reaches_the_epochs_order(flag_runs):
    labels = fs.SyntheticFaces(96, "train", 64).labels
    order = fs.epoch_order(labels, "balanced", 0, 1)
    seen = torch.cat([call["y"] for call in flag_runs["options"][:6]])
    assert torch.equal(seen, labels[order])


@slow
def test_no_scl_reaches_the_step_as_lambda_0(flag_runs):
    assert {call["lam"] for call in flag_runs["no_scl"]} == {0.0}
    assert all(call["has_keys"] for call in flag_runs["no_scl"])  # CUEM still reads the queue


@slow
def test_no_cuem_reaches_the_step(flag_runs):
    assert {call["use_cuem"] for call in flag_runs["no_cuem"]} == {False}


@slow
def test_the_baseline_runs_end_to_end_without_a_key_branch(flag_runs):
    assert not any(call["has_keys"] for call in flag_runs["baseline"])


@pytest.fixture
def optimiser_steps(monkeypatch):
    """The batch size of every train_step call that stepped the optimiser."""
    sizes, real_step = [], fs.train_step
    def step(model, opt, x_q, x_k, y, **kw):
        before = opt.state_dict()["state"].get(0, {}).get("step", torch.tensor(0.0)).item()
        out = real_step(model, opt, x_q, x_k, y, **kw)
        if opt.state_dict()["state"][0]["step"].item() == before + 1:
            sizes.append(len(y))
        return out
    monkeypatch.setattr(fs, "train_step", step)
    return sizes


@slow
def test_the_last_partial_batch_reaches_the_optimiser(tmp_path, optimiser_steps):
    run_main(TINY[:3] + ["100"] + TINY[4:] + ["--epochs", "1", "--out", str(tmp_path)])
    assert optimiser_steps == [16] * 6 + [4]


@slow
def test_a_single_leftover_image_is_left_out_and_the_run_says_so(tmp_path, optimiser_steps):
    _, text = run_main(TINY[:3] + ["97"] + TINY[4:] + ["--epochs", "1", "--out", str(tmp_path)])
    assert optimiser_steps == [16] * 6
    assert "97 training images = 6 batches of 16 + 1" in text


# ---- A trained model in use: --eval, --predict, --export (slow) -----------------------------

@pytest.fixture(scope="module")
def arm_ckpt(tmp_path_factory):
    """One epoch with ARM (so the two test protocols differ)."""
    out = tmp_path_factory.mktemp("arm") / "run"
    run_main(TINY + ["--epochs", "1", "--arm", "--out", str(out)])
    return out / "best.pt"


@slow
def test_checkpoint_card_says_how_to_feed_it(arm_ckpt):
    card = torch.load(arm_ckpt, weights_only=True)["card"]
    assert card["classes"] == fs.RAFDB_CLASSES and card["decode_size"] == card["img_size"] == 64
    assert card["normalisation"]["mean"] == pytest.approx([123.675, 116.28, 103.53])


@slow
def test_checkpoint_card_carries_both_test_accuracies_of_its_epoch(arm_ckpt):
    card = torch.load(arm_ckpt, weights_only=True)["card"]
    row = read_rows(arm_ckpt.parent / "metrics.jsonl")[-1]
    assert (card["test_acc"], card["test_acc_batch_independent"]) == (
        row["test_acc"], row["test_acc_batch_independent"])


@slow
def test_eval_reproduces_the_runs_two_accuracies(arm_ckpt):
    res, _ = run_main(["--eval", str(arm_ckpt), "--workers", "0", "--device", "cpu"])
    row = read_rows(arm_ckpt.parent / "metrics.jsonl")[-1]
    assert res["test_acc"] == pytest.approx(row["test_acc"])
    assert res["test_acc_batch_independent"] == pytest.approx(row["test_acc_batch_independent"])


@slow
def test_eval_prints_both_protocols_and_the_confusion_matrix(arm_ckpt):
    _, text = run_main(["--eval", str(arm_ckpt), "--workers", "0", "--device", "cpu"])
    assert "ARM's official protocol (g from each test batch): accuracy" in text
    assert "batch-independent (ARM's running g; --predict, --export): accuracy" in text
    assert "true \\ predicted  surprise" in text


@slow
def test_eval_writes_its_json_and_confusion(arm_ckpt):
    run_main(["--eval", str(arm_ckpt), "--workers", "0", "--device", "cpu"])
    saved = json.loads(arm_ckpt.with_name("best_eval.json").read_text())
    assert {"test_acc", "test_acc_batch_independent", "per_class_acc", "protocol"} <= saved.keys()
    assert (arm_ckpt.parent / "best_confusion.png").is_file()


@slow
def test_predict_classifies_folders_recursively_and_skips_an_unreadable_file(tmp_path, arm_ckpt):
    save_faces(tmp_path / "faces" / "a" / "b", 2)
    save_faces(tmp_path / "faces", 1, start=2)
    bad = tmp_path / "faces" / "a" / "bad.jpg"
    bad.write_bytes(b"not an image")
    # a subprocess: the exit status is part of what is checked
    r = run_cli(["--predict", str(tmp_path / "faces"), "--checkpoint", str(arm_ckpt),
                 "--device", "cpu"])
    assert r.returncode == 1 and f"skipped: cannot read image {bad}" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == "classified 3 images, skipped 1"


@slow
def test_predict_csv_holds_every_class_probability(tmp_path, arm_ckpt):
    save_faces(tmp_path / "faces", 3)
    run_main(["--predict", str(tmp_path / "faces"), "--checkpoint", str(arm_ckpt),
              "--csv", str(tmp_path / "p.csv"), "--device", "cpu"])
    head, *rows = read_csv(tmp_path / "p.csv")
    assert head == ["path", "predicted", *fs.RAFDB_CLASSES] and len(rows) == 3
    for row in rows:
        p = [float(v) for v in row[2:]]
        assert sum(p) == pytest.approx(1, abs=1e-5)  # 7 values written with 6 decimals
        assert row[1] == fs.RAFDB_CLASSES[int(np.argmax(p))]


@slow
def test_predict_reads_globs(tmp_path, arm_ckpt):
    save_faces(tmp_path / "faces" / "a", 2)
    res, _ = run_main(["--predict", str(tmp_path / "faces" / "**" / "*.png"), "--checkpoint",
                       str(arm_ckpt), "--device", "cpu"])
    assert len(res["probabilities"]) == 2


@slow
def test_predict_does_not_depend_on_the_other_images(tmp_path, arm_ckpt):
    paths = save_faces(tmp_path / "many", 301)
    one, _ = run_main(["--predict", str(paths[7]), "--checkpoint", str(arm_ckpt),
                       "--device", "cpu"])
    among, _ = run_main(["--predict", str(tmp_path / "many"), "--checkpoint", str(arm_ckpt),
                         "--workers", "2", "--device", "cpu"])
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
              "none", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu",
              "--out", str(out)])
    return root, out / "last.pt"


@slow
def test_predict_export_and_evaluation_see_the_same_test_images(ferplus_ckpt, tmp_path):
    root, ckpt_path = ferplus_ckpt
    files = sorted((root / "FER2013Test").glob("*.png"))
    *_, model = fs.open_checkpoint(ckpt_path, {"device": "cpu"}, "eval", ("device",))
    test = fs.load_dataset("ferplus", root, "test", 48)
    x = fs.Images(test, CPU, "device", 0).x
    evaluated = fs.logits_of(model, x, 64, 8)["batch_independent"].softmax(1)  # --predict's
    res, _ = run_main(["--predict", *map(str, files), "--checkpoint", str(ckpt_path),
                       "--device", "cpu"])
    predicted = torch.tensor([res["probabilities"][str(f)] for f in files])
    fs.main(["--export", str(tmp_path / "m.pt2"), "--checkpoint", str(ckpt_path), "--device",
             "cpu"])
    exported = torch.export.load(tmp_path / "m.pt2").module()(
        torch.stack([fs.pil_to_uint8(Image.open(f), 48) for f in files]))
    # float32 with other batch sizes and kernels (eager vs exported): ~1e-7 apart; a resize
    # done differently (48 -> 64 by PIL instead of on the device) moved them by 3.5e-3
    assert torch.allclose(predicted, evaluated, atol=1e-5)
    assert torch.allclose(exported.detach(), evaluated, atol=1e-5)


@slow
def test_export_runs_without_fer_supcon_and_matches_predict(tmp_path, arm_ckpt):
    paths = save_faces(tmp_path / "faces", 5)
    fs.main(["--export", str(tmp_path / "m.pt2"), "--checkpoint", str(arm_ckpt), "--device",
             "cpu"])
    predicted, _ = run_main(["--predict", str(tmp_path / "faces"), "--checkpoint", str(arm_ckpt),
                             "--device", "cpu"])
    script = f"""
import json, sys, numpy as np, torch
from PIL import Image
extra = {{"fer_supcon.json": ""}}
model = torch.export.load({str(tmp_path / 'm.pt2')!r}, extra_files=extra).module()
card = json.loads(extra["fer_supcon.json"])
S = card["decode_size"]
x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")
                 .resize((S, S), Image.BILINEAR)).copy()).permute(2, 0, 1) for p in sys.argv[1:]])
print(json.dumps(dict(probs=model(x).tolist(), imported="fer_supcon" in sys.modules)))
"""
    # a subprocess: an interpreter that has never imported fer_supcon
    r = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    expected = [predicted["probabilities"][str(p)] for p in paths]
    assert not got["imported"] and np.allclose(got["probs"], expected, atol=1e-5)  # float32


@slow
def test_export_as_a_process_first_call_leaves_real_normalisation_constants(tmp_path, arm_ckpt):
    # a fresh process: the export's trace is the first to ask for the constants, and a fake
    # tensor of the trace must not be what later eager calls get
    fs.imagenet_constants.cache_clear()
    res = fs.main(["--export", str(tmp_path / "m.pt2"), "--checkpoint", str(arm_ckpt),
                   "--device", "cpu"])
    mean, std = fs.imagenet_constants(torch.device("cpu"))
    assert type(mean) is torch.Tensor and type(std) is torch.Tensor
    assert type(res["max_diff"]) is float


@slow
def test_benchmark_reports_every_figure_on_this_cpu(capsys):
    cfg = fs.Config(device="cpu", img_size=64, batch_size=8, queue_size=64, arm=False,
                    pretrained="none")
    res = fs.benchmark(cfg, {"img_size": 64, "batch_size": 8}, rounds=(1, 0))
    figures = ("baseline_samples_per_s", "full_samples_per_s", "deterministic_samples_per_s",
               "augment_samples_per_s", "inference_images_per_s")
    assert all(res[k] > 0 for k in figures)


# ---- One-line errors ------------------------------------------------------------------------

@pytest.fixture
def bad_input(tmp_path):
    """The files the bad-input cases point at; returns a function from a case to its args."""
    (tmp_path / "empty").mkdir()
    for c in ("a", "b"):
        (tmp_path / "noimg" / "train" / c).mkdir(parents=True)
        (tmp_path / "noimg" / "test" / c).mkdir(parents=True)
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04garbage")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    return lambda args: [a.format(tmp=tmp_path) for a in args]


RAF_EMPTY = ["--data", "rafdb", "--root", "{tmp}/empty"]
# a second of training if a refusal is missing: the case then fails fast, with no "run" folder
QUICK = ["--synthetic-train", "32", "--synthetic-test", "16", "--img-size", "32", "--no-arm",
         "--epochs", "1", "--workers", "0", "--out", "{tmp}/run"]
BAD_INPUT = {  # case: (arguments, the message's key part)
    "rafdb root missing": (["--data", "rafdb", "--root", "{tmp}/nope"], "is not a folder"),
    "rafdb root wrong": (RAF_EMPTY, "list_patition_label.txt"),
    "affectnet root wrong": (["--data", "affectnet", "--root", "{tmp}/empty"],
                             "Manually_Annotated_file_lists"),
    "ferplus root wrong": (["--data", "ferplus", "--root", "{tmp}/empty"], "fer2013new.csv"),
    "imagefolder root wrong": (["--data", "imagefolder", "--root", "{tmp}/empty"],
                               "ROOT/train/<class>"),
    "no root": (["--data", "rafdb"], "needs --root"),
    "image size with ARM": (["--img-size", "48", "--arm"], "at least 64 with ARM"),
    "image size": (["--img-size", "24"], "32 without"),
    "label noise": (["--label-noise", "1.0"], "expected a fraction in [0, 1)"),
    "batch size": (["--batch-size", "1"], "expected at least 2"),
    "momentum": (["--momentum", "1.5"], "expected a value in [0, 1]"),
    "negative learning rate": (["--lr", "-1", *QUICK], "--lr -1.0: expected a positive"),
    "zero learning rate": (["--lr", "0", *QUICK], "--lr 0.0: expected a positive learning rate"),
    "negative weight decay": (["--weight-decay", "-1", *QUICK], "--weight-decay -1.0: expected"),
    "theta below 0": (["--theta", "-0.1", *QUICK], "--theta -0.1: expected a value in [0, 2]"),
    "theta above 2": (["--theta", "2.5", *QUICK], "--theta 2.5: expected a value in [0, 2]"),
    "lr decay 0": (["--lr-decay", "0", *QUICK], "--lr-decay 0.0: expected a factor in (0, 1]"),
    "lr decay above 1": (["--lr-decay", "1.1", *QUICK], "--lr-decay 1.1: expected a factor in"),
    "negative beta": (["--beta", "-0.5", *QUICK], "--beta -0.5: expected a weight of 0 or more"),
    "folder without images": (["--data", "imagefolder", "--root", "{tmp}/noimg"], "no images"),
    "missing checkpoint": (["--eval", "{tmp}/none.pt"], "does not exist"),
    "truncated checkpoint": (["--eval", "{tmp}/truncated.pt"], "not a readable torch file"),
    "foreign checkpoint": (["--resume", "{tmp}/foreign.pt"], "not a fer_supcon checkpoint"),
    "unknown dataset": (["--data", "ckplus"], "invalid choice: 'ckplus'"),
    "train labels elsewhere": (["--train-labels", "x.txt"], "applies to --data rafdb only"),
    "classes elsewhere": (RAF_EMPTY + ["--classes", "7"], "applies to --data affectnet only"),
    "ferplus rule elsewhere": (["--ferplus-label", "argmax"], "applies to --data ferplus only"),
    "synthetic size elsewhere": (RAF_EMPTY + ["--synthetic-train", "5"],
                                 "applies to --data synthetic only"),
    "root with synthetic": (["--root", "{tmp}/empty"], "--root applies to --data rafdb |"),
    "noise and label file": (RAF_EMPTY + ["--train-labels", "x", "--label-noise", "0.2"],
                             "give one"),
    "two commands": (["--eval", "x.pt", "--benchmark"], "not allowed with argument --eval"),
    "resume and a command": (["--resume", "x.pt", "--benchmark"],
                             "--resume does not apply to --benchmark"),
    "flag the benchmark ignores": (["--benchmark", "--lr", "0.1"],
                                   "--lr does not apply to --benchmark"),
    "csv without predict": (["--csv", "x.csv"], "--csv applies to --predict only"),
    "predict without checkpoint": (["--predict", "x.jpg"], "needs --checkpoint"),
    "checkpoint missing": (["--predict", "{tmp}/bad.jpg", "--checkpoint", "{tmp}/no.pt"],
                           "does not exist"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_gives_one_line_and_exit_2(case, bad_input, capsys):
    args, message = BAD_INPUT[case]
    with pytest.raises(SystemExit) as e:
        fs.main(bad_input(args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("fer_supcon: error: ") and message in err
    assert not Path(bad_input(["{tmp}/run"])[0]).exists()  # refused before any output


CHECKPOINT_MISUSE = {  # case: (arguments after --eval CKPT, the message's key part)
    "checkpoint does not fit": (["--img-size", "96"], "--img-size 96 (checkpoint: 64)"),
    "flag for another command": (["--lr", "0.1"], "--lr does not apply to --eval"),
    "other classes": (["--data", "ferplus", "--root", "{tmp}/fp"], "has 7 classes"),
    "unreadable test image": (["--data", "rafdb", "--root", "{tmp}/raf"],
                              "unreadable images: 1 (nothing was trained or written); the first "
                              "1: cannot read image {tmp}/raf/Image/aligned/test_0001_aligned.jpg"),
}


@slow
@pytest.mark.parametrize("case", CHECKPOINT_MISUSE)
def test_checkpoint_misuse_gives_one_line_and_exit_2(case, arm_ckpt, tmp_path, capsys):
    (tmp_path / "fp" / "FER2013Test").mkdir(parents=True)
    Image.new("L", (48, 48)).save(tmp_path / "fp" / "FER2013Test" / "a.png")
    (tmp_path / "fp" / "FER2013Test" / "label.csv").write_text(
        'a.png,"(0, 0, 48, 48)",0,9,0,0,0,0,0,0,0,0\n')
    write_rafdb(tmp_path / "raf")
    (tmp_path / "raf" / "Image" / "aligned" / "test_0001_aligned.jpg").write_bytes(b"\xff\xd8")
    args, message = CHECKPOINT_MISUSE[case]
    with pytest.raises(SystemExit) as e:
        fs.main(["--eval", str(arm_ckpt), *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message.format(tmp=tmp_path) in err


@slow
@pytest.mark.parametrize("cache", ["on", "off"])  # decoded into the cache, or checked first
def test_unreadable_images_are_refused_at_once_before_training(tmp_path, cache):
    write_rafdb(tmp_path / "raf")  # 6 training and 3 test images
    aligned = tmp_path / "raf" / "Image" / "aligned"
    bad = [aligned / f"train_0000{i}_aligned.jpg" for i in (2, 4, 5)] + [
        aligned / "test_0001_aligned.jpg"]
    for path in bad:
        path.write_bytes(b"\xff\xd8 truncated jpeg")
    # a subprocess: the images are read in DataLoader workers, the error must be one line
    r = run_cli(["--data", "rafdb", "--root", str(tmp_path / "raf"), "--img-size", "64",
                 "--pretrained", "none", "--batch-size", "2", "--epochs", "1", "--workers", "2",
                 "--device", "cpu", "--cache", cache, "--label-noise", "0.3",
                 "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("fer_supcon: error: unreadable images: 4 (nothing was trained or")
    assert [f"cannot read image {path}: " in err for path in bad] == [True] * 3 + [False]
    assert "== epoch" not in r.stdout and not (tmp_path / "o").exists()


# ---- The CUDA code paths on a fake GPU, on any machine ---------------------------------------

class FakeGPU(torch.overrides.TorchFunctionMode):
    """A CUDA device made on the CPU: what lives on 'cuda' is a FakeTensor (shape, dtype,
    device, no data); host tensors stay real and compute. A device mismatch raises as on a GPU.
    While `armed` (inside a step), a host read of a device value, a host tensor sent to the
    device or a device tensor built from host data is recorded in `events` (each is a stall
    of the GPU's queue on a real machine); outside a step a host read returns zeros."""
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
             torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__index__, torch.Tensor.__format__, torch.Tensor.__array__}

    def __init__(self, fake_tensor):
        super().__init__()
        self.fake_tensor = fake_tensor
        self.mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        self.armed, self.events, self.steps = False, [], 0  # events: (step, what)

    def on_device(self, v):
        if isinstance(v, self.fake_tensor.FakeTensor):
            return True
        return (isinstance(v, torch.device) and v.type == "cuda"
                or isinstance(v, str) and v.startswith("cuda"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if not any(self.on_device(v) for v in leaves):
            return func(*args, **kwargs)  # the host computes for real
        name = getattr(func, "__qualname__", str(func))
        to_host = func is torch.Tensor.to and any(
            isinstance(v, (str, torch.device)) and not self.on_device(v) for v in leaves)
        if func in self.READS or to_host:
            return self.read(func, name, args, leaves)
        if func in (torch.tensor, torch.as_tensor):
            self.record(f"{name}: a device tensor built from host data")
        elif any(isinstance(v, torch.Tensor) and not self.on_device(v)
                 and (v.dim() > 0 or func in (torch.Tensor.to, torch.Tensor.cuda))
                 for v in leaves):
            self.record(f"{name}: a host tensor sent to the device")
        with self.mode:
            return func(*args, **kwargs)

    def read(self, func, name, args, leaves):
        self.record(f"{name}: a device value read on the host")
        source = next(v for v in leaves if self.on_device(v) and isinstance(v, torch.Tensor))
        with self.fake_tensor.unset_fake_temporarily():
            zeros = torch.zeros(source.shape, dtype=source.dtype)
        if func is torch.Tensor.__format__:
            return format(0.0, *args[1:])
        if func in (torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
                    torch.Tensor.__index__, torch.Tensor.__bool__):
            return type(zeros.item())(0) if func is torch.Tensor.item else func(zeros)
        return zeros.tolist() if func is torch.Tensor.tolist else (
            zeros.numpy() if func in (torch.Tensor.numpy, torch.Tensor.__array__) else zeros)

    def record(self, event):
        if self.armed:
            self.events.append((self.steps, event))

    def after_the_first_step(self):
        """The events of every step but the first, where PyTorch makes its once-per-run
        device tensors (Adam's step counters)."""
        return [event for step, event in self.events if step > 1]

    def recording(self, function, armed=True):
        """function, with the recording armed (a step's part) or not (the host's) as it runs."""
        def wrapper(*args, **kwargs):
            self.steps += armed and function.__name__ == "two_views"  # a step's first part
            was, self.armed = self.armed, armed
            try:
                return function(*args, **kwargs)
            finally:
                self.armed = was
        return wrapper


def fake_backward(loss, *args, **kwargs):
    """Stands in for autograd's backward, which needs a CUDA context: a zero gradient (on the
    parameter's device) for every leaf the loss's graph reaches."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable") and node.variable.grad is None:
            node.variable.grad = torch.zeros_like(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)


def fake_gpu_model(cfg, num_classes, pretrained, device):
    """build_model on the fake GPU: Module.to cannot move FakeTensor parameters, so the
    network is built there and its 4-d weights made channels-last in place."""
    with torch.device(device):
        model = fs.FERSupCon(num_classes, cfg.img_size, "none", arm=cfg.arm,
                             queue_size=cfg.queue_size, head_bn=cfg.head_bn)
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


@pytest.fixture
def fake_gpu(monkeypatch):
    """The fake GPU, active; stand-ins for what it cannot do: the per-step CUDA generator
    (the default one), backward (zero gradients), torch.save (an empty file), the CUDA
    runtime's queries. The steps (train_step, two_views, EpochTally.add) record events."""
    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor",
                                      reason="this torch has no FakeTensor")
    gpu = FakeGPU(fake_tensor)
    monkeypatch.setattr(fs, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(fs, "build_model", fake_gpu_model)
    monkeypatch.setattr(fs, "step_generator", lambda *args: None)
    monkeypatch.setattr(torch.Tensor, "backward", fake_backward)
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: Path(f).write_bytes(b""))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * 2 ** 30, 80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a fake GPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    for name in ("train_step", "two_views"):
        monkeypatch.setattr(fs, name, gpu.recording(getattr(fs, name)))
    monkeypatch.setattr(fs.EpochTally, "add", gpu.recording(fs.EpochTally.add))
    monkeypatch.setattr(fs.EpochTally, "read", gpu.recording(fs.EpochTally.read, armed=False))
    constants = fs.imagenet_constants  # made once per device: fake ones must not outlive this
    constants.cache_clear()
    with warnings.catch_warnings(), gpu:
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        yield gpu
    constants.cache_clear()


STEP_MODES = {  # name: train_step's options (x_k None: the baseline's single view)
    "baseline": dict(lam=0.0, use_cuem=False, keys=False),
    "defaults": dict(),
    "literal sum": dict(supcon_reduction="sum"),
    "skip anchors": dict(skip_relabelled_anchors=True),
    "no scl": dict(lam=0.0),
    "no cuem": dict(use_cuem=False),
}


@pytest.mark.parametrize("mode,arm", [  # the variants' own wiring is in the fast tests above
    (mode, True) if mode in ("baseline", "defaults") else pytest.param(mode, True, marks=slow)
    for mode in STEP_MODES] + [pytest.param("defaults", False, marks=slow)])
def test_fake_gpu_step_stays_on_the_device_without_host_syncs(fake_gpu, mode, arm):
    cfg = fs.Config(img_size=64, queue_size=32, arm=arm)
    model = fake_gpu_model(cfg, 7, "none", "cuda")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], fused=True)
    fill_queue(model)
    x = torch.randint(0, 256, (16, 3, 48, 48), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 7, (16,), device="cuda")
    options = dict(lam=0.5, m=0.9, tau=0.1, theta=0.1, use_cuem=True) | STEP_MODES[mode]
    keys = options.pop("keys", True)
    for step in range(2):  # the second step: PyTorch's once-per-run tensors are made
        x_q, x_k = fs.two_views(x, cfg, 1, step, keys)
        out = fs.train_step(model, opt, x_q, x_k, y, amp=fs.autocast(torch.device("cuda")),
                            **options)
    assert fake_gpu.after_the_first_step() == []
    assert out.loss.device.type == "cuda" and out.loss.dtype == torch.float32
    assert model.queue.feats.dtype == torch.float32  # bf16 keys stored in float32


@slow
def test_fake_gpu_training_run_keeps_every_step_free_of_host_syncs(fake_gpu, tmp_path):
    # ARM (both test protocols), label noise (the tallies), CUEM
    res, text = run_main(["--data", "synthetic", "--synthetic-train", "40", "--synthetic-test",
                          "20", "--img-size", "64", "--batch-size", "16", "--epochs", "2",
                          "--cuem-start", "1", "--workers", "0", "--log-every", "0", "--arm",
                          "--label-noise", "0.3", "--device", "cuda",
                          "--out", str(tmp_path)])
    assert fake_gpu.after_the_first_step() == [] and res["final_epoch"] == 2
    assert "images decoded once into cuda memory" in text


def test_fake_gpu_benchmark_runs_every_job(fake_gpu):
    cfg = fs.Config(device="cuda", img_size=64, batch_size=8, queue_size=32, pretrained="none")
    res = fs.benchmark(cfg, {"img_size": 64, "batch_size": 8}, rounds=(1, 0))
    assert res["device"] == "a fake GPU"


def test_fake_gpu_predict_and_export_compute_on_the_device(fake_gpu):
    cfg = fs.Config(img_size=64, queue_size=32, arm=True)
    model = fake_gpu_model(cfg, 7, "none", "cuda").eval()
    x = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8, device="cuda")
    predicted = fs.logits_of(model, x, 64, 4)["batch_independent"]  # --predict's call
    exported = fs.ExportedNet(model, 64)(x)  # the exported program's forward
    assert predicted.device.type == exported.device.type == "cuda"


def test_fake_gpu_sees_a_host_copy_in_the_step(fake_gpu, monkeypatch):
    # the detector itself: normalisation constants built from a list in every call
    def uncached(device):
        mean = torch.tensor(fs.IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        return mean, torch.tensor(fs.IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    monkeypatch.setattr(fs, "imagenet_constants", uncached)
    x = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8, device="cuda")
    fs.two_views(x, fs.Config(img_size=64), 1, 0, keys=True)
    assert any("built from host data" in event for _, event in fake_gpu.events)


# ---- On a real GPU: skipped without one ------------------------------------------------------

@needs_cuda
def test_cuda_bf16_step_keeps_the_losses_and_the_queue_in_float32():
    device = torch.device("cuda")
    cfg = fs.Config(img_size=64, queue_size=32, arm=True)
    model = fs.build_model(cfg, 7, "none", device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], fused=True)
    fill_queue(model)
    x = torch.randint(0, 256, (16, 3, 48, 48), dtype=torch.uint8, device=device)
    x_q, x_k = fs.two_views(x, cfg, 1, 0, keys=True)
    out = fs.train_step(model, opt, x_q, x_k, torch.arange(16, device=device) % 7, lam=0.5,
                        m=0.9, tau=0.1, theta=0.1, use_cuem=True, amp=fs.autocast(device))
    assert out.loss.dtype == out.ce.dtype == out.supcon.dtype == torch.float32
    assert model.queue.feats.dtype == torch.float32 and torch.isfinite(out.loss)


@needs_cuda
@slow
def test_cuda_two_epochs_then_resume_give_the_same_weights(tmp_path):
    # --deterministic: CUDA's default kernels may add in another order on every run
    args = TINY[:-1] + ["cuda", "--arm", "--deterministic", "--cuem-start", "1"]
    try:
        run_main(args + ["--epochs", "2", "--out", str(tmp_path / "whole")])
        run_main(args + ["--epochs", "1", "--out", str(tmp_path / "cut")])
        run_main(["--resume", str(tmp_path / "cut" / "last.pt"), "--epochs", "2"])
    finally:  # a process-wide mode: the tests after this one run without it
        torch.use_deterministic_algorithms(False)
    a, b = (saved_weights(tmp_path / run / "last.pt") for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_cuda
@slow
def test_cuda_predict_export_and_evaluation_agree(ferplus_ckpt, tmp_path):
    root, ckpt_path = ferplus_ckpt
    files = sorted((root / "FER2013Test").glob("*.png"))
    *_, model = fs.open_checkpoint(ckpt_path, {"device": "cuda"}, "eval", ("device",))
    x = fs.Images(fs.load_dataset("ferplus", root, "test", 48), torch.device("cuda"),
                  "device", 0).x
    evaluated = fs.logits_of(model, x, 64, 8)["batch_independent"].softmax(1).cpu()
    res, _ = run_main(["--predict", *map(str, files), "--checkpoint", str(ckpt_path),
                       "--device", "cuda"])
    predicted = torch.tensor([res["probabilities"][str(f)] for f in files])
    fs.main(["--export", str(tmp_path / "m.pt2"), "--checkpoint", str(ckpt_path)])
    exported = torch.export.load(tmp_path / "m.pt2").module()(
        torch.stack([fs.pil_to_uint8(Image.open(f), 48) for f in files]))
    # the GPU's float32 convolutions may use TF32 (10-bit mantissa): ~1e-3 relative on the
    # logits, a few 1e-4 on probabilities; the exported program runs float32 on the CPU
    assert torch.allclose(predicted, evaluated, atol=1e-5)  # the same device and kernels
    assert torch.allclose(exported.detach(), evaluated, atol=5e-3)
