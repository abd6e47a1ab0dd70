"""A teacher's training trajectory (HetComp's curriculum): its saved epoch checkpoints as teachers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from rcekd.kd.base import Teacher

_EPOCH = re.compile(r"epoch_(\d+)\.safetensors$")


def load_trajectory(
    teacher_dir: str | Path,
    final: Teacher | None = None,
    *,
    n_checkpoints: int | None = 4,
    device: torch.device | None = None,
) -> list[Teacher]:
    """[early, …, final] teachers from a teacher artifact's saved trajectory.

    Checkpoints saved after the teacher's best epoch are dropped (the final teacher is the best one);
    ``n_checkpoints`` (counting the final) keeps that many evenly spaced, the latest early one included
    (None: all). ``final`` defaults to the artifact's own weights. Checksums are verified. Raises
    ValueError when no earlier checkpoint exists: HetComp cannot distil such a teacher.
    """
    from rcekd.checkpoint import (  # imported here: the checkpoint module is not needed to run HetComp itself
        CONFIG,
        load_model,
        load_weights,
        model_from_weights,
        read_manifest,
        trajectory_paths,
        verify_files,
    )

    teacher_dir = Path(teacher_dir)
    manifest = read_manifest(teacher_dir)
    verify_files(teacher_dir, manifest)
    best = manifest.get("training", {}).get("best_epoch")
    paths = [
        path
        for path in trajectory_paths(teacher_dir)
        if (match := _EPOCH.search(path.name)) and (not best or int(match.group(1)) < best)
    ]
    if not paths:
        raise ValueError(
            f"{teacher_dir} has no training trajectory before its best epoch: HetComp cannot use it "
            "(retrain the teacher with trajectory checkpoints, e.g. --trajectory-every 10)"
        )
    if n_checkpoints is not None:
        if n_checkpoints < 2:
            raise ValueError("n_checkpoints counts the final teacher and must be ≥ 2")
        keep = np.unique(np.linspace(0, len(paths) - 1, min(n_checkpoints - 1, len(paths))).round().astype(int))
        paths = [paths[i] for i in keep]
    config = json.loads((teacher_dir / CONFIG).read_text())
    scale = final.logit_scale if final is not None else None
    early = [
        Teacher(model_from_weights(config, load_weights(path)), logit_scale=scale, device=device) for path in paths
    ]
    if final is None:
        final = Teacher(load_model(teacher_dir, verify=False)[0], device=device)
    return [*early, final]
