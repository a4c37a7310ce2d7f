"""fer_supcon.py: Hu et al., "Facial Expression Recognition with Supervised Contrastive Learning and
Uncertainty Estimation", in one file, to be read next to the paper.

The network of Fig. 2 is a ResNet-18 trunk whose feature map feeds
  * the top branch, ARM + a linear classifier, trained with cross-entropy (Eq. 1);
  * a MoCo query branch, GAP + projection head -> z_q, and a momentum key encoder -> z_k that fills a
    labelled queue Q of K = 8192 slots (Sec. II-A);
  * the supervised contrastive loss between z_q and Q (Eq. 2), weighted by a lambda that decays with
    the epoch (Eq. 3, 4);
  * CUEM (Sec. II-B), which relabels a sample when its mean cosine similarity to another class of Q
    exceeds the one to its own class by more than theta.

Run it:
    python fer_supcon.py --data synthetic            # no download: a few minutes on a 2-core CPU
    python fer_supcon.py --data rafdb --root RAF-DB  # the paper's setting, one GPU
    python fer_supcon.py --eval runs/X/best.pt       # accuracy, confusion matrix, batch-independence check
    python fer_supcon.py --predict faces/ --checkpoint runs/X/best.pt --csv predictions.csv
    python fer_supcon.py --export model.pt2 --checkpoint runs/X/best.pt
    python fer_supcon.py --benchmark                 # training step, augmentation, loader, inference speed

The file reads top to bottom: config; Sec. II, the method, in the paper's order; data on the device;
the training loop; outputs; using a trained model; an appendix (dataset formats, synthetic faces,
drawings, benchmark); the command line. Every decision the paper leaves open is marked
`NOTE: not in the paper` and listed with its measured reason in README.md.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import glob
import json
import math
import os
import platform
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont

DATASETS = ("rafdb", "affectnet", "ferplus", "imagefolder", "synthetic")
REAL = DATASETS[:4]


# ==== Config (Sec. III-B) ===========================================================================

def param(default, help, choices=None, only=None, **per_data):
    """A config field: default, help, allowed values, the datasets it applies to, per-dataset defaults."""
    return field(default=default, metadata=dict(help=help, choices=choices, only=only, per_data=per_data))

@dataclass
class Config:
    # data (Sec. III-A)
    data: str = param("synthetic", "dataset", choices=DATASETS)
    root: str = param("", "dataset folder (layouts: README, 'Datasets')", only=REAL)
    train_labels: str = param("", "training labels from this file instead (e.g. noise02.txt)", only=("rafdb",))
    classes: int = param(8, "8 classes, or 7 without contempt", choices=(7, 8), only=("affectnet",))
    ferplus_label: str = param("majority", "label rule", choices=("majority", "argmax"), only=("ferplus",))
    synthetic_train: int = param(1500, "training images", only=("synthetic",))
    synthetic_test: int = param(700, "test images", only=("synthetic",))
    label_noise: float = param(0.0, "flip this fraction of training labels to another class (SCN protocol)")
    sampler: str = param("shuffle", "epoch order", choices=("shuffle", "balanced"), affectnet="balanced")
    img_size: int = param(224, "network input side, at least 64", synthetic=64)
    cache: str = param("auto", "decoded images in memory (auto: under --cache-gb)", choices=("auto", "on", "off"))
    cache_gb: float = param(8.0, "memory budget of the decoded-image cache")
    workers: int = param(min(8, os.cpu_count() or 1), "decoding processes")
    # network (Sec. II, Fig. 2)
    pretrained: str = param("imagenet", "trunk: imagenet | none | PATH of a ResNet-18 state dict", synthetic="none")
    no_arm: bool = param(False, "GAP + linear instead of ARM (ablation)", synthetic=True)
    arm_eval: str = param("running", "ARM's test-time g: running mean | batch (official)", choices=("running", "batch"))
    # II-A supervised contrastive learning
    queue_size: int = param(8192, "K, queue slots (Sec. II-A)")
    momentum: float | None = param(None, "m, key-encoder momentum; none given: 1 - batch size / queue size")
    tau: float = param(0.1, "tau, temperature of Eq. (2)")
    no_scl: bool = param(False, "lambda = 0: no supervised contrastive loss (Table II)")
    # II-B CUEM
    theta: float = param(0.1, "theta, CUEM's uncertainty threshold (Sec. II-B)")
    cuem_start: int = param(10, "first epoch of CUEM (SCN's relabel start; not in the paper)", synthetic=5)
    no_cuem: bool = param(False, "no relabelling (Table II)")
    # II-C objective, Sec. III-B optimiser
    alpha: float = param(30.0, "alpha of Eq. (4)")
    beta: float = param(1e-4, "beta of Eq. (4)")
    epochs: int = param(100, "training epochs", synthetic=8)
    batch_size: int = param(256, "batch size", synthetic=32)
    lr: float = param(1e-3, "Adam learning rate")
    weight_decay: float = param(1e-4, "Adam weight decay")
    lr_decay: float = param(0.9, "learning rate x this after every epoch")
    # the run
    device: str = param("auto", "where to train", choices=("auto", "cuda", "cpu"))
    seed: int = param(0, "seed of init, data order, augmentation and label noise")
    out: str = param("", "output folder; empty: runs/<data>-<date>-<time>")
    resume: str = param("", "continue the run saved in this last.pt")
    compile: bool = param(False, "torch.compile the network")
    log_every: float = param(10.0, "seconds between progress lines")

def make_config(given: dict) -> Config:
    """The config of a run: the flags given, else the dataset's own default, else the field's default."""
    data = given.get("data", Config.data)
    per_data = {f.name: f.metadata["per_data"][data] for f in dataclasses.fields(Config)
                if data in f.metadata["per_data"]}
    return Config(**{**per_data, **given})

class UserError(Exception):
    """A mistake the user can fix; main() prints it as one line and exits 2."""


# ==== II  The method ================================================================================
# ---- Fig. 2: ResNet-18 trunk, ARM (top branch), projection head --------------------------------------

def build_trunk(pretrained: str = "none") -> nn.Sequential:
    """torchvision ResNet-18 up to layer4 (no avgpool, no fc): (B, 3, S, S) -> (B, 512, S/32, S/32).
    pretrained: 'imagenet' (Sec. III-B), 'none' or the path of a ResNet-18 state dict."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if pretrained == "imagenet" else None
    try:
        r = torchvision.models.resnet18(weights=weights)
    except Exception as e:  # offline, proxy, ...
        raise UserError(f"cannot get the ImageNet weights of ResNet-18 ({type(e).__name__}: {e}); "
                        "use --pretrained none or --pretrained PATH") from None
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    trunk = nn.Sequential(OrderedDict((n, getattr(r, n)) for n in names))
    if pretrained not in ("imagenet", "none"):
        load_trunk_weights(trunk, pretrained)
    return trunk

def load_trunk_weights(trunk: nn.Module, path: str) -> None:
    """A ResNet-18 state dict (e.g. resnet18_msceleb.pth), bare or in 'state_dict', 'module.' or not; no fc.*"""
    sd = load_torch_file(path, "--pretrained file")
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--pretrained {path}: expected a ResNet-18 state dict (name -> tensor)")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.removeprefix("module.").startswith("fc.")}
    own = trunk.state_dict()  # files saved before PyTorch 0.4.1 have no BatchNorm update counts
    sd.update({k: own[k] for k in own.keys() - sd.keys() if k.endswith("num_batches_tracked")})
    load_weights(trunk, sd, f"--pretrained {path} (ResNet-18)")

def arm_sizes(img_size: int) -> tuple[int, int]:
    """(trunk map side s, ARM output side o) for an input side S: s = ceil(S / 32), o = (16 s - 32) // 8 + 1."""
    if img_size < 64:
        raise ValueError(f"input side {img_size} is too small: ARM needs at least 64")
    s = math.ceil(img_size / 32)  # ResNet-18 halves the side five times, rounding up
    return s, (16 * s - 32) // 8 + 1

class ARM(nn.Module):
    """Amending Representation Module (Shi & Zhu, arXiv 2103.10189), the top branch of Fig. 2: feature
    arrangement, de-albino kernel, BatchNorm, sharing affinity, classifier. (B, 512, s, s) -> logits (B, C).
    eval_batch_mean=True is the official code's test time: g from the test batch itself."""

    def __init__(self, num_classes: int, img_size: int = 224, eval_batch_mean: bool = False):
        super().__init__()
        self.s, self.o = arm_sizes(img_size)
        self.de_albino = nn.Conv2d(1, 1, kernel_size=32, stride=8, padding=0, bias=False)  # one shared kernel
        self.bn = nn.BatchNorm2d(2)
        self.affinity_weight = nn.Parameter(torch.ones(1))  # `alpha` in the official code, init 1.0
        self.fc = nn.Linear(self.o * self.o, num_classes)
        # NOTE: not in the paper - a running mean of g (momentum 0.1, like BatchNorm) for test time, so that a
        # prediction does not depend on the other images of its batch.
        self.register_buffer("running_g", torch.zeros(self.o, self.o))
        self.momentum, self.eval_batch_mean = 0.1, eval_batch_mean

    def forward(self, f):  # f: (B, 512, s, s)
        B = f.shape[0]
        x = F.pixel_shuffle(f, 16)  # (B, 2, 16s, 16s): channel 256c+16i+j at (h, w) -> map c, pixel (16h+i, 16w+j)
        y = self.de_albino(x.reshape(2 * B, 1, 16 * self.s, 16 * self.s))  # the kernel on each map: (2B, 1, o, o)
        y = self.bn(y.reshape(B, 2, self.o, self.o))  # (B, 2, o, o)
        if self.training or self.eval_batch_mean:
            g = y.mean((0, 1))  # (o, o): the mean over the batch and both maps
            if self.training:
                with torch.no_grad():
                    self.running_g.lerp_(g.float(), self.momentum)
        else:
            g = self.running_g.to(y.dtype)
        z = y.mean(1) + self.affinity_weight * g  # (B, o, o): sharing affinity
        return self.fc(z.flatten(1))  # (B, C)

def gap_classifier(num_classes: int) -> nn.Sequential:
    """--no-arm, the ablation without ARM: global average pooling + Linear(512, C). (B, 512, s, s) -> (B, C)."""
    return nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(512, num_classes)))

def projection_head(dim: int = 128) -> nn.Sequential:
    """The paper's "three-layer nonlinear MLP", r (512) -> z (dim).
    NOTE: not in the paper - widths 512-512-dim and BatchNorm (MoCo v2 / SupContrast practice)."""
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                         nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                         nn.Linear(512, dim))

class Encoder(nn.Module):
    """CNN + GAP + projection head, the query and key branches of Fig. 2."""

    def __init__(self, trunk: nn.Module, dim: int = 128):
        super().__init__()
        self.trunk, self.head = trunk, projection_head(dim)

    def forward(self, x):  # (B, 3, S, S) -> feature map f (B, 512, s, s), z (B, dim) L2-normalised
        f = self.trunk(x)
        return f, F.normalize(self.head(f.mean((2, 3))).float(), dim=1)  # r = GAP(f): (B, 512)

class FERSupCon(nn.Module):
    """The network of Fig. 2: the query encoder and the top branch, the momentum key encoder (a copy made
    after the trunk weights are loaded) and the labelled queue."""

    def __init__(self, num_classes, img_size=224, pretrained="none", arm=True, arm_eval_batch=False,
                 queue_size=8192, dim=128):
        super().__init__()
        self.encoder_q = Encoder(build_trunk(pretrained), dim)
        self.classifier = ARM(num_classes, img_size, arm_eval_batch) if arm else gap_classifier(num_classes)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.queue = LabeledQueue(queue_size, dim)

    def forward(self, x):  # inference: (B, 3, S, S) -> logits (B, C)
        return self.classifier(self.encoder_q.trunk(x))


# ---- II-A  Momentum encoder, labelled queue, supervised contrastive loss (Eq. 2) ---------------------

