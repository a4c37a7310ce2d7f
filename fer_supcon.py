"""fer_supcon.py: Hu et al., "Facial Expression Recognition with Supervised Contrastive Learning
and Uncertainty Estimation", in one file, to be read next to the paper. A ResNet-18 trunk feeds
ARM + a classifier (cross-entropy, Eq. 1) and a MoCo query branch z_q; a momentum key encoder
fills a labelled queue (Sec. II-A) for the supervised contrastive loss (Eq. 2, weighted by
Eq. 4) and for CUEM (Sec. II-B), which relabels a sample whose mean cosine similarity to
another class of the queue beats its own class's by more than theta.

    python fer_supcon.py --data synthetic            # ~2 min on a 2-core CPU, ~94 % test acc
    python fer_supcon.py --data rafdb --root RAF-DB  # the paper's setting, one GPU
    python fer_supcon.py --eval runs/X/best.pt       # both test protocols, confusion matrix
    python fer_supcon.py --predict faces/ --checkpoint runs/X/best.pt   # or --export model.pt2
    python fer_supcon.py --benchmark                 # the steps' speed, side by side

Defaults: the paper's text where it speaks; else the code it builds on (ARM's scripts, MoCo,
SupContrast), else ours. `NOTE: not in the paper` marks a silent choice and its source, `NOTE:
departs from` an option that departs from them; README.md lists both, sourced and measured.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import glob
import inspect
import json
import math
import os
import platform
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont

# ==== Constants ================================================================================

DATASETS = ("rafdb", "affectnet", "ferplus", "imagefolder", "synthetic")
REAL = DATASETS[:4]  # the licensed ones, read from --root
RAFDB_CLASSES = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
AFFECTNET_CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
                     "contempt"]
FERPLUS_CLASSES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUTS = dict(  # README, 'Datasets', has them in full
    rafdb="ROOT/EmoLabel/list_patition_label.txt ('train_00001.jpg 5' lines) and "
          "ROOT/Image/aligned/train_00001_aligned.jpg",
    imagefolder="ROOT/train/<class>/*.jpg|png and ROOT/test/<class>/* (or ROOT/val/)",
    affectnet="ROOT/Manually_Annotated_file_lists/{training,validation}.csv and "
              "ROOT/Manually_Annotated_Images/, or ROOT/{train_set,val_set}/{images,annotations}/",
    ferplus="ROOT/fer2013.csv and ROOT/fer2013new.csv (row for row), or "
            "ROOT/FER2013{Train,Test}/ with PNGs and a label.csv of vote rows")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GPU_HEADROOM = 16 * 2 ** 30  # GPU memory a cache leaves free for training
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "config", "classes", "history",
                   "rng", "relabels", "card"}
CROPS = dict(rafdb="RAF-DB aligned 100x100 face crops", affectnet="AffectNet face boxes, cropped",
             ferplus="FER2013 48x48 grayscale face crops", synthetic="fer_supcon's cartoon faces",
             imagefolder="the images of the training folder")
NATIVE_SIZE = {"rafdb": 100, "ferplus": 48}  # the side of the dataset's own images
COLORS = [(31, 78, 160), (214, 96, 40), (50, 150, 60), (160, 50, 150)]

# ==== Config (Sec. III-B): a field's comment is its --help line ===============================

@dataclass
class Config:
    # data (Sec. III-A)
    data: str = "synthetic"  # the dataset: rafdb | affectnet | ferplus | imagefolder | synthetic
    root: str = ""  # the dataset's folder (layouts: README)
    train_labels: str = ""  # training labels from this file, e.g. noise02.txt
    classes: int = 8  # 8, or 7 without contempt (the paper: 8)
    ferplus_label: str = "majority"  # label rule: majority (Microsoft's) | argmax (ours)
    synthetic_train: int = 1500  # training images
    synthetic_test: int = 700  # test images
    label_noise: float = 0.0  # flip this share of the training labels (SCN's protocol)
    sampler: str = "shuffle"  # epoch order: shuffle | balanced (ours, for AffectNet)
    img_size: int = 224  # network input side (ARM: 224; at least 64 with ARM, 32 without)
    augment: str = "arm"  # training views: arm (ARM's recipe) | affine (ours, README)
    cache: str = "auto"  # decoded images kept: auto (device, else host, else none) | on | off
    workers: int = min(8, os.cpu_count() or 1)  # decoding processes
    # network (Sec. II, Fig. 2) and its evaluation
    pretrained: str = "imagenet"  # trunk weights: imagenet (Sec. III-B) | none | PATH
    arm: bool = True  # ARM as the top branch (Sec. II); --no-arm: GAP + linear
    head_bn: bool = True  # BatchNorm in the projection head (SimCLR v2, MoCo v3; README)
    test_batch_size: int = 64  # test batches in file order (ARM's test script)
    # II-A supervised contrastive learning
    queue_size: int = 8192  # K, the queue's slots (Sec. II-A)
    momentum: float | None = None  # m of the key encoder; none: 1 - B / K (ours, README)
    tau: float = 0.1  # tau of Eq. (2)
    supcon_reduction: str = "mean"  # Eq. (2) over anchors: mean (SupContrast) | sum (as written)
    scl: bool = True  # L_sup of Eq. (2) (Table II); --no-scl: lambda = 0
    skip_relabelled_anchors: bool = False  # option: a relabelled sample is no Eq. (2) anchor
    # II-B CUEM
    theta: float = 0.1  # theta of CUEM (Sec. II-B)
    cuem: bool = True  # CUEM's relabelling (Table II)
    cuem_start: int = 10  # CUEM's first epoch (SCN's relabelling start)
    # II-C objective, III-B optimiser
    alpha: float = 30.0  # alpha of Eq. (4)
    beta: float = 1e-4  # beta of Eq. (4)
    epochs: int = 100  # training epochs (Sec. III-B)
    batch_size: int = 256  # (Sec. III-B)
    lr: float = 1e-3  # Adam's learning rate (Sec. III-B)
    weight_decay: float = 1e-4  # Adam's weight decay (Sec. III-B)
    lr_decay: float = 0.9  # the learning rate x this after every epoch (Sec. III-B)
    # the run
    device: str = "auto"  # where to train: auto | cuda | cpu
    seed: int = 0  # of the initial weights, data order, augmentation and label noise
    out: str = ""  # output folder; empty: runs/<data>-<date>-<time>
    resume: str = ""  # continue the run saved in this last.pt
    compile: bool = False  # torch.compile the network
    deterministic: bool = False  # CUDA runs bit for bit, slower (CPU runs are anyway)
    log_every: float = 10.0  # seconds between progress lines

CHOICES = dict(data=DATASETS, classes=(7, 8), ferplus_label=("majority", "argmax"),
               sampler=("shuffle", "balanced"), augment=("arm", "affine"),
               cache=("auto", "on", "off"), supcon_reduction=("mean", "sum"),
               device=("auto", "cuda", "cpu"))
ONLY = dict(root=REAL, train_labels=("rafdb",), classes=("affectnet",),  # the datasets a
            ferplus_label=("ferplus",), synthetic_train=("synthetic",),  # field applies to
            synthetic_test=("synthetic",))
# NOTE: not in the paper - a dataset's own defaults: a first synthetic run in minutes on a CPU
# (ARM cannot learn from random weights); AffectNet's 48 % happiness balanced (README)
DATA_DEFAULTS = dict(synthetic=dict(img_size=64, pretrained="none", arm=False, epochs=8,
                                    batch_size=32, cuem_start=5),
                     affectnet=dict(sampler="balanced"))

def make_config(given: dict) -> Config:
    """A run's config: the flags given, else the dataset's own default, else the field's."""
    return Config(**{**DATA_DEFAULTS.get(given.get("data", Config.data), {}), **given})

def applies(name: str, data: str) -> bool:
    return data in ONLY.get(name, DATASETS)

class UserError(Exception):
    """A mistake the user can fix; main() prints it as one line and exits 2."""

# ==== II  The method ============================================================================
# ---- Fig. 2: ResNet-18 trunk, ARM (the top branch), projection head ----------------------------

def build_trunk(pretrained: str = "none") -> nn.Sequential:
    """torchvision ResNet-18 up to layer4 (no avgpool, no fc): (B, 3, S, S) -> (B, 512, s, s),
    s = ceil(S / 32). pretrained: 'imagenet' (Sec. III-B), 'none' or a state dict's path."""
    resnet = torchvision.models.resnet18()
    if pretrained == "imagenet":  # downloaded by torchvision on the first run, then cached
        try:
            weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict()
        except Exception as e:  # offline, proxy, ...
            raise UserError(f"cannot get the ImageNet weights of ResNet-18 ({type(e).__name__}: "
                            f"{e}); use --pretrained none or --pretrained PATH") from None
        resnet.load_state_dict(weights)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    trunk = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in names))
    if pretrained not in ("imagenet", "none"):
        load_trunk_weights(trunk, pretrained)
    return trunk

class ARM(nn.Module):
    """Amending Representation Module (Shi & Zhu, arXiv 2103.10189), Fig. 2's top branch:
    (B, 512, s, s) -> logits (B, C). In eval mode g is the running mean, or with
    batch_g=True the mean over the batch, as in the official test script."""

    @staticmethod
    def sides(img_size: int) -> tuple[int, int]:
        """(map side s, output side) for input side S: ceil(S / 32), (16 s - 32) // 8 + 1."""
        if img_size < 64:
            raise ValueError(f"input side {img_size} is too small: ARM needs at least 64")
        map_side = math.ceil(img_size / 32)
        return map_side, (16 * map_side - 32) // 8 + 1

    def __init__(self, num_classes: int, img_size: int = 224):
        super().__init__()
        self.map_side, self.out_side = ARM.sides(img_size)
        # one kernel, shared by the two arranged maps
        self.de_albino = nn.Conv2d(1, 1, kernel_size=32, stride=8, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.affinity_weight = nn.Parameter(torch.ones(1))  # `alpha` in the official code
        self.fc = nn.Linear(self.out_side ** 2, num_classes)
        # NOTE: not in the paper - a running mean of g (momentum 0.1, like BatchNorm's) for
        # --predict and --export, where one image has no batch; every test evaluation reports
        # the official protocol (g from each test batch of 64) and this one beside it
        self.register_buffer("running_g", torch.zeros(self.out_side, self.out_side))
        self.momentum = 0.1

    def forward(self, f, batch_g: bool = False):  # f: (B, 512, s, s)
        B = f.shape[0]
        s, o = self.map_side, self.out_side
        # feature arrangement: channel 256c + 16i + j at (h, w) -> map c, pixel (16h+i, 16w+j)
        x = F.pixel_shuffle(f, 16)  # (B, 2, 16s, 16s)
        y = self.de_albino(x.reshape(2 * B, 1, 16 * s, 16 * s))  # each map alone: (2B, 1, o, o)
        y = self.bn(y.reshape(B, 2, o, o))  # (B, 2, o, o)
        if self.training or batch_g:
            g = y.mean((0, 1))  # (o, o): the mean over the batch and both maps
            if self.training:
                with torch.no_grad():
                    self.running_g.lerp_(g.float(), self.momentum)
        else:
            g = self.running_g.to(y.dtype)
        z = y.mean(1) + self.affinity_weight * g  # (B, o, o): sharing affinity
        return self.fc(z.flatten(1))  # (B, C)

class GAPClassifier(nn.Module):
    """--no-arm, the ablation without ARM: global average pooling + Linear(512, C)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, f, batch_g: bool = False):  # (B, 512, s, s) -> (B, C); no g: batch_g unused
        return self.fc(f.mean((2, 3)))  # a mean: its CUDA backward is deterministic

def projection_head(dim: int = 128, batch_norm: bool = True) -> nn.Sequential:
    """The paper's "three-layer nonlinear MLP", r (B, 512) -> z (B, dim).
    NOTE: not in the paper - widths 512-512-dim; BatchNorm after the two hidden layers, as in
    MoCo v3's three-layer projector (SimCLR v2's three-layer head has it after every layer);
    MoCo v2 and SupContrast: Linear-ReLU-Linear, no BN (batch_norm=False: that MLP grown to
    three layers). Measured on noisy digits: without BN CUEM stops relabelling (README)."""
    def hidden():
        return [nn.Linear(512, 512), *([nn.BatchNorm1d(512)] if batch_norm else []),
                nn.ReLU(inplace=True)]
    return nn.Sequential(*hidden(), *hidden(), nn.Linear(512, dim))

class Encoder(nn.Module):
    """CNN + GAP + projection head: the query and key branches of Fig. 2."""

    def __init__(self, trunk: nn.Module, dim: int = 128, head_bn: bool = True):
        super().__init__()
        self.trunk, self.head = trunk, projection_head(dim, head_bn)

    def forward(self, x):  # (B, 3, S, S) -> feature map f (B, 512, s, s), z (B, dim)
        f = self.trunk(x)
        r = f.mean((2, 3))  # GAP: (B, 512)
        # NOTE: not in the paper - z is L2-normalised (MoCo): z_q . z_k is CUEM's cosine
        return f, F.normalize(self.head(r).float(), dim=1)

class FERSupCon(nn.Module):
    """Fig. 2: query encoder, top branch, momentum key encoder (a copy), labelled queue."""

    def __init__(self, num_classes, img_size=224, pretrained="none", arm=True, queue_size=8192,
                 dim=128, head_bn=True):
        super().__init__()
        self.encoder_q = Encoder(build_trunk(pretrained), dim, head_bn)
        self.classifier = ARM(num_classes, img_size) if arm else GAPClassifier(num_classes)
        # MoCo's builder: a second encoder, set to the query encoder's weights, no gradients
        self.encoder_k = Encoder(build_trunk(), dim, head_bn).requires_grad_(False)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.queue = LabeledQueue(queue_size, dim)

    def forward(self, x):  # inference: (B, 3, S, S) -> logits (B, C)
        return self.classifier(self.encoder_q.trunk(x))

# ---- II-A  Momentum encoder, labelled queue, supervised contrastive loss (Eq. 2) ---------------

@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """MoCo's key encoder: w_k <- m w_k + (1 - m) w_q for every parameter (MoCo updates
    parameters only: the key encoder runs in train mode and never reads its BatchNorm buffers);
    m = 0 copies, m = 1 freezes. The two modules must have the same parameters (names, shapes)."""
    if not 0 <= m <= 1:
        raise ValueError(f"momentum_update needs m in [0, 1], got {m}")
    params_q, params_k = dict(online.named_parameters()), dict(target.named_parameters())
    if params_q.keys() != params_k.keys() or any(params_q[n].shape != params_k[n].shape
                                                  for n in params_q):
        raise ValueError("momentum_update needs two modules with the same parameters "
                         "(names and shapes)")
    for name, w_q in params_q.items():
        params_k[name].lerp_(w_q, 1 - m)  # w_k + (1 - m)(w_q - w_k)

def key_momentum(batch_size: int, queue_size: int) -> float:
    """m when --momentum is not given. NOTE: not in the paper - m = 1 - B / K, so that the key
    encoder averages over about as many steps as the queue holds (RAF-DB: 1 - 256/8192)."""
    return max(0.0, 1 - batch_size / queue_size)

class LabeledQueue(nn.Module):
    """Q of Sec. II-A: K slots of (z_k, label), label -1: empty; buffers (.to(), state dict)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"LabeledQueue needs size and dim >= 1, got {size}, {dim}")
        self.register_buffer("feats", torch.zeros(size, dim))  # (K, D)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int64))  # (K,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, feats, labels):
        """Ring buffer: write the batch (B, D), (B,) at (ptr + arange(B)) % K, no host sync."""
        if feats.shape != (len(labels), self.feats.shape[1]):
            raise ValueError(f"enqueue expects feats (B, {self.feats.shape[1]}) and labels "
                             f"(B,), got {tuple(feats.shape)} and {tuple(labels.shape)}")
        K, B = len(self.labels), len(labels)
        if B > K:  # only the last K survive
            self.ptr.add_(B - K)
            feats, labels = feats[-K:], labels[-K:]
            B = K
        slots = (self.ptr + torch.arange(B, device=self.ptr.device)) % K  # (B,)
        self.feats[slots] = feats.detach().to(self.feats.dtype)
        self.labels[slots] = labels
        self.ptr.copy_((self.ptr + B) % K)

    def is_full(self) -> torch.Tensor:  # a bool scalar on the queue's device
        return (self.labels >= 0).all()

