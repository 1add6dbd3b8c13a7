import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lowshot.config import Config, ModelConfig
from lowshot.models import WeightsError, backbone_for, create_backbone, save_checkpoint


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    a.eval()
    b.eval()
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


def test_backbone_gives_pooled_features() -> None:
    m = create_backbone(ModelConfig(name="test_resnet"), in_chans=3, img_size=32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, m.num_features)


def test_vit_gets_img_size() -> None:
    m = create_backbone(ModelConfig(name="test_vit"), in_chans=3, img_size=32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, m.num_features)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weight_file_loads_through_timm(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    full = timm.create_model("test_resnet", num_classes=7)  # with a classifier, as published weights are
    f = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    save_file(state, str(f)) if suffix == ".safetensors" else torch.save(state, f)
    m = create_backbone(ModelConfig(name="test_resnet", weights=str(f)))
    full.reset_classifier(0)
    assert _same(m, full, torch.randn(2, 3, 32, 32))


def test_rgb_weights_adapt_to_one_channel(tmp_path: Path) -> None:
    full = timm.create_model("test_resnet", num_classes=0)
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(f))
    m = create_backbone(ModelConfig(name="test_resnet", weights=str(f)), in_chans=1)
    stem = next(p for n, p in m.named_parameters() if p.ndim == 4)
    ref = next(p for n, p in full.named_parameters() if p.ndim == 4)
    assert stem.shape[1] == 1 and torch.allclose(stem[:, 0], ref.sum(1))  # timm sums the RGB kernels


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would run code on unpickling
            return (print, ("pwned",))

    f = tmp_path / "evil.pth"
    with open(f, "wb") as fh:
        pickle.dump({"conv1.weight": Evil()}, fh)
    with pytest.raises(WeightsError, match="weights_only"):
        create_backbone(ModelConfig(name="test_resnet", weights=str(f)))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.name = "test_resnet"
    cfg.data.channels = "single"
    src, in_chans, _ = backbone_for(cfg, grayscale=True)
    assert in_chans == 1
    with torch.no_grad():  # make it differ from any fresh init
        for p in src.parameters():
            p.add_(0.01)
    d = save_checkpoint(tmp_path / "ckpt", src, cfg, {"in_chans": 1})
    assert {p.name for p in d.iterdir()} == {"backbone.safetensors", "config.yaml", "meta.json"}
    cfg.model.weights = str(d)
    loaded, _, _ = backbone_for(cfg, grayscale=True)
    assert _same(src, loaded, torch.randn(2, 1, 32, 32))
    # A mismatch is caught with the fix in the message.
    with pytest.raises(WeightsError, match=re.escape("model.name=test_resnet")):
        create_backbone(ModelConfig(name="resnet18", weights=str(d)), in_chans=1)
    with pytest.raises(WeightsError, match=re.escape("data.channels=single")):
        create_backbone(ModelConfig(name="test_resnet", weights=str(d)), in_chans=3)


def test_bad_names_and_paths_are_clear(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not a timm model"):
        create_backbone(ModelConfig(name="resnet_eighteen"))
    with pytest.raises(WeightsError, match="no such file"):
        create_backbone(ModelConfig(name="test_resnet", weights=str(tmp_path / "nope.pth")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=re.escape("holds no backbone.safetensors")):
        create_backbone(ModelConfig(name="test_resnet", weights=str(tmp_path / "empty")))


def test_embedding_extraction_leaves_batchnorm_statistics_frozen() -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    from lowshot.models import embed

    accelerator = Accelerator(cpu=True)
    m = create_backbone(ModelConfig(name="test_resnet"))
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    loader = accelerator.prepare(
        DataLoader(TensorDataset(torch.randn(10, 3, 32, 32) * 5 + 3, torch.arange(10)), batch_size=4)
    )
    feats, labels = embed(m, loader, accelerator)
    assert feats.shape == (10, m.num_features) and labels.tolist() == list(range(10))
    after = {k: v for k, v in m.state_dict().items() if "running" in k}
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert m.training  # the caller's mode is restored


def test_hub_weights_without_network_fail_fast_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(
        "lowshot.models.reachable", lambda url, timeout_s=3.0: False
    )  # as on an offline machine
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    t = time.perf_counter()
    with pytest.raises(WeightsError, match=re.escape("model.weights=PATH")):
        create_backbone(ModelConfig(name="resnet18", weights="hub"))
    assert time.perf_counter() - t < 30  # no minute of download retries
    assert before == huggingface_hub.constants.HF_HUB_OFFLINE  # restored for the rest of the process


def test_packaged_imagenet_weights_classify_photographs() -> None:
    """EfficientNet-Lite0 from its PyPI package, renamed onto timm's tf_efficientnet_lite0, recognises
    scikit-image's sample photographs (a cat, a cup of coffee) as ImageNet classes."""
    from PIL import Image
    from skimage import data

    from lowshot.models import packaged_state_dict

    full = timm.create_model("tf_efficientnet_lite0")
    full.load_state_dict(packaged_state_dict("efficientnet-lite0", full))
    full.eval()
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(full))
    with torch.no_grad():
        cat = full(tf(Image.fromarray(data.chelsea())).unsqueeze(0)).softmax(1)[0]
        coffee = full(tf(Image.fromarray(data.coffee())).unsqueeze(0)).softmax(1)[0]
    assert set(cat.topk(3).indices.tolist()) <= {
        281,
        282,
        283,
        284,
        285,
    }  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert int(coffee.argmax()) in (967, 968)  # espresso, cup
    # The backbone lowshot builds from the same weights gives the same pooled features.
    m = create_backbone(ModelConfig(name="tf_efficientnet_lite0", weights="efficientnet-lite0"))
    x = torch.randn(2, 3, 64, 64)
    full.reset_classifier(0)
    assert _same(m, full, x)
    with pytest.raises(WeightsError, match=re.escape("model.name=tf_efficientnet_lite0")):
        create_backbone(ModelConfig(name="resnet18", weights="efficientnet-lite0"))


def test_small_input_stem_keeps_spatial_resolution_and_round_trips(tmp_path: Path) -> None:
    """The CIFAR / MedMNIST-28 ResNet: 28 px in, a 4x4 map after the last stage (1x1 with the ImageNet stem)."""
    cfg = ModelConfig(name="resnet18", small_input_stem=True)
    m = create_backbone(cfg, in_chans=1)
    assert tuple(m.conv1.weight.shape) == (64, 1, 3, 3) and m.conv1.stride == (1, 1)
    x = torch.randn(2, 1, 28, 28)
    assert m.forward_features(x).shape[-2:] == (4, 4)
    assert create_backbone(ModelConfig(name="resnet18"), in_chans=1).forward_features(x).shape[-2:] == (1, 1)
    full = Config(model=cfg)
    save_checkpoint(tmp_path / "ck", m, full, {"in_chans": 1})
    back = create_backbone(
        ModelConfig(name="resnet18", small_input_stem=True, weights=str(tmp_path / "ck")), 1
    )
    assert _same(m, back, x)
    with pytest.raises(WeightsError, match="small_input_stem"):
        create_backbone(ModelConfig(name="test_vit", small_input_stem=True), img_size=32)
