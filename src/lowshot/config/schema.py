"""The settings of a run: one dataclass per section (data, model, aug, ssl, train, fewshot, check, eval,
track, state), each field with its default and the comment that explains it (docs/configuration.md is
generated from these comments by ``lowshot.configdoc``). Values are checked where they are made
(``__post_init__``); reading files and the command line is :mod:`lowshot.config.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import ConfigError, check_choice, check_dicom_options, check_positive, check_rate


@dataclass
class DataConfig:
    root: str = "data"  # folder that `source` is relative to; env LOWSHOT_DATA_ROOT overrides
    # A MedMNIST .npz (official split), a class-per-folder image directory, or a CSV manifest
    # `path,label[,group][,split]`; relative to `root` unless absolute.
    source: str = "breastmnist.npz"
    size: int = 32  # working resolution in px: images are decoded once into a uint8 store of this size
    # "auto": RGB if any image has colour, else grayscale; "gray": colour → luma (ultrasound exports
    # with coloured calipers or Doppler overlays); "rgb": always 3 channels.
    color: str = "auto"
    channels: str = "replicate"  # grayscale input: "replicate" to 3 channels, or "single" (timm in_chans=1)
    # DICOM grayscale window after the rescale slope/intercept (lowshot.data.dicom): "auto" (the file's VOI
    # LUT or window centre/width, else 8-bit as stored, deeper data min-max), "minmax", or "C,W" (e.g. 40,400).
    dicom_window: str = "auto"
    dicom_frames: str = "middle"  # multi-frame DICOM: "middle" | "first" frame, or "error"
    # Used only when the source has no split of its own; stratified by label, grouped by `group`.
    val_fraction: float = 0.15
    test_fraction: float = 0.2  # share of the images in the test split (sources without a split)
    # seed of the splits lowshot makes (groups dealt by a hash of it and their image digests: the same
    # split wherever the data lies; a changed group moves only itself) and of data.limit /
    # data.train_per_class draws
    split_seed: int = 0
    # k-fold cross-validation: folds > 1 re-splits train+val (never test) into `folds` stratified,
    # grouped folds (dealt by hash as the hold-outs) and validates on fold `fold`; repeat with other
    # split_seed values.
    folds: int = 0
    fold: int = 0  # which of the `folds` validates (0-based)
    # Images that are identical, near-identical (dHash within `duplicate_bits` of 64 bits: a candidate) or
    # re-cropped copies, once verified (duplicate_ncc below), share a group whenever lowshot splits, so a
    # duplicate pair never straddles train/val/test or two folds.
    group_duplicates: bool = True
    duplicate_bits: int = 4  # dHash Hamming distance (of 64 bits) up to which two images are candidates
    # ... and a hash candidate is a duplicate only when verified: detail NCC of the 32 px thumbnails at the
    # best alignment >= duplicate_ncc (lowshot.data.copies; 0.88 from bench/pool_copies.py: copies ~0.98,
    # JPEG q70 copies at 28 px 0.97 found). The pool guard uses the same threshold. It is raised on a set
    # whose images correlate with *mirrored* images of the set (never copies) within 0.04 of it, up to
    # 0.96, and the run says so: at low resolution distinct images of some modalities look alike (the best
    # distinct RetinaMNIST pair scores 0.883, its mirrored level 0.855, so 0.895 is used there). A pair that
    # fails gets a second chance an octave lower (the thumbnails averaged to 16 px), where copies that lost
    # their finest detail (half size and back, JPEG q40, noise) still correlate: threshold duplicate_ncc,
    # calibrated the same way, and off where the set's mirrored look-alikes come within 0.04 of 0.96 there
    # (RetinaMNIST: 0.948, off).
    duplicate_ncc: float = 0.88
    # A CSV manifest (labelled, or an ssl.unlabelled pool's) reads only files below its own folder or
    # data.root (a path like ../../etc/... is refused, naming it); true lifts that.
    allow_outside_root: bool = False
    cache_dir: str = ""  # decoded stores go here; "" = env LOWSHOT_CACHE or ~/.cache/lowshot
    limit: int = 0  # keep at most this many images per split (stratified); 0 = all. For smoke tests.
    # Label budget: keep K labelled training images per class (0 = all), drawn by `train_draw`; the
    # other training images get split 'unlabelled' and are not trained on.
    train_per_class: int = 0
    train_draw: int = 0  # which seeded draw of the label budget (repeat a budget over draws 0, 1, ...)
    # DataLoader workers per process; -1 = auto: none on CPU (the 2 cores are busy with the model),
    # up to 8 per process on GPU, where per-image PIL augmentation in one process starves the device.
    num_workers: int = -1
    # Where training views are made. "batched": the uint8 store on the device, one batched augmentation
    # per step (lowshot.augment, same distributions); "per_image": PIL transforms in DataLoader workers.
    # "auto" = batched: per-image PIL starves a GPU (3% of the model's speed on an H200), and on 2 CPU
    # cores it took 9-10% of a resnet18 step at 64 px against 1% batched (bench/, EXPERIMENTS.md).
    augment_path: str = "auto"
    # The batched augmentation through torch.compile: a dozen fused kernels instead of ~100 eager ones
    # (needed to keep up with the model on a GPU: 7.6x the eager views on an H200); "auto": on a GPU
    # only (on CPU it measured within noise of eager, and the one-off compile takes ~20 s).
    augment_compile: str = "auto"

    def __post_init__(self) -> None:
        check_choice("data.channels", self.channels, ("replicate", "single"))
        check_choice("data.augment_path", self.augment_path, ("auto", "batched", "per_image"))
        check_choice("data.augment_compile", self.augment_compile, ("auto", "on", "off"))
        check_choice("data.color", self.color, ("auto", "gray", "rgb"))
        check_dicom_options(self.dicom_window, self.dicom_frames)
        if not 0.0 < self.val_fraction < 1.0 or not 0.0 < self.test_fraction < 1.0:
            raise ConfigError("data.val_fraction and data.test_fraction must lie in (0, 1)")
        if self.size < 8:
            raise ConfigError(
                f"data.size={self.size} px is too small; use 8 or more (28 keeps MedMNIST's detail)"
            )
        if self.folds == 1 or self.folds < 0 or (self.folds and not 0 <= self.fold < self.folds):
            raise ConfigError(
                f"data.folds={self.folds}, data.fold={self.fold}: use folds=0 (fixed split) or folds>=2 "
                f"with 0 <= fold < folds"
            )


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    # "none" (random init) | "hub" (timm pretrained=True, needs network) | a local weights file
    # (.safetensors, .pth, .bin) | a lowshot checkpoint directory (holds backbone.safetensors).
    weights: str = "none"
    drop_rate: float = 0.0  # dropout on the pooled features, before the linear head (fine-tuning)
    drop_path_rate: float = 0.0  # stochastic depth (timm drop_path_rate)
    # ResNets at 28-32 px: a stride-1 3x3 first conv and no max-pool (the CIFAR / MedMNIST-28 ResNet),
    # so a 28 px image still leaves a 4x4 map after the last stage instead of 1x1.
    small_input_stem: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model keyword arguments


@dataclass
class AugConfig:
    """SimCLR views (lightly's SimCLRTransform), tuned down for medical images."""

    min_scale: float = (
        0.3  # smallest crop, as a fraction of the image area; 0.08 (ImageNet) can crop lesions away
    )
    hflip: float = 0.5  # horizontal flip probability; set 0 where laterality matters
    vflip: float = 0.0  # vertical flip probability
    rotate: float = 0.0  # probability of a random 90° rotation
    cj_prob: float = 0.8  # colour-jitter probability
    cj_strength: float = 0.5  # scales the four jitter ranges below
    brightness: float = 0.8  # brightness jitter range (x cj_strength)
    contrast: float = 0.8  # contrast jitter range (x cj_strength)
    saturation: float = 0.8  # forced to 0 on grayscale data
    hue: float = 0.2  # forced to 0 on grayscale data
    gray_prob: float = 0.2  # random grayscale; forced to 0 on grayscale data
    blur_prob: float = 0.5  # Gaussian blur probability
    blur_sigma: list[float] = field(
        default_factory=lambda: [0.1, 1.0]
    )  # [min, max] px at the working resolution


@dataclass
class SSLConfig:
    # simclr | moco (v2, memory bank) | byol | vicreg | dino: lowshot.methods, same views and launch.
    # Start from any weights with model.weights (ImageNet Lite0 from PyPI, a file, the hub, a checkpoint):
    # continued, domain-adaptive pretraining (Azizi et al., 2021) instead of from scratch.
    method: str = "simclr"
    # Extra sources read by pretraining only: folders (recursive, any layout, labels ignored), CSV
    # manifests (a 'path' column), .npz files (every image array); relative to data.root unless absolute.
    # Checked against the labelled val/test images first (check.pool_leakage).
    unlabelled: list[str] = field(default_factory=list)
    use_train: bool = True  # also pretrain on the labelled training split (False: the pool alone)
    epochs: int = 50  # pretraining epochs
    # Length in optimizer steps instead (0: ssl.epochs): the same compute whatever the pool's size, for
    # comparing pools or methods at equal cost; the last epoch stops at the budget, the lr and momentum
    # schedules span it. ssl.warmup_epochs still counts epochs of the pretraining images.
    steps: int = 0
    batch_size: int = 128  # per process; NT-Xent negatives are gathered from every process
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3  # peak lr after warmup, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.01  # final lr as a fraction of ssl.lr
    weight_decay: float = 1e-4  # decoupled (AdamW) or L2 (SGD) weight decay
    warmup_epochs: int = 3  # linear lr warmup
    temperature: float = 0.2  # NT-Xent / InfoNCE softmax temperature (SimCLR, MoCo)
    proj_hidden_dim: int = 512  # projection (and BYOL predictor, DINO head) hidden width
    proj_dim: int = 128  # projection output (SimCLR, MoCo, BYOL); DINO's bottleneck
    # MoCo/BYOL/DINO: EMA decay of the momentum copy, cosine-scheduled from this to 1 over training
    # (BYOL's 0.996 is for ~100k steps; a few thousand steps on a small set want a faster-moving target).
    momentum: float = 0.99
    memory_bank: int = 4096  # MoCo: negatives are this many past keys (independent of the batch size)
    wide_dim: int = 1024  # VICReg: expander width and output (the paper's 8192 needs far larger batches)
    dino_prototypes: int = 4096  # DINO head outputs (the paper's 65536 is for ImageNet)
    teacher_temp: float = 0.04  # DINO: teacher softmax temperature (the student's is 0.1)
    center_momentum: float = 0.9  # DINO: EMA of the teacher-output centre
    knn_every: int = 5  # epochs between online kNN checks on the validation split (0 = off)
    knn_k: int = 20  # neighbours of the online kNN check
    knn_t: float = 0.1  # temperature of the kNN's similarity weights

    def __post_init__(self) -> None:
        check_choice("ssl.method", self.method, ("simclr", "moco", "byol", "vicreg", "dino"))
        check_choice("ssl.optimizer", self.optimizer, ("adamw", "sgd"))
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"config key 'ssl.momentum': {self.momentum} must lie in [0, 1], e.g. 0.99")
        check_positive(
            "ssl", memory_bank=self.memory_bank, wide_dim=self.wide_dim, dino_prototypes=self.dino_prototypes
        )
        check_positive("ssl", epochs=self.epochs, batch_size=self.batch_size)
        check_rate("ssl", lr=self.lr, weight_decay=self.weight_decay)
        if self.steps < 0:
            raise ConfigError(
                f"ssl.steps={self.steps}: give a number of optimizer steps, or 0 for ssl.epochs"
            )


