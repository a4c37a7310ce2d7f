"""Tests for fer_supcon.py: every vectorised formula against a naive loop
written straight from the paper, the edge cases, the loaders on fixtures in
the published formats, and the command line end to end. CPU only."""
import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fer_supcon as fs

HERE = Path(__file__).parent


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


# ---- Eq. (2): supervised contrastive loss ----------------------------------

def naive_supcon(q, q_labels, keys, key_labels, tau):
    """Eq. (2) literally: for each anchor i with positives P(i), the mean over p
    of -log(exp(s_ip) / (exp(s_ip) + sum_{a in A(i)} exp(s_ia))), then the mean
    over anchors that have a positive."""
    per_anchor = []
    for i in range(len(q)):
        s = [float(q[i] @ keys[j]) / tau for j in range(len(keys))]
        P = [j for j in range(len(keys)) if key_labels[j] >= 0 and key_labels[j] == q_labels[i]]
        A = [j for j in range(len(keys)) if key_labels[j] >= 0 and key_labels[j] != q_labels[i]]
        if not P:
            continue
        terms = [-math.log(math.exp(s[p]) / (math.exp(s[p]) + sum(math.exp(s[a]) for a in A))) for p in P]
        per_anchor.append(sum(terms) / len(P))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_supcon_matches_naive_eq2_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, keys = unit(6, 8, seed), unit(20, 8, seed + 100)
    q_labels = torch.randint(0, 4, (6,), generator=g)
    key_labels = torch.randint(-1, 4, (20,), generator=g)  # -1: empty slots
    got = fs.supcon_loss(q, q_labels, keys, key_labels, tau=0.1)
    assert got.item() == pytest.approx(naive_supcon(q, q_labels, keys, key_labels, 0.1), rel=1e-9)


@pytest.mark.parametrize("case", ["empty_slots", "class_missing", "no_negatives", "no_positives", "all_agree"])
def test_supcon_edge_cases_match_naive_and_have_finite_gradients(case):
    q, keys = unit(4, 8, 1).requires_grad_(), unit(10, 8, 2)
    q_labels, key_labels = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 1, 0, 2, -1, -1, 1, 0, 2])
    if case == "empty_slots":
        key_labels = torch.full((10,), -1)
    elif case == "class_missing":
        q_labels = torch.tensor([3, 3, 0, 1])  # class 3 is not in the queue
    elif case == "no_negatives":
        key_labels, q_labels = torch.tensor([1] * 8 + [-1, -1]), torch.tensor([1, 1, 1, 1])
    elif case == "no_positives":
        q_labels = torch.tensor([5, 6, 5, 6])
    elif case == "all_agree":
        q_labels = torch.tensor([1, 1, 1, 1])
    loss = fs.supcon_loss(q, q_labels, keys, key_labels, tau=0.1)
    assert loss.item() == pytest.approx(naive_supcon(q.detach(), q_labels, keys, key_labels, 0.1), abs=1e-12)
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


# ---- CUEM (Sec. II-B) -------------------------------------------------------

def naive_cuem(q, labels, queue, queue_labels, num_classes, theta):
    new, us = [], []
    for i in range(len(q)):
        S = {}
        for c in range(num_classes):
            members = [j for j in range(len(queue)) if queue_labels[j] == c]
            if members:
                S[c] = sum(float(F.cosine_similarity(q[i], queue[j], dim=0)) for j in members) / len(members)
        y = int(labels[i])
        if y not in S:
            new.append(y), us.append(0.0)
            continue
        c_max = max(S, key=S.get)
        u = S[c_max] - S[y]
        us.append(u)
        new.append(c_max if u > theta else y)
    return new, us


