"""The method contract, over every registered method (a new method is tested the moment it registers itself):
a tiny build -> one training step on a batch from the real data path (``stages.classifier.training_data``) ->
its final weights saved and reloaded as the CAM stage does -> CAM inference of one image through
``methods.inference.method_cams``. Plus the registry's errors and a plugin loaded from outside the package."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from wsss_core.config import deep_merge, stage_config
from wsss_core.errors import ConfigError
from wsss_core.methods import get_method, load_plugins, register_method, registered_methods, registry

# ---- tiny settings -------------------------------------------------------------------------------------------

TINY_RESNET = {"backbone": {"arch": "resnet50", "layers": [1, 1, 1, 1], "width_per_group": 8, "weights": None}}
#: every method: small crops, batch 2, no pretrained weights, no workers
SHRINK = {"backbone": {"weights": None}, "batch_size": 2, "crop_size": 32, "resize_long": [32, 48], "max_steps": 1,
          "num_workers": 0, "amp": False}
_TINY_RESNEST = {"backbone": {"arch": "resnest50", "layers": [1, 1, 1, 1], "width_per_group": 8, "stem_width": 8,
                             "weights": None}}
_TINY_PPC = {"backbone": {"arch": "resnet38", "width": 0.0625, "weights": None}, "ppc": {"view2_size": 16}}
#: per built-in method, on top of its experiment's toy settings (a method not listed here: TINY_RESNET when its
#: backbone is a ResNet-50/101, e.g. the dataset's toy default, else only SHRINK)
TINY = {
    "cam": TINY_RESNET,
    "sipe": TINY_RESNET,
    "sfc": TINY_RESNET,
    "ppc": _TINY_PPC,
    "fsae": _TINY_PPC,  # the experiment named fsae's base (ppc_fsae: PPC)
    "mctformer": {"backbone": {"arch": "vit", "embed_dim": 16, "depth": 3, "heads": 2, "patch_size": 8,
                               "img_size": 32, "drop_path": 0.0, "weights": None}},
    "eps_cam": _TINY_RESNEST,
    # an untrained superpixel network in place of the one train_scn makes (the stage sets superpixels.weights)
    "spcam": {**_TINY_RESNEST, "superpixels": {"weights": None}},
    "msa": {**TINY_RESNET, "msa": {"patches": 1}, "superpixels": {"weights": None}},   # 2x2 grid: one patch
    # the segmentation loss from step 0 (the contract runs one step)
    "rtc": {"backbone": {"arch": "resnet38", "width": 0.0625, "weights": None},
            "rtc": {"view2_size": 16, "seg_start": 0.0, "refine_iters": 2}},
}


def tiny_classifier_cfg(name: str) -> dict:
    """Tiny ``classifier`` settings for method ``name``: the toy settings of the experiment of ``config.yaml``
    named after it (else the first one that uses it; none: the dataset's toy defaults), shrunk by :data:`SHRINK`
    and :data:`TINY` (or the generic tiny ResNet-50)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    exps = [e for e, x in (config.get("experiments") or {}).items() if (x or {}).get("method") == name]
    exp = name if name in exps else (exps[0] if exps else None)
    cfg = deep_merge(stage_config(config, "toy", exp, "classifier"), SHRINK)
    if name in TINY:
        return deep_merge(cfg, TINY[name])
    return deep_merge(cfg, TINY_RESNET) if cfg["backbone"].get("arch") in ("resnet50", "resnet101") else cfg


# ---- the contract ----------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A prepared toy dataset (4 train_aug images of 48 px, 3 classes) and its stand-in saliency manifest."""
    from wsss_core.data.prepare import prepare_dataset
    from wsss_core.data.saliency import saliency_manifest
    from wsss_core.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("contract")
    make_toy_dataset(root / "toy", seed=3, image_size=48, n_train_aug=4, n_train=2, n_val=1, n_classes=3)
    prepare_dataset({"kind": "toy", "root": str(root / "toy")}, "toy", root / "prepared")
    saliency_manifest({"kind": "toy"}, root / "prepared", ["train_aug"], root / "saliency" / "manifest.json")
    return {"root": root, "prepared": str(root / "prepared"), "saliency": str(root / "saliency" / "manifest.json")}


def check_method_contract(name: str, toy: dict, cfg: dict | None = None) -> None:
    """Method ``name`` trains one step and infers CAMs of one image, as the pipeline's classifier stages do."""
    from wsss_core.data.io import read_image
    from wsss_core.data.prepare import DatasetInfo
    from wsss_core.engine.trainer import batch_stream, batch_to_device, save_final
    from wsss_core.methods.base import make_optimizer
    from wsss_core.methods.inference import method_cams
    from wsss_core.stages.classifier import load_method_model, training_data

    cfg = tiny_classifier_cfg(name) if cfg is None else cfg
    cpu = torch.device("cpu")
    info = DatasetInfo(toy["prepared"])
    ids = info.ids("train_aug")
    m = get_method(name)
    torch.manual_seed(0)
    model = m.build_model(cfg, info.n_classes - 1, cache_dir=str(toy["root"] / "weights")).to(cpu)
    optimizer = make_optimizer(m, model, cfg)
    data = training_data(m, cfg, info, ids, seed=0, saliency=toy["saliency"])
    if hasattr(m, "setup"):
        m.setup(model, info.multi_hot(ids), cfg)
    batch = batch_to_device(next(iter(batch_stream(data, cfg["batch_size"], seed=0, start_step=0))), cpu)
    assert batch["image"].shape[:2] == (2, 3) and batch["label"].shape == (2, info.n_classes - 1)

    model.train()
    out = m.training_step(model, batch, 0, cfg)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), f"{name}: no or non-finite gradients"
    assert any(g.abs().sum() > 0 for g in grads), f"{name}: the loss reaches no parameter"
    if cfg.get("max_grad_norm"):
        torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), f"{name}: the optimizer step changed nothing"
    if hasattr(m, "after_step"):
        m.after_step(model, 0, cfg)

    # the CAM stage rebuilds the model from its final weights file
    path = toy["root"] / f"{name}_final.pt"
    save_final(path, model, {"method": name, "classes": info.classes, "cfg": dict(cfg)})
    m2, model2, _ = load_method_model(str(path), cpu, weights_dir=str(toy["root"] / "weights"))
    assert m2 is m and not model2.training
    image_id = ids[0]
    image = read_image(info.image_path(image_id))
    keys = info.labels(image_id)
    keys_out, cams, aux = method_cams(m, model2, image, keys, [1.0, 0.75], True, cpu)
    keys_out = [int(k) for k in keys_out]
    assert keys_out in (list(keys), [0, *keys]), f"{name}: keys {keys_out} for labels {keys}"
    cams = np.asarray(cams)
    assert cams.shape == (len(keys_out), *image.shape[:2]), f"{name}: cams {cams.shape}, image {image.shape}"
    assert np.isfinite(cams).all() and (cams >= 0).all(), f"{name}: negative or non-finite CAMs"
    if aux is not None:
        aux = np.asarray(aux)
        assert aux.shape[1:] == image.shape[:2] and np.isfinite(aux).all()
    if hasattr(m, "infer_seg"):  # a single-stage method: its own segmentation output (fg score maps)
        seg_keys, maps = m.infer_seg(model2, image, [1.0], True, cpu)
        assert [int(k) for k in seg_keys] == list(range(1, info.n_classes)), f"{name}: infer_seg keys {seg_keys}"
        assert maps.shape == (info.n_classes - 1, *image.shape[:2]) and np.isfinite(maps).all()
        assert (maps >= 0).all() and (maps <= 1).all(), f"{name}: single-stage maps outside [0, 1]"