@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """MoCo's key encoder: w_k <- m w_k + (1 - m) w_q over the parameters w; buffers
    (BatchNorm statistics) are copied. m = 0 copies, m = 1 freezes."""
    p_k, p_q = list(target.parameters()), list(online.parameters())
    if not 0 <= m <= 1 or [p.shape for p in p_k] != [p.shape for p in p_q]:
        raise ValueError(f"momentum_update needs m in [0, 1] (got {m}) and modules with the same parameters")
    torch.optim.swa_utils.get_ema_multi_avg_fn(m)(p_k, p_q, None)  # one fused lerp: p_k += (1 - m) (p_q - p_k)
    for b_k, b_q in zip(target.buffers(), online.buffers()):
        b_k.copy_(b_q)

class LabeledQueue(nn.Module):
    """Q of Sec. II-A: K slots of (z_k, label); label -1 marks an empty slot. Buffers, so that the queue
    moves with .to() and is saved in the state dict."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"LabeledQueue needs size and dim >= 1, got {size}, {dim}")
        self.register_buffer("feats", torch.zeros(size, dim))  # (K, D)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int64))  # (K,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, feats, labels):
        """Ring buffer: write the batch (B, D), (B,) at (ptr + arange(B)) % K, without a host sync."""
        if feats.shape != (len(labels), self.feats.shape[1]):
            raise ValueError(f"enqueue expects feats (B, {self.feats.shape[1]}) and labels (B,), "
                             f"got {tuple(feats.shape)} and {tuple(labels.shape)}")
        K, B = len(self.labels), len(labels)
        if B > K:  # only the last K survive
            self.ptr.add_(B - K)
            feats, labels, B = feats[-K:], labels[-K:], K
        idx = (self.ptr + torch.arange(B, device=self.ptr.device)) % K  # (B,)
        self.feats[idx] = feats.detach().to(self.feats.dtype)
        self.labels[idx] = labels
        self.ptr.copy_((self.ptr + B) % K)

    def is_full(self) -> torch.Tensor:  # a bool scalar on the queue's device
        return (self.labels >= 0).all()

def supcon_loss(q, q_labels, keys, key_labels, tau=0.1):
    """Eq. (2). q: queries (N, D), keys: the queue (K, D), both L2-normalised; key labels < 0 are empty
    slots. For anchor i and positive p (same label) with negatives A(i) (other labels), s = q . k / tau:
        l_ip = -log( exp(s_ip) / (exp(s_ip) + sum_{a in A(i)} exp(s_ia)) )
    Other positives are not in the denominator. The mean over P(i), then over the anchors that have a
    positive; 0 (still in the graph) when none has one."""
    if tau <= 0 or q.shape[1] != keys.shape[1] or len(q) != len(q_labels) or len(keys) != len(key_labels):
        raise ValueError(f"supcon_loss needs tau > 0 (got {tau}), q (N, D) with N labels and keys (K, D) with K "
                         f"labels; got {tuple(q.shape)}, {len(q_labels)}, {tuple(keys.shape)}, {len(key_labels)}")
    s = q @ keys.T / tau  # (N, K)
    filled = (key_labels >= 0)[None, :]  # (1, K)
    pos = (q_labels[:, None] == key_labels[None, :]) & filled  # (N, K): P(i)
    neg = filled & ~pos  # (N, K): A(i)
    neg_lse = torch.logsumexp(s.masked_fill(~neg, -torch.inf), 1, keepdim=True)  # (N, 1); -inf: no negatives
    l = torch.logaddexp(s, neg_lse) - s  # (N, K): l_ip for every p; 0 when A(i) is empty
    n_pos = pos.sum(1)  # (N,) |P(i)|
    per_anchor = torch.where(pos, l, 0.0).sum(1) / n_pos.clamp(min=1)  # (N,)
    # NOTE: not in the paper - a mean over anchors, not Eq. (2)'s sum over i, which would scale the loss (and
    # so lambda) with the batch size.
    has_pos = n_pos > 0
    return torch.where(has_pos, per_anchor, 0.0).sum() / has_pos.sum().clamp(min=1)


# ---- II-B  Contrastive uncertainty estimation module (CUEM), Fig. 3 ----------------------------------

def cuem(q, labels, queue, queue_labels, num_classes, theta=0.1):
    """Fig. 3. For each query and each class c present in the queue (K, D): S_c = the mean cosine similarity to
    the queue entries of class c; u = max_c S_c - S_label. Where u > theta the label becomes argmax_c S_c.
    q: (N, D), or (V, N, D) for V views of each sample, whose S are averaged. Returns (new labels (N,), u (N,));
    u = 0 when the sample's own class is not in the queue."""
    views = q[None] if q.dim() == 2 else q  # (V, N, D)
    if views.shape[2] != queue.shape[1] or views.shape[1] != len(labels) or len(queue) != len(queue_labels):
        raise ValueError(f"cuem needs q (N, D) or (V, N, D) with N labels and a queue (K, D) with K labels; got "
                         f"{tuple(q.shape)}, {len(labels)}, {tuple(queue.shape)}, {len(queue_labels)}")
    views, queue = F.normalize(views.float(), dim=2), F.normalize(queue.float(), dim=1)
    filled = queue_labels >= 0  # (K,)
    onehot = F.one_hot(queue_labels.clamp(min=0), num_classes).float() * filled[:, None]  # (K, C)
    count = onehot.sum(0)  # (C,) entries per class
    S = (views @ queue.T @ onehot).mean(0) / count.clamp(min=1)  # (N, C): S_cos, averaged over the views
    present = count > 0  # (C,)
    s_max, c_max = S.masked_fill(~present, -torch.inf).max(1)  # S_cos_max and its class, (N,)
    s_own = S.gather(1, labels[:, None]).squeeze(1)  # S_cos_zq, (N,)
    u = torch.where(present[labels], s_max - s_own, 0.0)  # (N,)
    return torch.where(u > theta, c_max, labels), u


# ---- II-C  Objective: Eq. (1), (3), the lambda schedule of Eq. (4), one training step ------------------

def loss_weight(epoch: int, alpha: float = 30, beta: float = 1e-4) -> float:
    """Eq. (4), epochs counted from 1: lambda = 1 - epoch / alpha while epoch <= alpha (so lambda(alpha) = 0,
    as written), beta afterwards."""
    if epoch < 1 or alpha <= 0:
        raise ValueError(f"loss_weight needs epoch >= 1 (epochs count from 1) and alpha > 0, got {epoch}, {alpha}")
    return 1.0 - epoch / alpha if epoch <= alpha else beta

class StepOut(NamedTuple):  # device tensors
    loss: torch.Tensor  # L_total, Eq. (3)
    ce: torch.Tensor  # L_FER, Eq. (1)
    sup: torch.Tensor  # L_sup, Eq. (2)
    y_fer: torch.Tensor  # (B,) the labels L_FER used: CUEM's where it relabelled, else the annotation
    u: torch.Tensor  # (B,) CUEM's uncertainty (0 where it did not run)
    cuem_ran: torch.Tensor  # bool scalar: CUEM ran in this step (it waits for a full queue)

def train_step(model, opt, x_q, x_k, y, *, lam, m, tau, theta, use_cuem, amp) -> StepOut:
    """One optimisation step of Sec. II: L_total = L_FER + lambda * L_sup (Eq. 3). x_q, x_k: the two
    augmented views (B, 3, S, S); x_k = None skips the key branch (the baseline of Table II); y: the
    annotation (B,). Nothing here waits for the device."""
    with amp:  # NOTE: not in the paper - the classifier sees the query view: one trunk pass feeds both
        f_q, z_q = model.encoder_q(x_q)  # (B, 512, s, s), (B, 128)
        logits = model.classifier(f_q)  # (B, C): the top branch
    y_fer, u, ran = y, torch.zeros(len(y), device=y.device), torch.zeros((), dtype=torch.bool, device=y.device)
    sup = torch.zeros((), device=y.device)
    if x_k is not None:
        with torch.no_grad():
            momentum_update(model.encoder_q, model.encoder_k, m)  # before this step's keys
            with amp:
                z_k = model.encoder_k(x_k)[1]  # (B, 128)
        Q = model.queue  # NOTE: not in the paper - the contrast set is the queue as it stood, nothing else
        if use_cuem:  # NOTE: not in the paper - CUEM waits for a full queue; per step, nothing is stored
            # NOTE: not in the paper - S (so u) is averaged over the sample's two views, z_q and z_k: on one
            # augmented view, an erased mouth made a clean sample look like another class (README).
            new, u_all = cuem(torch.stack([z_q.detach(), z_k]), y, Q.feats, Q.labels, logits.shape[1], theta)
            ran = Q.is_full()
            y_fer, u = torch.where(ran, new, y), torch.where(ran, u_all, 0.0)
        if lam > 0:
            # NOTE: not in the paper - Eq. (2)'s anchors keep the annotation, and a sample CUEM relabels is no anchor
            # (label -1): CUEM's labels fed back into the features CUEM reads collapsed training (README).
            sup = supcon_loss(z_q, torch.where(y_fer == y, y, -1), Q.feats, Q.labels, tau)  # Eq. (2)
    ce = F.cross_entropy(logits.float(), y_fer)  # Eq. (1): L_FER, on CUEM's labels
    loss = ce + lam * sup  # Eq. (3)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if x_k is not None:
        model.queue.enqueue(z_k, y)  # after the loss: "z^k and the corresponding annotation are enqueued"
    return StepOut(loss.detach(), ce.detach(), sup.detach(), y_fer, u, ran)


# ==== Data on the device: a decoded cache or loader workers; augmentation in batches ===================

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def normalize(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) on the 0..255 scale -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / std

def prepare(x: torch.Tensor, size: int) -> torch.Tensor:
    """The test transform: uint8 (B, 3, h, w) -> resized, normalised float (B, 3, size, size)."""
    x = x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x)

def augment(x: torch.Tensor, size: int, g: torch.Generator, flip_p=0.5, rotate=10.0, scale=(0.9, 1.1),
            translate=0.05, noise_p=0.25, noise_std=5.5, erase_p=0.5, erase_area=(0.02, 0.25)) -> torch.Tensor:
    """NOTE: not in the paper - one augmented view (the light SCN / ARM recipe) of a uint8 batch (B, 3, h, w)
    -> normalised float (B, 3, size, size), each sample with its own draws from `g` (on x's device). One
    affine_grid / grid_sample does the resize, flip, rotation, scale and shift; noise and erasing are masks."""
    B, dev = x.shape[0], x.device
    u = lambda: torch.rand(B, generator=g, device=dev)  # one U(0, 1) per sample
    flip = torch.where(u() < flip_p, -1.0, 1.0)
    a = (2 * u() - 1) * math.radians(rotate)
    s = scale[0] + (scale[1] - scale[0]) * u()
    t = torch.stack([(2 * u() - 1) * 2 * translate, (2 * u() - 1) * 2 * translate], 1)  # the side is 2 grid units
    # affine_grid maps output to input coordinates, the inverse of p_out = s R(a) Flip p_in + t:
    # p_in = Flip R(-a) / s (p_out - t).
    cos, sin = a.cos() / s, a.sin() / s
    M = torch.stack([torch.stack([flip * cos, flip * sin], 1), torch.stack([-sin, cos], 1)], 1)  # (B, 2, 2)
    grid = F.affine_grid(torch.cat([M, -(M @ t.unsqueeze(2))], 2), [B, 3, size, size], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, 3, S, S)
    noisy = (u() < noise_p).view(B, 1, 1, 1)
    y = normalize(torch.where(noisy, y + noise_std * torch.randn(y.shape, generator=g, device=dev), y).clamp(0, 255))
    # random erasing (0 = the mean after normalisation), aspect ratio log-uniform in [0.3, 3.3]
    area = erase_area[0] + (erase_area[1] - erase_area[0]) * u()
    ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u())
    eh, ew = ((area * ratio).sqrt() * size).clamp(max=size), ((area / ratio).sqrt() * size).clamp(max=size)
    top, left = u() * (size - eh), u() * (size - ew)
    pos = torch.arange(size, device=dev, dtype=torch.float32)
    rows = (pos >= top[:, None]) & (pos < (top + eh)[:, None])  # (B, S)
    cols = (pos >= left[:, None]) & (pos < (left + ew)[:, None])  # (B, S)
    erase = rows[:, :, None] & cols[:, None, :] & (u() < erase_p)[:, None, None]  # (B, S, S)
    return y.masked_fill(erase[:, None], 0.0)