@pytest.mark.parametrize("seed", range(5))
def test_cuem_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    q, queue = unit(12, 6, seed), unit(40, 6, seed + 7)
    labels = torch.randint(0, 5, (12,), generator=g)
    queue_labels = torch.randint(-1, 4, (40,), generator=g)  # class 4 never in the queue; -1 empty
    new, u = fs.cuem(q, labels, queue, queue_labels, 5, theta=0.05)
    ref_new, ref_u = naive_cuem(q, labels, queue, queue_labels, 5, 0.05)
    assert new.tolist() == ref_new
    assert u.tolist() == pytest.approx(ref_u, abs=1e-6)


def test_cuem_relabels_only_past_theta():
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue_labels = torch.tensor([0, 1])
    angle = lambda d: torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))]])
    # u = cos(d) - sin(d) when labelled 1 and nearer class 0
    q = torch.cat([angle(40), angle(30), angle(45)])  # u: 0.124, 0.366, 0
    new, u = fs.cuem(q, torch.tensor([1, 1, 1]), queue, queue_labels, 2, theta=0.2)
    assert new.tolist() == [1, 0, 1]
    assert u[2].item() == pytest.approx(0.0, abs=1e-6)


def test_cuem_keeps_label_when_own_class_absent_or_queue_empty():
    q = unit(3, 4, 0)
    new, u = fs.cuem(q, torch.tensor([2, 2, 2]), unit(5, 4, 1), torch.tensor([0, 1, 0, 1, -1]), 3)
    assert new.tolist() == [2, 2, 2] and u.abs().max() == 0
    new, u = fs.cuem(q, torch.tensor([0, 1, 2]), torch.zeros(5, 4), torch.full((5,), -1), 3)
    assert new.tolist() == [0, 1, 2] and u.abs().max() == 0


# ---- Eq. (4), queue, momentum encoder ---------------------------------------

def test_loss_weight_follows_eq4():
    assert fs.loss_weight(1) == pytest.approx(1 - 1 / 30)
    assert fs.loss_weight(15) == pytest.approx(0.5)
    assert fs.loss_weight(30) == 0.0  # as written: lambda(alpha) = 0
    assert fs.loss_weight(31) == 1e-4 and fs.loss_weight(100) == 1e-4
    assert fs.loss_weight(5, alpha=20, beta=0.1) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        fs.loss_weight(0)


def test_queue_wraps_around():
    Q = fs.LabeledQueue(5, 2)
    assert (Q.labels == -1).all() and not Q.is_full()
    for step in range(3):  # 3 batches of 2 into 5 slots: the third wraps
        Q.enqueue(torch.full((2, 2), float(step)), torch.tensor([step, step]))
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


def test_momentum_update_m0_copies_m1_freezes_and_mixes_in_between():
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    q(torch.randn(8, 3))  # non-trivial running stats
    k = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    k0 = {n: t.clone() for n, t in k.state_dict().items()}
    fs.momentum_update(q, k, 1.0)
    assert all(torch.equal(k0[n], p) for n, p in k.named_parameters())
    fs.momentum_update(q, k, 0.5)
    for (n, p_k), p_q in zip(k.named_parameters(), q.parameters()):
        assert torch.allclose(p_k, 0.5 * k0[n] + 0.5 * p_q)
    assert torch.equal(k[1].running_mean, q[1].running_mean)  # buffers copied
    fs.momentum_update(q, k, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(k.state_dict().values(), q.state_dict().values()))


# ---- ARM and the network ------------------------------------------------------

@pytest.mark.parametrize("img,side", [(96, 3), (112, 5), (224, 11)])
def test_arm_shapes(img, side):
    s, o = fs.arm_sizes(img)
    assert o == side
    arm = fs.ARM(7, img)
    assert arm(torch.randn(4, 512, s, s)).shape == (4, 7)
    assert arm.fc.in_features == side * side and arm.running_g.shape == (side, side)
    assert {n for n, _ in arm.named_parameters()} == {"de_albino.weight", "bn.weight", "bn.bias", "alpha", "fc.weight", "fc.bias"}
    net = fs.FERSupCon(7, img, queue_size=16)
    assert net.encoder_q.trunk(torch.randn(2, 3, img, img)).shape == (2, 512, s, s)


