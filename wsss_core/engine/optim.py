"""The SGD of the WSSS references, with their momentum-equals-weight-decay quirk (switch ``fix_quirk``).

One place builds every such optimizer: the classifier stage (:func:`wsss_core.methods.base.make_optimizer`, PPC,
SIPE, SFC, FSAE on them), AffinityNet and IRN. The learning-rate schedule (poly) is the trainer's
(:func:`wsss_core.engine.trainer.poly_lambda`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch


def poly_sgd_param_groups(groups: Iterable[tuple[str, Iterable, float]],
                          cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """SGD groups of the IRN family's PolyOptimizerSGD (SIPE, SFC, IRN) from ``(name, params, lr multiplier)``:
    lr ``cfg['lr'] * mult`` and weight decay ``cfg['weight_decay']`` (1e-4) on every group; :func:`reference_sgd` gives
    them their momentum (the quirk)."""
    wd = float(cfg.get("weight_decay", 1e-4))
    lr = float(cfg["lr"])
    return [{"params": list(params), "lr": lr * float(mult), "weight_decay": wd, "name": name}
            for name, params, mult in groups]


def reference_sgd(groups: Iterable[dict[str, Any]], cfg: Mapping[str, Any], weight_decay: float = 1e-4,
                  quirk: bool = True) -> torch.optim.SGD:
    """``torch.optim.SGD`` over ``groups`` (each with its ``lr``; a group's own ``weight_decay`` or ``momentum`` wins)
    with lr ``cfg['lr']``, weight decay ``cfg['weight_decay']`` (default ``weight_decay``) and momentum:

    - ``quirk`` and not ``cfg['fix_quirk']`` (the default): the weight decay. The references' optimizer,
      ``jiwoon-ahn/psa`` ``tool/torchutils.py::PolyOptimizer`` (as called by ``usr922/wseg``
      ``tool/torchutils.py`` / ``util/torchutils.py`` and PSA's ``train_aff.py``; IRN's and SIPE's
      ``PolyOptimizerSGD``), calls ``super().__init__(params, lr, weight_decay)``: the weight decay lands in SGD's
      third positional slot, *momentum*, while each group keeps its own ``weight_decay``;
    - otherwise (``fix_quirk: true``, or ``quirk=False`` for optimizers without the quirk, e.g. the CAM baseline):
      ``cfg['momentum']`` (0.9).

    torch fills the groups' missing values in place (so ``groups[i]['momentum']`` can be read afterwards). The poly
    schedule is the trainer's LambdaLR."""
    wd = float(cfg.get("weight_decay", weight_decay))
    momentum = wd if quirk and not cfg.get("fix_quirk", False) else float(cfg.get("momentum", 0.9))
    return torch.optim.SGD(list(groups), lr=float(cfg["lr"]), momentum=momentum, weight_decay=wd,
                           nesterov=bool(cfg.get("nesterov", False)) and momentum > 0)


def weight_bias_groups(parts: Iterable[tuple[str, Iterable[tuple[str, torch.nn.Parameter]], float]],
                       cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """PuzzleCAM-style groups (CHENDL-SHEN/ESC and MSA ``train*.py``): for each ``(name, named parameters, mult)``,
    the trainable weights (any parameter whose name does not end in ``bias``, BN scales included) at
    ``lr * mult`` with ``cfg['weight_decay']``, the biases at ``2 * lr * mult`` without weight decay. Empty groups
    are dropped. The SGD over them: :func:`reference_sgd` (the quirk; ``nesterov`` from ``cfg``)."""
    lr, wd = float(cfg["lr"]), float(cfg.get("weight_decay", 1e-4))
    out = []
    for name, named, mult in parts:
        w, b = [], []
        for pname, p in named:
            if p.requires_grad:
                (b if pname.endswith("bias") else w).append(p)
        out += [{"params": w, "lr": lr * mult, "weight_decay": wd, "name": f"{name}_w"},
                {"params": b, "lr": 2 * lr * mult, "weight_decay": 0.0, "name": f"{name}_b"}]
    return [g for g in out if g["params"]]