def queue_slots(queue_size: int, batch_size: int, n_train: int) -> int:
    """K for a training set of n_train images. NOTE: not in the paper - at most the largest
    multiple of the batch size not above n_train: a longer queue would hold stale repeats."""
    return min(queue_size, n_train // batch_size * batch_size)

def supcon_loss(q, q_labels, keys, key_labels, tau=0.1, reduction="mean"):
    """Eq. (2). q: queries (N, D), keys: the queue (K, D), both L2-normalised; key labels < 0
    are empty slots. For anchor i, positive p (same label) and negatives A(i) (other labels),
    with s = q . k / tau:
        l_ip = -log( exp(s_ip) / (exp(s_ip) + sum_{a in A(i)} exp(s_ia)) )
    Other positives are not in the denominator. The mean over P(i), then over the anchors that
    have a positive ("mean") or their sum ("sum", Eq. 2 as written); 0 (still in the graph)
    when none has one."""
    bad_shapes = q.shape[1] != keys.shape[1] or len(keys) != len(key_labels)
    if tau <= 0 or bad_shapes or len(q) != len(q_labels) or reduction not in ("mean", "sum"):
        raise ValueError(f"supcon_loss needs tau > 0, q (N, D) with N labels, keys (K, D) with K "
                         f"labels, reduction 'mean' or 'sum'; got {tau}, {tuple(q.shape)}, "
                         f"{tuple(keys.shape)}, {reduction!r}")
    # NOTE: not in the paper - Eq. (2) writes z_i^k . z_p^q with P, A "in Q": we read anchors
    # as the batch's z_q, positives and negatives as the queue's z_k (where Sec. II-A puts them)
    sim = q @ keys.T / tau  # (N, K)
    filled = (key_labels >= 0)[None, :]  # (1, K)
    pos = (q_labels[:, None] == key_labels[None, :]) & filled  # (N, K): P(i)
    neg = filled & ~pos  # (N, K): A(i)
    neg_lse = torch.logsumexp(sim.masked_fill(~neg, -torch.inf), 1, keepdim=True)  # (N, 1)
    l_ip = torch.logaddexp(sim, neg_lse) - sim  # (N, K); 0 when A(i) is empty
    n_pos = pos.sum(1)  # (N,): |P(i)|
    per_anchor = torch.where(pos, l_ip, 0.0).sum(1) / n_pos.clamp(min=1)  # (N,)
    has_pos = n_pos > 0
    total = torch.where(has_pos, per_anchor, 0.0).sum()  # Eq. (2): sum_{i=1}^{N}
    if reduction == "sum":
        return total
    # NOTE: a reading of Eq. (2) - SupContrast's convention: its paper writes the same sum over
    # anchors and its code takes the mean (the sum weighs L_sup N times against Eq. 1's mean)
    return total / has_pos.sum().clamp(min=1)

# ---- II-B  Contrastive uncertainty estimation module (CUEM), Fig. 3 ---------------------------

def cuem(q, labels, queue, queue_labels, num_classes, theta=0.1):
    """Fig. 3. For each query and each class c present in the queue (K, D): S_c = the mean
    cosine similarity to the queue entries of class c; u = max_c S_c - S_label. Where
    u > theta the label becomes argmax_c S_c. q: (N, D). Returns (labels (N,), u (N,)); u = 0
    when the sample's own class is not in the queue."""
    bad_queue = q.shape[1] != queue.shape[1] or len(queue) != len(queue_labels)
    if bad_queue or len(q) != len(labels):
        raise ValueError(f"cuem needs q (N, D) with N labels, a queue (K, D) with K labels; got "
                         f"{tuple(q.shape)}, {tuple(queue.shape)}")
    q, queue = F.normalize(q.float(), dim=1), F.normalize(queue.float(), dim=1)
    filled = queue_labels >= 0  # (K,)
    onehot = F.one_hot(queue_labels.clamp(min=0), num_classes).float() * filled[:, None]  # (K, C)
    count = onehot.sum(0)  # (C,): entries per class
    S = q @ queue.T @ onehot / count.clamp(min=1)  # (N, C): S_cos
    present = count > 0  # (C,)
    s_max, c_max = S.masked_fill(~present, -torch.inf).max(1)  # S_cos_max and its class, (N,)
    s_own = S.gather(1, labels[:, None]).squeeze(1)  # S_cos_zq, (N,)
    u = torch.where(present[labels], s_max - s_own, 0.0)  # (N,)
    return torch.where(u > theta, c_max, labels), u

# ---- II-C  Objective: Eq. (1), (3), the lambda schedule of Eq. (4), one training step ----------

def loss_weight(epoch: int, alpha: float = 30, beta: float = 1e-4) -> float:
    """Eq. (4), epochs from 1: lambda = 1 - epoch / alpha up to alpha (lambda(alpha) = 0, as
    written), beta afterwards."""
    if epoch < 1 or alpha <= 0:
        raise ValueError(f"loss_weight needs epoch >= 1 (epochs count from 1) and alpha > 0, "
                         f"got {epoch}, {alpha}")
    return 1.0 - epoch / alpha if epoch <= alpha else beta

def epoch_plan(epoch: int, cfg: Config) -> tuple[float, bool]:
    """This epoch's lambda (Eq. 4; 0 with --no-scl, Table II) and whether CUEM runs.
    NOTE: not in the paper - CUEM starts at epoch --cuem-start (10: SCN's relabel start).
    NOTE: not in the paper - with --no-scl (Table II's "baseline + CUEM") no loss reaches the
    projection head: it keeps its random initial weights, so CUEM compares random projections
    of the trained trunk's features (the paper does not say what its row did)."""
    lam = loss_weight(epoch, cfg.alpha, cfg.beta) if cfg.scl else 0.0
    return lam, cfg.cuem and epoch >= cfg.cuem_start

class StepOut(NamedTuple):  # device tensors
    loss: torch.Tensor  # L_total, Eq. (3)
    ce: torch.Tensor  # L_FER, Eq. (1)
    supcon: torch.Tensor  # L_sup, Eq. (2)
    y_fer: torch.Tensor  # (B,): the labels of L_FER: CUEM's where it relabelled, else y
    u: torch.Tensor  # (B,): CUEM's uncertainty (0 where it did not run)
    cuem_ran: torch.Tensor  # bool scalar: CUEM ran in this step (it waits for a full queue)

def train_step(model, opt, x_q, x_k, y, *, lam, m, tau, theta, use_cuem, amp,
               supcon_reduction="mean", skip_relabelled_anchors=False) -> StepOut:
    """One step of Sec. II, L_total = L_FER + lambda L_sup (Eq. 3), on views x_q, x_k (B, 3, S,
    S) (x_k None: the baseline, no key branch) and annotation y (B,); no host sync."""
    # NOTE: not in the paper - the classifier sees the query view (one trunk pass feeds both)
    with amp:
        f_q, z_q = model.encoder_q(x_q)  # (B, 512, s, s), (B, 128)
        logits = model.classifier(f_q)  # (B, C): the top branch
    y_fer, u = y, torch.zeros(len(y), device=y.device)
    cuem_ran = torch.zeros((), dtype=torch.bool, device=y.device)
    supcon = torch.zeros((), device=y.device)
    if x_k is not None:
        # NOTE: not in the paper - no shuffle-BN: positives come from earlier batches
        with torch.no_grad():
            momentum_update(model.encoder_q, model.encoder_k, m)  # before this step's keys
            with amp:
                z_k = model.encoder_k(x_k)[1]  # (B, 128)
        queue = model.queue  # NOTE: not in the paper - the contrast set: the queue as it was
        if use_cuem:
            cuem_labels, cuem_u = cuem(z_q.detach(), y, queue.feats, queue.labels,
                                       logits.shape[1], theta)  # Fig. 3: S from z^q
            # NOTE: not in the paper - CUEM waits for a full queue, writes nothing back
            cuem_ran = queue.is_full()
            y_fer, u = torch.where(cuem_ran, cuem_labels, y), torch.where(cuem_ran, cuem_u, 0.0)
        if lam > 0:
            # NOTE: not in the paper - anchors and queue keep the annotation (CUEM's labels
            # there confirmed themselves and collapsed training: README)
            anchors = y
            if skip_relabelled_anchors:  # NOTE: departs from Eq. (2), which sums over every i
                anchors = torch.where(y_fer == y, y, -1)  # -1: no anchor in this step
            supcon = supcon_loss(z_q, anchors, queue.feats, queue.labels, tau,
                                 supcon_reduction)  # Eq. (2)
    ce = F.cross_entropy(logits.float(), y_fer)  # Eq. (1): L_FER, on CUEM's labels
    loss = ce + lam * supcon  # Eq. (3)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if x_k is not None:
        model.queue.enqueue(z_k, y)  # after the loss, with the annotation
    return StepOut(loss.detach(), ce.detach(), supcon.detach(), y_fer, u, cuem_ran)

# ==== Data on the device: a decoded cache or loader workers; augmentation in batches ===========

@functools.cache
def imagenet_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std on the 0..255 scale, (1, 3, 1, 1), made once per device: built
    from a list, a CUDA tensor is a copy that waits for all earlier GPU work."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std

def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) on the 0..255 scale -> ImageNet-normalised."""
    mean, std = imagenet_constants(x.device)
    return (x - mean) / std

def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """float (B, 3, h, w) -> (B, 3, size, size), bilinear (antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)

def eval_transform(x: torch.Tensor, size: int) -> torch.Tensor:
    """The test transform (also --predict's, --export's): uint8 -> resized, normalised float."""
    return imagenet_normalize(resize(x.float(), size))

def arm_augment(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A training view of a uint8 batch (B, 3, h, w) -> normalised float (B, 3, size, size),
    drawn per sample from `gen`, in ARM's order (dataset.py, image_utils.py, train_raf-db.py):
    with p 0.5 one of {horizontal flip, Gaussian noise of variance 30, clipped, truncated} at
    equal odds, at the decoded size; resize; ImageNet normalisation; RandomErasing(p 0.5, area
    0.02-0.1, aspect 0.3-3.3, value 0). NOTE: not in the paper - ARM's recipe."""
    B, dev = x.shape[0], x.device
    def uniform():  # one U(0, 1) draw per sample, (B,)
        return torch.rand(B, generator=gen, device=dev)
    pick = uniform()  # ARM: uniform > 0.5, then randint(0, 1): flip, noise 0.25 each
    flip, noisy = (pick < 0.25).view(B, 1, 1, 1), ((pick >= 0.25) & (pick < 0.5)).view(B, 1, 1, 1)
    x = x.float()
    x = torch.where(flip, x.flip(-1), x)
    noise = math.sqrt(30) * torch.randn(x.shape, generator=gen, device=dev)
    x = torch.where(noisy, (x + noise).clamp(0, 255).floor(), x)  # astype(uint8) truncates
    x = imagenet_normalize(resize(x, size))
    return random_erase(x, gen, uniform)

def random_erase(x: torch.Tensor, gen: torch.Generator, uniform, p=0.5, area=(0.02, 0.1),
                 aspect=(0.3, 3.3)) -> torch.Tensor:
    """torchvision's RandomErasing (value 0) per sample of x (B, 3, S, S): with probability p, a
    round(sqrt(a r)) x round(sqrt(a / r)) rectangle, a = S^2 U(area), log r ~ U(log aspect), at
    a uniform integer position; with area <= 0.1 and aspect <= 3.3 the first draw always fits."""
    S = x.shape[-1]
    a = S * S * (area[0] + (area[1] - area[0]) * uniform())
    r = torch.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * uniform())
    height, width = (a * r).sqrt().round(), (a / r).sqrt().round()  # (B,), whole pixels
    top = (uniform() * (S - height + 1)).floor()  # randint(0, S - h + 1)
    left = (uniform() * (S - width + 1)).floor()
    pos = torch.arange(S, device=x.device, dtype=x.dtype)
    rows = (pos >= top[:, None]) & (pos < (top + height)[:, None])  # (B, S)
    cols = (pos >= left[:, None]) & (pos < (left + width)[:, None])  # (B, S)
    erase = rows[:, :, None] & cols[:, None, :] & (uniform() < p)[:, None, None]  # (B, S, S)
    return x.masked_fill(erase[:, None], 0.0)  # (B, 3, S, S)