def test_arm_matches_naive_reading_of_the_official_module():
    torch.manual_seed(0)
    arm = fs.ARM(7, 112)
    f = torch.randn(3, 512, 4, 4)
    x = torch.zeros(3, 2, 64, 64)  # feature arrangement by hand: channel 256c+16i+j at (h,w) -> (c, 16h+i, 16w+j)
    for c in range(2):
        for i in range(16):
            for j in range(16):
                x[:, c, i::16, j::16] = f[:, 256 * c + 16 * i + j]
    y = torch.cat([arm.de_albino(x[:, c:c + 1]) for c in range(2)], 1)  # the shared kernel on each map
    y = arm.bn(y)
    z = y.mean(1) + arm.alpha * y.mean((0, 1))
    assert torch.allclose(arm(f), arm.fc(z.flatten(1)), atol=1e-5)


def test_arm_eval_is_batch_independent_and_official_mode_is_not():
    torch.manual_seed(0)
    arm = fs.ARM(7, 96)
    arm.train()
    for _ in range(5):
        arm(torch.randn(8, 512, 3, 3) + 1.0)  # fills the running statistics and running g
    arm.eval()
    f = torch.randn(8, 512, 3, 3)
    alone = torch.cat([arm(f[i:i + 1]) for i in range(8)])
    assert torch.allclose(arm(f), alone, atol=1e-5)
    arm.eval_batch_mean = True  # --arm-eval batch
    assert not torch.allclose(arm(f)[:4], arm(f[:4]), atol=1e-3)


def test_image_size_under_64_is_rejected():
    with pytest.raises(fs.UserError, match="at least 64"):
        fs.arm_sizes(60)