@pytest.mark.parametrize("name", registered_methods())
def test_method_contract(name, toy):
    check_method_contract(name, toy)


# ---- the registry ------------------------------------------------------------------------------------------------

PLUGIN = '''
"""A throwaway method: global-average-pooled 1x1 classifier on a ResNet, multi-label soft margin."""
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.methods import register_method
from wsss_core.models.backbones import resnet_from_config


class Net(nn.Module):
    def __init__(self, backbone, n_classes):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.out_channels, n_classes, 1, bias=False)

    def forward(self, x):
        return self.head(self.backbone(x)).mean((2, 3))


@register_method("{name}")
def build_model(cfg, n_classes, cache_dir="weights"):
    return Net(resnet_from_config(cfg["backbone"], cache_dir), n_classes)


def param_groups(model, cfg):
    return [{{"params": list(model.parameters()), "lr": cfg["lr"]}}]

{training_step}

def cam_forward(model, images):
    return F.relu(model.head(model.backbone(images)))
'''
TRAINING_STEP = '''
def training_step(model, batch, step, cfg):
    return {"loss": F.multilabel_soft_margin_loss(model(batch["image"]), batch["label"])}
'''


@pytest.fixture()
def scratch_registry(monkeypatch, tmp_path):
    """Registrations made by the test are undone; ``tmp_path`` is on ``sys.path``."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PENDING", set(registry._PENDING))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [k for k in sys.modules if k.startswith("contract_plugin_")]:
        del sys.modules[mod]


def test_unknown_method_names_the_closest_one():
    with pytest.raises(KeyError, match=r"unknown method 'sipee'; did you mean 'sipe'\?.*'mctformer'"):
        get_method("sipee")


def test_registering_a_module_without_training_step_fails(scratch_registry):
    # a module already imported: checked at once
    mod = types.ModuleType("contract_plugin_bare")
    exec("def build_model(cfg, n_classes): pass\ndef param_groups(m, c): pass\ndef cam_forward(m, x): pass",
         mod.__dict__)
    sys.modules[mod.__name__] = mod
    with pytest.raises(TypeError, match=r"contract_plugin_bare \(registered as 'bare'\) lacks training_step"):
        register_method("bare")(mod.build_model)
    assert "bare" not in registered_methods()
    # decorating build_model in a module being imported: checked when its import ends
    (scratch_registry / "contract_plugin_nostep.py").write_text(PLUGIN.format(name="nostep", training_step=""))
    with pytest.raises(TypeError, match="lacks training_step"):
        load_plugins(["contract_plugin_nostep"])
    assert "nostep" not in registered_methods()
    # a name registered by another module
    with pytest.raises(ValueError, match="'cam' is already registered by wsss_core.methods.cam"):
        register_method("cam")(types.SimpleNamespace(__module__="contract_plugin_bare"))


def test_load_plugins_registers_a_module_that_passes_the_contract(scratch_registry, toy):
    (scratch_registry / "contract_plugin_gap.py").write_text(PLUGIN.format(name="gap", training_step=TRAINING_STEP))
    assert "gap" not in registered_methods()
    assert load_plugins(["contract_plugin_gap"]) == ["gap"]
    assert "gap" in registered_methods() and get_method("gap") is sys.modules["contract_plugin_gap"]
    check_method_contract("gap", toy)
    with pytest.raises(ConfigError, match="'contract_plugin_absent'"):
        load_plugins(["contract_plugin_absent"])