def affine_augment(x: torch.Tensor, size: int, gen: torch.Generator, rotate=10.0,
                   scale=(0.9, 1.1), translate=0.05) -> torch.Tensor:
    """NOTE: departs from ARM's recipe - --augment affine (ours, README): uint8 -> normalised
    (B, 3, size, size): one grid_sample flips (p 0.5), rotates, scales and shifts while resizing;
    Gaussian noise (std 5.5, p 0.25); then ARM's erasing at up to a quarter of the area."""
    B, dev = x.shape[0], x.device
    def uniform():  # one U(0, 1) draw per sample, (B,)
        return torch.rand(B, generator=gen, device=dev)
    flip = torch.where(uniform() < 0.5, -1.0, 1.0)
    angle = (2 * uniform() - 1) * math.radians(rotate)
    zoom = scale[0] + (scale[1] - scale[0]) * uniform()
    shift = torch.stack([(2 * uniform() - 1) * 2 * translate for _ in range(2)], 1)  # side: 2
    # affine_grid maps output to input coordinates, the inverse of
    # p_out = zoom R(angle) Flip p_in + shift:   p_in = Flip R(-angle) / zoom (p_out - shift)
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    M = torch.stack([torch.stack([flip * cos, flip * sin], 1), torch.stack([-sin, cos], 1)], 1)
    theta_affine = torch.cat([M, -(M @ shift.unsqueeze(2))], 2)  # (B, 2, 3)
    grid = F.affine_grid(theta_affine, [B, 3, size, size], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", align_corners=False)  # (B, 3, S, S)
    noisy = (uniform() < 0.25).view(B, 1, 1, 1)
    noise = 5.5 * torch.randn(y.shape, generator=gen, device=dev)
    y = imagenet_normalize(torch.where(noisy, y + noise, y).clamp(0, 255))
    return random_erase(y, gen, uniform, area=(0.02, 0.25))

AUGMENTATIONS = {"arm": arm_augment, "affine": affine_augment}

def step_generator(seed: int, epoch: int, step: int, device) -> torch.Generator:
    """Augmentation draws from (seed, epoch, step): a resumed run sees the same views."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + step)

def inject_label_noise(labels: torch.Tensor, p: float, num_classes: int, seed: int):
    """NOTE: not in the paper - SCN's generate.py moves a label to a uniformly drawn other
    class; it flips each with probability p, this flips exactly round(p N) of them."""
    gen = torch.Generator().manual_seed(seed + 7919)
    flip = torch.randperm(len(labels), generator=gen)[: round(p * len(labels))]
    noisy = labels.clone()
    offset = torch.randint(1, num_classes, (len(flip),), generator=gen)  # never 0
    noisy[flip] = (labels[flip] + offset) % num_classes
    return noisy

def epoch_order(labels: torch.Tensor, sampler: str, seed: int, epoch: int) -> torch.Tensor:
    """An epoch's order, from (seed, epoch); 'balanced': inverse class frequency, replacement."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if sampler == "balanced":
        weights = 1.0 / torch.bincount(labels).clamp(min=1).double()[labels]
        return torch.multinomial(weights, len(labels), replacement=True, generator=gen)
    return torch.randperm(len(labels), generator=gen)

def decode_all(ds, workers: int, keep: bool = True):
    """A split decoded once in `workers` processes: (uint8 (N, 3, s, s) or None, unreadable)."""
    images = torch.empty(len(ds), 3, ds.size, ds.size, dtype=torch.uint8) if keep else None
    unreadable = []
    for x, idx, errors in torch.utils.data.DataLoader(Readable(ds), batch_size=128,
                                                      num_workers=workers):
        if keep:
            images[idx] = x
        unreadable += [e for e in errors if e]
    return images, unreadable

def refuse_unreadable(*splits: Images) -> None:
    """One error for all the images of these splits that cannot be read, before any training."""
    bad = [message for split in splits for message in split.unreadable]
    if bad:
        raise UserError(f"unreadable images: {len(bad)} (nothing was trained or written); "
                        f"the first {min(3, len(bad))}: " + "; ".join(bad[:3]))

def host_memory_available() -> int:
    """Bytes the host can still give (Linux's MemAvailable); 0 where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            return int(re.search(r"MemAvailable:\s*(\d+)", handle.read())[1]) * 1024
    except (OSError, TypeError):  # TypeError: no MemAvailable line
        return 0

def cache_placement(choice: str, device: torch.device, nbytes: int) -> str:
    """NOTE: not in the paper - one decode: 'device' (a GPU's free memory less GPU_HEADROOM, or
    the CPU's), 'host' (CUDA: batches through pinned memory), or 'workers' (every epoch)."""
    host = 0.75 * host_memory_available()  # leave the system a quarter
    gpu_free = torch.cuda.mem_get_info(device)[0] - GPU_HEADROOM if device.type == "cuda" else 0
    if choice != "off" and nbytes <= gpu_free:
        return "device"
    if choice != "off" and nbytes <= host:
        return "device" if device.type == "cpu" else "host"
    if choice == "on":
        raise UserError(f"--cache on: the images need {nbytes / 2 ** 30:.1f} GiB, more than the "
                        f"device or 3/4 of the host's free {host / 0.75 / 2 ** 30:.1f} GiB give")
    return "workers"

class Images:
    """A split's uint8 batches on the device: from a cache (device, or pinned host) or workers."""

    def __init__(self, ds, device, placement: str, workers: int, x=None):
        self.device = device
        self.placement = placement
        self.x = x  # (N, 3, s, s) uint8
        self.unreadable = []  # the images that cannot be read (refuse_unreadable)
        self.wait_seconds = 0.0  # time spent waiting for the workers' next batch
        if x is None:  # decoded once: the cache, or (workers) a check that every image reads
            self.x, self.unreadable = decode_all(ds, workers, keep=placement != "workers")
        if placement == "device":
            self.x = self.x.to(device)  # (N, 3, s, s)
        if placement == "workers":
            self.order = []  # the coming pass's batches: set before it, read by the workers
            self.loader = torch.utils.data.DataLoader(
                ds, batch_sampler=self.order, num_workers=workers,
                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None)

    def batches(self, order: torch.Tensor, batch_size: int):
        """(uint8 (b, 3, s, s), indices (b,)) on the device: `order` in batches, last partial."""
        if self.placement == "workers":
            source = self.from_workers(order, batch_size)
        else:  # the cache's device: the GPU's, or the host's
            source = ((self.x[idx], idx) for idx in order.to(self.x.device).split(batch_size))
        for x, idx in source:
            if self.placement == "host":  # pinned: the copies run while the GPU computes
                x, idx = x.pin_memory(), idx.pin_memory()
            yield x.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)

    def from_workers(self, order: torch.Tensor, batch_size: int):
        """The workers' host batches in `order`; the time spent waiting for each is counted."""
        self.order[:] = [b.tolist() for b in order.split(batch_size)]
        t0 = time.perf_counter()
        for x, _, idx in self.loader:
            self.wait_seconds += time.perf_counter() - t0
            yield x, idx
            t0 = time.perf_counter()  # the step has run: from here, waiting for the next

def placement_note(placement: str, choice: str, device, n: int, nbytes: int, side: int,
                   seconds: float, workers: int) -> str:
    """The banner's line on where a run's n images live and at what rate they come."""
    size = f"{n:,} images, {nbytes / 2 ** 30:.2f} GiB at {side} px"
    rate = f"decoded in {seconds:.1f} s, {n / max(seconds, 1e-9):,.0f} images/s"
    if placement == "workers":
        why = "--cache off" if choice == "off" else "no cache fits"
        return (f"images decoded every epoch by {workers} workers ({size}; {why}); a first pass "
                f"checked that all read: {rate}")
    where = f"{device.type} memory" if placement == "device" else "pinned host memory (CUDA)"
    return f"images decoded once into {where} ({size}; {rate})"

def trained_images(n: int, batch_size: int) -> int:
    """Images of an epoch trained on. NOTE: not in the paper - all, the last partial batch too
    (ARM's loader keeps it), but a single leftover image (train-mode BatchNorm cannot take it)."""
    return n - 1 if n > 1 and n % batch_size == 1 else n

# ==== III  Training and evaluation ============================================================

def train(cfg: Config, ckpt=None) -> dict:
    """Sec. III-B: Adam, lr x 0.9 per epoch, lambda by Eq. (4), a test after every epoch."""
    state = TrainState(cfg, ckpt)
    cfg, model = state.cfg, state.model
    use_keys, epoch = cfg.scl or cfg.cuem, state.first_epoch  # baseline: no keys
    try:
        for epoch in range(state.first_epoch, cfg.epochs + 1):
            lam, use_cuem = epoch_plan(epoch, cfg)
            order = epoch_order(state.train_ds.labels, cfg.sampler, cfg.seed, epoch)
            order = order[:trained_images(len(order), cfg.batch_size)]
            tally = EpochTally(state, epoch, lam, order)
            model.train()
            for step, (x, idx) in enumerate(state.train_images.batches(order, cfg.batch_size)):
                x_q, x_k = two_views(x, cfg, epoch, step, use_keys)
                result = train_step(model, state.opt, x_q, x_k, state.labels[idx], lam=lam,
                                    m=cfg.momentum, tau=cfg.tau, theta=cfg.theta,
                                    use_cuem=use_cuem, amp=autocast(state.device),
                                    supcon_reduction=cfg.supcon_reduction,
                                    skip_relabelled_anchors=cfg.skip_relabelled_anchors)
                tally.add(step, idx, result)  # sums on the device; a progress line when due
            state.sched.step()  # the learning rate x 0.9 after every epoch (Sec. III-B)
            row = evaluate_epoch(state, tally)  # the test evaluation and the metrics row
            save_outputs(state)
            print(epoch_line(row, tally), flush=True)
            loader_note(state, row, tally)
    except (KeyboardInterrupt, FloatingPointError) as e:
        last = state.out / "last.pt"
        where = f"{last} (epoch {epoch - 1})" if last.exists() else "none written yet"
        if isinstance(e, FloatingPointError):
            raise UserError(f"{e}; stopped; last good checkpoint: {where}") from None
        print(f"\ninterrupted in epoch {epoch}; last complete checkpoint: {where}", file=sys.stderr)
        raise SystemExit(130)
    summary = summarize(state.history, state.train_ds.classes, cfg)
    took = time.strftime("%H:%M:%S", time.gmtime(time.time() - state.started))
    print(f"final epoch {summary['final_epoch']}: test acc {accuracy_text(summary, 'final_acc')} "
          f"| best epoch {summary['best_epoch']}: {accuracy_text(summary, 'best_acc')} | mean of "
          f"the last {len(summary['last5_epochs'])} epochs: "
          f"{accuracy_text(summary, 'last5_mean_acc')} | {took} | {state.out}")
    return dict(summary, out=str(state.out), history=state.history)

def loader_note(state: TrainState, row: dict, tally: "EpochTally") -> None:
    """Once per run: the workers kept the step waiting for more than a tenth of an epoch."""
    wait, busy = row["data_wait_seconds"], row["train_seconds"]
    if state.loader_noted or wait <= 0.1 * busy:
        return
    state.loader_noted = True
    print(f"note: the workers cannot keep up with the step: it waited {wait:.1f} s of the epoch's "
          f"{busy:.1f} s ({tally.seen / busy:,.0f} images/s, the step alone "
          f"{tally.seen / max(busy - wait, 1e-9):,.0f}); try more --workers or --cache on")

def accuracy_text(figures: dict, key: str) -> str:
    """'92.05%', with ARM '92.05% (batch-independent 91.95%)': the official protocol first."""
    text = f"{100 * figures[key]:.2f}%"
    other = figures.get(key + "_batch_independent")
    return text if other is None else f"{text} (batch-independent {100 * other:.2f}%)"

def two_views(x, cfg: Config, epoch: int, step: int, keys: bool):
    """The query view and, when the key branch runs, the key view: two independent draws."""
    gen = step_generator(cfg.seed, epoch, step, x.device)
    augment = AUGMENTATIONS[cfg.augment]
    views = [augment(x, cfg.img_size, gen).contiguous(memory_format=torch.channels_last)
             for _ in range(2 if keys else 1)]
    return views[0], views[-1] if keys else None

class TrainState:
    """What a training run holds between epochs (last.pt restores it); prints the banner."""

    def __init__(self, cfg: Config, ckpt=None):
        self.device = device = pick_device(cfg.device)
        if cfg.deterministic:
            make_deterministic()
        torch.manual_seed(cfg.seed)
        size = decode_size(cfg)  # the side the images are decoded at
        self.train_ds = ds = load_dataset(cfg.data, cfg.root, "train", size, **dataset_options(cfg))
        self.test_ds = load_dataset(cfg.data, cfg.root, "test", size, **dataset_options(cfg))
        if cfg.label_noise > 0:
            ds.labels = inject_label_noise(ds.true_labels, cfg.label_noise, len(ds.classes),
                                           cfg.seed)
        self.noise = (ds.labels != ds.true_labels).double().mean().item()  # 0: unknown
        self.labels, self.true_labels = ds.labels.to(device), ds.true_labels.to(device)
        cfg, notes = method_sizes(cfg, len(ds)) if ckpt is None else (cfg, [])
        self.cfg = cfg
        self.model = build_model(cfg, len(ds.classes), "none" if ckpt else cfg.pretrained, device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, cfg.lr, weight_decay=cfg.weight_decay,
                                    fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=cfg.lr_decay)
        self.relabels = RelabelLog(len(ds), len(ds.classes), device)
        self.out = Path(cfg.out or f"runs/{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.history, self.first_epoch = [], 1  # history: the metrics rows
        if ckpt is not None:
            load_weights(self.model, ckpt["model"], cfg.resume)
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["rng"])
            for name, saved in ckpt["relabels"].items():
                getattr(self.relabels, name).copy_(saved)
            self.history, self.first_epoch = ckpt["history"], ckpt["epoch"] + 1
            notes.append(f"resumed from {cfg.resume} after epoch {ckpt['epoch']}")
        if trained_images(len(ds), cfg.batch_size) < len(ds):
            notes.append(f"{len(ds)} training images = {len(ds) // cfg.batch_size} batches of "
                         f"{cfg.batch_size} + 1: each epoch leaves the last out (BatchNorm)")
        n = len(ds) + len(self.test_ds)
        placement = cache_placement(cfg.cache, device, n * 3 * size ** 2)
        notes.append(f"evaluation: {statistics_text(cfg)}; output {self.out}")
        banner(cfg, device, ds, self.test_ds, notes)
        t0 = time.time()
        self.train_images = Images(ds, device, placement, cfg.workers)
        self.test_images = Images(self.test_ds, device, placement, cfg.workers)
        refuse_unreadable(self.train_images, self.test_images)
        print("note: " + placement_note(placement, cfg.cache, device, n, n * 3 * size ** 2,
                                        size, time.time() - t0, cfg.workers))
        self.out.mkdir(parents=True, exist_ok=True)  # written to once every image reads
        if cfg.label_noise > 0:
            write_noisy_labels(ds, self.out / "noisy_labels.txt")
        self.loader_noted = False  # the note that the workers cannot keep up, once
        self.figures_due = 1  # the epoch whose outputs include the figures (save_outputs)
        imagenet_constants(self.labels.device)  # before the first step: a copy to the device
        self.started = time.time()  # for the speed and the time left

def method_sizes(cfg: Config, n_train: int) -> tuple[Config, list[str]]:
    """The batch size, K (queue_slots) and m (key_momentum) on n_train images, with notes."""
    B = min(cfg.batch_size, n_train)
    K = queue_slots(cfg.queue_size, B, n_train)
    m = cfg.momentum if cfg.momentum is not None else key_momentum(B, K)
    notes = []
    if B < cfg.batch_size:
        notes.append(f"batch size {cfg.batch_size} > {n_train} training images: using {B}")
    if K < cfg.queue_size:
        notes.append(f"queue size {cfg.queue_size} capped to {K} (whole batches <= {n_train})")
    if cfg.momentum is None:
        notes.append(f"m = {m:.4f} = 1 - {B}/{K} (batch size / queue size)")
    return dataclasses.replace(cfg, batch_size=B, queue_size=K, momentum=m), notes

class EpochTally:
    """An epoch's sums on the device (the step never waits for the host), read per progress
    line: losses, relabels (all, right, per class), noisy labels seen, the first bad step."""

    def __init__(self, state: TrainState, epoch: int, lam: float, order: torch.Tensor):
        self.state = state
        self.epoch = epoch
        self.lam = lam
        self.lr = state.opt.param_groups[0]["lr"]
        self.steps = math.ceil(len(order) / state.cfg.batch_size)
        self.epoch_labels = state.train_ds.labels[order]  # host, in training order
        zero = torch.zeros((), dtype=torch.float64, device=state.device)
        names = ("loss", "ce", "supcon", "relabelled", "relabelled_right", "noisy",
                 "first_bad_step")  # first_bad_step: 0 while every loss is finite
        self.sums = dict.fromkeys(names, zero)  # replaced, never changed in place
        self.sums["relabelled_to"] = zero.repeat(len(state.train_ds.classes))  # (C,)
        self.seen = 0  # images trained on so far (from the batches' shapes: no sync)
        self.started = self.last_line = time.time()
        self.wait_at_start = state.train_images.wait_seconds

    def add(self, step: int, idx, result: StepOut) -> None:
        y, y_true = self.state.labels[idx], self.state.true_labels[idx]
        moved = result.y_fer != y  # relabelled by CUEM
        right = moved & (result.y_fer == y_true)  # the only way a noisy label is restored
        noisy = y != y_true
        first_bad = (self.sums["first_bad_step"] == 0) & ~result.loss.isfinite()
        to_class = torch.zeros_like(self.sums["relabelled_to"]).index_add_(0, result.y_fer,
                                                                          moved.double())
        step_sums = dict(loss=result.loss, ce=result.ce, supcon=result.supcon,
                         relabelled=moved.sum(), relabelled_right=right.sum(), noisy=noisy.sum(),
                         first_bad_step=first_bad * (step + 1), relabelled_to=to_class)
        self.sums = {name: total + step_sums[name] for name, total in self.sums.items()}
        self.state.relabels.add(idx, y, result)
        self.seen += len(idx)
        if time.time() - self.last_line > self.state.cfg.log_every or step + 1 == self.steps:
            self.read(step + 1)
            print(self.progress_line(), flush=True)

    def read(self, steps: int) -> None:
        """The one host sync: the sums so far, as numbers in self.figures."""
        *totals, to_class = self.sums.values()
        values = torch.cat([torch.stack(totals), to_class]).tolist()
        self.figures = dict(zip(self.sums, values), steps=steps, seen=self.seen,
                            relabelled_to=[int(v) for v in values[len(totals):]])
        self.seconds, self.last_line = time.time() - self.started, time.time()
        self.data_wait = self.state.train_images.wait_seconds - self.wait_at_start
        if self.figures["first_bad_step"]:
            raise FloatingPointError(f"non-finite loss in epoch {self.epoch}, step "
                                     f"{int(self.figures['first_bad_step'])}")

    def progress_line(self) -> str:
        cfg, sums = self.state.cfg, self.figures
        step, per_epoch = sums["steps"], len(self.epoch_labels)
        done = (self.epoch - self.state.first_epoch) * per_epoch + self.seen  # images
        rate = done / (time.time() - self.state.started)
        left = ((cfg.epochs - self.state.first_epoch + 1) * per_epoch - done) / rate
        return (f"epoch {self.epoch}/{cfg.epochs} step {step}/{self.steps} | loss "
                f"{sums['loss'] / step:.4f} ce {sums['ce'] / step:.4f} sup "
                f"{sums['supcon'] / step:.4f} lam {self.lam:.4f} | {self.relabel_text()} | "
                f"{rate:.0f} samples/s | ETA {time.strftime('%H:%M:%S', time.gmtime(left))}")

    def relabel_text(self) -> str:
        """CUEM's relabels so far, their precision / recall when the truth is known, the alarm."""
        sums = self.figures
        n = sums["relabelled"]
        text = f"relabelled {int(n)} ({100 * n / sums['seen']:.1f}%)"
        if self.state.noise > 0 and n > 0:
            text += (f" (precision {sums['relabelled_right'] / n:.2f}, recall "
                     f"{sums['relabelled_right'] / max(sums['noisy'], 1):.2f})")
        alarm = self.alarm()
        return text + (f" UNUSUAL: {alarm}" if alarm else "")

    def alarm(self) -> str:
        labelled = torch.bincount(self.epoch_labels[:self.figures["seen"]],
                                  minlength=len(self.figures["relabelled_to"]))
        return relabel_alarm(self.figures["relabelled_to"], labelled.tolist(),
                             self.state.train_ds.classes)

def evaluate_epoch(state: TrainState, tally: EpochTally) -> dict:
    """After an epoch's steps: the test evaluation (both of ARM's protocols), the metrics row."""
    cfg, sums = state.cfg, tally.figures
    t0 = time.time()
    conf = evaluate(state.model, state.test_images, state.test_ds.labels, cfg.img_size,
                    cfg.test_batch_size, len(state.test_ds.classes))
    n = sums["relabelled"]
    steps = sums["steps"]
    row = dict(epoch=tally.epoch, lr=tally.lr, lam=tally.lam, loss=sums["loss"] / steps,
               ce=sums["ce"] / steps, supcon=sums["supcon"] / steps, relabelled=int(n),
               relabel_share=n / sums["seen"], relabelled_to=sums["relabelled_to"],
               relabel_alarm=bool(tally.alarm()), **scores(conf["official"]))
    if isinstance(state.model.classifier, ARM):  # ARM's running g: what --predict computes
        row["test_acc_batch_independent"] = scores(conf["batch_independent"])["test_acc"]
    if state.noise > 0:  # precision: None (null) when nothing was relabelled
        row["relabel_precision"] = sums["relabelled_right"] / n if n else None
        row["relabel_recall"] = sums["relabelled_right"] / max(sums["noisy"], 1)
    row.update(samples_per_s=sums["seen"] / tally.seconds, train_seconds=tally.seconds,
               data_wait_seconds=tally.data_wait, test_seconds=time.time() - t0,
               output_seconds=None, confusion=conf["official"].tolist())
    state.history.append(row)
    return row

def epoch_line(row: dict, tally: EpochTally) -> str:
    return (f"== epoch {row['epoch']}: test acc {accuracy_text(row, 'test_acc')} mean class acc "
            f"{100 * row['mean_class_acc']:.2f}% | loss {row['loss']:.4f} ce {row['ce']:.4f} sup "
            f"{row['supcon']:.4f} lam {row['lam']:.4f} | {tally.relabel_text()} | train "
            f"{row['train_seconds']:.1f}s (waiting for data {row['data_wait_seconds']:.1f}s), "
            f"test {row['test_seconds']:.1f}s, outputs {row['output_seconds']:.1f}s")

class RelabelLog:
    """Per training sample, on the device: CUEM's looks, relabels, their classes, its last u."""

    def __init__(self, n: int, num_classes: int, device):
        self.seen = torch.zeros(n, dtype=torch.int32, device=device)
        self.relabelled = torch.zeros(n, dtype=torch.int32, device=device)
        self.to_class = torch.zeros(n, num_classes, dtype=torch.int32, device=device)  # (N, C)
        self.last_u = torch.zeros(n, device=device)

    def add(self, idx, y, result: StepOut) -> None:
        moved = (result.y_fer != y).int()
        self.seen.index_add_(0, idx, result.cuem_ran.int().expand(len(idx)))
        self.relabelled.index_add_(0, idx, moved)
        self.to_class.index_put_((idx, result.y_fer), moved, accumulate=True)
        # a sample drawn twice in a batch (balanced sampler) keeps the larger u: no write race
        u = torch.where(result.cuem_ran, result.u, self.last_u[idx])
        self.last_u.scatter_reduce_(0, idx, u, reduce="amax", include_self=False)

def relabel_alarm(relabelled_to: list, labelled: list, classes) -> str:
    """NOTE: not in the paper - '' or CUEM's collapse (README): in one epoch, a class receives
    at least 10 relabels, and more than the samples annotated with it: it would double."""
    for name, k, m in zip(classes, relabelled_to, labelled):
        if k >= 10 and k > m:
            return (f"{name} received {k} relabels, {k / max(m, 1):.1f}x its {m} annotated "
                    f"samples this epoch: CUEM may be collapsing (README)")
    return ""

def decode_size(cfg: Config) -> int:
    """NOTE: not in the paper - images are decoded no larger than the dataset's own (RAF-DB
    100 px, FERPlus 48 px) and resized to --img-size on the device (augment, eval_transform)."""
    return min(cfg.img_size, NATIVE_SIZE.get(cfg.data, cfg.img_size))

def statistics_text(cfg: Config) -> str:
    """The evaluation protocol of a run or checkpoint, in words (banner, card, --eval)."""
    text = ("eval mode with PyTorch's running BatchNorm statistics, test batches of "
            f"{cfg.test_batch_size} in file order")
    if cfg.arm:
        text += ("; ARM's g from each test batch (ARM's test script: the headline) and, beside "
                 "it, ARM's running g (batch-independent: --predict, --export)")
    return text

def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")

def make_deterministic() -> None:
    """--deterministic: deterministic CUDA kernels, cuBLAS's fixed workspace, no cuDNN tuning."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False

def autocast(device):
    """NOTE: not in the paper - bf16 autocast on CUDA (no GradScaler); float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16)
    return torch.autocast("cpu", enabled=False)

