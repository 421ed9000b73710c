"""GaLore (Zhao et al., ICML 2024) on the hidden matrices: galore-torch's GaLoreAdamW, checkpointable.

The optimizer is the reference `galore_torch.GaLoreAdamW` (galore-torch 1.0) unchanged: a copy of
transformers' old AdamW that, for parameters in a group with the keys `rank`, `update_proj_gap`,
`scale` and `proj_type`, keeps Adam's moments in a rank-r subspace of the gradient. Per matrix its
state holds `step` (a Python int), `exp_avg` and `exp_avg_sq` (the projected gradient's shape) and a
`GaLoreProjector` object whose `ortho_matrix` is refreshed by an SVD of the gradient whenever
`step % update_proj_gap == 0`.

Two things are added here, nothing about the maths changes:

* Checkpoints. torch.load(weights_only=True) cannot unpickle a GaLoreProjector, so `state_dict()`
  replaces each projector by a dict of its attributes (tensors and plain numbers/strings) and
  `load_state_dict()` rebuilds the projector from that dict. `ortho_matrix` is stored as the very
  tensor the projector holds: a slice of the full SVD factor, which torch.save writes with its whole
  storage, offset and strides, so after loading the projector holds the same memory and the same
  strides and training continues bit for bit.
* Lazy import. galore_torch imports transformers and bitsandbytes (seconds of import time, a
  bitsandbytes log line about optional CPU kernels, deprecation warnings from their imports), so it
  is imported only when a GaLore optimizer is built: `galore_adamw_class()` imports it quietly on
  first use and builds the subclass once.

Behaviour worth knowing (galore-torch 1.0, galore_projector.py):
* rank > min(m, n) is not an error: the SVD factors are sliced with [:rank], which silently gives
  min(m, n) directions (a full rotation, no compression). One exception: proj_type reverse_std on
  a wide m x n matrix (m < n) with rank >= m crashes in project_back (it infers the side from the
  projected gradient's shape, which is then square); build_galore refuses that up front.
* The projector's ortho_matrix is a slice of the SVD factor, so it pins the whole factor: for
  proj_type std that is min(m, n)^2 floats per fp32 matrix, whatever the rank (for non-fp32 params
  the slice is cast, i.e. copied, and pins only r x n or m x r elements).
"""

import logging
import warnings

import torch

__all__ = ["galore_adamw_class", "build_galore", "projector_to_dict"]

_CLASS = None  # the GaLoreAdamW subclass, built on first use
_PLAIN = (bool, int, float, str, type(None))


def _import_galore():
    """Imports galore_torch without the noise of its dependencies' imports; returns
    (GaLoreAdamW, GaLoreProjector)."""
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward from kernels-community"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            from galore_torch import GaLoreAdamW
            from galore_torch.galore_projector import GaLoreProjector
    finally:
        bnb_logger.setLevel(level)
    return GaLoreAdamW, GaLoreProjector


def projector_to_dict(projector) -> dict:
    """A GaLoreProjector's attributes as plain data (tensors, lists of tensors, numbers, strings)."""
    out = {}
    for key, value in vars(projector).items():
        ok = isinstance(value, _PLAIN + (torch.Tensor,)) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value))
        if not ok:
            raise TypeError(f"GaLoreProjector.{key} is a {type(value).__name__}; cannot checkpoint it as plain data")
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _to_device_keeping_layout(t, device):
    """`t` on `device` with its whole storage, offset and strides (t itself when already there), so
    a projector loaded onto another device holds the same memory and layout as one never saved."""
    if t.device == torch.device(device):
        return t
    whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
    return whole.to(device).as_strided(t.size(), t.stride(), t.storage_offset())


def _projector_from_dict(projector_cls, data: dict, device):
    projector = projector_cls(rank=data["rank"])
    for key, value in data.items():
        if isinstance(value, list):
            value = [_to_device_keeping_layout(v, device) for v in value]
        elif not isinstance(value, _PLAIN):
            value = _to_device_keeping_layout(value, device)
        setattr(projector, key, value)
    return projector


def galore_adamw_class():
    """galore_torch.GaLoreAdamW with a weights_only-loadable state_dict (imports galore_torch)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    base, projector_cls = _import_galore()

    class CheckpointableGaLoreAdamW(base):
        """galore_torch.GaLoreAdamW; state_dict() holds each projector as a dict of plain data."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
            # no_deprecation_warning: the FutureWarning is about transformers' AdamW, not GaLore
            super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             correct_bias=correct_bias, no_deprecation_warning=True)

        def state_dict(self):
            sd = super().state_dict()
            # super() shares the live per-parameter dicts: build new ones, never touch self.state
            sd["state"] = {
                pid: {**s, "projector": projector_to_dict(s["projector"])} if "projector" in s else s
                for pid, s in sd["state"].items()
            }
            return sd

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            # torch.optim's load deep-copies state and mangles strings (it rebuilds every iterable
            # with type(value)(generator)), so the projectors are rebuilt from the saved dicts.
            saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            for saved_id, p in zip(saved_ids, params):
                saved = state_dict["state"].get(saved_id)
                if saved is not None and isinstance(saved.get("projector"), dict):
                    self.state[p]["projector"] = _projector_from_dict(projector_cls, saved["projector"], p.device)

    CheckpointableGaLoreAdamW.__module__ = __name__
    CheckpointableGaLoreAdamW.__qualname__ = "CheckpointableGaLoreAdamW"
    _CLASS = CheckpointableGaLoreAdamW
    return _CLASS


def build_galore(params, cfg):
    """GaLoreAdamW on `params` (the hidden matrices), all in one group with the GaLore keys.

    `cfg` is optimizers.GaLoreConfig: lr, betas, eps, weight_decay and group_params (rank,
    update_proj_gap, scale, proj_type)."""
    gp = cfg.group_params
    params = list(params)
    if gp.proj_type == "reverse_std":
        for p in params:
            m, n = p.shape[0], p.shape[-1]
            if m < n and gp.rank >= m:
                raise ValueError(
                    f"galore-torch's proj_type reverse_std fails on a wide {m}x{n} matrix when group_params.rank "
                    f"({gp.rank}) >= {m} (project_back picks the wrong side); use a smaller rank or proj_type std")
    group = dict(params=list(params), rank=gp.rank, update_proj_gap=gp.update_proj_gap, scale=gp.scale,
                 proj_type=gp.proj_type)
    return galore_adamw_class()([group], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