def test_pretrained_path_loads_strips_module_and_fails_loudly(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18()
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "ok.pth")
    trunk = fs.build_trunk(str(tmp_path / "ok.pth"))
    assert torch.equal(trunk.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    del sd["module.layer3.0.conv1.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(fs.UserError, match="1 missing"):
        fs.build_trunk(str(tmp_path / "missing.pth"))
    sd = {**ref.state_dict(), "feature.weight": torch.zeros(3)}
    torch.save(sd, tmp_path / "unused.pth")
    with pytest.raises(fs.UserError, match="1 unused"):
        fs.build_trunk(str(tmp_path / "unused.pth"))


def test_key_encoder_starts_as_a_copy_and_has_no_gradients():
    net = fs.FERSupCon(7, 96, queue_size=8)
    for a, b in zip(net.encoder_q.state_dict().values(), net.encoder_k.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in net.encoder_k.parameters())


def make_step_inputs(B=8, C=7, size=64, K=16):
    torch.manual_seed(0)
    net = fs.FERSupCon(C, size, queue_size=K, arm=False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(B, 3, size, size)
    return net, opt, x, torch.randint(0, C, (B,))


def test_step_enqueues_keys_with_the_labels_it_used():
    net, opt, x, y = make_step_inputs()
    amp = fs.autocast(torch.device("cpu"))
    loss, ce, sup, used = fs.train_step(net, opt, x, x.flip(-1), y, 0.5, 0.99, 0.1, 0.1, True, True, amp)
    assert torch.equal(net.queue.labels[:8], used) and (net.queue.labels[8:] == -1).all()
    assert sup.item() == 0.0  # the queue was empty before this step
    assert torch.allclose(net.queue.feats[:8].norm(dim=1), torch.ones(8))


def test_baseline_step_skips_the_key_branch_and_no_scl_keeps_the_queue():
    net, opt, x, y = make_step_inputs()
    amp = fs.autocast(torch.device("cpu"))
    k0 = [p.clone() for p in net.encoder_k.parameters()]
    _, _, sup, used = fs.train_step(net, opt, x, None, y, 0.0, 0.5, 0.1, 0.1, False, False, amp)
    assert (net.queue.labels == -1).all() and torch.equal(used, y) and sup.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(k0, net.encoder_k.parameters()))
    _, _, sup, _ = fs.train_step(net, opt, x, x, y, 0.0, 0.5, 0.1, 0.1, True, True, amp)  # --no-scl with CUEM
    assert (net.queue.labels[:8] >= 0).all() and sup.item() == 0.0


# ---- Augmentation -------------------------------------------------------------

def test_augment_shapes_dtype_and_same_seed_same_views():
    x = torch.randint(0, 256, (6, 3, 50, 50), dtype=torch.uint8)
    a = fs.augment(x, 64, torch.Generator().manual_seed(3))
    b = fs.augment(x, 64, torch.Generator().manual_seed(3))
    c = fs.augment(x, 64, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(0)
    q, k = fs.augment(x, 64, g), fs.augment(x, 64, g)
    assert not torch.equal(q, k)  # two independent views


def test_augment_flip_really_flips_and_identity_is_identity():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    off = dict(rotate=0.0, scale=(1.0, 1.0), translate=0.0, noise_p=0.0, erase_p=0.0)
    same = fs.augment(x, 32, torch.Generator(), flip_p=0.0, **off)
    flipped = fs.augment(x, 32, torch.Generator(), flip_p=1.0, **off)
    assert torch.allclose(same, fs.prepare(x, 32), atol=1e-4)
    assert torch.allclose(flipped, fs.prepare(x.flip(-1), 32), atol=1e-4)


def test_augment_erasing_zeroes_a_rectangle():
    x = torch.full((4, 3, 40, 40), 200, dtype=torch.uint8)
    off = dict(flip_p=0.0, rotate=0.0, scale=(1.0, 1.0), translate=0.0, noise_p=0.0)
    y = fs.augment(x, 40, torch.Generator().manual_seed(0), erase_p=1.0, **off)
    for img in y:
        zero = (img == 0).all(0)  # (H, W)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert 0.015 * 1600 <= zero.sum() <= 0.26 * 1600
        assert zero.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle


# ---- Data ---------------------------------------------------------------------

def write_rafdb(root, n_train=6, n_test=3, size=30):
    (root / "EmoLabel").mkdir(parents=True)
    (root / "Image" / "aligned").mkdir(parents=True)
    lines = [f"train_{i:05d}.jpg {i % 7 + 1}" for i in range(1, n_train + 1)]
    lines += [f"test_{i:04d}.jpg {(i + 3) % 7 + 1}" for i in range(1, n_test + 1)]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines))  # no trailing newline, as shipped
    for k, line in enumerate(lines):
        name = line.split()[0].replace(".jpg", "_aligned.jpg")
        Image.new("RGB", (size, size), (k * 20, 100, 50)).save(root / "Image" / "aligned" / name)
    return lines


def test_rafdb_loader_reads_the_real_layout(tmp_path):
    write_rafdb(tmp_path)
    train = fs.load_dataset("rafdb", tmp_path, "train", 24)
    test = fs.load_dataset("rafdb", tmp_path, "test", 24)
    assert len(train) == 6 and len(test) == 3 and train.classes[0] == "surprise" and len(train.classes) == 7
    assert train.labels.tolist() == [i % 7 for i in range(1, 7)]  # labels 1..7 -> 0..6
    assert test.labels.tolist() == [(i + 3) % 7 for i in range(1, 4)]
    img, label, index = train[2]
    assert img.shape == (3, 24, 24) and img.dtype == torch.uint8 and label == 3 and index == 2
    assert img[0, 0, 0] == 40  # the third file's red value


def test_rafdb_train_labels_file_replaces_training_labels(tmp_path):
    write_rafdb(tmp_path)
    noisy = tmp_path / "noise01.txt"
    noisy.write_text("\n".join(f"train_{i:05d}.jpg {7 if i == 2 else i % 7 + 1}" for i in range(1, 7)) + "\n")
    train = fs.load_dataset("rafdb", tmp_path, "train", 24, train_labels=str(noisy))
    assert train.labels.tolist() == [1, 6, 3, 4, 5, 6]
    assert train.true_labels.tolist() == [1, 2, 3, 4, 5, 6]  # the official labels: CUEM's precision / recall
    noisy.write_text("train_00001.jpg 1")
    with pytest.raises(fs.UserError, match="5 missing"):
        fs.load_dataset("rafdb", tmp_path, "train", 24, train_labels=str(noisy))


def test_rafdb_errors_name_the_expected_files(tmp_path):
    with pytest.raises(fs.UserError, match="list_patition_label.txt"):
        fs.load_dataset("rafdb", tmp_path, "train", 24)
    write_rafdb(tmp_path)
    (tmp_path / "Image" / "aligned" / "train_00003_aligned.jpg").unlink()
    with pytest.raises(fs.UserError, match="1 of 6 images missing, first .*train_00003_aligned.jpg"):
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
    head = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
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
    assert (img[:, 8, 8].int() - torch.tensor([200, 90, 10])).abs().max() <= 8  # JPEG tolerance
    assert (img[2, 2:-2, 2:-2] < 60).all()  # cropped to the box: no blue border left
    seven = fs.load_dataset("affectnet", tmp_path, "train", 16, classes=7)
    assert seven.labels.tolist() == [0, 1, 3] and len(seven.classes) == 7
    test = fs.load_dataset("affectnet", tmp_path, "test", 16)  # the validation set is the test set
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


FERPLUS_HEAD = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
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
    assert (fs.ferplus_label(v, "majority"), fs.ferplus_label(v, "argmax")) == VOTES[votes]


def test_ferplus_csv_layout_row_for_row_with_empty_names_dropped(tmp_path):
    pix = lambda k: " ".join(str((k * 40 + i) % 256) for i in range(48 * 48))
    rows = [("Training", "fer0.png", "6,0,0,0,0,0,0,0,4,0"), ("Training", "", "0,9,0,0,0,0,0,0,0,0"),
            ("Training", "fer2.png", "4,0,0,1,3,2,0,0,0,0"), ("Training", "fer3.png", "0,3,0,0,0,0,0,2,1,0"),
            ("PublicTest", "fer4.png", "0,0,8,0,0,0,0,0,0,0"), ("PrivateTest", "fer5.png", "0,0,0,0,0,0,0,5,4,1")]
    (tmp_path / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "".join(f'0,"{pix(k)}",{u}\n' for k, (u, _, _) in enumerate(rows)))
    (tmp_path / "fer2013new.csv").write_text(FERPLUS_HEAD + "\n" + "".join(f"{u},{n},{v}\n" for u, n, v in rows))
    train = fs.load_dataset("ferplus", tmp_path, "train", 48)
    assert train.labels.tolist() == [0, 1] and train.classes == fs.FERPLUS_CLASSES
    img = train[1][0]  # row 3 (fer3.png): grayscale replicated to 3 channels
    assert img.shape == (3, 48, 48) and torch.equal(img[0], img[2]) and img[0, 0, 0] == 120
    assert fs.load_dataset("ferplus", tmp_path, "train", 48, label_rule="argmax").labels.tolist() == [0, 0, 1]
    assert fs.load_dataset("ferplus", tmp_path, "test", 48).labels.tolist() == [7]  # PrivateTest only
    (tmp_path / "fer2013new.csv").write_text(FERPLUS_HEAD + "\nTraining,fer0.png,1,2\n")
    with pytest.raises(fs.UserError, match="row for row"):
        fs.load_dataset("ferplus", tmp_path, "train", 48)


def test_ferplus_folder_layout(tmp_path):
    for split, votes in (("FER2013Train", ["6,0,0,0,0,0,0,0,4,0", "4,0,0,1,3,2,0,0,0,0"]), ("FER2013Test", ["0,0,8,0,0,0,0,0,0,0"])):
        (tmp_path / split).mkdir()
        lines = []
        for i, v in enumerate(votes):
            Image.new("L", (48, 48), 50 * i).save(tmp_path / split / f"fer{i:07d}.png")
            lines.append(f'fer{i:07d}.png,"(0, 0, 48, 48)",{v}')
        (tmp_path / split / "label.csv").write_text("\n".join(lines) + "\n")
    assert fs.load_dataset("ferplus", tmp_path, "train", 40).labels.tolist() == [0]
    assert fs.load_dataset("ferplus", tmp_path, "train", 40, label_rule="argmax").labels.tolist() == [0, 0]
    test = fs.load_dataset("ferplus", tmp_path, "test", 40)
    assert test.labels.tolist() == [2] and test[0][0].shape == (3, 40, 40)


@pytest.mark.parametrize("name,expected", [("rafdb", "list_patition_label.txt"), ("affectnet", "training.csv"),
                                           ("ferplus", "fer2013new.csv"), ("imagefolder", "train")])
def test_missing_layout_names_the_expected_files(tmp_path, name, expected):
    with pytest.raises(fs.UserError, match=expected) as e:
        fs.load_dataset(name, tmp_path, "train", 64)
    assert "expected" in str(e.value) and "ROOT/" in str(e.value)  # shows the layout


def test_balanced_sampler_equalises_class_frequencies():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = torch.cat([fs.epoch_order(labels, "balanced", 0, e) for e in range(1, 11)])
    freq = torch.bincount(labels[order], minlength=3) / len(order)
    assert len(fs.epoch_order(labels, "balanced", 0, 1)) == 1000  # an epoch is as long as the training set
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)
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
    assert changed.sum().item() == round(p * 1000)  # every chosen label moved to a different class
    assert torch.equal(noisy, fs.inject_label_noise(labels, p, 7, seed=0))
    counts = torch.bincount((noisy - labels)[changed] % 7, minlength=7)
    assert counts[0] == 0 and counts[1:].min() > 0  # all offsets used