def build_model(cfg: Config, num_classes: int, pretrained: str, device) -> FERSupCon:
    model = FERSupCon(num_classes, cfg.img_size, pretrained, arm=cfg.arm,
                      queue_size=cfg.queue_size, head_bn=cfg.head_bn)
    model = model.to(device, memory_format=torch.channels_last)  # faster on CUDA and the CPU
    if cfg.compile:  # the parts the step and the evaluation call (in place: same state dict)
        for part in (model.encoder_q.trunk, model.encoder_q.head, model.encoder_k.trunk,
                     model.encoder_k.head, model.classifier):
            part.compile()
    return model

def load_weights(model: nn.Module, state_dict: dict, what) -> None:
    """load_state_dict, loud on any missing, unused or misshapen tensor (never strict=False)."""
    own = model.state_dict()
    missing, unused = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape)
    if missing or unused or wrong:
        raise UserError(f"{what} does not fit this network: {len(missing)} missing {missing[:3]}, "
                        f"{len(unused)} unused {unused[:3]}, {len(wrong)} misshapen {wrong[:3]}")
    model.load_state_dict(state_dict)

@torch.no_grad()
def logits_of(model, x: torch.Tensor, img_size: int, batch_size: int, amp=None) -> dict:
    """Eval-mode logits (N, C) of uint8 images (N, 3, h, w), in batches of batch_size in the
    given order, one trunk pass per batch, under both test protocols: 'official' (with ARM, g
    from each batch) and 'batch_independent' (ARM's running g); one without ARM. NOTE: not in
    the paper - ARM's test_raf-db.py protocol is the headline."""
    was_training, arm = model.training, isinstance(model.classifier, ARM)
    model.eval()
    protocols = {"official": [], "batch_independent": []} if arm else {"official": []}
    with amp or torch.autocast("cpu", enabled=False):
        for xb in x.split(batch_size):
            xb = eval_transform(xb, img_size).contiguous(memory_format=torch.channels_last)
            f = model.encoder_q.trunk(xb)  # (b, 512, s, s)
            for name, chunks in protocols.items():
                batch_g = name == "official"  # g from this batch (ARM), else the running g
                chunks.append(model.classifier(f, batch_g=batch_g).float())  # (b, C)
    model.train(was_training)
    logits = {name: torch.cat(chunks) for name, chunks in protocols.items()}
    logits.setdefault("batch_independent", logits["official"])
    return logits

