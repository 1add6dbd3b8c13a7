"""Fine-tuning strategies and regularisers, each checked by its effect on a real timm ResNet-18: which
parameters and BatchNorm statistics change at which epoch, the lr of every group, EMA weights, mixup
targets, class weights and balanced sampling, the L1 penalty, head dropout."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import timm
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowshot.augment import train_transform
from lowshot.config import ConfigError, ModelConfig, TrainConfig, parse_args
from lowshot.data import make_loader
from lowshot.finetune import (
    class_weights,
    classifier,
    l1_penalty,
    make_criterion,
    make_ema,
    make_mixup,
    param_groups,
    set_trainable,
    stage_groups,
    train_epoch,
    trainable_stages,
    unfreezing_done,
)
from lowshot.models import SmallCNN, create_backbone
from lowshot.optim import lr_schedule, make_optimizer


def net(drop: float = 0.0) -> tuple[nn.Sequential, list[list[str]]]:
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0)
    return classifier(backbone, 2, drop), stage_groups(backbone)


def loader(n: int = 16, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 2
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def one_epoch(model: nn.Sequential, tc: TrainConfig, **kw: Any) -> None:
    opt = make_optimizer(param_groups(model, tc), tc.optimizer, tc.lr, tc.weight_decay)
    data = loader()
    train_epoch(
        model,
        data,
        opt,
        lr_schedule(opt, tc, len(data)),
        nn.CrossEntropyLoss(),
        Accelerator(cpu=True),
        tc,
        **kw,
    )


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def prefixes(names: set[str]) -> set[str]:
    """'0.layer4.1.bn2.weight' → 'layer4'; '1.1.weight' → 'head'."""
    return {"head" if n.startswith("1.") else n.split(".")[1] for n in names}


def test_stage_groups_follow_the_network_from_stem_to_top() -> None:
    _, groups = net()
    assert [g[0].split(".")[0] for g in groups] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    cnn = SmallCNN(num_classes=0, in_chans=1)
    assert len(stage_groups(cnn)) == 7  # 5 conv blocks + 2 hidden fully connected layers
    assert sum(isinstance(m, nn.Conv2d) for m in SmallCNN(num_classes=2).modules()) == 5
    assert sum(isinstance(m, nn.Linear) for m in SmallCNN(num_classes=2).modules()) == 3
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 128)


@pytest.mark.parametrize(
    ("strategy", "stages", "expect"),
    [
        ("head", 0, {"head"}),
        ("partial", 2, {"head", "layer3", "layer4"}),
        ("full", 0, {"head", "conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
    ],
)
def test_only_the_chosen_stages_change_batchnorm_statistics_included(
    strategy: str, stages: int, expect: set
) -> None:
    model, groups = net()
    tc = TrainConfig(strategy=strategy, stages=stages, lr=1e-2, warmup_epochs=0)
    set_trainable(model[0], groups, trainable_stages(tc, 0, len(groups)))
    before = copy.deepcopy(model.state_dict())
    one_epoch(model, tc)
    moved = changed(before, model)
    assert prefixes(moved) == expect
    # frozen stages keep their BatchNorm running statistics (eval mode), trained ones update them
    frozen_bn = [k for k in before if "running_mean" in k and prefixes({k}) - expect]
    assert all(k not in moved for k in frozen_bn)
    if strategy != "head":
        assert "0.layer4.1.bn2.running_mean" in moved


def test_gradual_unfreezing_schedule_and_early_stopping_waits() -> None:
    tc = TrainConfig(strategy="gradual", unfreeze_every=2)
    assert [trainable_stages(tc, e, 5) for e in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert not unfreezing_done(tc, 8, 5) and unfreezing_done(tc, 10, 5)
    capped = replace(tc, stages=2)
    assert [trainable_stages(capped, e, 5) for e in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert unfreezing_done(TrainConfig(strategy="full"), 0, 5)
    # the trained set grows epoch by epoch, top stage first
    model, groups = net()
    seen = []
    for epoch in range(6):
        set_trainable(model[0], groups, trainable_stages(tc, epoch, len(groups)))
        before = copy.deepcopy(model.state_dict())
        one_epoch(model, tc)
        seen.append(prefixes(changed(before, model)))
    assert seen[0] == seen[1] == {"head"}
    assert seen[2] == seen[3] == {"head", "layer4"}
    assert seen[4] == seen[5] == {"head", "layer3", "layer4"}


def test_layer_wise_and_discriminative_learning_rates() -> None:
    model, _ = net()
    tc = TrainConfig(lr=1e-3, layer_decay=0.5, backbone_lr_scale=0.1, weight_decay=0.05)
    groups = param_groups(model, tc)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter, frozen or not
    head = model[1][1].weight
    assert lr_of[id(head)] == pytest.approx(1e-3)
    last = model[0].layer4[1].conv2.weight
    first = model[0].layer4[0].conv1.weight
    stem = model[0].conv1.weight
    assert lr_of[id(last)] == pytest.approx(1e-3 * 0.1 * 0.5)  # one step of decay below the head
    assert lr_of[id(first)] == pytest.approx(lr_of[id(last)] * 0.5)  # timm's layers: one per block
    assert lr_of[id(stem)] == pytest.approx(1e-3 * 0.1 * 0.5**9)  # stem + 8 blocks below the head
    assert (
        wd_of[id(model[0].bn1.weight)] == 0.0
        and wd_of[id(stem)] == 0.05
        and wd_of[id(model[1][1].bias)] == 0.0
    )
    # the schedule scales every group alike: the ratios hold at every step
    opt = make_optimizer(groups, "adamw", tc.lr, tc.weight_decay)
    sched = lr_schedule(opt, replace(tc, warmup_epochs=1, epochs=3), steps_per_epoch=4)
    for _ in range(6):
        opt.step()
        sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert max(lrs) / min(lrs) == pytest.approx(1 / (0.1 * 0.5**9))


def test_ema_weights_are_the_moving_average_of_the_live_weights() -> None:
    from timm.utils import ModelEmaV3

    model, _ = net()
    start = copy.deepcopy(model.state_dict())
    ema = ModelEmaV3(model, decay=0.9)  # without warmup: a fixed decay per step
    tc = TrainConfig(lr=1e-2, warmup_epochs=0)
    opt = make_optimizer(param_groups(model, tc), tc.optimizer, tc.lr, tc.weight_decay)
    data = loader(n=8, batch=8)  # one step per call
    sched = lr_schedule(opt, tc, 2)
    acc = Accelerator(cpu=True)
    keys = ("1.1.weight", "0.layer4.1.conv2.weight")
    train_epoch(model, data, opt, sched, nn.CrossEntropyLoss(), acc, tc, ema=ema)
    first = {k: model.state_dict()[k].clone() for k in keys}
    for k in keys:  # timm's first update (step 1) copies the live weights
        assert not torch.equal(first[k], start[k]) and torch.equal(ema.module.state_dict()[k], first[k])
    train_epoch(model, data, opt, sched, nn.CrossEntropyLoss(), acc, tc, ema=ema)
    for k in keys:  # then ema = d * ema + (1 - d) * live at every step
        live, avg = model.state_dict()[k], ema.module.state_dict()[k]
        assert not torch.equal(live, avg)
        assert torch.allclose(avg, 0.9 * first[k] + 0.1 * live, atol=1e-6)


def test_ema_warmup_decides_the_decay_of_short_runs() -> None:
    model, _ = net()
    assert make_ema(model, TrainConfig()) is None  # train.ema=0: off
    warm = make_ema(model, TrainConfig(ema=0.99))
    assert warm is not None
    # With timm's warmup 0.99 and 0.998 give one decay for the ~120 steps of a small set's run (9 steps an
    # epoch), and 0.99 only after ~1,000 steps: why train.ema_warmup exists.
    for step in (2, 50, 120, 500):
        assert warm.get_decay(step) == make_ema(model, TrainConfig(ema=0.998)).get_decay(step) < 0.99
    assert warm.get_decay(2000) == 0.99
    cold = make_ema(model, TrainConfig(ema=0.99, ema_warmup=False))
    assert cold is not None and cold.get_decay(2) == cold.get_decay(120) == 0.99
    assert cold.get_decay(1) == 0.0  # the first update copies the live weights, with warmup or without


def test_mixup_targets_are_soft_sum_to_one_and_mix_the_images() -> None:
    mix = make_mixup(TrainConfig(mixup=0.4, label_smoothing=0.1), num_classes=3)
    assert mix is not None and make_mixup(TrainConfig(), 3) is None
    torch.manual_seed(1)
    np.random.seed(0)  # timm draws lambda with numpy
    x, y = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    xm, t = mix(x.clone(), y)
    assert t.shape == (8, 3) and torch.allclose(t.sum(1), torch.ones(8))
    # batch mode mixes each image with the one mirrored in the batch: xm = lam x + (1 - lam) x.flip(0)
    lam = ((xm - x.flip(0)) * (x - x.flip(0))).sum() / ((x - x.flip(0)) ** 2).sum()
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-5) and 0.0 < float(lam) < 1.0
    # ... and the targets the same way, from label-smoothed one-hot vectors (0.1 spread over 3 classes)
    smooth = torch.nn.functional.one_hot(y, 3).float() * 0.9 + 0.1 / 3
    assert torch.allclose(t, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5)
    cut = make_mixup(TrainConfig(cutmix=1.0), num_classes=3)
    assert cut is not None
    xc, tc = cut(x.clone(), y)
    same = (xc == x).flatten(1).all(1) | (xc == x.flip(0)).flatten(1).all(1)
    assert not same.all() and torch.allclose(tc.sum(1), torch.ones(8))  # pasted patches, soft targets


def test_class_weights_and_balanced_sampler() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    w = class_weights(labels, 2)
    assert torch.allclose(w, torch.tensor([100 / (2 * 90), 100 / (2 * 10)]))
    assert torch.allclose(class_weights(np.array([0, 1, 0, 1]), 2), torch.ones(2))
    with pytest.raises(ValueError, match="no training image"):
        class_weights(np.array([0, 0]), 2)
    ds = TensorDataset(torch.zeros(100, 1), torch.from_numpy(labels))
    torch.manual_seed(0)
    drawn = torch.cat([y for _ in range(20) for _, y in make_loader(ds, 50, 0, True, balance=labels)])
    assert 0.45 < drawn.float().mean() < 0.55  # the 10% class is drawn half of the time
    plain = torch.cat([y for _ in range(20) for _, y in make_loader(ds, 50, 0, True)])
    assert plain.float().mean() < 0.15


def test_l1_penalty_shrinks_weights() -> None:
    lin = nn.Linear(4, 2)
    assert torch.isclose(l1_penalty(lin), lin.weight.abs().sum())  # weights only, not the bias
    norms = {}
    for l1 in (0.0, 1e-3):
        model, _ = net()
        one_epoch(model, TrainConfig(lr=1e-2, warmup_epochs=0, weight_decay=0.0, l1=l1))
        norms[l1] = float(l1_penalty(model).detach())
    assert norms[1e-3] < norms[0.0]


def test_head_dropout_acts_even_on_a_frozen_backbone() -> None:
    model, groups = net(drop=0.5)
    set_trainable(model[0], groups, 0)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.allclose(model(x), model(x))


def test_grayscale_augmentation_has_no_colour_jitter() -> None:
    from PIL import Image

    tf = train_transform(
        32, TrainConfig(rotate=15, brightness=0.3, contrast=0.3, hflip=0.0), {"mean": [0.5], "std": [0.5]}
    )
    jitter = next(t for t in tf.transforms if type(t).__name__ == "ColorJitter")
    assert jitter.hue is None and jitter.saturation is None and jitter.brightness == (0.7, 1.3)
    img = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1)), mode="L")
    outs = torch.stack([tf(img) for _ in range(8)])
    assert outs.shape == (8, 1, 32, 32) and outs.std(0).mean() > 0


def test_strategy_settings_are_checked_and_densenet_builds() -> None:
    with pytest.raises(ConfigError, match=r"train\.stages"):
        parse_args(["train.strategy=partial"])
    with pytest.raises(ConfigError, match=r"train\.strategy"):
        parse_args(["train.strategy=unfreeze"])
    with pytest.raises(ConfigError, match=r"train\.ema"):
        parse_args(["train.ema=1.5"])
    cfg, _ = parse_args(["train.strategy=gradual", "train.unfreeze_every=4", "train.layer_decay=0.7"])
    assert cfg.train.strategy == "gradual" and cfg.train.layer_decay == 0.7
    # DenseNet takes no drop_path_rate keyword: it is passed only when set
    assert create_backbone(ModelConfig(name="densenet121"), 1).eval()(torch.randn(1, 1, 32, 32)).shape == (
        1,
        1024,
    )


def test_drop_path_and_label_smoothing_act() -> None:
    from timm.layers import DropPath

    backbone = create_backbone(ModelConfig(name="resnet18", drop_path_rate=0.2))
    rates = [m.drop_prob for m in backbone.modules() if isinstance(m, DropPath)]
    assert len(rates) == 7 and max(rates) == pytest.approx(0.2)  # rising with depth from 0 at block 1
    for m in backbone.modules():  # timm zero-inits each block's last BN: residual branches start at 0
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    x = torch.randn(8, 3, 32, 32)
    backbone.train()
    torch.manual_seed(0)
    a = backbone(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, backbone(x))
    confident = torch.tensor([[20.0, -20.0]])
    plain = make_criterion(TrainConfig(), np.array([0, 1]), 2)
    smooth = make_criterion(TrainConfig(label_smoothing=0.1), np.array([0, 1]), 2)
    assert plain(confident, torch.tensor([0])) < 1e-6 < 1.0 < smooth(confident, torch.tensor([0]))
    weighted = make_criterion(TrainConfig(balance="loss"), np.array([0, 0, 0, 1]), 2)
    assert weighted.weight is not None and weighted.weight[1] == 3 * weighted.weight[0]


def test_models_own_no_decay_parameters_keep_no_decay() -> None:
    """A ViT's position embedding and class token take no weight decay (timm's no_weight_decay())."""
    vit = timm.create_model("test_vit", num_classes=0, img_size=32)
    groups = param_groups(classifier(vit, 2, 0.0), TrainConfig(weight_decay=0.05, layer_decay=0.8))
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd_of[id(vit.pos_embed)] == 0.0 and wd_of[id(vit.cls_token)] == 0.0
    assert wd_of[id(vit.blocks[0].attn.qkv.weight)] == 0.05