def step_generator(seed: int, epoch: int, step: int, device) -> torch.Generator:
    """The augmentation draws are a function of (seed, epoch, step), so a resumed run sees the same views."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + step)

def inject_label_noise(labels: torch.Tensor, p: float, num_classes: int, seed: int) -> torch.Tensor:
    """NOTE: not in the paper - the SCN / RUL / EAC protocol: round(p N) labels chosen at random, each moved to a
    uniformly drawn *different* class. Returns the noisy copy."""
    g = torch.Generator().manual_seed(seed + 7919)
    flip = torch.randperm(len(labels), generator=g)[: round(p * len(labels))]
    noisy = labels.clone()
    noisy[flip] = (labels[flip] + torch.randint(1, num_classes, (len(flip),), generator=g)) % num_classes
    return noisy

def epoch_order(labels: torch.Tensor, sampler: str, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of an epoch, a function of (seed, epoch); 'balanced': inverse class frequency, replacement."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if sampler == "balanced":
        weights = 1.0 / torch.bincount(labels).clamp(min=1).double()[labels]
        return torch.multinomial(weights, len(labels), replacement=True, generator=g)
    return torch.randperm(len(labels), generator=g)

def decode_all(ds, workers: int) -> torch.Tensor:
    """Decode a whole split once, in `workers` processes: uint8 (N, 3, s, s)."""
    out = torch.empty(len(ds), 3, ds.size, ds.size, dtype=torch.uint8)
    for x, _, idx in torch.utils.data.DataLoader(ds, batch_size=128, num_workers=workers):
        out[idx] = x
    return out

class Images:
    """A split as uint8 batches on the device: indexed out of a decoded cache that lives on the device
    (nothing is decoded after the first epoch), or decoded by DataLoader workers into pinned memory."""

    def __init__(self, ds, device, cache: bool, workers: int, x=None):
        self.device, self.x = device, x  # x: an already decoded (N, 3, s, s) uint8 tensor
        if x is None and cache:
            self.x = decode_all(ds, workers).to(device)  # (N, 3, s, s)
        elif x is None:
            self.order = []  # the batches of the coming epoch: set before each pass, read by persistent workers
            self.loader = torch.utils.data.DataLoader(
                ds, batch_sampler=self.order, num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

    def batches(self, order: torch.Tensor, batch_size: int, drop_last: bool):
        """Yield (uint8 images (b, 3, s, s), indices (b,)) on the device, in `order`."""
        n = len(order) // batch_size * batch_size if drop_last else len(order)
        if self.x is not None:
            order = order[:n].to(self.device)
            for i in range(0, n, batch_size):
                yield self.x[order[i:i + batch_size]], order[i:i + batch_size]
        else:
            self.order[:] = [b.tolist() for b in order[:n].split(batch_size)]
            for x, _, idx in self.loader:
                yield x.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)


# ==== III  Training and evaluation =================================================================

EPOCH_SUMS = ("loss", "ce", "supcon", "relabelled", "relabelled_right", "noisy", "restored", "bad")
# NOTE: not in the paper - an epoch in which CUEM relabels this share of the samples more than the known label
# noise (0 when unknown) is flagged: the collapses in README's "CUEM under label noise" passed it within 2 epochs.
RELABEL_ALERT = 0.15

@dataclass
class Run:
    """What a training run holds between epochs."""
    cfg: Config
    device: torch.device
    train_ds: object
    test_ds: object
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    out: Path
    relabels: RelabelLog
    train_images: Images | None = None
    test_images: Images | None = None
    noise: float = 0.0  # the known share of wrong training labels (injected or --train-labels), else 0
    history: list = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0

class RelabelLog:
    """Per training sample, on the device: how often CUEM saw it and relabelled it, to which classes, and its
    last u. Written to relabels.csv after every epoch; no host sync in the step."""

    def __init__(self, n: int, num_classes: int, device):
        self.seen = torch.zeros(n, dtype=torch.int32, device=device)
        self.moved = torch.zeros(n, dtype=torch.int32, device=device)
        self.votes = torch.zeros(n, num_classes, dtype=torch.int32, device=device)  # (N, C) relabels per class
        self.last_u = torch.zeros(n, device=device)

    def add(self, idx, y, out: StepOut):
        moved = (out.y_fer != y).int()
        self.seen.index_add_(0, idx, out.cuem_ran.int().expand(len(idx)))
        self.moved.index_add_(0, idx, moved)
        self.votes.index_put_((idx, out.y_fer), moved, accumulate=True)
        self.last_u[idx] = torch.where(out.cuem_ran, out.u, self.last_u[idx])

def decode_size(cfg: Config) -> int:  # NOTE: not in the paper - no larger than the files; augment() resizes
    return min(cfg.img_size, NATIVE_SIZE.get(cfg.data, cfg.img_size))

def start_run(cfg: Config, ckpt=None) -> Run:
    """Data, network, optimiser and output folder of a run (or of the run `ckpt` saved), and the start banner."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_ds, test_ds = (load_dataset(cfg.data, cfg.root, s, decode_size(cfg), **dataset_options(cfg))
                         for s in ("train", "test"))
    C, N, notes = len(train_ds.classes), len(train_ds), []
    if cfg.label_noise > 0:
        train_ds.labels = inject_label_noise(train_ds.true_labels, cfg.label_noise, C, cfg.seed)
    if ckpt is None:
        B = min(cfg.batch_size, N)
        K = min(cfg.queue_size, N // B * B)  # NOTE: not in the paper - a longer queue would hold stale repeats
        notes += [f"batch size {cfg.batch_size} > {N} training images: using {B}"] * (B < cfg.batch_size)
        notes += [f"queue size {cfg.queue_size} capped to {K} (the largest multiple of the batch <= {N} images)"
                  ] * (K < cfg.queue_size)
        # NOTE: not in the paper - m = 1 - B / K: the key encoder averages over the steps the queue holds
        m = cfg.momentum if cfg.momentum is not None else max(0.0, 1 - B / K)
        notes += [f"m = {m:.4f} = 1 - {B}/{K} (batch size / queue size)"] * (cfg.momentum is None)
        cfg = dataclasses.replace(cfg, batch_size=B, queue_size=K, momentum=m)
    model = build_model(cfg, C, "none" if ckpt else cfg.pretrained, device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    out = Path(cfg.out or f"runs/{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = Run(cfg, device, train_ds, test_ds, model, opt, sched, out, RelabelLog(N, C, device),
              noise=(train_ds.labels != train_ds.true_labels).double().mean().item())
    if ckpt is not None:
        load_weights(model, ckpt["model"], cfg.resume)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        for k, v in ckpt.get("relabels", {}).items():
            getattr(run.relabels, k).copy_(v)
        run.history, run.best_acc, run.best_epoch = ckpt["history"], ckpt["best_acc"], ckpt["best_epoch"]
        notes.append(f"resumed from {cfg.resume} after epoch {ckpt['epoch']}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.label_noise > 0:
        write_noisy_labels(train_ds, out / "noisy_labels.txt")
    size = decode_size(cfg)
    total_bytes = (N + len(test_ds)) * 3 * size ** 2
    cache = cfg.cache == "on" or (cfg.cache == "auto" and total_bytes <= cfg.cache_gb * 2 ** 30)
    steps = N // cfg.batch_size
    notes += [f"an epoch is {steps} batches of {cfg.batch_size}" + (f"; each leaves out {N % cfg.batch_size} images, "
              "another random set every epoch (drop_last)" if N % cfg.batch_size else ""),
              f"decoded-image cache {'on' if cache else 'off'} ({total_bytes / 2 ** 30:.2f} GiB at {size} px); "
              f"sampler {cfg.sampler}; output {out}"]
    banner(cfg, device, train_ds, test_ds, notes)
    t0 = time.time()
    run.train_images, run.test_images = (Images(ds, device, cache, cfg.workers) for ds in (train_ds, test_ds))
    if cache:
        print(f"decoded {N + len(test_ds)} images in {time.time() - t0:.1f}s")
    return run

def train_epoch(run: Run, epoch: int, clock: tuple[float, int]) -> dict:
    """The steps of one epoch; their figures are summed on the device and read once per progress line."""
    cfg, dev = run.cfg, run.device
    lam = 0.0 if cfg.no_scl else loss_weight(epoch, cfg.alpha, cfg.beta)  # Eq. (4)
    use_keys = not (cfg.no_scl and cfg.no_cuem)  # the baseline skips the key branch
    knobs = dict(lam=lam, m=cfg.momentum, tau=cfg.tau, theta=cfg.theta, amp=autocast(dev),
                 use_cuem=not cfg.no_cuem and epoch >= cfg.cuem_start)
    y_all, y_true_all = run.train_ds.labels.to(dev), run.train_ds.true_labels.to(dev)
    sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in EPOCH_SUMS}  # bad: first non-finite step
    steps, tick = len(y_all) // cfg.batch_size, time.time()
    run.model.train()
    order = epoch_order(run.train_ds.labels, cfg.sampler, cfg.seed, epoch)
    for step, (x, idx) in enumerate(run.train_images.batches(order, cfg.batch_size, drop_last=True)):
        g = step_generator(cfg.seed, epoch, step, dev)
        x_q = augment(x, cfg.img_size, g).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        x_k = augment(x, cfg.img_size, g).contiguous(memory_format=torch.channels_last) if use_keys else None
        y, y_true = y_all[idx], y_true_all[idx]
        out = train_step(run.model, run.opt, x_q, x_k, y, **knobs)
        moved, noisy, right = out.y_fer != y, y != y_true, out.y_fer == y_true
        for k, v in zip(EPOCH_SUMS, (out.loss, out.ce, out.sup, moved.sum(), (moved & right).sum(), noisy.sum(),
                                     (noisy & right).sum())):
            sums[k] += v
        sums["bad"] = torch.where((sums["bad"] == 0) & ~out.loss.isfinite(), step + 1, sums["bad"])
        run.relabels.add(idx, y, out)
        if time.time() - tick > cfg.log_every or step + 1 == steps:
            tick, figures = time.time(), dict(zip(sums, torch.stack(list(sums.values())).tolist()))  # host sync
            if figures["bad"]:
                raise FloatingPointError(f"non-finite loss in epoch {epoch}, step {int(figures['bad'])}")
            progress(run, epoch, step + 1, steps, figures, lam, clock)
    return dict(figures, lam=lam, steps=steps)

def progress(run: Run, epoch: int, step: int, steps: int, sums: dict, lam: float, clock):
    """One progress line: the running means of the losses, the relabels so far, speed and time left."""
    B, (t0, start) = run.cfg.batch_size, clock
    rate = ((epoch - start) * steps + step) * B / (time.time() - t0)
    eta = ((run.cfg.epochs - epoch + 1) * steps - step) * B / rate
    print(f"epoch {epoch}/{run.cfg.epochs} step {step}/{steps} | loss {sums['loss'] / step:.4f} ce "
          f"{sums['ce'] / step:.4f} sup {sums['supcon'] / step:.4f} lam {lam:.4f} | {relabel_text(run, sums, step * B)}"
          f" | {rate:.0f} samples/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)

def relabel_text(run: Run, sums: dict, seen: int) -> str:
    """CUEM's relabels, their precision / recall when the truth is known, a flag past the known noise + alert."""
    n, noisy, limit = sums["relabelled"], max(sums["noisy"], 1), run.noise + RELABEL_ALERT
    text = f"relabelled {int(n)} ({100 * n / seen:.1f}%)"
    if run.noise > 0 and n > 0:
        text += f" (precision {sums['relabelled_right'] / n:.2f}, recall {sums['restored'] / noisy:.2f})"
    if n / seen > limit:
        text += f" UNUSUAL: more than {100 * limit:.0f}% of the labels changed, see README 'CUEM under label noise'"
    return text

def end_epoch(run: Run, epoch: int, sums: dict, seconds: float) -> dict:
    """After the steps: the lr decay, the test evaluation, the metrics row, the output files, the epoch's line."""
    cfg, dev, n, seen = run.cfg, run.device, sums["relabelled"], sums["steps"] * run.cfg.batch_size
    lr, t = run.opt.param_groups[0]["lr"], time.time()
    run.sched.step()  # lr x 0.9 after every epoch (Sec. III-B)
    order = torch.randperm(len(run.train_ds), generator=torch.Generator().manual_seed(cfg.seed))[:NORM_STATS_IMAGES]
    refresh_norm_stats(run.model, run.train_images, order, cfg.img_size, min(cfg.batch_size, len(order)), autocast(dev))
    eval_bs = 64 if cfg.arm_eval == "batch" else max(cfg.batch_size, 256)  # official protocol: 64, unshuffled
    conf = evaluate(run.model, run.test_images, run.test_ds.labels, cfg.img_size, eval_bs, len(run.test_ds.classes))
    row = dict(epoch=epoch, lr=lr, lam=sums["lam"], **{k: sums[k] / sums["steps"] for k in EPOCH_SUMS[:3]},
               relabelled=int(n), relabel_share=n / seen, **scores(conf), seconds=seconds, samples_per_s=seen / seconds,
               eval_seconds=time.time() - t, confusion=conf.tolist())
    if run.noise > 0:  # precision: None (null) when nothing was relabelled
        row.update(relabel_precision=sums["relabelled_right"] / n if n else None,
                   relabel_recall=sums["restored"] / max(sums["noisy"], 1))
    run.history.append(row)
    is_best = row["test_acc"] > run.best_acc
    run.best_acc, run.best_epoch = (row["test_acc"], epoch) if is_best else (run.best_acc, run.best_epoch)
    save_outputs(run, epoch, is_best)
    print(f"== epoch {epoch}: test acc {100 * row['test_acc']:.2f}% mean class acc {100 * row['mean_class_acc']:.2f}%"
          f" | loss {row['loss']:.4f} ce {row['ce']:.4f} sup {row['supcon']:.4f} lam {row['lam']:.4f} | "
          f"{relabel_text(run, sums, seen)} | {seconds:.1f}s + stats, test {row['eval_seconds']:.1f}s", flush=True)
    return row

def train(cfg: Config, ckpt=None) -> dict:
    """Sec. III-B: Adam, lr x0.9 per epoch, lambda by Eq. (4), a test evaluation after every epoch."""
    run = start_run(cfg, ckpt)
    start = ckpt["epoch"] + 1 if ckpt else 1
    clock, epoch, last = (time.time(), start), start, run.out / "last.pt"
    try:
        for epoch in range(start, run.cfg.epochs + 1):
            t = time.time()
            end_epoch(run, epoch, train_epoch(run, epoch, clock), time.time() - t)
    except (KeyboardInterrupt, FloatingPointError) as e:
        where = f"{last} (epoch {epoch - 1})" if last.exists() else "none written yet"
        if isinstance(e, FloatingPointError):
            raise UserError(f"{e}; stopped; last good checkpoint: {where}") from None
        print(f"\ninterrupted in epoch {epoch}; last complete checkpoint: {where}", file=sys.stderr)
        raise SystemExit(130)
    s = summarize(run)
    print(f"final epoch {s['final_epoch']}: test acc {100 * s['final_acc']:.2f}% | best epoch {s['best_epoch']}: "
          f"{100 * s['best_acc']:.2f}% | mean of the last {len(s['last5_epochs'])} epochs: "
          f"{100 * s['last5_mean_acc']:.2f}% (the test set doubles as validation set, as in the FER literature) | "
          f"{time.strftime('%H:%M:%S', time.gmtime(time.time() - clock[0]))} | {run.out}")
    return dict(s, out=str(run.out), history=run.history)

def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")

def autocast(device):  # bf16 autocast on CUDA (no GradScaler needed); plain float32 on the CPU
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

def build_model(cfg: Config, num_classes: int, pretrained: str, device) -> FERSupCon:
    model = FERSupCon(num_classes, cfg.img_size, pretrained, arm=not cfg.no_arm,
                      arm_eval_batch=cfg.arm_eval == "batch", queue_size=cfg.queue_size)
    model = model.to(device, memory_format=torch.channels_last)  # faster on CUDA and on the CPU
    if cfg.compile:
        for part in (model.encoder_q, model.encoder_k, model.classifier):
            part.compile()  # in place: the state-dict keys stay the same
    return model

def load_weights(model: nn.Module, state: dict, what) -> None:
    """load_state_dict, loud on any missing, unused or misshapen tensor (never strict=False)."""
    own = model.state_dict()
    missing, unused = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unused or wrong:
        raise UserError(f"{what} does not fit this network: {len(missing)} missing {missing[:3]}, {len(unused)} "
                        f"unused {unused[:3]}, {len(wrong)} of another shape {wrong[:3]}")
    model.load_state_dict(state)

@torch.no_grad()
def logits_of(model, x: torch.Tensor, img_size: int, batch_size: int, amp=None) -> torch.Tensor:
    """Eval-mode logits (N, C) of uint8 images (N, 3, h, w) already on the model's device, in batches."""
    model.eval()
    with amp or torch.autocast("cpu", enabled=False):
        return torch.cat([model(prepare(xb, img_size).contiguous(memory_format=torch.channels_last)).float()
                          for xb in x.split(batch_size)])

# NOTE: not in the paper - before each test evaluation (and checkpoint) the running statistics are recomputed for the
# current weights over this many training images ("precise BN"): running averages lag fast-moving weights (README).
NORM_STATS_IMAGES = 2048

@torch.no_grad()
def refresh_norm_stats(model: FERSupCon, images: Images, order: torch.Tensor, img_size: int, batch_size: int,
                       amp=None) -> None:
    """The running statistics inference reads (trunk BatchNorms, ARM's BatchNorm and g) := their mean over the batches
    of `order` (test transform), current weights: momentum 1 / (i + 1) at batch i gives the mean of batches 0..i."""
    stats = [m for part in (model.encoder_q.trunk, model.classifier) for m in part.modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, ARM))]
    momenta = [m.momentum for m in stats]
    model.train()  # each batch normalised by its own statistics, as in training
    for i, (x, _) in enumerate(images.batches(order, batch_size, drop_last=True)):
        for m in stats:
            m.momentum = 1 / (i + 1)
        with amp or torch.autocast("cpu", enabled=False):
            x = prepare(x, img_size).contiguous(memory_format=torch.channels_last)
            model.classifier.forward(model.encoder_q.trunk(x))  # .forward: eager under --compile (momentum changes)
    for m, momentum in zip(stats, momenta):
        m.momentum = momentum

def evaluate(model, images: Images, labels: torch.Tensor, img_size, batch_size, num_classes) -> torch.Tensor:
    """The confusion matrix of the test split, in batches of batch_size in file order."""
    logits = [logits_of(model, x, img_size, batch_size, autocast(images.device))
              for x, _ in images.batches(torch.arange(len(labels)), batch_size, drop_last=False)]
    return confusion(torch.cat(logits), labels.to(images.device), num_classes)

def confusion(logits: torch.Tensor, y: torch.Tensor, C: int) -> torch.Tensor:
    """(C, C) counts, rows: true class, columns: predicted."""
    return torch.bincount(y * C + logits.argmax(1), minlength=C * C).view(C, C).cpu()

def scores(conf: torch.Tensor) -> dict:
    """Accuracy, mean class accuracy (the mean of the per-class recalls, over classes with test samples),
    macro-F1 and the per-class accuracy of a confusion matrix (rows: true class)."""
    conf = conf.double()
    tp, true, pred = conf.diag(), conf.sum(1), conf.sum(0)
    recall = tp / true.clamp(min=1)
    f1 = 2 * tp / (true + pred).clamp(min=1)  # = 2 P R / (P + R); 0 for a class never true nor predicted
    has = true > 0
    return dict(test_acc=(tp.sum() / conf.sum().clamp(min=1)).item(), mean_class_acc=recall[has].mean().item(),
                macro_f1=f1[has].mean().item(), per_class_acc=recall.tolist())

def banner(cfg, device, train_ds, test_ds, notes):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"fer_supcon | torch {torch.__version__} torchvision {torchvision.__version__} | {device.type}: {name} "
          f"| {torch.get_num_threads()} threads | seed {cfg.seed}")
    print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    for split, ds in (("train", train_ds), ("test", test_ds)):
        counts = zip(ds.classes, torch.bincount(ds.labels, minlength=len(ds.classes)).tolist())
        print(f"{split}: {len(ds)} images, " + ", ".join(f"{c} {n}" for c, n in counts))
    print("".join(f"note: {n}\n" for n in notes), end="")


