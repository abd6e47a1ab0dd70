"""Backbone factory: one name → one class; construction from a dataset or from a saved config."""

from __future__ import annotations

from typing import Any

from rcekd.data import Dataset
from rcekd.models.base import Recommender
from rcekd.models.hstu import HSTU
from rcekd.models.lightgcn import LightGCN
from rcekd.models.mf import MF

MODELS: dict[str, type[Recommender]] = {cls.arch: cls for cls in (MF, LightGCN, HSTU)}

__all__ = ["HSTU", "MF", "MODELS", "LightGCN", "Recommender", "build_model", "model_from_config"]


def _model_class(arch: str) -> type[Recommender]:
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; expected one of {sorted(MODELS)}")
    return MODELS[arch]


def build_model(arch: str, dataset: Dataset, **hparams: Any) -> Recommender:
    """A fresh model for ``dataset``; graph/sequence backbones take the training split they need."""
    cls = _model_class(arch)
    if cls in (LightGCN, HSTU):
        hparams["train"] = dataset.train
    return cls(dataset.n_users, dataset.n_items, **hparams)


def model_from_config(config: dict[str, Any]) -> Recommender:
    """An empty model shaped by a saved ``config.json`` (buffers are resized when weights load)."""
    params = dict(config)
    cls = _model_class(params.pop("arch"))
    return cls(**params)