def evaluate(model, images: Images, labels: torch.Tensor, img_size, batch_size, num_classes):
    """Both protocols' confusion matrices (logits_of), batches in file order, the last partial."""
    order = torch.arange(len(labels))
    batches = [logits_of(model, x, img_size, batch_size, autocast(images.device))
               for x, _ in images.batches(order, batch_size)]
    y = labels.to(images.device)
    return {name: confusion(torch.cat([b[name] for b in batches]), y, num_classes)
            for name in batches[0]}

def confusion(logits: torch.Tensor, y: torch.Tensor, C: int) -> torch.Tensor:
    """(C, C) counts, rows: true class, columns: predicted; no host sync until it is read."""
    counts = torch.zeros(C * C, dtype=torch.int64, device=y.device)
    counts.index_add_(0, y * C + logits.argmax(1), torch.ones_like(y))
    return counts.view(C, C).cpu()

def scores(conf: torch.Tensor) -> dict:
    """Accuracy, mean class accuracy and macro-F1 (over classes with test samples), per class."""
    conf = conf.double()
    tp, true = conf.diag(), conf.sum(1)
    recall = tp / true.clamp(min=1)
    f1 = 2 * tp / (true + conf.sum(0)).clamp(min=1)  # = 2 P R / (P + R); 0: never true, predicted
    has = true > 0
    return dict(test_acc=(tp.sum() / conf.sum().clamp(min=1)).item(),
                mean_class_acc=recall[has].mean().item(), macro_f1=f1[has].mean().item(),
                per_class_acc=recall.tolist())

def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"

def banner(cfg: Config, device, train_ds, test_ds, notes) -> None:
    print(f"fer_supcon | torch {torch.__version__} torchvision {torchvision.__version__} | "
          f"{device_name(device)} | seed {cfg.seed}")
    print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()
                                if applies(k, cfg.data)))
    for split, ds in (("train", train_ds), ("test", test_ds)):
        counts = zip(ds.classes, torch.bincount(ds.labels, minlength=len(ds.classes)).tolist())
        print(f"{split}: {len(ds)} images, " + ", ".join(f"{c} {n}" for c, n in counts))
    print("".join(f"note: {note}\n" for note in notes), end="")

# ==== Outputs: checkpoints, metrics.jsonl, summary.json, curves, relabels, confusion (Fig. 4) ==

def atomic_write(path: Path, write) -> None:
    """write(tmp_path), fsync, then rename over `path`: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # .pt2 for torch.export
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))

def write_png(path, image: Image.Image) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))

def write_csv(path, rows) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    atomic_write(path, write)

def load_trunk_weights(trunk: nn.Module, path: str) -> None:
    """A ResNet-18 state dict (resnet18_msceleb.pth; 'state_dict', 'module.'; fc.* ignored)."""
    sd = load_torch_file(path, "--pretrained file")
    if isinstance(sd, dict):
        sd = sd.get("state_dict", sd)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--pretrained {path}: expected a ResNet-18 state dict (name -> tensor)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    own = trunk.state_dict()  # files saved before PyTorch 0.4.1 lack BatchNorm's update counts
    for k in own.keys() - sd.keys():
        if k.endswith("num_batches_tracked"):
            sd[k] = own[k]
    load_weights(trunk, sd, f"--pretrained {path} (ResNet-18)")

def load_torch_file(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # data, never code
    except Exception as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise UserError(f"{what} {path} is not a readable torch file (truncated or foreign?): "
                        f"{lines[0][:200]}") from None

def load_checkpoint(path) -> dict:
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        found = sorted(ckpt.keys())[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a fer_supcon checkpoint: expected keys "
                        f"{sorted(CHECKPOINT_KEYS)}, found {found}")
    return ckpt

def model_card(cfg: Config, classes, row: dict) -> dict:
    """What a user needs to feed the model, and its epoch's two accuracies (row: its metrics)."""
    return dict(classes=list(classes), decode_size=decode_size(cfg), img_size=cfg.img_size,
                input="RGB uint8 face crops, resized to decode_size x decode_size (PIL, "
                      "bilinear); the network resizes them to img_size (antialiased bilinear)",
                normalisation=dict(mean=[255 * v for v in IMAGENET_MEAN],
                                   std=[255 * v for v in IMAGENET_STD]),
                dataset=cfg.data, crops=CROPS[cfg.data], statistics=statistics_text(cfg),
                torch=str(torch.__version__), test_acc=row["test_acc"],  # the official protocol
                test_acc_batch_independent=row.get("test_acc_batch_independent", row["test_acc"]))

def save_outputs(state: TrainState) -> None:
    """The run folder's files, each atomic: last.pt, best.pt, metrics.jsonl, summary.json every
    epoch; figures and relabels.csv too, or every k epochs and after the last if they cost over a
    tenth of the epoch's training. The row gets the seconds (None in the checkpoint's copy)."""
    t0 = time.time()
    cfg, row = state.cfg, state.history[-1]
    classes = state.train_ds.classes
    summary = summarize(state.history, classes, cfg)
    checkpoint = dict(model=state.model.state_dict(), optimizer=state.opt.state_dict(),
                      scheduler=state.sched.state_dict(), epoch=row["epoch"],
                      config=dataclasses.asdict(cfg), classes=classes, history=state.history,
                      rng=torch.get_rng_state(), relabels=vars(state.relabels),
                      card=model_card(cfg, classes, row))
    atomic_write(state.out / "last.pt", lambda tmp: torch.save(checkpoint, tmp))
    if summary["best_epoch"] == row["epoch"]:  # a hard link to last.pt: no second serialisation
        try:
            atomic_write(state.out / "best.pt", lambda tmp: os.link(state.out / "last.pt", tmp))
        except OSError:  # a file system without hard links
            atomic_write(state.out / "best.pt", lambda tmp: torch.save(checkpoint, tmp))
    if row["epoch"] == cfg.epochs or row["epoch"] >= state.figures_due:
        t1 = time.time()
        write_png(state.out / "curves.png", draw_curves(state.history, cfg.data))
        write_relabels(state)
        title = (f"{cfg.data} test, epoch {row['epoch']}: accuracy {100 * row['test_acc']:.2f}%"
                 f", mean class {100 * row['mean_class_acc']:.2f}%")
        save_confusion(torch.tensor(row["confusion"]), classes, state.out / "confusion", title)
        every = math.ceil((time.time() - t1) / (0.1 * row["train_seconds"]))
        if every > 1 and state.figures_due == 1:
            print(f"note: the figures and relabels.csv took {time.time() - t1:.1f} s, over a tenth "
                  f"of the epoch's training: written every {every} epochs and after the last")
        state.figures_due = row["epoch"] + max(every, 1)
    row["output_seconds"] = time.time() - t0
    write_text(state.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))
    write_text(state.out / "summary.json", json.dumps(summary, indent=1) + "\n")

def summarize(history: list, classes, cfg: Config) -> dict:
    """Final epoch, best epoch (the first), last five: the official protocol, the other beside."""
    final, last5 = history[-1], history[-5:]
    best = max(history, key=lambda r: r["test_acc"])
    summary = dict(data=cfg.data, protocol=statistics_text(cfg), final_epoch=final["epoch"],
                   final_acc=final["test_acc"], final_mean_class_acc=final["mean_class_acc"],
                   final_macro_f1=final["macro_f1"],
                   final_per_class_acc=dict(zip(classes, final["per_class_acc"])),
                   best_epoch=best["epoch"], best_acc=best["test_acc"],
                   last5_epochs=[r["epoch"] for r in last5],
                   last5_mean_acc=sum(r["test_acc"] for r in last5) / len(last5))
    if "test_acc_batch_independent" in final:
        key = "test_acc_batch_independent"
        summary.update(final_acc_batch_independent=final[key], best_acc_batch_independent=best[key],
                       last5_mean_acc_batch_independent=sum(r[key] for r in last5) / len(last5))
    return dict(summary, config=dataclasses.asdict(cfg))

def write_relabels(state: TrainState) -> None:
    """relabels.csv (a row per sample CUEM relabelled) and relabels.png (the first 48)."""
    log, ds = state.relabels, state.train_ds
    seen = log.seen.tolist()
    relabelled = log.relabelled.tolist()
    last_u = log.last_u.tolist()
    order = sorted((j for j in range(len(ds)) if relabelled[j]),  # the most often, consistently
                   key=lambda j: (-relabelled[j], -relabelled[j] / seen[j], j))
    cuem_label = log.to_class.argmax(1).tolist()  # the class it gave most often
    name = [ds.classes[c] for c in ds.labels.tolist()]
    paths = getattr(ds, "paths", [""] * len(ds))
    write_csv(state.out / "relabels.csv",
              [["index", "path", "label", "cuem_label", "relabelled", "seen", "last_u"]]
              + [[j, paths[j], name[j], ds.classes[cuem_label[j]], relabelled[j], seen[j],
                  f"{last_u[j]:.4f}"] for j in order])
    tiles = []
    for j in order[:48]:
        caption = [f"{name[j]} -> {ds.classes[cuem_label[j]]}",
                   f"relabelled {relabelled[j]} of {seen[j]}"]
        if state.noise > 0:  # the truth is known
            caption.append(f"true: {ds.classes[ds.true_labels[j]]}")
        tiles.append((ds[j][0], caption))
    title = (f"--data {state.cfg.data}, epoch {state.history[-1]['epoch']}: the training images "
             f"CUEM relabelled most often ({len(order)} relabelled at least once)")
    write_png(state.out / "relabels.png", draw_relabels(tiles, title))

def write_noisy_labels(ds, path: Path) -> None:
    """--label-noise's labels: RAF-DB's label format for rafdb, else 'index class' lines."""
    names = getattr(ds, "names", None)  # RAF-DB: its file names, labels 1..7
    lines = [f"{names[i]} {y + 1}" if names else f"{i} {y}"
             for i, y in enumerate(ds.labels.tolist())]
    write_text(path, "\n".join(lines) + "\n")

def confusion_text(conf: torch.Tensor, classes) -> str:
    """Counts and row percentages (rows: true class, columns: predicted)."""
    w = max(9, max(len(c) for c in classes) + 1)
    rows = ["true \\ predicted".ljust(w) + "".join(c[:w - 1].rjust(w) for c in classes)]
    for c, row in zip(classes, conf.tolist()):
        total = max(sum(row), 1)
        rows.append(c.ljust(w) + "".join(f"{v:>{w - 7}d} {100 * v / total:5.1f}%" for v in row))
    return "\n".join(rows) + "\n"

def save_confusion(conf, classes, stem: Path, title: str) -> None:
    write_text(stem.with_suffix(".txt"), title + "\n" + confusion_text(conf, classes))
    write_png(stem.with_suffix(".png"), draw_confusion(conf, classes, title))

# ==== Using a trained model: --eval, --predict, --export =======================================

def open_checkpoint(path, cli_values: dict, command: str, flags=(), must_match=()):
    """Load a checkpoint and its network (eval mode); print what it expects as input."""
    extra = sorted(cli_values.keys() - set(flags) - set(must_match))
    if extra:
        raise UserError(f"--{extra[0].replace('_', '-')} does not apply to --{command}")
    ckpt = load_checkpoint(path)
    check_matches(ckpt["config"], cli_values, must_match, f"--{command}")
    cfg = checkpoint_config(ckpt, cli_values, flags)
    device = pick_device(cfg.device)
    model = build_model(dataclasses.replace(cfg, compile=False), len(ckpt["classes"]), "none",
                        device)
    load_weights(model, ckpt["model"], path)
    card = ckpt["card"]
    side, net = card["decode_size"], card["img_size"]
    print(f"{path}: epoch {ckpt['epoch']} of a {card['dataset']} run ({card['crops']}); "
          f"{len(card['classes'])} classes {', '.join(card['classes'])}; input RGB face crops "
          f"read at {side}x{side}, network {net}x{net}, ImageNet normalisation; "
          f"{card['statistics']}; test accuracy {100 * card['test_acc_batch_independent']:.2f}% "
          f"as --predict and --export compute it, {100 * card['test_acc']:.2f}% under the run's "
          f"protocol; trained with torch {card['torch']}")
    return ckpt, card, cfg, device, model.eval()

def checkpoint_config(ckpt: dict, cli_values: dict, flags) -> Config:
    """A checkpoint's config, with the `flags` given; this machine's device unless given."""
    saved = {k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__}
    given = {k: v for k, v in cli_values.items() if k in flags}
    return Config(**{**saved, "device": "auto", **given})