@dataclass
class TrainConfig:
    probe: bool = False  # True: frozen backbone, cached embeddings, L-BFGS logistic regression
    # Inverse L2 strengths tried by the probe; the one with the best validation AUROC is kept.
    probe_cs: list[float] = field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
    )
    epochs: int = 30  # fine-tuning epochs (at most: early stopping)
    batch_size: int = 64  # per process
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 5e-4  # the head's peak lr; backbone groups: x backbone_lr_scale x layer_decay^depth
    schedule: str = "cosine"  # cosine (after warmup) | step (x gamma at each milestone)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of epochs
    gamma: float = 0.1  # step schedule: lr factor at each milestone
    min_lr_ratio: float = 0.01  # cosine: final lr as a fraction of lr
    weight_decay: float = 0.05  # not applied to norms and biases
    momentum: float = 0.9  # sgd only
    warmup_epochs: int = 2  # linear warmup (cosine schedule)
    patience: int = 10  # epochs without a better validation AUROC before stopping
    label_smoothing: float = 0.0  # cross-entropy label smoothing (also on mixup's soft targets)
    # What trains. "full": everything. "head": a linear head on the frozen backbone, trained with
    # augmentation (BatchNorm statistics frozen too). "partial": the head and the last `stages` stage
    # groups. "gradual": the head alone for `unfreeze_every` epochs, then one more stage group, deepest
    # first, every `unfreeze_every` epochs, up to `stages` (0 = all); early stopping waits for the last
    # unfreezing (Howard & Ruder, 2018). Stage groups are timm's coarse group_matcher (stem, stages).
    strategy: str = "full"
    stages: int = 0  # partial / gradual: how many stage groups (from the head) train; 0 = all
    unfreeze_every: int = 3  # gradual: epochs between unfreezing steps
    # Per-group learning rates: layer-wise decay lr x layer_decay^(depth below the head) over timm's fine
    # layer groups (param_groups_layer_decay; BEiT, Bao et al., 2022), 1 = off; and a discriminative
    # factor on every backbone lr (the head keeps train.lr).
    layer_decay: float = 1.0
    backbone_lr_scale: float = 1.0  # every backbone group's lr x this (discriminative fine-tuning)
    l1: float = (
        0.0  # L1 penalty coefficient on weights (not norms/biases), added to the loss; L2 is weight_decay
    )
    mixup: float = 0.0  # mixup alpha (timm Mixup, Zhang et al., 2018); 0 = off
    cutmix: float = 0.0  # cutmix alpha (Yun et al., 2019); with mixup too, each batch picks one of the two
    # Exponential moving average of the weights (timm ModelEmaV3); validation, selection, the checkpoint and
    # the test use the averaged weights. 0 = off.
    ema: float = 0.0
    # timm's EMA warmup: the decay at optimizer step s is min(ema, 1 - s^(-2/3)), so it reaches 0.99 only
    # after ~1,000 steps and 0.998 after ~11,000; a few hundred labelled images at batch 64 take ~9 steps an
    # epoch, where any ema >= 0.96 gives the same run (bench/results/recipe_screen/screen.md). false: the decay is
    # `ema` from the first step (which copies the weights).
    ema_warmup: bool = True
    balance: str = "none"  # none | loss (cross-entropy weighted by inverse class frequency) | sampler
    augment: bool = True  # False: no augmentation at all (the MedMNIST protocol)
    crop_min_scale: float = 0.7  # training-time random resized crop
    hflip: float = 0.5  # set 0 where laterality matters
    vflip: float = 0.0  # vertical flip probability
    rotate: float = 0.0  # random rotation, up to this many degrees either way
    # Brightness and contrast jitter factors in [1 - x, 1 + x]; no hue or saturation (grayscale modalities).
    brightness: float = 0.0
    contrast: float = 0.0  # contrast jitter (see brightness)
    # Each epoch, also score the *un-augmented* training images in eval mode: augmentation and dropout
    # are why the running training accuracy can sit below validation; this curve cannot.
    eval_train: bool = True

    def __post_init__(self) -> None:
        check_choice("train.optimizer", self.optimizer, ("adamw", "adam", "sgd"))
        check_choice("train.schedule", self.schedule, ("cosine", "step"))
        check_choice("train.strategy", self.strategy, ("full", "head", "partial", "gradual"))
        check_choice("train.balance", self.balance, ("none", "loss", "sampler"))
        check_positive("train", unfreeze_every=self.unfreeze_every)
        if self.strategy == "partial" and self.stages < 1:
            raise ConfigError(
                "train.strategy=partial needs train.stages >= 1 (the last N stage groups train)"
            )
        if not 0.0 < self.layer_decay <= 1.0 or self.backbone_lr_scale <= 0.0:
            raise ConfigError("train.layer_decay must lie in (0, 1] and train.backbone_lr_scale be > 0")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"train.ema={self.ema}: an EMA decay in [0, 1), e.g. 0.99; 0 = off")
        check_positive("train", epochs=self.epochs, batch_size=self.batch_size, patience=self.patience)
        check_rate("train", lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class FewShotConfig:
    """N-way K-shot episodes on cached embeddings (fewshot/evaluate.py)."""

    n_way: int = 2  # classes per episode; fewer than the data has → each episode draws a subset
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 20])  # K support images per class
    n_query: int = 15  # Q query images per class, from `query_split`
    episodes: int = 1000  # episodes per (N-way, K-shot) setting
    query_split: str = "test"  # queries come from here, support always from train: never overlapping
    classifiers: list[str] = field(
        default_factory=lambda: ["prototype", "knn", "logreg"]
    )  # prototype (nearest class mean) | knn | logreg, on the support embeddings
    metric: str = "cosine"  # prototype distance: cosine | euclidean
    knn_k: int = 5  # neighbours of the knn classifier
    logreg_l2: float = 0.01  # L2 strength (1/C) of the logreg classifier
    # Label efficiency: a probe on K labelled training images per class (0 = all), scored on test.
    label_budgets: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 0])
    draws: int = 10  # random draws of the K labels per budget
    # The label-efficiency probe's inverse L2 strength: 0 = chosen on the validation labels among
    # train.probe_cs, as finetune/train.py --probe does (lowshot.probe: one estimator); > 0 = fixed.
    probe_c: float = 0.0

    def __post_init__(self) -> None:
        check_choice("fewshot.query_split", self.query_split, ("val", "test"))
        check_choice("fewshot.metric", self.metric, ("cosine", "euclidean"))
        for c in self.classifiers:
            check_choice("fewshot.classifiers", c, ("prototype", "knn", "logreg"))
        check_positive(
            "fewshot",
            n_way=self.n_way,
            n_query=self.n_query,
            episodes=self.episodes,
            **{f"shots[{i}]": k for i, k in enumerate(self.shots)},
        )