# ==== Outputs: checkpoints, metrics.jsonl, summary.json, curves.png, relabels.csv, confusion (Fig. 4) ===

def atomic_write(path: Path, write) -> None:
    """write(tmp_path), fsync, then rename over `path`: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # the suffix: torch.export wants .pt2
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def write_text(path, text):
    atomic_write(path, lambda p: Path(p).write_text(text))

def write_csv(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    atomic_write(path, write)

def load_torch_file(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # data, never code
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is not a readable torch file (truncated or foreign?): {first[:200]}") from None

CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "best_acc", "best_epoch", "config", "classes",
                   "history", "rng"}
CROPS = {"rafdb": "RAF-DB aligned 100x100 face crops", "affectnet": "AffectNet face boxes, cropped",
         "ferplus": "FER2013 48x48 grayscale face crops", "imagefolder": "the images of the training folder",
         "synthetic": "fer_supcon's synthetic cartoon faces"}
NATIVE_SIZE = {"rafdb": 100, "ferplus": 48}  # the side of the dataset's own images

def load_checkpoint(path):
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        found = sorted(ckpt.keys())[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a fer_supcon checkpoint: expected keys {sorted(CHECKPOINT_KEYS)}, "
                        f"found {found}")
    return ckpt

def model_card(cfg: Config, classes) -> dict:
    """What a user needs to feed the model: saved in every checkpoint and exported file."""
    return dict(classes=list(classes), input_size=cfg.img_size, input="RGB uint8, resized to input_size x input_size",
                normalisation=dict(mean=[255 * v for v in IMAGENET_MEAN], std=[255 * v for v in IMAGENET_STD]),
                dataset=cfg.data, crops=CROPS[cfg.data], crop_size=NATIVE_SIZE.get(cfg.data, cfg.img_size),
                torch=str(torch.__version__))

def save_outputs(run: Run, epoch: int, is_best: bool) -> None:
    """last.pt, best.pt, metrics.jsonl, summary.json, curves.png, relabels.csv, confusion.*; all atomic."""
    state = dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(),
                 epoch=epoch, best_acc=run.best_acc, best_epoch=run.best_epoch, config=dataclasses.asdict(run.cfg),
                 classes=run.train_ds.classes, history=run.history, rng=torch.get_rng_state(),
                 relabels=vars(run.relabels), card=model_card(run.cfg, run.train_ds.classes))
    for name in ("last.pt",) + ("best.pt",) * is_best:
        atomic_write(run.out / name, lambda p: torch.save(state, p))
    write_text(run.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.history))
    write_text(run.out / "summary.json", json.dumps(summarize(run), indent=1) + "\n")
    atomic_write(run.out / "curves.png", lambda p: draw_curves(run.history, run.cfg.data).save(p, format="PNG"))
    write_relabels(run, run.out / "relabels.csv")
    row = run.history[-1]
    title = (f"{run.cfg.data} test, epoch {epoch}: accuracy {100 * row['test_acc']:.2f}%, "
             f"mean class {100 * row['mean_class_acc']:.2f}%")
    save_confusion(torch.tensor(row["confusion"]), run.train_ds.classes, run.out / "confusion", title)

def summarize(run: Run) -> dict:
    """The numbers people quote, from the final epoch, the best epoch and the last five epochs."""
    final, last5 = run.history[-1], run.history[-5:]
    return dict(data=run.cfg.data, final_epoch=final["epoch"], final_acc=final["test_acc"],
                final_mean_class_acc=final["mean_class_acc"], final_macro_f1=final["macro_f1"],
                final_per_class_acc=dict(zip(run.train_ds.classes, final["per_class_acc"])),
                best_epoch=run.best_epoch, best_acc=run.best_acc, last5_epochs=[r["epoch"] for r in last5],
                last5_mean_acc=sum(r["test_acc"] for r in last5) / len(last5), config=dataclasses.asdict(run.cfg))

def write_relabels(run: Run, path: Path) -> None:
    """relabels.csv: one row per training sample CUEM relabelled at least once, the most often first."""
    log, ds = run.relabels, run.train_ds
    (seen, moved, u), cuem_label, labels = (t.tolist() for t in (log.seen, log.moved, log.last_u)), \
        log.votes.argmax(1).tolist(), ds.labels.tolist()
    paths = getattr(ds, "paths", [""] * len(ds))
    write_csv(path, [["index", "path", "label", "cuem_label", "relabelled", "seen", "last_u"]] + [
        [j, paths[j], ds.classes[labels[j]], ds.classes[cuem_label[j]], moved[j], seen[j], f"{u[j]:.4f}"]
        for _, j in sorted((-moved[j] / seen[j], j) for j in range(len(ds)) if moved[j])])

def write_noisy_labels(ds, path: Path) -> None:
    """The labels --label-noise drew: the RAF-DB label-file format for rafdb, else 'index class' (0-based)."""
    names = getattr(ds, "names", None)
    lines = [f"{name} {y + 1}" for name, y in zip(names, ds.labels.tolist())] if names else [
        f"{i} {y}" for i, y in enumerate(ds.labels.tolist())]
    write_text(path, "\n".join(lines) + "\n")

def confusion_text(conf: torch.Tensor, classes) -> str:
    """Counts and row percentages (rows: true class, columns: predicted)."""
    w = max(9, max(len(c) for c in classes) + 1)
    rows = ["true \\ predicted".ljust(w) + "".join(c[:w - 1].rjust(w) for c in classes)]
    for c, row in zip(classes, conf.tolist()):
        total = max(sum(row), 1)
        rows.append(c.ljust(w) + "".join(f"{v:>{w - 7}d} {100 * v / total:5.1f}%" for v in row))
    return "\n".join(rows) + "\n"

def save_confusion(conf, classes, stem: Path, title):
    write_text(stem.with_suffix(".txt"), title + "\n" + confusion_text(conf, classes))
    atomic_write(stem.with_suffix(".png"), lambda p: draw_confusion(conf, classes, title).save(p, format="PNG"))


# ==== Using a trained model: --eval, --predict, --export ============================================

def checkpoint_config(ckpt, given: dict, flags) -> Config:
    """The run's config from a checkpoint, overridden by the given `flags`; this machine's device unless given."""
    saved = {k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__}
    return Config(**{**saved, "device": "auto", **{k: v for k, v in given.items() if k in flags}})

def check_fits(ckpt_cfg: dict, given: dict, keys, what):
    diff = [f"--{k.replace('_', '-')} {given[k]} (checkpoint: {ckpt_cfg.get(k)})" for k in keys
            if k in given and given[k] != ckpt_cfg.get(k)]
    if diff:
        raise UserError(f"{what} does not fit the checkpoint: " + ", ".join(diff))

def open_checkpoint(path, given: dict, command: str, flags=(), fits=()) -> tuple[dict, Config, torch.device, FERSupCon]:
    """Load a checkpoint, rebuild its network in eval mode (ARM's running g), print what it expects as input."""
    extra = sorted(given.keys() - set(flags) - set(fits))
    if extra:
        raise UserError(f"--{extra[0].replace('_', '-')} does not apply to --{command}")
    ckpt = load_checkpoint(path)
    check_fits(ckpt["config"], given, fits, f"--{command}")
    cfg = checkpoint_config(ckpt, given, flags)
    device = pick_device(cfg.device)
    model = build_model(dataclasses.replace(cfg, compile=False), len(ckpt["classes"]), "none", device)
    load_weights(model, ckpt["model"], path)
    if cfg.no_arm and "arm_eval" in given:
        raise UserError(f"--arm-eval needs ARM: {path} was trained with --no-arm")
    if not cfg.no_arm:
        model.classifier.eval_batch_mean = False  # ARM's running g: an answer never depends on the batch
    card = ckpt["card"] = ckpt.get("card") or model_card(cfg, ckpt["classes"])
    print(f"{path}: epoch {ckpt['epoch']} of a {card['dataset']} run ({card['crops']}); {len(card['classes'])} "
          f"classes {', '.join(card['classes'])}; input {card['input_size']}x{card['input_size']} RGB, ImageNet "
          f"normalisation; trained with torch {card['torch']}")
    return ckpt, cfg, device, model.eval()

EVAL_FLAGS = ("data", "root", "train_labels", "classes", "ferplus_label", "device", "workers", "arm_eval",
              "synthetic_test", "seed")

def run_eval(path, given) -> dict:
    """A checkpoint's test scores and confusion matrix, the proof that an answer does not depend on its batch,
    and (--arm-eval batch) the official protocol by test batch size; into <stem>_eval.json, <stem>_confusion.*"""
    ckpt, cfg, device, model = open_checkpoint(path, given, "eval", EVAL_FLAGS, fits=("img_size", "no_arm"))
    test_ds = load_dataset(cfg.data, cfg.root, "test", decode_size(cfg), **dataset_options(cfg))
    if len(test_ds.classes) != len(ckpt["classes"]):
        raise UserError(f"{path} has {len(ckpt['classes'])} classes ({', '.join(ckpt['classes'])}); "
                        f"--data {cfg.data} has {len(test_ds.classes)} ({', '.join(test_ds.classes)})")
    x = Images(test_ds, device, cache=True, workers=cfg.workers).x  # (N, 3, s, s) uint8 on the device
    y, arm = test_ds.labels.to(device), not cfg.no_arm
    conf = confusion(logits_of(model, x, cfg.img_size, 256, autocast(device)), y, len(test_ds.classes))
    res = dict(checkpoint=str(path), epoch=ckpt["epoch"], data=cfg.data, test_images=len(y), **scores(conf),
               classes=test_ds.classes, batch_independence=batch_independence(model, x, y, cfg.img_size))
    title = (f"{path} on {cfg.data} test ({len(y)} images){', ARM running g' if arm else ''}: accuracy "
             f"{100 * res['test_acc']:.2f}%, mean class {100 * res['mean_class_acc']:.2f}%, macro-F1 "
             f"{100 * res['macro_f1']:.2f}%")
    print(title + "\n" + confusion_text(conf, test_ds.classes))
    stem = Path(path).with_name(Path(path).stem)
    save_confusion(conf, test_ds.classes, Path(f"{stem}_confusion"), title)
    bi = res["batch_independence"]
    print(f"batch independence, first {bi['images']} test images: largest logit difference against the batch of "
          f"{bi['images']}: one at a time {bi['max_diff_one_at_a_time']:.2e}, shuffled {bi['max_diff_shuffled']:.2e}"
          f" ({'float noise: a prediction does not depend on its batch' if bi['float_noise'] else 'NOT float noise'})")
    if arm and given.get("arm_eval") == "batch":
        model.classifier.eval_batch_mean = True  # the official code: g from the test batch itself
        res["official_batch_mean"] = official = official_protocol(model, x, y, cfg.img_size, cfg.seed)
        print("ARM's test-batch g (official code), test accuracy by test batch size: " + ", ".join(
            f"{k.replace('_', ' ')} {100 * v:.2f}%" for k, v in official.items()))
    write_text(f"{stem}_eval.json", json.dumps({**res, "config": dataclasses.asdict(cfg)}, indent=1) + "\n")
    print(f"wrote {stem}_eval.json, {stem}_confusion.png and {stem}_confusion.txt")
    return res

def batch_independence(model, x, y, img_size, n=256) -> dict:
    """The first n test images, float32: logits one at a time and shuffled, against all n in one batch."""
    x, y = x[:n], y[:n]
    whole = logits_of(model, x, img_size, len(x))  # (n, C)
    alone = logits_of(model, x, img_size, 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(x.device)
    shuffled = logits_of(model, x[perm], img_size, 64)[perm.argsort()]  # back in file order
    d1, d2 = ((a - whole).abs().max().item() for a in (alone, shuffled))
    acc = lambda logits: (logits.argmax(1) == y).double().mean().item()
    # float noise: far below the logits' scale (fp32 rounding of one sum is ~1e-7 relative)
    return dict(images=len(x), max_diff_one_at_a_time=d1, max_diff_shuffled=d2, acc_batch=acc(whole),
                acc_one_at_a_time=acc(alone), acc_shuffled=acc(shuffled),
                float_noise=max(d1, d2) <= 1e-4 * (1 + whole.abs().max().item()))

def official_protocol(model, x, y, img_size, seed) -> dict:
    """Accuracy with ARM's test-batch g at test batch sizes 1, 64 and 256 in file order, and 64 shuffled."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    acc = lambda order, bs: (logits_of(model, x[order], img_size, bs).argmax(1) == y[order]).double().mean().item()
    plain = torch.arange(len(x), device=x.device)
    return dict(batch_1=acc(plain, 1), batch_64=acc(plain, 64), batch_256=acc(plain, 256),
                batch_64_shuffled=acc(perm, 64))

def find_images(patterns) -> list[str]:
    """Files as given, folders searched recursively for images, and globs; in order, without repeats."""
    found = []
    for p in patterns:
        if os.path.isfile(p):
            found.append(p)
        files = Path(p).rglob("*") if os.path.isdir(p) else glob.glob(p, recursive=True)
        found += sorted(str(f) for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(f))
    if not found:
        raise UserError(f"no images found in {' '.join(patterns)} (expected image files, folders or globs of "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    return list(dict.fromkeys(found))

def run_predict(patterns, path, given, top=3, csv_path=None) -> dict:
    """Class probabilities of the images in `patterns`, decoded by workers, in batches; float32, eval mode."""
    ckpt, cfg, device, model = open_checkpoint(path, given, "predict", ("device", "workers", "batch_size", "log_every"))
    classes, files, card = ckpt["classes"], find_images(patterns), ckpt["card"]
    loader = torch.utils.data.DataLoader(ImageList(files, [0] * len(files), classes, cfg.img_size),
                                         batch_size=min(cfg.batch_size, 256), num_workers=cfg.workers)
    results, skipped, warned, tick, rows = {}, [], False, time.time(), [["path", "predicted", *classes]]
    for x, w, h, err in loader:
        probs = logits_of(model, x.to(device), cfg.img_size, len(x)).softmax(1).cpu()  # (b, C)
        for f, p, wi, hi, e in zip(files[len(results) + len(skipped):], probs, w.tolist(), h.tolist(), err):
            if e:
                skipped.append(f)
                print(f"skipped {f}: cannot read image: {e}", file=sys.stderr)
                continue
            if not warned and (max(wi, hi) > 4 * card["crop_size"] or not 0.75 <= wi / hi <= 1.33):
                warned = True
                print(f"warning: {f} is {wi}x{hi}; the model was trained on {card['crops']}: whole photos need a "
                      f"face detector and alignment first", file=sys.stderr)
            k = p.topk(min(top, len(p)))
            results[f] = [(classes[i], v) for v, i in zip(k.values.tolist(), k.indices.tolist())]
            print(f"{f}: " + ", ".join(f"{c} {v:.3f}" for c, v in results[f]))
            rows.append([f, classes[int(p.argmax())], *(f"{v:.6f}" for v in p.tolist())])
        if time.time() - tick > cfg.log_every:
            tick = time.time()
            print(f"... {len(results) + len(skipped)} of {len(files)} images", file=sys.stderr, flush=True)
    if csv_path:
        write_csv(csv_path, rows)
    print(f"classified {len(results)} images, skipped {len(skipped)}" + (f"; wrote {csv_path}" if csv_path else ""))
    return dict(predictions=results, skipped=skipped)

class ExportedNet(nn.Module):
    """What --export saves: uint8 RGB (B, 3, S, S) -> class probabilities (B, C), the normalisation inside."""

    def __init__(self, model: FERSupCon):
        super().__init__()
        self.trunk, self.classifier = model.encoder_q.trunk, model.classifier

    def forward(self, x):
        return self.classifier(self.trunk(normalize(x.float()))).softmax(1)

def run_export(file, path, given) -> dict:
    """torch.export the inference network with the model card inside, load it back and compare it with the
    eager model on test images."""
    ckpt, cfg, _, model = open_checkpoint(path, given, "export")
    net = ExportedNet(model.float().cpu().to(memory_format=torch.contiguous_format)).eval()
    S, card = cfg.img_size, ckpt["card"]
    example = torch.zeros(2, 3, S, S, dtype=torch.uint8)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    atomic_write(file, lambda p: torch.export.save(program, p, extra_files={"fer_supcon.json": json.dumps(card)}))
    try:  # test images when the dataset is here, else random ones
        ds = load_dataset(cfg.data, cfg.root, "test", S, **dataset_options(cfg))
        x, what = torch.stack([ds[i][0] for i in range(min(64, len(ds)))]), f"{cfg.data} test images"
    except UserError:
        x, what = torch.randint(0, 256, (64, 3, S, S), dtype=torch.uint8), "random images (no dataset here)"
    extra = {"fer_supcon.json": ""}
    loaded = torch.export.load(file, extra_files=extra).module()
    with torch.no_grad():
        diff = (loaded(x) - net(x)).abs().max().item()
    print(f"wrote {file}: uint8 RGB (B, 3, {S}, {S}) -> probabilities of {', '.join(card['classes'])}; reloaded, "
          f"on {len(x)} {what}: largest difference to the eager model {diff:.2e}")
    return dict(file=str(file), max_diff=diff, card=json.loads(extra["fer_supcon.json"]))


# ==== Appendix A: dataset formats (Sec. III-A) ========================================================

RAFDB_CLASSES = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
AFFECTNET_CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"]
FERPLUS_CLASSES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUTS = dict(
    rafdb="the RAF-DB (basic) layout: ROOT/EmoLabel/list_patition_label.txt (lines 'train_00001.jpg 5', labels "
          "1..7) and ROOT/Image/aligned/train_00001_aligned.jpg",
    imagefolder="the image-folder layout: ROOT/train/<class>/*.jpg|png and ROOT/test/<class>/* (or ROOT/val/)",
    affectnet="an AffectNet layout: ROOT/Manually_Annotated_file_lists/{training,validation}.csv (subDirectory_"
              "filePath, face_x, face_y, face_width, face_height, facial_landmarks, expression, valence, arousal) "
              "with images under ROOT/Manually_Annotated_Images/, or ROOT/{train_set,val_set}/images/<id>.jpg with "
              "ROOT/{train_set,val_set}/annotations/<id>_exp.npy",
    ferplus="a FERPlus layout: ROOT/fer2013.csv (emotion,pixels,Usage) with ROOT/fer2013new.csv (Usage,Image name,"
            "neutral,...,NF) row for row, or ROOT/FER2013Train/ and ROOT/FER2013Test/ each with its PNGs and a "
            "label.csv of lines 'fer0000000.png,\"(0, 0, 48, 48)\",4,0,0,1,3,2,0,0,0,0'")

def layout_error(data, message):
    return UserError(f"{message}; expected {LAYOUTS[data]}")

def pil_to_uint8(img: Image.Image, size: int, box=None) -> torch.Tensor:
    """PIL image -> uint8 (3, size, size): optional face box crop, RGB, bilinear resize (antialiased)."""
    img = (img.crop(box) if box is not None else img).convert("RGB")
    img = img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, S, S)

class FaceDataset(torch.utils.data.Dataset):
    """Items (uint8 (3, size, size), label, index); labels after noise, true_labels before; subclasses: image(i)"""

    def __init__(self, classes, labels, size):
        self.classes, self.size = list(classes), size
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.true_labels = self.labels.clone()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.image(i), int(self.labels[i]), i

class ImageFiles(FaceDataset):
    """Images on disk; `boxes` (x0, y0, x1, y1) crop to the face when given."""

    def __init__(self, paths, labels, classes, size, boxes=None, layout="imagefolder"):
        super().__init__(classes, labels, size)
        self.paths, self.boxes = [str(p) for p in paths], boxes
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise layout_error(layout, f"{len(missing)} of {len(paths)} images missing, first {missing[0]}")

    def image(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                return pil_to_uint8(img, self.size, None if self.boxes is None else self.boxes[i])
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read image {self.paths[i]}: {e}") from None

class ImageList(ImageFiles):
    """--predict's images: (uint8 (3, S, S), original width, height, error message or '')."""

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                return pil_to_uint8(img, self.size), img.width, img.height, ""
        except (OSError, ValueError, SyntaxError) as e:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), 0, 0, str(e) or type(e).__name__

def read_label_lines(path: Path, what: str) -> list[tuple[str, int]]:
    """RAF-DB label file: 'name label' per line (1..7 -> 0..6; the official file has no trailing newline)."""
    if not path.is_file():
        raise layout_error("rafdb", f"{what} not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if parts and (len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7):
            raise UserError(f"{path}:{n}: expected 'train_00001.jpg 5' (name, label 1..7), got {line!r}")
        rows += [(parts[0], int(parts[1]) - 1)] if parts else []
    return rows

def load_rafdb(root: Path, split, size, train_labels="", **_):
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    rows = [r for r in read_label_lines(label_file, "RAF-DB label file") if r[0].startswith(split + "_")]
    if not rows:
        raise layout_error("rafdb", f"{label_file} has no '{split}_' lines")
    official = rows
    if train_labels and split == "train":  # e.g. noise02.txt; the official labels stay the truth
        other = dict(read_label_lines(Path(train_labels), "--train-labels file"))
        names = {name for name, _ in rows}
        missing, extra = sorted(names - other.keys()), sorted(other.keys() - names)
        if missing or extra:
            raise UserError(f"--train-labels {train_labels} must list exactly the {len(names)} training images: "
                            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]})")
        rows = [(name, other[name]) for name, _ in rows]
    paths = [root / "Image" / "aligned" / (Path(name).stem + "_aligned.jpg") for name, _ in rows]
    ds = ImageFiles(paths, [y for _, y in rows], RAFDB_CLASSES, size, layout="rafdb")
    ds.names, ds.true_labels = [name for name, _ in rows], torch.tensor([y for _, y in official])
    return ds