def check_matches(ckpt_config: dict, cli_values: dict, keys, what: str) -> None:
    diff = [f"--{k.replace('_', '-')} {cli_values[k]} (checkpoint: {ckpt_config.get(k)})"
            for k in keys if k in cli_values and cli_values[k] != ckpt_config.get(k)]
    if diff:
        raise UserError(f"{what} does not fit the checkpoint: " + ", ".join(diff))

EVAL_FLAGS = ("data", "root", "train_labels", "classes", "ferplus_label", "device", "workers",
              "test_batch_size", "synthetic_test")

def run_eval(path, cli_values: dict) -> dict:
    """A checkpoint's test scores under both protocols of the run (ARM's official one and the
    batch-independent one); <stem>_eval.json, <stem>_confusion.png / .txt (the official one's)."""
    ckpt, card, cfg, device, model = open_checkpoint(
        path, cli_values, "eval", EVAL_FLAGS, must_match=("img_size", "arm"))
    test_ds = load_dataset(cfg.data, cfg.root, "test", decode_size(cfg), **dataset_options(cfg))
    classes = test_ds.classes
    if len(classes) != len(ckpt["classes"]):
        raise UserError(f"{path} has {len(ckpt['classes'])} classes ({', '.join(ckpt['classes'])})"
                        f"; --data {cfg.data} has {len(classes)} ({', '.join(classes)})")
    images = Images(test_ds, device, "device", cfg.workers)
    refuse_unreadable(images)
    conf = evaluate(model, images, test_ds.labels, cfg.img_size, cfg.test_batch_size,
                    len(classes))  # the run's test protocol, both ways with ARM
    n = len(test_ds)
    res = dict(checkpoint=str(path), epoch=ckpt["epoch"], data=cfg.data,
               protocol=statistics_text(cfg), test_images=n, **scores(conf["official"]),
               classes=classes)
    lines = [f"{path} on {cfg.data} test ({n} images); {res['protocol']}"]
    if isinstance(model.classifier, ARM):
        res["test_acc_batch_independent"] = scores(conf["batch_independent"])["test_acc"]
        lines.append(f"ARM's official protocol (g from each test batch): {score_text(res)}")
        lines.append("batch-independent (ARM's running g; --predict, --export): "
                     f"{score_text(scores(conf['batch_independent']))}")
    else:
        lines.append(score_text(res))
    stem = Path(path).with_name(Path(path).stem)
    title = f"{path} on {cfg.data} test ({n} images): {score_text(res)}"
    save_confusion(conf["official"], classes, Path(f"{stem}_confusion"), title)
    write_text(f"{stem}_eval.json",
               json.dumps({**res, "config": dataclasses.asdict(cfg)}, indent=1) + "\n")
    print("\n".join(lines) + "\n" + confusion_text(conf["official"], classes)
          + f"wrote {stem}_eval.json, {stem}_confusion.png and {stem}_confusion.txt")
    return res

def score_text(figures: dict) -> str:
    return (f"accuracy {100 * figures['test_acc']:.2f}%, mean class "
            f"{100 * figures['mean_class_acc']:.2f}%, macro-F1 {100 * figures['macro_f1']:.2f}%")

def find_images(patterns) -> list[str]:
    """Files as given, folders searched recursively, globs; in order, without repeats."""
    found = []
    for p in patterns:
        if os.path.isfile(p):
            found.append(p)
        files = Path(p).rglob("*") if os.path.isdir(p) else glob.glob(p, recursive=True)
        found += sorted(str(file) for file in files
                        if Path(file).suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(file))
    if not found:
        raise UserError(f"no images found in {' '.join(patterns)} (expected image files, folders "
                        f"or globs of {', '.join(IMAGE_EXTENSIONS)})")
    return list(dict.fromkeys(found))

def run_predict(patterns, path, cli_values: dict, top=3, csv_path=None) -> dict:
    """Class probabilities of images read as the test images were; float32, ARM's running g."""
    flags = ("device", "workers", "batch_size")
    ckpt, card, cfg, device, model = open_checkpoint(path, cli_values, "predict", flags)
    classes, files = ckpt["classes"], find_images(patterns)
    images = Readable(ImageFiles(files, [0] * len(files), classes, card["decode_size"]))
    loader = torch.utils.data.DataLoader(images, min(cfg.batch_size, 256), num_workers=cfg.workers)
    probabilities, skipped = {}, []
    rows = [["path", "predicted", *classes]]
    for x, idx, errors in loader:
        logits = logits_of(model, x.to(device), cfg.img_size, len(x))["batch_independent"]
        probs = logits.softmax(1).cpu()  # (b, C): ARM's running g, whatever the batch
        for file, prob, err in zip([files[i] for i in idx.tolist()], probs, errors):
            if err:
                skipped.append(file)
                print(f"skipped: {err}", file=sys.stderr)
                continue
            probabilities[file] = prob.tolist()
            best = prob.topk(min(top, len(prob)))
            print(f"{file}: " + ", ".join(f"{classes[i]} {v:.3f}" for v, i in
                                          zip(best.values.tolist(), best.indices.tolist())))
            rows.append([file, classes[int(prob.argmax())], *(f"{v:.6f}" for v in prob.tolist())])
    if csv_path:
        write_csv(csv_path, rows)
    wrote = f"; wrote {csv_path}" if csv_path else ""
    print(f"classified {len(probabilities)} images, skipped {len(skipped)}{wrote}")
    return dict(probabilities=probabilities, skipped=skipped)

class ExportedNet(nn.Module):
    """--export: uint8 RGB (B, 3, d, d) at the card's decode size -> probabilities (B, C)."""

    def __init__(self, model: FERSupCon, img_size: int):
        super().__init__()
        self.trunk, self.classifier = model.encoder_q.trunk, model.classifier
        self.img_size = img_size
        self.requires_grad_(False)  # an inference program: its outputs carry no autograd graph

    def forward(self, x):
        return self.classifier(self.trunk(eval_transform(x, self.img_size))).softmax(1)