@dataclass
class CheckConfig:
    """`lowshot check`: duplicates, leakage across splits, label conflicts."""

    sheet_pairs: int = 24  # flagged pairs drawn in pairs.png
    # A second source (folder, .npz or CSV, like ssl.unlabelled) searched for copies of any of this
    # source's images: a pretraining pool against the labelled set, an external test set against the
    # training data. Found copies fail the check like leakage; against.png shows the weakest accepted.
    against: str = ""
    # Also pair images whose embeddings (model.name / model.weights: ImageNet weights or a SimCLR
    # checkpoint) have cosine similarity >= `cosine`: dHash sees brightness gradients only and is blind
    # on look-alike modalities (fundus photos), a backbone sees content.
    embeddings: bool = False
    cosine: float = 0.97  # embedding cosine similarity at which two images count as look-alikes
    # Identical images across splits (leakage): "error" stops `lowshot check` (exit 1) and every training
    # script; "warn" (--warn-only) goes on; "drop" removes the train/val copies, leaving the test split as
    # published. Near duplicates (data.duplicate_bits) and label conflicts are reported, for a person to judge.
    leakage: str = "error"
    # ssl.unlabelled images that are copies of the labelled val/test images (pretraining on them is
    # transductive leakage): "error" stops pretraining with the list, "drop" removes them from the pool,
    # "warn" goes on. Copies = identical pixels, or a verified near/crop/resize copy: detail NCC of 32 px
    # thumbnails >= data.duplicate_ncc (lowshot.data.copies).
    pool_leakage: str = "error"

    def __post_init__(self) -> None:
        check_choice("check.leakage", self.leakage, ("error", "warn", "drop"))
        check_choice("check.pool_leakage", self.pool_leakage, ("error", "warn", "drop"))