def load_imagefolder(root: Path, split, size, **_):
    names = ["train"] if split == "train" else ["test", "val"]
    folder = next((root / n for n in names if (root / n).is_dir()), None)
    if folder is None:
        raise layout_error("imagefolder", f"no folder {' or '.join(str(root / n) for n in names)}")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir()) if (root / "train").is_dir() else []
    here = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not here or set(here) - set(classes):
        raise layout_error("imagefolder", f"{folder} has class folders {here}, not a subset of train's {classes}")
    files = [sorted(p for p in (folder / c).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) for c in classes]
    if not any(files):
        raise layout_error("imagefolder", f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return ImageFiles(sum(files, []), [c for c, f in enumerate(files) for _ in f], classes, size)

def load_affectnet(root: Path, split, size, classes=8, **_):
    """AffectNet codes 0..7 (8..10 dropped; classes=7 drops contempt too); the validation set is the test set."""
    lists = root / "Manually_Annotated_file_lists" / ("training.csv" if split == "train" else "validation.csv")
    folder = root / ("train_set" if split == "train" else "val_set")
    paths, labels, boxes = [], [], []
    if lists.is_file():
        head, *rows = read_csv_rows(lists, "AffectNet list") or [[]]
        col = {h.strip(): i for i, h in enumerate(head)}
        if "subDirectory_filePath" not in col or "expression" not in col:
            raise layout_error("affectnet", f"{lists}: header {head[:9]} lacks subDirectory_filePath / expression")
        box_cols = [col.get(k) for k in ("face_x", "face_y", "face_width", "face_height")]
        for n, row in enumerate(rows, 2):
            try:
                code = int(row[col["expression"]])
                x, y, w, h = (int(float(row[i])) for i in box_cols) if None not in box_cols else (0, 0, 0, 0)
            except (ValueError, IndexError):
                raise UserError(f"{lists}:{n}: expected {len(head)} columns with an integer expression, "
                                f"got {row[:7]}") from None
            if 0 <= code < classes:
                paths.append(root / "Manually_Annotated_Images" / row[col["subDirectory_filePath"]])
                labels.append(code)
                boxes.append((x, y, x + w, y + h))
        boxes = boxes if None not in box_cols else None
    elif (folder / "annotations").is_dir():
        for ann in sorted((folder / "annotations").glob("*_exp.npy")):
            try:
                code = int(np.load(ann).item())
            except (ValueError, OSError) as e:
                raise UserError(f"{ann}: expected a saved expression code 0..10 ({e})") from None
            if 0 <= code < classes:
                paths.append(folder / "images" / (ann.name.removesuffix("_exp.npy") + ".jpg"))
                labels.append(code)
        boxes = None
    else:
        raise layout_error("affectnet", f"neither {lists} nor {folder / 'annotations'} exists")
    if not paths:
        raise layout_error("affectnet", f"no AffectNet {split} images with expression codes 0..{classes - 1}")
    return ImageFiles(paths, labels, AFFECTNET_CLASSES[:classes], size, boxes, layout="affectnet")

def ferplus_label(votes, rule="majority") -> int:
    """FERPlus votes (neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF) -> class
    0..7, or -1 to drop the image. majority (Microsoft's): drop single votes; keep if the top emotion has more than
    half of the rest and is not unknown / NF. argmax (NOTE: not in the paper): the top column, unless unknown / NF."""
    v = np.asarray(votes, dtype=np.float64)
    if rule == "majority":
        v = np.where(v <= 1, 0.0, v)  # outlier removal: single votes
        if v.max() <= 0.5 * v.sum():
            return -1
    elif v.max() <= 0:
        return -1
    top = int(np.argmax(v))
    return top if top < 8 else -1

class Fer2013Pixels(FaceDataset):
    """FER2013 rows: 48 x 48 grayscale pixels as space-separated integers, replicated to 3 channels."""

    def __init__(self, pixels, labels, size):
        super().__init__(FERPLUS_CLASSES, labels, size)
        self.pixels = pixels

    def image(self, i):
        gray = np.array(self.pixels[i].split(), dtype=np.uint8).reshape(48, 48)
        return pil_to_uint8(Image.fromarray(gray), self.size)

def votes(cells, path, n):
    try:
        return [int(x) for x in cells]
    except ValueError:
        raise UserError(f"{path}:{n}: expected 10 integer vote columns, got {cells}") from None

def read_csv_rows(path: Path, what: str) -> list[list[str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.reader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None

def load_ferplus(root: Path, split, size, label_rule="majority", **_):
    """FERPlus: fer2013.csv + fer2013new.csv (test: PrivateTest), or FER2013Train / FER2013Test with label.csv."""
    if (root / "fer2013.csv").is_file() and (root / "fer2013new.csv").is_file():
        old, new = (read_csv_rows(root / n, "FERPlus file")[1:] for n in ("fer2013.csv", "fer2013new.csv"))
        if len(old) != len(new):
            raise UserError(f"fer2013.csv has {len(old)} rows but fer2013new.csv {len(new)}: they must match row "
                            "for row")
        pixels, labels = [], []
        for n, (o, v) in enumerate(zip(old, new), 2):
            if len(o) != 3 or len(v) != 12 or o[2] != v[0]:
                raise UserError(f"row {n}: expected fer2013.csv 'emotion,pixels,Usage' and fer2013new.csv "
                                f"'Usage,Image name,<10 vote columns>' with the same Usage, got {o[::2]} / {v[:2]}")
            if v[0] != ("Training" if split == "train" else "PrivateTest") or not v[1].strip():
                continue  # another split, or an empty image name: removed by the FERPlus authors
            label = ferplus_label(votes(v[2:], root / "fer2013new.csv", n), label_rule)
            if label >= 0:
                pixels.append(o[1])
                labels.append(label)
        return Fer2013Pixels(pixels, labels, size)
    folder = root / ("FER2013Train" if split == "train" else "FER2013Test")
    if not (folder / "label.csv").is_file():
        raise layout_error("ferplus", f"neither {root / 'fer2013.csv'} + fer2013new.csv nor {folder / 'label.csv'} "
                                      "exists")
    paths, labels = [], []
    for n, row in enumerate(read_csv_rows(folder / "label.csv", "FERPlus label file"), 1):
        if row and len(row) != 12:
            raise UserError(f"{folder / 'label.csv'}:{n}: expected 'name.png,\"(0, 0, 48, 48)\",<10 vote columns>', "
                            f"got {row[:3]}")
        label = ferplus_label(votes(row[2:], folder / "label.csv", n), label_rule) if row else -1
        if label >= 0:
            paths.append(folder / row[0])
            labels.append(label)
    return ImageFiles(paths, labels, FERPLUS_CLASSES, size, layout="ferplus")


# ---- Synthetic faces: cartoon faces drawn with PIL, deterministic per (seed, split, index)
#                 brow raise, brow tilt (inner end up), eye opening, mouth curve (smile +),
#                 mouth opening, mouth half-width, asymmetry, nose wrinkle
SYNTHETIC_EXPRESSIONS = np.array([
    [0.26, 0.00, 2.00, 0.00, 0.40, 0.24, 0.00, 0.0],    # surprise: brows up, eyes wide, round open mouth
    [0.16, 0.18, 1.70, -0.10, 0.16, 0.62, 0.00, 0.0],   # fear: brows up and together, stretched mouth
    [-0.10, -0.06, 0.45, -0.14, 0.06, 0.42, 0.24, 1.0],  # disgust: squint, lopsided lip, wrinkled nose
    [0.02, 0.00, 0.75, 0.34, 0.12, 0.62, 0.00, 0.0],    # happiness: smile
    [-0.02, 0.22, 0.70, -0.30, 0.00, 0.44, 0.00, 0.0],  # sadness: inner brows up, frown
    [-0.12, -0.24, 0.55, -0.06, 0.06, 0.40, 0.00, 0.0],  # anger: brows down in a V, narrow eyes
    [0.00, 0.00, 1.00, 0.00, 0.00, 0.48, 0.00, 0.0],    # neutral
])
SYNTHETIC_JITTER = np.array([0.03, 0.03, 0.12, 0.03, 0.02, 0.05, 0.02, 0.0])  # identity's own face

def draw_face(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One cartoon face showing expression `label` (RAF-DB order) at a random intensity in [0.5, 1] (low intensities
    are close to neutral: ambiguous), with random identity, pose, background, lighting and noise."""
    k = rng.uniform(0.5, 1.0)
    p = SYNTHETIC_EXPRESSIONS[6] + k * (SYNTHETIC_EXPRESSIONS[label] - SYNTHETIC_EXPRESSIONS[6])
    raise_, tilt, eye_open, curve, mouth_open, mouth_w, asym, wrinkle = p + rng.normal(0, 1, 8) * SYNTHETIC_JITTER
    D = 2 * size  # draw at twice the size, then shrink (antialiasing)
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (D, D), bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 2)):  # background clutter
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * D
        d.ellipse([x0, y0, x0 + rng.uniform(0.1, 0.5) * D, y0 + rng.uniform(0.1, 0.5) * D],
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    r = D * rng.uniform(0.34, 0.4)  # the face fills the crop, as in aligned datasets
    cx, cy = D / 2 + rng.uniform(-0.05, 0.05, 2) * D
    P = lambda x, y: (cx + r * x, cy + r * y)  # face units -> pixels
    hair = tuple(int(v) for v in rng.integers(10, 120, 3))
    skin = tuple(int(v) for v in np.array([224, 172, 140]) * rng.uniform(0.45, 1.1) + rng.integers(-15, 16, 3))
    fw, fh = rng.uniform(0.85, 1.05), rng.uniform(1.1, 1.35)
    if rng.random() < 0.7:
        d.ellipse([*P(-fw - 0.12, -fh - 0.15), *P(fw + 0.12, 0.2)], fill=hair)
    d.ellipse([*P(-fw, -fh), *P(fw, fh)], fill=skin)
    ex, ey = rng.uniform(0.32, 0.42), rng.uniform(-0.22, -0.1)
    iris = tuple(int(v) for v in rng.integers(20, 140, 3))
    line = max(2, round(0.1 * r))
    for s in (-1, 1):
        h = 0.09 * max(eye_open, 0.15)
        d.ellipse([*P(s * ex - 0.16, ey - h), *P(s * ex + 0.16, ey + h)], fill=(245, 245, 240), outline=(40, 30, 30))
        pr = min(0.065, h)
        d.ellipse([*P(s * ex - pr, ey - pr), *P(s * ex + pr, ey + pr)], fill=iris)
        by = ey - 0.24 - raise_
        d.line([P(s * 0.13, by - tilt), P(s * (ex + 0.2), by + 0.3 * tilt)], fill=hair, width=line + 1)
    d.line([P(0, ey + 0.1), P(0.06, 0.28), P(-0.04, 0.3)], fill=tuple(int(v * 0.7) for v in skin), width=line)
    if wrinkle * k > 0.5:
        for s in (-1, 1):
            d.line([P(s * 0.07, 0.02), P(s * 0.17, 0.08)], fill=tuple(int(v * 0.6) for v in skin), width=line)
    my, w = rng.uniform(0.5, 0.62), max(mouth_w, 0.12)
    xs = np.linspace(-1, 1, 15)
    mid = [my + curve * (0.5 - x * x) - asym * max(x, 0) for x in xs]  # smile: corners above the centre
    half = [0.5 * max(mouth_open, 0) * (1 - x * x) for x in xs]  # an open mouth parts both lips
    upper = [P(x * w, m - h) for x, m, h in zip(xs, mid, half)]
    lower = [P(x * w, m + h) for x, m, h in zip(xs, mid, half)]
    if mouth_open > 0.03:
        d.polygon(upper + lower[::-1], fill=(90, 20, 30), outline=(60, 10, 20))
    else:
        d.line(upper, fill=(110, 30, 40), width=line + 1)
    img = img.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, fillcolor=bg)
    img = img.resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) * rng.uniform(0.7, 1.15)  # lighting
    x = x.mean(2, keepdims=True).repeat(3, 2) if rng.random() < 0.2 else x  # some grayscale, like FERPlus
    x += rng.normal(0, rng.uniform(0, 6), x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))

class SyntheticFaces(FaceDataset):
    """Seven expressions in RAF-DB order, drawn on demand; image i of a split depends only on (seed, split, i)."""

    def __init__(self, n, split, size, seed=0):
        self.key = [seed, {"train": 0, "test": 1}[split]]
        labels = [int(np.random.default_rng(self.key + [i]).integers(7)) for i in range(n)]
        super().__init__(RAFDB_CLASSES, labels, size)

    def image(self, i):
        rng = np.random.default_rng(self.key + [i])  # its first draw is the label, as in __init__
        return pil_to_uint8(draw_face(rng, int(rng.integers(7)), self.size), self.size)

LOADERS = {"rafdb": load_rafdb, "affectnet": load_affectnet, "ferplus": load_ferplus, "imagefolder": load_imagefolder}

def load_dataset(name, root, split, size, **options) -> FaceDataset:
    """Dataset `name` ('rafdb' | 'affectnet' | 'ferplus' | 'imagefolder' |
    'synthetic'), split 'train' | 'test', images decoded to uint8 3 x size x size."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "synthetic":
        n = options.get("synthetic_train" if split == "train" else "synthetic_test", 1500 if split == "train" else 700)
        return SyntheticFaces(n, split, size, options.get("seed", 0))
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if not root:
        raise UserError(f"--data {name} needs --root DIR (the dataset folder; layouts in README.md)")
    if not Path(root).is_dir():
        raise UserError(f"dataset root {root} is not a folder")
    return LOADERS[name](Path(root), split, size, **options)

def dataset_options(cfg: Config) -> dict:
    return dict(train_labels=cfg.train_labels, classes=cfg.classes, label_rule=cfg.ferplus_label, seed=cfg.seed,
                synthetic_train=cfg.synthetic_train, synthetic_test=cfg.synthetic_test)


# ==== Appendix B: drawings (Fig. 4's confusion matrix, training curves) ================================

def fonts(size=15):  # Pillow >= 10.1
    return ImageFont.load_default(size=size), ImageFont.load_default(size=size - 3)

def draw_confusion(conf: torch.Tensor, classes, title="") -> Image.Image:
    """Fig. 4-style matrix: class names on both axes, count and row percentage per cell, shaded by the latter."""
    font, small = fonts()
    C, cell, left, head = len(classes), 74, 120, 50  # head: two title lines
    top = head + 110
    img = Image.new("RGB", (max(left + C * cell + 20, 640), top + C * cell + 40), "white")
    d = ImageDraw.Draw(img)
    for k, line in enumerate(title.split(": ", 1)):  # "what: figures" on two lines
        d.text((10, 8 + 20 * k), line, fill="black", font=font)
    d.text((left + C * cell // 2, top - 8), "predicted", fill="black", font=font, anchor="ms")
    for j, name in enumerate(classes):  # column labels, written upwards
        lab = Image.new("RGB", (top - head - 30, cell), "white")
        ImageDraw.Draw(lab).text((top - head - 36, cell // 2), name, fill="black", font=small, anchor="rm")
        img.paste(lab.rotate(90, expand=True), (left + j * cell, head))
    for i, row in enumerate(conf.tolist()):
        total = max(sum(row), 1)
        d.text((left - 8, top + i * cell + cell // 2), classes[i], fill="black", font=small, anchor="rm")
        for j, v in enumerate(row):
            f, x0, y0 = v / total, left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=tuple(int(255 - f * (255 - c)) for c in COLORS[0]),
                        outline=(200, 200, 200))
            ink = "white" if f > 0.5 else "black"
            d.text((x0 + cell // 2, y0 + cell // 2 - 9), str(v), fill=ink, font=font, anchor="mm")
            d.text((x0 + cell // 2, y0 + cell // 2 + 11), f"{100 * f:.1f}%", fill=ink, font=small, anchor="mm")
    d.text((10, top + C * cell + 12), "rows: true class (counts, % of the row)", fill="black", font=small)
    return img

COLORS = [(31, 78, 160), (214, 96, 40), (50, 150, 60), (160, 50, 150)]

def plot(d: ImageDraw.ImageDraw, box, title, xs, series: dict, lo=None, hi=None):
    """One panel: a line with dots per series over the epochs xs, a y axis with 5 values, a legend."""
    font, small = fonts()
    x0, y0, x1, y1 = box
    values = [v for ys in series.values() for v in ys if v is not None and math.isfinite(v)] or [0.0, 1.0]
    step = 10 ** math.floor(math.log10(max(max(values) - min(values), 1e-6)))  # round the axis outwards
    lo = math.floor(min(values) / step) * step if lo is None else lo
    hi = max(math.ceil(max(values) / step) * step, lo + step) if hi is None else hi
    d.text((x0, y0 - 26), title, fill="black", font=font)
    for k in range(5):
        y = y1 - (y1 - y0) * k / 4
        d.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        d.text((x0 - 6, y), f"{lo + (hi - lo) * k / 4:.3g}", fill="black", font=small, anchor="rm")
    X = lambda i: x0 + (x1 - x0) * (i + 0.5) / len(xs)
    for i in range(0, len(xs), math.ceil(len(xs) / 10)):
        d.text((X(i), y1 + 6), str(xs[i]), fill="black", font=small, anchor="mt")
    d.text(((x0 + x1) / 2, y1 + 24), "epoch", fill="black", font=small, anchor="mt")
    d.rectangle(box, outline="black")
    for c, (name, ys) in enumerate(series.items()):
        pts = [(X(i), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for i, v in enumerate(ys) if v is not None]
        d.line(pts, fill=COLORS[c], width=2)  # nothing for a single point
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[c])
        lx = x0 + sum(d.textlength(n, font=small) + 40 for n in list(series)[:c])  # legend under the axis
        d.line([(lx, y1 + 50), (lx + 20, y1 + 50)], fill=COLORS[c], width=3)
        d.text((lx + 26, y1 + 50), name, fill="black", font=small, anchor="lm")

def draw_curves(history: list, data: str) -> Image.Image:
    """curves.png: accuracy, losses, the schedule (Eq. 4 and the lr) and CUEM's relabels, per epoch."""
    img = Image.new("RGB", (1120, 780), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 12), f"fer_supcon, --data {data}: per epoch (metrics.jsonl)", fill="black", font=fonts(17)[0])
    def col(key, factor=1.0):  # None where the figure does not exist (L_sup is not computed while lambda = 0)
        shown = [r.get(key) is not None and (key != "supcon" or r["lam"] > 0) for r in history]
        return [r[key] * factor if ok else None for r, ok in zip(history, shown)]
    panels = [("test accuracy, %", dict(accuracy=col("test_acc", 100), **{"mean class": col("mean_class_acc", 100)}),
               None, None),
              ("training losses", {"cross-entropy, Eq. (1)": col("ce"), "L_sup, Eq. (2)": col("supcon")}, 0, None),
              ("schedule", {"lambda, Eq. (4)": col("lam"), "lr / first lr": col("lr", 1 / history[0]["lr"])}, 0, 1),
              (f"CUEM, % of the epoch's samples (last: {history[-1]['relabelled']} relabelled)",
               {"relabelled": col("relabel_share", 100), "precision": col("relabel_precision", 100),
                "recall": col("relabel_recall", 100)}, 0, 100)]
    for k, (title, series, lo, hi) in enumerate(panels):
        x, y = 90 + 550 * (k % 2), 90 + 360 * (k // 2)
        series = {n: ys for n, ys in series.items() if any(v is not None for v in ys)}
        plot(d, (x, y, x + 440, y + 260), title, [r["epoch"] for r in history], series, lo, hi)
    return img


# ==== Appendix C: --benchmark, side by side in one run =================================================

def benchmark(cfg: Config, given: dict) -> dict:
    """Samples/s of the baseline step (CE with ARM, one view), the full step (two views, momentum update, Eq. 2,
    CUEM, enqueue), augmentation, cached loader and eval-mode network: interleaved repeats, medians; memory."""
    device = pick_device(cfg.device)
    cuda = device.type == "cuda"
    S = cfg.img_size if "img_size" in given else 224 if cuda else 112
    B = cfg.batch_size if "batch_size" in given else 256 if cuda else 32
    reps, warmup = (30, 5) if cuda else (7, 2)
    cfg = dataclasses.replace(cfg, img_size=S, batch_size=B)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, 7, "none", device).train()
    model.queue.enqueue(F.normalize(torch.randn_like(model.queue.feats), dim=1), torch.arange(cfg.queue_size) % 7)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=cuda)
    cache = torch.randint(0, 256, (max(4 * B, 1024), 3, min(S, 100), min(S, 100)), dtype=torch.uint8, device=device)
    images, amp = Images(None, device, True, 0, x=cache), autocast(device)
    g = torch.Generator(device=device).manual_seed(0)
    x_q, x_k = (augment(cache[:B], S, g).contiguous(memory_format=torch.channels_last) for _ in range(2))
    y, knobs = torch.randint(0, 7, (B,), device=device), dict(m=0.99, tau=0.1, theta=0.1, amp=amp)
    jobs = dict(baseline_samples_per_s=lambda: train_step(model, opt, x_q, None, y, lam=0.0, use_cuem=False, **knobs),
                full_samples_per_s=lambda: train_step(model, opt, x_q, x_k, y, lam=0.5, use_cuem=True, **knobs),
                augment_samples_per_s=lambda: (augment(cache[:B], S, g), augment(cache[:B], S, g)),
                inference_images_per_s=lambda: (logits_of(model, cache[:B], S, B, amp), model.train()),
                loader_samples_per_s=lambda: list(images.batches(torch.randperm(len(cache)), B, drop_last=True)))
    times = {k: [] for k in jobs}
    torch.cuda.reset_peak_memory_stats() if cuda else None
    for r in range(warmup + reps):  # interleaved, so that drifts in machine load hit all alike
        for k, job in jobs.items():
            torch.cuda.synchronize() if cuda else None
            t = time.perf_counter()
            job()
            torch.cuda.synchronize() if cuda else None
            times[k] += [time.perf_counter() - t] * (r >= warmup)
    med = {k: float(np.median(v)) for k, v in times.items()}
    if cuda:
        peak, name = torch.cuda.max_memory_allocated() / 2 ** 20, torch.cuda.get_device_name(device)
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    res = dict(device=name, torch=torch.__version__, img_size=S, batch_size=B, repeats=reps, compile=cfg.compile,
               **{k: B / t for k, t in med.items()},
               overhead_ratio=med["full_samples_per_s"] / med["baseline_samples_per_s"], peak_memory_mb=peak)
    res["loader_samples_per_s"] *= len(cache) // B  # one job there is a pass over the cache
    print(f"benchmark on {name}, torch {torch.__version__}, {S}px, batch {B}, median of {reps} after {warmup} warm-up")
    for k in jobs:
        print(f"  {k.replace('_', ' '):<36} {res[k]:>12,.0f}")
    print(f"  {'overhead ratio (full / baseline)':<36} {res['overhead_ratio']:>12.3f}\n  {'peak memory':<36} "
          f"{peak:>12,.0f} MB {'(CUDA allocated)' if cuda else '(process RSS)'}\n{json.dumps(res)}")
    return res


# ==== Command line ================================================================================

class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (through main), no usage dump
        raise UserError(f"{message} (see --help)")

def build_parser() -> ArgParser:
    """Flags from Config (defaults from the same fields, per-dataset ones named) and the commands."""
    p = ArgParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, md = "--" + f.name.replace("_", "-"), f.metadata
        per_data = "".join(f"; {d}: {v}" for d, v in md["per_data"].items())
        only = f" [--data {' | '.join(md['only'])}]" if md["only"] and len(md["only"]) < len(REAL) else ""
        text = f"{md['help']}{only} (default {f.default}{per_data})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=text)
            if f.name.startswith("no_"):  # --arm / --scl / --cuem undo a default such as synthetic's no_arm
                p.add_argument("--" + f.name[3:], dest=f.name, action="store_false", help=f"undo {flag}")
        else:
            kind = float if f.name == "momentum" else type(f.default)
            p.add_argument(flag, type=kind, choices=md["choices"], help=text.replace("%", "%%"))
    p.add_argument("--eval", metavar="CKPT", help="evaluate a checkpoint on the test split")
    p.add_argument("--predict", metavar="PATH", nargs="+", help="classify images: files, folders (recursive), globs")
    p.add_argument("--checkpoint", metavar="CKPT", help="the checkpoint for --predict and --export")
    p.add_argument("--top", type=int, metavar="K", help="--predict: print the K most likely classes (default 3)")
    p.add_argument("--csv", metavar="FILE", help="--predict: write path, predicted class and probabilities here")
    p.add_argument("--export", metavar="FILE", help="save the inference network with torch.export (.pt2)")
    p.add_argument("--benchmark", action="store_true", help="measure step, augmentation, loader, inference speed")
    return p

RESUME_FLAGS = {"epochs", "device", "workers", "log_every", "out", "cache", "cache_gb", "resume"}

def validate(cfg: Config, given: dict) -> None:
    """One-line errors for values and combinations that cannot work."""
    for name in given:
        only = Config.__dataclass_fields__[name].metadata["only"]
        if only and cfg.data not in only:
            raise UserError(f"--{name.replace('_', '-')} applies to --data {' | '.join(only)} only, not {cfg.data}")
    checks = [(cfg.img_size >= 64, f"--img-size {cfg.img_size}: expected at least 64"),
              (0 <= cfg.label_noise < 1, f"--label-noise {cfg.label_noise}: expected a fraction in [0, 1)"),
              (not (cfg.label_noise and cfg.train_labels), "--label-noise and --train-labels: give one of them"),
              (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: expected at least 1"),
              (cfg.epochs >= 1, f"--epochs {cfg.epochs}: expected at least 1"),
              (cfg.queue_size >= 1, f"--queue-size {cfg.queue_size}: expected at least 1"),
              (0 <= (cfg.momentum or 0) <= 1, f"--momentum {cfg.momentum}: expected a value in [0, 1]"),
              (cfg.tau > 0, f"--tau {cfg.tau}: expected a positive temperature"),
              (cfg.alpha > 0, f"--alpha {cfg.alpha}: expected a positive number of epochs"),
              (cfg.workers >= 0, f"--workers {cfg.workers}: expected 0 or more"),
              (not (cfg.no_arm and "arm_eval" in given), "--arm-eval needs ARM: it does not apply with --no-arm"),
              (cfg.synthetic_train >= 1 and cfg.synthetic_test >= 1, "--synthetic-train/-test: expected at least 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)

def user_message(e: Exception) -> str:
    """One line; a UserError raised in a DataLoader worker arrives wrapped in its traceback."""
    msg = str(e).strip()
    return re.sub(r"^[\w.]*UserError: ", "", msg.splitlines()[-1]).strip() if "Traceback" in msg else msg

def run(argv=None) -> dict:
    args = vars(build_parser().parse_args(argv))
    given = {k: v for k, v in args.items() if k in Config.__dataclass_fields__}
    command = [c for c in ("predict", "eval", "export", "benchmark", "resume") if c in args]
    if len(command) > 1:
        raise UserError(f"--{command[0]} and --{command[1]}: give one command at a time")
    for flag, needs in (("checkpoint", ("predict", "export")), ("top", ("predict",)), ("csv", ("predict",))):
        if flag in args and not set(needs) & set(command):
            raise UserError(f"--{flag} applies to --{' and --'.join(needs)} only")
    if "predict" in args or "export" in args:
        if "checkpoint" not in args:
            raise UserError(f"--{command[0]} needs --checkpoint CKPT (a best.pt or last.pt of a run)")
        if "export" in args:
            return run_export(args["export"], args["checkpoint"], given)
        if args.get("top", 3) < 1:
            raise UserError(f"--top {args['top']}: expected at least 1")
        return run_predict(args["predict"], args["checkpoint"], given, args.get("top", 3), args.get("csv"))
    if "eval" in args:
        return run_eval(args["eval"], given)
    if "resume" in given:
        ckpt = load_checkpoint(given["resume"])
        check_fits(ckpt["config"], given, sorted(given.keys() - RESUME_FLAGS), "--resume")
        cfg = checkpoint_config(ckpt, {"out": str(Path(given["resume"]).parent), **given}, RESUME_FLAGS)
        validate(cfg, {})
        return train(cfg, ckpt)
    cfg = make_config(given)
    validate(cfg, given)
    return benchmark(cfg, given) if args.get("benchmark") else train(cfg)

def main(argv=None) -> dict:
    """The command line; returns the final metrics (or the eval / predict / export / benchmark results). A
    user's mistake prints one line and exits with 2; --predict exits with 1 when it skipped an image."""
    try:
        res = run(argv)
    except UserError as e:
        print(f"fer_supcon: error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # outside the epoch loop (which names its last checkpoint)
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if res.get("skipped"):
        raise SystemExit(1)
    return res

if __name__ == "__main__":
    main()