def run_export(file, path, cli_values: dict) -> dict:
    """torch.export the network with its card; reload it and compare it with the eager one."""
    ckpt, card, cfg, _, model = open_checkpoint(path, cli_values, "export", ("device",))
    net = ExportedNet(model.float().cpu().to(memory_format=torch.contiguous_format), cfg.img_size)
    side = card["decode_size"]
    imagenet_constants(torch.device("cpu"))  # made here: cached from the trace, they'd be fake
    program = torch.export.export(net.eval(), (torch.zeros(2, 3, side, side, dtype=torch.uint8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    extra = {"fer_supcon.json": json.dumps(card)}
    atomic_write(file, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    try:
        ds = load_dataset(cfg.data, cfg.root, "test", side, **dataset_options(cfg))
        x = torch.stack([ds[i][0] for i in range(min(64, len(ds)))])
        what = f"{cfg.data} test images"
    except UserError:
        x, what = torch.randint(0, 256, (64, 3, side, side), dtype=torch.uint8), "random images"
    extra = {"fer_supcon.json": ""}
    with torch.no_grad():
        diff = (torch.export.load(file, extra_files=extra).module()(x) - net(x)).abs().max().item()
    print(f"wrote {file}: uint8 RGB (B, 3, {side}, {side}) -> probabilities of "
          f"{', '.join(card['classes'])}; reloaded, on {len(x)} {what}: largest difference to "
          f"the eager model {diff:.2e}")
    return dict(file=str(file), max_diff=diff, card=json.loads(extra["fer_supcon.json"]))

# ==== Appendix A: dataset formats (Sec. III-A) ================================================

def layout_error(data: str, message: str) -> UserError:
    return UserError(f"{message}; expected the {data} layout: {LAYOUTS[data]}")

def pil_to_uint8(img: Image.Image, size: int, box=None) -> torch.Tensor:
    """PIL image -> uint8 (3, size, size): optional face-box crop, RGB, bilinear resize."""
    img = (img.crop(box) if box is not None else img).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, S, S)

class FaceDataset(torch.utils.data.Dataset):
    """Items (uint8 (3, size, size), label, index); .labels noisy, .true_labels not; image(i)."""

    def __init__(self, classes, labels, size: int):
        self.classes, self.size = list(classes), size
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.true_labels = self.labels.clone()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.image(i), int(self.labels[i]), i

class ImageFiles(FaceDataset):
    """Images on disk; `boxes` (x0, y0, x1, y1) crop to the face; a bad file raises when read."""

    def __init__(self, paths, labels, classes, size, boxes=None):
        super().__init__(classes, labels, size)
        self.paths, self.boxes = [str(p) for p in paths], boxes

    def image(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                return pil_to_uint8(img, self.size, None if self.boxes is None else self.boxes[i])
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read image {self.paths[i]}: {e}") from None

class Readable(torch.utils.data.Dataset):
    """Items (uint8 (3, S, S), index, '' or why it cannot be read): one pass finds all bad files."""

    def __init__(self, ds: FaceDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds.image(i), i, ""
        except UserError as e:
            return torch.zeros(3, self.ds.size, self.ds.size, dtype=torch.uint8), i, str(e)

def read_label_lines(path: Path, what: str) -> list[tuple[str, int]]:
    """A RAF-DB label file: 'name label' lines, labels 1..7 -> 0..6 (no final newline)."""
    if not path.is_file():
        raise layout_error("rafdb", f"{what} not found: {path}")
    rows = []
    for row_no, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if parts and (len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7):
            raise UserError(f"{path}:{row_no}: expected 'train_00001.jpg 5' (name, label 1..7), "
                            f"got {line!r}")
        if parts:
            rows.append((parts[0], int(parts[1]) - 1))
    return rows

def load_rafdb(root: Path, split, size, train_labels="", **_):
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    rows = [r for r in read_label_lines(label_file, "RAF-DB label file")
            if r[0].startswith(split + "_")]
    if not rows:
        raise layout_error("rafdb", f"{label_file} has no '{split}_' lines")
    official = rows
    if train_labels and split == "train":  # e.g. noise02.txt; the official labels stay the truth
        other = dict(read_label_lines(Path(train_labels), "--train-labels file"))
        names = {name for name, _ in rows}
        missing, unknown = sorted(names - other.keys()), sorted(other.keys() - names)
        if missing or unknown:
            raise UserError(f"--train-labels {train_labels} must list exactly the {len(names)} "
                            f"training images: {len(missing)} missing (e.g. {missing[:2]}), "
                            f"{len(unknown)} unknown (e.g. {unknown[:2]})")
        rows = [(name, other[name]) for name, _ in rows]
    paths = [root / "Image" / "aligned" / (Path(name).stem + "_aligned.jpg") for name, _ in rows]
    ds = ImageFiles(paths, [y for _, y in rows], RAFDB_CLASSES, size)
    ds.names = [name for name, _ in rows]
    ds.true_labels = torch.tensor([y for _, y in official])
    return ds

def load_imagefolder(root: Path, split, size, **_):
    names = ["train"] if split == "train" else ["test", "val"]
    folder = next((root / name for name in names if (root / name).is_dir()), None)
    if folder is None:
        raise layout_error("imagefolder", f"no folder {' or '.join(str(root / x) for x in names)}")
    train = root / "train"
    classes = sorted(d.name for d in train.iterdir() if d.is_dir()) if train.is_dir() else []
    here = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not here or set(here) - set(classes):
        raise layout_error("imagefolder", f"{folder} has class folders {here}, not a subset of "
                                          f"train's {classes}")
    files = [sorted(p for p in (folder / c).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
             for c in classes]
    if not any(files):
        raise layout_error("imagefolder", f"no images under {folder}/<class>/")
    labels = [c for c, in_class in enumerate(files) for _ in in_class]
    return ImageFiles(sum(files, []), labels, classes, size)

def load_affectnet(root: Path, split, size, classes=8, **_):
    """Codes 0..7 (classes=7: 0..6), cropped to the list's face boxes; test: the validation set."""
    lists = root / "Manually_Annotated_file_lists" / ("training.csv" if split == "train"
                                                      else "validation.csv")
    folder = root / ("train_set" if split == "train" else "val_set")
    paths, labels = [], []
    boxes = []
    if lists.is_file():
        head, *rows = read_csv_rows(lists, "AffectNet list") or [[]]
        col = {h.strip(): i for i, h in enumerate(head)}
        box_cols = [col.get(k) for k in ("face_x", "face_y", "face_width", "face_height")]
        for row_no, row in enumerate(rows, 2):
            try:
                code = int(row[col["expression"]])
                box = [int(float(row[i])) if i is not None else 0 for i in box_cols]  # x, y, w, h
                path = root / "Manually_Annotated_Images" / row[col["subDirectory_filePath"]]
            except (ValueError, IndexError, KeyError):
                raise layout_error("affectnet", f"{lists}:{row_no}: expected the header's "
                                                f"columns, an integer expression; got {row[:7]}"
                                   ) from None
            if 0 <= code < classes:
                paths.append(path)
                labels.append(code)
                boxes.append((box[0], box[1], box[0] + box[2], box[1] + box[3]))
    elif (folder / "annotations").is_dir():
        for ann in sorted((folder / "annotations").glob("*_exp.npy")):
            try:
                code = int(np.load(ann).item())
            except (ValueError, OSError) as e:
                raise UserError(f"{ann}: expected a saved expression code 0..10 ({e})") from None
            if 0 <= code < classes:
                paths.append(folder / "images" / (ann.name.removesuffix("_exp.npy") + ".jpg"))
                labels.append(code)
    else:
        raise layout_error("affectnet", f"neither {lists} nor {folder / 'annotations'} exists")
    if not paths:
        raise layout_error("affectnet", f"no {split} images with codes 0..{classes - 1}")
    boxes = boxes if boxes and None not in box_cols else None
    return ImageFiles(paths, labels, AFFECTNET_CLASSES[:classes], size, boxes)

def label_from_votes(votes, rule="majority") -> int:
    """FERPlus votes (8 emotions, unknown, NF) -> class 0..7 or -1 (dropped, as unknown / NF).
    majority (Microsoft's): no single votes, top > half the rest; argmax (NOTE: ours): the top."""
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
    """FER2013 rows: 48 x 48 grayscale pixels as space-separated integers -> 3 channels."""

    def __init__(self, pixels, labels, size, rows):
        super().__init__(FERPLUS_CLASSES, labels, size)
        self.pixels = pixels
        self.rows = rows  # each image's row number in fer2013.csv

    def image(self, i):
        try:
            gray = np.array(self.pixels[i].split(), dtype=np.uint8).reshape(48, 48)
        except (ValueError, OverflowError) as e:
            raise UserError(f"cannot read image: fer2013.csv:{self.rows[i]}: expected 48 x 48 "
                            f"pixel values 0..255 ({e})") from None
        return pil_to_uint8(Image.fromarray(gray), self.size)

def read_csv_rows(path: Path, what: str) -> list[list[str]]:
    try:
        with open(path, newline="") as handle:
            return list(csv.reader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None

def ferplus_row_label(votes, path, row_no, rule) -> int:
    try:
        return label_from_votes([int(v) for v in votes], rule)
    except ValueError:
        raise UserError(f"{path}:{row_no}: expected 10 integer vote columns, got {votes}") from None

def load_ferplus(root: Path, split, size, label_rule="majority", **_):
    """fer2013.csv + fer2013new.csv (test: PrivateTest), or FER2013Train|Test/label.csv."""
    if (root / "fer2013.csv").is_file() and (root / "fer2013new.csv").is_file():
        pixel_rows = read_csv_rows(root / "fer2013.csv", "FERPlus file")[1:]
        vote_rows = read_csv_rows(root / "fer2013new.csv", "FERPlus file")[1:]
        if len(pixel_rows) != len(vote_rows):
            raise UserError(f"fer2013.csv has {len(pixel_rows)} rows, fer2013new.csv "
                            f"{len(vote_rows)}: they must match row for row")
        usage = "Training" if split == "train" else "PrivateTest"
        pixels = []
        labels = []
        rows = []  # their row numbers in fer2013.csv
        for row_no, (o, v) in enumerate(zip(pixel_rows, vote_rows), 2):
            if len(o) != 3 or len(v) != 12 or o[2] != v[0]:
                raise UserError(f"row {row_no}: expected fer2013.csv 'emotion,pixels,Usage' and "
                                f"fer2013new.csv 'Usage,Image name,<10 vote columns>' with the "
                                f"same Usage, got {o[::2]} / {v[:2]}")
            if v[0] != usage or not v[1].strip():
                continue  # another split, or an empty image name: removed by the FERPlus authors
            label = ferplus_row_label(v[2:], root / "fer2013new.csv", row_no, label_rule)
            if label >= 0:
                pixels.append(o[1])
                rows.append(row_no)
                labels.append(label)
        return Fer2013Pixels(pixels, labels, size, rows)
    folder = root / ("FER2013Train" if split == "train" else "FER2013Test")
    if not (folder / "label.csv").is_file():
        raise layout_error("ferplus", f"neither {root / 'fer2013.csv'} + fer2013new.csv nor "
                                      f"{folder / 'label.csv'} exists")
    paths, labels = [], []
    for row_no, row in enumerate(read_csv_rows(folder / "label.csv", "FERPlus label file"), 1):
        if row and len(row) != 12:
            raise UserError(f"{folder / 'label.csv'}:{row_no}: expected 'name.png,\"(0, 0, 48, "
                            f"48)\",<10 vote columns>', got {row[:3]}")
        label = ferplus_row_label(row[2:], folder / "label.csv", row_no, label_rule) if row else -1
        if label >= 0:
            paths.append(folder / row[0])
            labels.append(label)
    return ImageFiles(paths, labels, FERPLUS_CLASSES, size)

# ---- Synthetic faces: cartoon faces drawn with PIL, deterministic per (seed, split, index) ----

SYNTHETIC_PARAMS = ("brow_raise", "brow_tilt", "eye_open", "mouth_curve", "mouth_open",
                    "mouth_width", "asymmetry", "wrinkle")  # brow tilt: inner end up; smile: +
SYNTHETIC_EXPRESSIONS = np.array([
    [0.26, 0.00, 2.00, 0.00, 0.40, 0.24, 0.00, 0.0],     # surprise: brows up, round open mouth
    [0.16, 0.18, 1.70, -0.10, 0.16, 0.62, 0.00, 0.0],    # fear: brows up, stretched mouth
    [-0.10, -0.06, 0.45, -0.14, 0.06, 0.42, 0.24, 1.0],  # disgust: squint, lopsided lip
    [0.02, 0.00, 0.75, 0.34, 0.12, 0.62, 0.00, 0.0],     # happiness: smile
    [-0.02, 0.22, 0.70, -0.30, 0.00, 0.44, 0.00, 0.0],   # sadness: inner brows up, frown
    [-0.12, -0.24, 0.55, -0.06, 0.06, 0.40, 0.00, 0.0],  # anger: brows down in a V
    [0.00, 0.00, 1.00, 0.00, 0.00, 0.48, 0.00, 0.0],     # neutral
])
SYNTHETIC_JITTER = np.array([0.03, 0.03, 0.12, 0.03, 0.02, 0.05, 0.02, 0.0])  # identity's own

def random_color(rng, low=0, high=256) -> tuple:
    return tuple(int(v) for v in rng.integers(low, high, 3))

def draw_face(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """A cartoon face of `label` at an intensity in [0.5, 1] (near neutral: ambiguous), with
    random identity, pose, background, lighting and noise."""
    intensity, neutral = rng.uniform(0.5, 1.0), SYNTHETIC_EXPRESSIONS[6]
    params = neutral + intensity * (SYNTHETIC_EXPRESSIONS[label] - neutral)
    face = dict(zip(SYNTHETIC_PARAMS, params + rng.normal(0, 1, 8) * SYNTHETIC_JITTER))
    big, bg = 2 * size, random_color(rng)  # drawn at twice the size, then shrunk
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 2)):  # background clutter
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * big
        width, height = rng.uniform(0.1, 0.5) * big, rng.uniform(0.1, 0.5) * big
        draw.ellipse([x0, y0, x0 + width, y0 + height], fill=random_color(rng))
    r = big * rng.uniform(0.34, 0.4)  # the face fills the crop, as in aligned datasets
    cx, cy = big / 2 + rng.uniform(-0.05, 0.05, 2) * big
    def at(x, y):  # face units -> pixels
        return (cx + r * x, cy + r * y)
    hair = random_color(rng, 10, 120)
    tone = np.array([224, 172, 140]) * rng.uniform(0.45, 1.1) + rng.integers(-15, 16, 3)
    skin = tuple(int(v) for v in tone)
    fw, fh = rng.uniform(0.85, 1.05), rng.uniform(1.1, 1.35)
    if rng.random() < 0.7:
        draw.ellipse([*at(-fw - 0.12, -fh - 0.15), *at(fw + 0.12, 0.2)], fill=hair)
    draw.ellipse([*at(-fw, -fh), *at(fw, fh)], fill=skin)
    ex, ey = rng.uniform(0.32, 0.42), rng.uniform(-0.22, -0.1)
    iris, line = random_color(rng, 20, 140), max(2, round(0.1 * r))
    for side in (-1, 1):
        h = 0.09 * max(face["eye_open"], 0.15)
        draw.ellipse([*at(side * ex - 0.16, ey - h), *at(side * ex + 0.16, ey + h)],
                     fill=(245, 245, 240), outline=(40, 30, 30))
        pr = min(0.065, h)
        draw.ellipse([*at(side * ex - pr, ey - pr), *at(side * ex + pr, ey + pr)], fill=iris)
        by, tilt = ey - 0.24 - face["brow_raise"], face["brow_tilt"]
        draw.line([at(side * 0.13, by - tilt), at(side * (ex + 0.2), by + 0.3 * tilt)],
                  fill=hair, width=line + 1)
    draw.line([at(0, ey + 0.1), at(0.06, 0.28), at(-0.04, 0.3)],
              fill=tuple(int(v * 0.7) for v in skin), width=line)
    if face["wrinkle"] * intensity > 0.5:
        for side in (-1, 1):
            draw.line([at(side * 0.07, 0.02), at(side * 0.17, 0.08)],
                      fill=tuple(int(v * 0.6) for v in skin), width=line)
    my, w = rng.uniform(0.5, 0.62), max(face["mouth_width"], 0.12)
    xs = np.linspace(-1, 1, 15)
    # smile: corners above the centre; an open mouth parts both lips
    mid = [my + face["mouth_curve"] * (0.5 - x * x) - face["asymmetry"] * max(x, 0) for x in xs]
    half = [0.5 * max(face["mouth_open"], 0) * (1 - x * x) for x in xs]
    upper = [at(x * w, m - hh) for x, m, hh in zip(xs, mid, half)]
    lower = [at(x * w, m + hh) for x, m, hh in zip(xs, mid, half)]
    if face["mouth_open"] > 0.03:
        draw.polygon(upper + lower[::-1], fill=(90, 20, 30), outline=(60, 10, 20))
    else:
        draw.line(upper, fill=(110, 30, 40), width=line + 1)
    img = img.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, fillcolor=bg)
    img = img.resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) * rng.uniform(0.7, 1.15)  # lighting
    if rng.random() < 0.2:  # some grayscale, like FERPlus
        x = x.mean(2, keepdims=True).repeat(3, 2)
    x += rng.normal(0, rng.uniform(0, 6), x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))

class SyntheticFaces(FaceDataset):
    """Seven expressions in RAF-DB order, drawn on demand from (seed, split, index)."""

    def __init__(self, n, split, size, seed=0):
        self.key = [seed, {"train": 0, "test": 1}[split]]
        labels = [int(np.random.default_rng(self.key + [i]).integers(7)) for i in range(n)]
        super().__init__(RAFDB_CLASSES, labels, size)

    def image(self, i):
        rng = np.random.default_rng(self.key + [i])  # its first draw is the label, as above
        return pil_to_uint8(draw_face(rng, int(rng.integers(7)), self.size), self.size)

LOADERS = {"rafdb": load_rafdb, "affectnet": load_affectnet, "ferplus": load_ferplus,
           "imagefolder": load_imagefolder}

def load_dataset(name, root, split, size, **options) -> FaceDataset:
    """A split ('train' | 'test') of dataset `name`, images as uint8 (3, size, size)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "synthetic":
        n = options.get(f"synthetic_{split}", 1500 if split == "train" else 700)
        return SyntheticFaces(n, split, size, options.get("seed", 0))
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if not root:
        raise UserError(f"--data {name} needs --root DIR (the dataset folder; README.md)")
    if not Path(root).is_dir():
        raise UserError(f"dataset root {root} is not a folder")
    return LOADERS[name](Path(root), split, size, **options)

def dataset_options(cfg: Config) -> dict:
    return dict(train_labels=cfg.train_labels, classes=cfg.classes, label_rule=cfg.ferplus_label,
                seed=cfg.seed, synthetic_train=cfg.synthetic_train,
                synthetic_test=cfg.synthetic_test)

# ==== Appendix B: drawings (Fig. 4's confusion matrix, curves, CUEM's relabels) =================

def fonts(size=15):  # Pillow >= 10.1
    return ImageFont.load_default(size=size), ImageFont.load_default(size=size - 3)

def draw_confusion(conf: torch.Tensor, classes, title="") -> Image.Image:
    """Fig. 4-style: count and row percentage per cell, shaded by the latter; title on 2 lines."""
    font, small = fonts()
    C, cell = len(classes), 74
    left, top = 120, 160
    img = Image.new("RGB", (max(left + C * cell + 20, 640), top + C * cell + 40), "white")
    draw = ImageDraw.Draw(img)
    for k, text in enumerate(title.split(": ", 1)):
        draw.text((10, 8 + 20 * k), text, fill="black", font=font)
    draw.text((left + C * cell // 2, top - 8), "predicted", fill="black", font=font, anchor="ms")
    for j, name in enumerate(classes):  # column labels, written upwards
        label = Image.new("RGB", (80, cell), "white")
        ImageDraw.Draw(label).text((74, cell // 2), name, fill="black", font=small, anchor="rm")
        img.paste(label.rotate(90, expand=True), (left + j * cell, 50))
    for i, row in enumerate(conf.tolist()):
        y = top + i * cell
        draw.text((left - 8, y + cell // 2), classes[i], fill="black", font=small, anchor="rm")
        for j, v in enumerate(row):
            share, x = v / max(sum(row), 1), left + j * cell
            shade = tuple(int(255 - share * (255 - c)) for c in COLORS[0])
            draw.rectangle([x, y, x + cell, y + cell], fill=shade, outline=(200, 200, 200))
            ink = "white" if share > 0.5 else "black"
            draw.text((x + cell // 2, y + cell // 2 - 9), str(v), fill=ink, font=font, anchor="mm")
            draw.text((x + cell // 2, y + cell // 2 + 11), f"{100 * share:.1f}%", fill=ink,
                      font=small, anchor="mm")
    draw.text((10, top + C * cell + 12), "rows: true class (counts, % of the row)",
              fill="black", font=small)
    return img

def round_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Tick values 1, 2 or 5 times a power of ten apart, covering [lo, hi]."""
    hi = hi if hi > lo else lo + 1  # a flat series gets a unit range
    step = 10 ** math.floor(math.log10((hi - lo) / most))
    step = next(k * step for k in (1, 2, 5, 10) if (hi - lo) / (k * step) <= most)
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]

def draw_curves(history: list, data: str) -> Image.Image:
    """curves.png: per epoch, panels of accuracy, losses, the schedule (Eq. 4, lr), relabels."""
    font, small = fonts()
    img = Image.new("RGB", (1120, 760), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 12), f"fer_supcon, --data {data}: per epoch (metrics.jsonl)", fill="black",
              font=font)
    panels = {"test accuracy, %": [("accuracy", "test_acc", 100),
                                   ("batch-independent", "test_acc_batch_independent", 100)],
              "training losses": [("cross-entropy, Eq. (1)", "ce", 1),
                                  ("L_sup, Eq. (2)", "supcon", 1)],
              "schedule": [("lambda, Eq. (4)", "lam", 1),
                           ("lr / first lr", "lr", 1 / history[0]["lr"])],
              "CUEM, % of the epoch's samples": [("relabelled", "relabel_share", 100),
                                                 ("precision", "relabel_precision", 100),
                                                 ("recall", "relabel_recall", 100)]}
    epochs = [r["epoch"] for r in history]
    epoch_ticks = [e for e in round_ticks(epochs[0], epochs[-1], 10) if e in epochs] or epochs
    w, h = 440, 240  # a panel's size
    for k, (title, series) in enumerate(panels.items()):
        x0 = 80 + 550 * (k % 2)  # the panel's corner
        y0 = 80 + 350 * (k // 2)
        def at_x(e):  # the epoch's point in the panel
            return x0 + w * (epochs.index(e) + 0.5) / len(epochs)
        # None where a figure does not exist (L_sup is not computed while lambda = 0)
        ys = {name: [r[key] * scale if r.get(key) is not None and (key != "supcon" or r["lam"] > 0)
                     else None for r in history] for name, key, scale in series}
        ys = {name: v for name, v in ys.items() if any(y is not None for y in v)}
        values = [v for vs in ys.values() for v in vs if v is not None] or [0.0]
        ticks = round_ticks(min(values), max(values))
        lo, hi = ticks[0], ticks[-1]
        draw.text((x0, y0 - 24), title, fill="black", font=font)
        for t in ticks:
            y = y0 + h - h * (t - lo) / (hi - lo)
            draw.line([(x0, y), (x0 + w, y)], fill=(225, 225, 225))
            draw.text((x0 - 6, y), f"{t:g}", fill="black", font=small, anchor="rm")
        draw.rectangle((x0, y0, x0 + w, y0 + h), outline="black")
        for e in epoch_ticks:
            draw.line([(at_x(e), y0 + h), (at_x(e), y0 + h + 4)], fill="black")
            draw.text((at_x(e), y0 + h + 6), str(e), fill="black", font=small, anchor="mt")
        draw.text((x0 + w / 2, y0 + h + 22), "epoch", fill="black", font=small, anchor="mt")
        legend_x = x0
        for color, (name, vs) in zip(COLORS, ys.items()):
            pts = [(at_x(e), y0 + h - h * (v - lo) / (hi - lo)) for e, v in zip(epochs, vs)
                   if v is not None]
            draw.line(pts, fill=color, width=2)  # nothing for a single point
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.text((legend_x, y0 + h + 40), name, fill=color, font=small)
            legend_x += draw.textlength(name, font=small) + 24
    return img

def draw_relabels(tiles: list, title: str) -> Image.Image:
    """relabels.png: each tile (uint8 image (3, s, s), caption lines) enlarged, 8 a row."""
    font, small = fonts()
    cols, cell = 8, 150
    side = 112  # an image's side
    rows = max(1, math.ceil(len(tiles) / cols))
    img = Image.new("RGB", (cols * cell + 20, 50 + rows * (side + 52)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 12), title if tiles else title + ": none yet", fill="black", font=font)
    for k, (x, caption) in enumerate(tiles):
        left, top = 10 + (k % cols) * cell, 50 + (k // cols) * (side + 52)
        face = Image.fromarray(x.permute(1, 2, 0).numpy()).resize((side, side), Image.BILINEAR)
        img.paste(face, (left + (cell - side) // 2, top))
        for i, text in enumerate(caption):
            draw.text((left + cell // 2, top + side + 3 + 16 * i), text, fill="black",
                      font=small, anchor="mt")
    return img

# ==== Appendix C: --benchmark, side by side in one run =========================================

def benchmark(cfg: Config, cli_values: dict, rounds=None) -> dict:
    """Samples/s, medians of interleaved repeats, of the baseline step (one view), the full step
    (also deterministic), two augmented views, the eval-mode network; peak memory."""
    device = pick_device(cfg.device)
    cuda = device.type == "cuda"
    S = cfg.img_size if "img_size" in cli_values else (224 if cuda else 112)
    B = cfg.batch_size if "batch_size" in cli_values else (256 if cuda else 32)
    repeats, warmup = rounds or ((30, 5) if cuda else (7, 2))  # timed, warm-up
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # for the deterministic job
    cfg = dataclasses.replace(cfg, img_size=S, batch_size=B)
    model = build_model(cfg, 7, cfg.pretrained, device)
    model.queue.enqueue(F.normalize(torch.randn_like(model.queue.feats), dim=1),
                        torch.arange(cfg.queue_size, device=device) % 7)  # full: CUEM runs
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], fused=cuda)
    cache = torch.randint(0, 256, (B, 3, min(S, 100), min(S, 100)), dtype=torch.uint8,
                          device=device)
    x_q, x_k = two_views(cache, cfg, 0, 0, keys=True)
    y, amp = torch.randint(0, 7, (B,), device=device), autocast(device)
    step = dict(m=0.99, tau=0.1, theta=0.1, amp=amp)
    def full_step(deterministic=False):
        torch.use_deterministic_algorithms(deterministic)
        out = train_step(model, opt, x_q, x_k, y, lam=0.5, use_cuem=True, **step)
        torch.use_deterministic_algorithms(False)  # off again for the other jobs
        return out
    jobs = dict(
        baseline_samples_per_s=lambda: train_step(model, opt, x_q, None, y, lam=0.0,
                                                  use_cuem=False, **step),
        full_samples_per_s=full_step,
        deterministic_samples_per_s=lambda: full_step(deterministic=True),
        augment_samples_per_s=lambda: two_views(cache, cfg, 0, 0, keys=True),
        inference_images_per_s=lambda: logits_of(model, cache, S, B, amp))
    times = {k: [] for k in jobs}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for r in range(warmup + repeats):  # interleaved: drifts in machine load hit all alike
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    res = dict(device=device_name(device), torch=torch.__version__, img_size=S, batch_size=B,
               repeats=repeats, compile=cfg.compile,
               **{k: B / float(np.median(t)) for k, t in times.items()})
    res["overhead_ratio"] = res["baseline_samples_per_s"] / res["full_samples_per_s"]
    res["deterministic_ratio"] = res["full_samples_per_s"] / res["deterministic_samples_per_s"]
    if cuda:
        res["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        import resource
        res["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"benchmark on {res['device']}, {S}px, batch {B}, median of {repeats} after {warmup} "
          f"warm-up; peak memory {res['peak_memory_mb']:,.0f} MB (CUDA allocated / CPU RSS)")
    for k in (*jobs, "overhead_ratio", "deterministic_ratio"):
        print(f"  {k.replace('_', ' '):<36} {res[k]:>12,.{3 if 'ratio' in k else 0}f}")
    print(json.dumps(res))
    return res

# ==== Command line =============================================================================

class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (through main), no usage dump
        raise UserError(f"{message} (see --help)")

def field_help() -> dict:
    """Each Config field's comment, its --help line, read from this file."""
    try:
        source = inspect.getsource(Config)
    except (OSError, TypeError):  # no source (a frozen program): flags without help
        return {}
    return dict(re.findall(r"^    (\w+): [^=]+=[^#]*#\s*(.*)$", source, re.MULTILINE))

def build_parser() -> ArgParser:
    """A flag per Config field (--x / --no-x for a switch), then the commands."""
    parser = ArgParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help()
    for f in dataclasses.fields(Config):
        own = "".join(f"; {d}: {v[f.name]}" for d, v in DATA_DEFAULTS.items() if f.name in v)
        only = f" [--data {' | '.join(ONLY[f.name])}]" if f.name in ONLY else ""
        text = f"{helps.get(f.name, '')}{only} (default {f.default}{own})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = float if f.name == "momentum" else type(f.default)
            parser.add_argument(flag, type=kind, choices=CHOICES.get(f.name), help=text)
    command = parser.add_mutually_exclusive_group()  # one at a time; none: training
    command.add_argument("--eval", metavar="CKPT", help="evaluate a checkpoint on the test split")
    command.add_argument("--predict", metavar="PATH", nargs="+",
                         help="classify images: files, folders (recursive), globs")
    command.add_argument("--export", metavar="FILE", help="save the network with torch.export")
    command.add_argument("--benchmark", action="store_true", help="measure the steps' speed")
    parser.add_argument("--checkpoint", metavar="CKPT", help="--predict's, --export's checkpoint")
    parser.add_argument("--top", type=int, metavar="K", help="--predict: print K (default 3)")
    parser.add_argument("--csv", metavar="FILE", help="--predict: write probabilities here")
    return parser

BENCHMARK_FLAGS = {"device", "img_size", "batch_size", "arm", "head_bn", "pretrained",
                   "queue_size", "augment", "compile", "seed"}
RESUME_FLAGS = {"epochs", "device", "workers", "log_every", "out", "cache", "resume"}

def validate(cfg: Config, cli_values: dict) -> None:
    """One-line errors for values and combinations that cannot work."""
    for name in cli_values:
        if not applies(name, cfg.data):
            raise UserError(f"--{name.replace('_', '-')} applies to --data "
                            f"{' | '.join(ONLY[name])} only, not {cfg.data}")
    checks = [
        (cfg.img_size >= (64 if cfg.arm else 32),
         f"--img-size {cfg.img_size}: expected at least 64 with ARM, 32 without"),
        (0 <= cfg.label_noise < 1, "--label-noise: expected a fraction in [0, 1)"),
        (not (cfg.label_noise and cfg.train_labels), "--label-noise and --train-labels: give one"),
        (cfg.batch_size >= 2, f"--batch-size {cfg.batch_size}: expected at least 2 (BatchNorm)"),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs}: expected at least 1"),
        (cfg.queue_size >= 1, f"--queue-size {cfg.queue_size}: expected at least 1"),
        (0 <= (cfg.momentum or 0) <= 1, f"--momentum {cfg.momentum}: expected a value in [0, 1]"),
        (cfg.tau > 0, f"--tau {cfg.tau}: expected a positive temperature"),
        (0 <= cfg.theta <= 2, f"--theta {cfg.theta}: expected a value in [0, 2] (u's range)"),
        (cfg.alpha > 0, f"--alpha {cfg.alpha}: expected a positive number of epochs"),
        (cfg.beta >= 0, f"--beta {cfg.beta}: expected a weight of 0 or more"),
        (cfg.lr > 0, f"--lr {cfg.lr}: expected a positive learning rate"),
        (cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: expected 0 or more"),
        (0 < cfg.lr_decay <= 1, f"--lr-decay {cfg.lr_decay}: expected a factor in (0, 1]"),
        (cfg.workers >= 0, f"--workers {cfg.workers}: expected 0 or more"),
        (cfg.test_batch_size >= 1, f"--test-batch-size {cfg.test_batch_size}: expected >= 1"),
        (min(cfg.synthetic_train, cfg.synthetic_test) >= 1, "--synthetic-*: expected >= 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)

def user_message(e: Exception) -> str:
    """One line; a UserError raised in a DataLoader worker arrives wrapped in its traceback."""
    msg = str(e).strip()
    if "Traceback" in msg:
        return re.sub(r"^[\w.]*UserError: ", "", msg.splitlines()[-1]).strip()
    return msg

def run_command(argv=None) -> dict:
    """Parse the command line and run the one command it names (training by default)."""
    args = vars(build_parser().parse_args(argv))
    cli_values = {k: v for k, v in args.items() if k in Config.__dataclass_fields__}
    command = next((c for c in ("predict", "eval", "export", "benchmark") if c in args), "")
    for flag, needs in (("checkpoint", ("predict", "export")), ("top", ("predict",)),
                        ("csv", ("predict",))):
        if flag in args and command not in needs:
            raise UserError(f"--{flag} applies to --{' and --'.join(needs)} only")
    if command in ("predict", "export") and "checkpoint" not in args:
        raise UserError(f"--{command} needs --checkpoint CKPT (a best.pt or last.pt)")
    if args.get("top", 3) < 1:
        raise UserError(f"--top {args['top']}: expected at least 1")
    extra = sorted(cli_values.keys() - BENCHMARK_FLAGS) if command == "benchmark" else []
    if extra:
        raise UserError(f"--{extra[0].replace('_', '-')} does not apply to --benchmark")
    if command == "export":
        return run_export(args["export"], args["checkpoint"], cli_values)
    if command == "predict":
        return run_predict(args["predict"], args["checkpoint"], cli_values, args.get("top", 3),
                           args.get("csv"))
    if command == "eval":
        return run_eval(args["eval"], cli_values)
    if "resume" in cli_values:
        ckpt = load_checkpoint(cli_values["resume"])
        check_matches(ckpt["config"], cli_values, sorted(cli_values.keys() - RESUME_FLAGS),
                      "--resume")
        cfg = checkpoint_config(ckpt, {"out": str(Path(cli_values["resume"]).parent),
                                       **cli_values}, RESUME_FLAGS)
        validate(cfg, {})
        return train(cfg, ckpt)
    cfg = make_config(cli_values)
    validate(cfg, cli_values)
    return benchmark(cfg, cli_values) if command == "benchmark" else train(cfg)

def main(argv=None) -> dict:
    """The command line. A user's mistake: one line, exit 2; --predict skipped an image: 1."""
    try:
        res = run_command(argv)
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