@dataclass
class EvalConfig:
    bootstrap: int = 1000  # resamples of the test split for confidence intervals
    ci: float = 0.95  # confidence level of every interval
    # False: a selection-only run (one fold of a learning-rate search, say): the test split stays sealed
    # and unscored; choose on the folds' validation scores, then run the chosen setting once with True.
    test: bool = True
    calibration_bins: int = 15  # equal-width confidence bins for ECE and the reliability diagram
    # Fit one softmax temperature on the validation split (Guo et al., 2017) and report test calibration
    # with it. Accuracy does not change (the argmax stays), nor does a binary AUROC (the ranking stays).
    temperature_scaling: bool = True
    # The operating point (lowshot.operating_point), chosen on validation and stored beside the model;
    # test sensitivity/specificity are reported at it beside the argmax (0.5) numbers. balanced: the Bayes
    # decision for balanced accuracy, undoing the training prior (argmax under a label budget K per class or
    # train.balance); prior: the most accurate at eval.prior or the validation split's class frequencies;
    # youden: max validation balanced accuracy, fitted; sensitivity: eval.target_sensitivity for
    # eval.positive_class on validation; argmax: 0.5.
    operating_point: str = "balanced"
    positive_class: str = ""  # a class name or index; "" = the rarest class (usually the finding)
    target_sensitivity: float = (
        0.9  # sensitivity rule: the validation sensitivity to reach for eval.positive_class
    )
    prior: list[float] = field(
        default_factory=list
    )  # deployment class frequencies; [] = the validation split's

    def __post_init__(self) -> None:
        check_choice(
            "eval.operating_point",
            self.operating_point,
            ("argmax", "balanced", "prior", "youden", "sensitivity"),
        )
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(f"eval.target_sensitivity={self.target_sensitivity}: give a fraction in (0, 1]")