# ---- Command line end to end ------------------------------------------------

TINY = ["--data", "synthetic", "--synthetic-train", "96", "--synthetic-test", "32", "--img-size", "64",
        "--batch-size", "16", "--workers", "0", "--log-every", "0"]


def test_end_to_end_run_writes_every_output_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    res = fs.main(TINY + ["--epochs", "3", "--cuem-start", "2", "--alpha", "2", "--out", str(out)])
    text = capsys.readouterr().out
    for name in ("last.pt", "best.pt", "metrics.jsonl", "confusion.png", "confusion.txt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["ce"] < rows[0]["ce"]  # the loss goes down
    assert rows[0]["lam"] == pytest.approx(0.5) and rows[1]["lam"] == 0.0 and rows[2]["lam"] == 1e-4
    assert {"lr", "loss", "supcon", "relabelled", "test_acc", "mean_class_acc", "samples_per_s"} <= rows[0].keys()
    assert rows[1]["lr"] == pytest.approx(rows[0]["lr"] * 0.9)
    assert "queue size 8192 capped to 96" in text and "samples/s" in text and "ETA" in text
    assert "final epoch 3" in text and "best epoch" in text
    assert f"torch {torch.__version__}" in text and "seed 0" in text and "config: data=synthetic" in text  # banner
    assert re.search(r"train: 96 images, surprise \d+, fear \d+", text) and "test: 32 images" in text
    assert res["epochs"] == 3 and 0 <= res["best_acc"] <= 1
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["model"]["queue.labels"].min() >= 0  # the queue filled
    img = Image.open(out / "confusion.png")
    assert img.size[0] > 300 and img.mode == "RGB"


def test_worker_decoding_path_trains_exactly_like_the_cache(tmp_path):
    args = TINY + ["--epochs", "2", "--cuem-start", "1"]
    fs.main(args + ["--cache", "on", "--out", str(tmp_path / "on")])
    fs.main(args + ["--cache", "off", "--workers", "2", "--out", str(tmp_path / "off")])  # the last --workers wins
    a, b = final_weights(tmp_path / "on" / "last.pt"), final_weights(tmp_path / "off" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_label_noise_run_logs_relabel_precision_and_recall(tmp_path):
    res = fs.main(TINY + ["--epochs", "2", "--cuem-start", "1", "--label-noise", "0.3", "--out", str(tmp_path)])
    row = res["history"][-1]
    assert "relabel_precision" in row and "relabel_recall" in row
    assert 0 <= row["relabel_precision"] <= 1 and 0 <= row["relabel_recall"] <= 1


def test_predict_and_eval_use_only_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    fs.main(TINY + ["--epochs", "1", "--arm", "--out", str(out)])  # ARM on: both eval modes exist
    faces = tmp_path / "faces"
    faces.mkdir()
    Image.new("L", (100, 80), 120).save(faces / "gray.png")  # any size, grayscale
    Image.fromarray(fs.SyntheticFaces(1, "test", 130)[0][0].permute(1, 2, 0).numpy()).save(faces / "face.jpg")
    capsys.readouterr()
    ckpt = torch.load(out / "best.pt", weights_only=True)
    ckpt["config"]["device"] = "cuda"  # trained elsewhere: applying it here must not need that device
    torch.save(ckpt, out / "best.pt")
    res = fs.main(["--predict", str(faces / "gray.png"), str(faces / "face.jpg"), "--checkpoint", str(out / "best.pt")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(faces / "gray.png") + ": ")
    for top in res.values():
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and top[0][0] in fs.RAFDB_CLASSES
    res = fs.main(["--eval", str(out / "best.pt"), "--arm-eval", "batch", "--workers", "0"])
    text = capsys.readouterr().out
    assert set(res) == {"running", "batch"} and "batch-independent" in text and "official" in text
    assert (out / "best_confusion.png").is_file() and (out / "best_confusion_batch.txt").is_file()
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert res["running"]["acc"] == pytest.approx(metrics["test_acc"])  # the same number as during training


def run_cli(args, **kw):
    return subprocess.run([sys.executable, str(HERE / "fer_supcon.py"), *args], capture_output=True, text=True,
                          cwd=kw.pop("cwd", None), timeout=kw.pop("timeout", 300), **kw)


def final_weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_after_sigkill_gives_bitwise_equal_weights(tmp_path):
    args = TINY + ["--epochs", "4", "--cuem-start", "2", "--alpha", "3", "--seed", "5"]
    assert run_cli(args + ["--out", str(tmp_path / "whole")]).returncode == 0
    proc = subprocess.Popen([sys.executable, str(HERE / "fer_supcon.py"), *args, "--out", str(tmp_path / "cut")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "cut" / "last.pt"
    while not last.exists() and proc.poll() is None:
        pass
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert epoch < 4
    done = run_cli(["--resume", str(last)])
    assert done.returncode == 0, done.stderr
    assert f"resumed from {last} after epoch {epoch}" in done.stdout
    a, b = final_weights(tmp_path / "whole" / "last.pt"), final_weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    drop = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in ("seconds", "samples_per_s")} for r in rows]
    assert drop(whole) == drop(cut)


def test_ctrl_c_stops_cleanly_and_names_the_last_checkpoint(tmp_path):
    import signal
    proc = subprocess.Popen([sys.executable, str(HERE / "fer_supcon.py"), *TINY, "--epochs", "50", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "last.pt").exists() and proc.poll() is None:
        pass
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


def bad_input_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    for c in ("a", "b"):
        (tmp_path / "noimg" / "train" / c).mkdir(parents=True)
        (tmp_path / "noimg" / "test" / c).mkdir(parents=True)
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04garbage")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    empty = str(tmp_path / "empty")
    return {
        "rafdb root missing": (["--data", "rafdb", "--root", str(tmp_path / "nope")], "is not a folder"),
        "rafdb root wrong": (["--data", "rafdb", "--root", empty], "list_patition_label.txt"),
        "affectnet root wrong": (["--data", "affectnet", "--root", empty], "Manually_Annotated_file_lists"),
        "ferplus root wrong": (["--data", "ferplus", "--root", empty], "fer2013new.csv"),
        "imagefolder root wrong": (["--data", "imagefolder", "--root", empty], "ROOT/train/<class>"),
        "no root": (["--data", "rafdb"], "needs --root"),
        "image size": (["--img-size", "48"], "at least 64"),
        "label noise": (["--label-noise", "1.0"], "expected a fraction in [0, 1)"),
        "batch size": (["--batch-size", "0"], "expected at least 1"),
        "folder without images": (["--data", "imagefolder", "--root", str(tmp_path / "noimg")], "no images"),
        "missing checkpoint": (["--eval", str(tmp_path / "none.pt")], "does not exist"),
        "truncated checkpoint": (["--eval", str(tmp_path / "truncated.pt")], "not a readable torch file"),
        "foreign checkpoint": (["--resume", str(tmp_path / "foreign.pt")], "not a fer_supcon checkpoint"),
        "unknown dataset": (["--data", "ckplus"], "invalid choice: 'ckplus'"),
        "unreadable image": (["--predict", str(tmp_path / "bad.jpg"), "--checkpoint", "X"], None),
    }


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys):
    cases = bad_input_cases(tmp_path)
    fs.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "best.pt")
    cases["unreadable image"] = (["--predict", str(tmp_path / "bad.jpg"), "--checkpoint", ckpt], "cannot read image")
    cases["checkpoint does not fit"] = (["--eval", ckpt, "--img-size", "96"], "--img-size 96 (checkpoint: 64)")
    cases["other classes"] = (["--eval", ckpt, "--data", "ferplus", "--root", str(tmp_path / "fp")], "has 7 classes")
    (tmp_path / "fp" / "FER2013Test").mkdir(parents=True)
    Image.new("L", (48, 48)).save(tmp_path / "fp" / "FER2013Test" / "a.png")
    (tmp_path / "fp" / "FER2013Test" / "label.csv").write_text('a.png,"(0, 0, 48, 48)",0,9,0,0,0,0,0,0,0,0\n')
    capsys.readouterr()
    for name, (args, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            fs.main(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("fer_supcon: error: ") and message in err, (name, err)


def test_corrupt_image_in_a_dataset_is_reported_with_its_path(tmp_path):
    write_rafdb(tmp_path / "raf")
    bad = tmp_path / "raf" / "Image" / "aligned" / "train_00004_aligned.jpg"
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    r = run_cli(["--data", "rafdb", "--root", str(tmp_path / "raf"), "--img-size", "64", "--pretrained", "none",
                 "--batch-size", "2", "--epochs", "1", "--workers", "2", "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"fer_supcon: error: cannot read image {bad}: " + r.stderr.split(f"{bad}: ")[1].strip()]


def test_compile_gives_the_same_losses_as_eager_on_the_cpu():
    import dataclasses

    def losses(compile_):
        torch.manual_seed(0)
        cfg = dataclasses.replace(fs.Config(), img_size=64, queue_size=16, compile=compile_)
        net = fs.build_model(cfg, 7, "none", torch.device("cpu")).train()
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        x, y, out = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8), torch.arange(8) % 7, []
        for step in range(3):
            g = fs.step_generator(0, 1, step, "cpu")
            views = [fs.augment(x, 64, g).contiguous(memory_format=torch.channels_last) for _ in range(2)]
            # CUEM off: its threshold would turn rounding differences into label flips
            loss, *_ = fs.train_step(net, opt, *views, y, 0.5, 0.9, 0.1, 0.1, True, False, fs.autocast(torch.device("cpu")))
            out.append(loss.item())
        return out

    eager, compiled = losses(False), losses(True)
    assert compiled == pytest.approx(eager, rel=2e-3)
    assert eager[0] != eager[1]  # the steps really trained