@dataclass
class TrackConfig:
    log_with: str = "wandb"  # wandb | none (the local run directory is always written)
    project: str = "lowshot"  # the W&B project
    group: str = ""  # the experiment; "" = the run name
    tags: list[str] = field(
        default_factory=list
    )  # extra W&B tags (the data set, backbone, weights source and job are added)
    wandb_mode: str = "auto"  # auto (online only with an API key) | online | offline

    def __post_init__(self) -> None:
        check_choice("track.log_with", self.log_with, ("wandb", "none"))
        check_choice("track.wandb_mode", self.wandb_mode, ("auto", "online", "offline"))


@dataclass
class StateConfig:
    # Training states (lowshot.resume) in run_dir/state/step-<8 digits>/: model, optimizer, scheduler, grad
    # scaler, EMA, early stopping with its best weights, every process's RNG, the loader's position. One is
    # also saved after the last epoch, and after the step at which SIGTERM/SIGINT arrived.
    # Minutes after the last state at which the next step or epoch end saves one; 0 = off.
    every_minutes: float = 5.0
    # Also every N epochs; 0 = off (on a few hundred images an epoch can take less time than a save).
    every: int = 0
    every_steps: int = 0  # also every N optimizer steps, inside an epoch; 0 = off
    keep: int = 2  # newest states kept; an older one is deleted only after a newer one is complete

    def __post_init__(self) -> None:
        check_positive("state", keep=self.keep)
        if min(self.every, self.every_steps, self.every_minutes) < 0:
            raise ConfigError(
                "config keys 'state.every_minutes', 'state.every', 'state.every_steps': 0 (off) or more"
            )


@dataclass
class Config:
    seed: int = (
        0  # every random draw of a run (init, data order, augmentation, bootstrap); splits: data.split_seed
    )
    out_dir: str = "runs"  # run directories are out_dir/name/
    name: str = ""  # run directory name under out_dir; "" = <job>-<data>-<model>-<time>
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | no
    channels_last: str = "auto"  # auto (on GPU) | on | off: NHWC weights, what tensor-core convolutions want
    compile: bool = False  # torch.compile (inductor) through Accelerate; pays off only over long runs
    # "" = a new run; auto = continue out_dir/name from its newest state if it is an unfinished run, else start
    # it (one command line for the first start and every restart); a run directory = continue that run.
    resume: str = ""
    overwrite: bool = False  # replace the run already in out_dir/name (finished or not) instead of refusing
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    state: StateConfig = field(default_factory=StateConfig)

    def __post_init__(self) -> None:
        check_choice("mixed_precision", self.mixed_precision, ("auto", "bf16", "fp16", "no"))
        check_choice("channels_last", self.channels_last, ("auto", "on", "off"))
