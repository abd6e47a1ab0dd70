"""Uploaded teachers: every accepted format loads and scores like its source; anything unsafe is refused."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

import rcekd.kd.onnx_teacher
from rcekd.checkpoint import CheckpointError, save_artifact
from rcekd.data import Dataset
from rcekd.kd import Teacher, make_distiller
from rcekd.kd.onnx_teacher import OnnxScoresTeacher
from rcekd.models import MF, build_model
from rcekd.pipeline import dataset_record
from rcekd.teacher_import import (
    SCORE_METHODS,
    VECTOR_METHODS,
    ImportedTeacher,
    MethodUnsupported,
    import_teacher,
    require_method,
)

#: settings scaled to the 60-item tiny dataset (as in tests/rcekd/kd/test_distillers.py)
OPTIONS: dict[str, dict[str, Any]] = {
    "rcekd": {"K": 10, "L": 10, "mxK": 30, "weight": 50.0},
    "ce": {"K": 30, "weight": 50.0},
    "cd": {"n_samples": 5, "mxK": 20, "weight": 5.0},
    "rrd": {"K": 10, "L": 20, "mxK": 30, "weight": 0.5},
}


class MakesMarker:
    """Unpickling this creates ``marker``: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


class ScoresModule(torch.nn.Module):
    """user_ids → user_vecs[user_ids] @ item_vecs.T: an MF teacher as a scores-only graph."""

    def __init__(self, model: MF) -> None:
        super().__init__()
        self.users = torch.nn.Parameter(model.user_emb.weight.detach().clone())
        self.items = torch.nn.Parameter(model.item_emb.weight.detach().clone())

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        return self.users[user_ids] @ self.items.T


@pytest.fixture(scope="module")
def mf(tiny_dataset: Dataset) -> MF:
    torch.manual_seed(0)
    return MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.5).eval()


@pytest.fixture(scope="module")
def onnx_path(mf: MF, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dynamo exporter (torch ≥ 2.9's default), as one file: uploads cannot carry external data."""
    path = tmp_path_factory.mktemp("onnx") / "teacher.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ScoresModule(mf),
            (torch.tensor([0, 1]),),
            str(path),
            input_names=["user_ids"],
            output_names=["scores"],
            dynamic_shapes={"user_ids": {0: torch.export.Dim("batch")}},
            dynamo=True,
            external_data=False,
            optimize=False,
        )
    return path


def _artifact(directory: Path, model: MF, dataset: Dataset, trajectory: bool = False) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_artifact(
        directory,
        model,
        role="teacher",
        dataset=dataset_record(dataset),
        metrics={},
        training={"best_epoch": 30},
        trajectory=[(10, state), (20, state)] if trajectory else None,
    )
    return directory


def _tar(path: Path, source: Path, arcname: str, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        archive.add(source, arcname=arcname)
    return path


def _zip(path: Path, source: Path, prefix: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(source.rglob("*")):
            if file.is_file():
                archive.write(file, f"{prefix}{file.relative_to(source)}")
    return path


def _check_scores(imported: ImportedTeacher, model: MF) -> None:
    users = torch.tensor([0, 3, 3, 39, 7])
    items = torch.randint(0, model.n_items, (5, 12), generator=torch.Generator().manual_seed(1))
    expected = Teacher(model).score(users, items)
    torch.testing.assert_close(imported.teacher.score(users, items), expected, atol=1e-5, rtol=1e-5)


def _left_in(workdir: Path) -> list[Path]:
    return list(workdir.rglob("*")) if workdir.exists() else []


# ------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize(
    ("kind", "name"),
    [("tar.gz", "upload.bin"), ("tar", "teacher.tar"), ("zip", "teacher.zip"), ("zip-root", "teacher.pt")],
)
def test_artifact_archives_import_and_verify(
    kind: str, name: str, mf: MF, tiny_dataset: Dataset, tmp_path: Path
) -> None:
    source = _artifact(tmp_path / "src" / "mf", mf, tiny_dataset)
    upload = tmp_path / name
    if kind.startswith("tar"):
        _tar(upload, source, "mf", "w:gz" if kind == "tar.gz" else "w")
    else:
        _zip(upload, source, "" if kind == "zip-root" else "mf/")
    imported = import_teacher(upload, tiny_dataset, tmp_path / "work")
    assert imported.format == "artifact" and imported.verified
    assert imported.fingerprint == tiny_dataset.fingerprint
    assert imported.manifest["role"] == "teacher" and imported.model is not None
    assert imported.supports == VECTOR_METHODS - {"hetcomp"} and imported.trajectory_dir is None
    _check_scores(imported, mf)


def test_safetensors_with_config_metadata(mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "weights.dat"  # misleading name: detected by its header
    metadata = {"config": json.dumps(mf.config()), "dataset_fingerprint": tiny_dataset.fingerprint}
    save_file({k: v.contiguous() for k, v in mf.state_dict().items()}, str(path), metadata=metadata)
    imported = import_teacher(path, tiny_dataset, tmp_path / "work")
    assert (imported.format, imported.verified, imported.manifest["arch"]) == ("safetensors", True, "mf")
    assert imported.manifest["hyperparameters"]["dim"] == 8
    _check_scores(imported, mf)


def test_bare_safetensors_takes_the_callers_spec(mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in mf.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="architecture"):
        import_teacher(path, tiny_dataset, tmp_path / "work")
    imported = import_teacher(path, tiny_dataset, tmp_path / "work", arch="mf", hyperparameters={"dim": 8})
    assert imported.fingerprint is None and not imported.verified
    _check_scores(imported, mf)


@pytest.mark.parametrize(("wrap", "name"), [(None, "model.pt"), ("state_dict", "model.onnx"), ("model", "x.bin")])
def test_state_dict_imports(wrap: str | None, name: str, mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / name
    state = mf.state_dict()
    torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    imported = import_teacher(path, tiny_dataset, tmp_path / "work", arch="mf", hyperparameters={"dim": 8})
    assert imported.format == "state_dict" and not imported.verified
    assert imported.supports == VECTOR_METHODS - {"hetcomp"}
    _check_scores(imported, mf)


@pytest.mark.parametrize("buffers", [True, False])
def test_lightgcn_state_dict_takes_missing_edges_from_the_dataset(
    buffers: bool, tiny_dataset: Dataset, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build_model("lightgcn", tiny_dataset, dim=8, n_layers=2).eval()
    state = {k: v for k, v in model.state_dict().items() if buffers or k != "edges"}
    torch.save(state, tmp_path / "lightgcn.pt")
    hyper = {"dim": 8, "n_layers": 2}
    imported = import_teacher(
        tmp_path / "lightgcn.pt", tiny_dataset, tmp_path / "work", arch="lightgcn", hyperparameters=hyper
    )
    users, items = torch.arange(40), torch.randint(0, 60, (40, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(imported.teacher.score(users, items), Teacher(model).score(users, items))


def test_onnx_scores_teacher_imports(onnx_path: Path, mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:
    upload = tmp_path / "teacher.pt"  # misleading name
    upload.write_bytes(onnx_path.read_bytes())
    imported = import_teacher(upload, tiny_dataset, tmp_path / "work")
    assert imported.format == "onnx_scores" and imported.model is None
    assert imported.fingerprint is None and not imported.verified
    assert imported.supports == SCORE_METHODS and imported.manifest["n_parameters"] == (40 + 60) * 8
    _check_scores(imported, mf)
    exclude = tiny_dataset.csr("train")
    assert torch.equal(imported.teacher.topk(10, exclude), Teacher(mf).topk(10, exclude))
    with pytest.raises(MethodUnsupported, match="vectors"):
        require_method(imported, "dcd")


def test_onnx_scores_chunk_over_distinct_users(
    onnx_path: Path, mf: MF, tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rcekd.kd.onnx_teacher, "CHUNK_SCORES", 3 * tiny_dataset.n_items)  # 3 users a run
    teacher = OnnxScoresTeacher.from_file(onnx_path, tiny_dataset.n_users, tiny_dataset.n_items, logit_scale=2.0)
    calls: list[int] = []
    run = teacher._run
    monkeypatch.setattr(teacher, "_run", lambda users: calls.append(len(users)) or run(users))
    users = torch.tensor([9, 1, 9, 30, 2, 1, 5, 30, 0, 17])
    items = torch.randint(0, 60, (10, 7), generator=torch.Generator().manual_seed(0))
    expected = Teacher(mf, logit_scale=2.0).score(users, items)
    torch.testing.assert_close(teacher.score(users, items), expected, atol=1e-5, rtol=1e-5)
    assert calls == [3, 3, 1]  # 7 distinct users, never more than 3 at once
    assert torch.equal(teacher.topk(5), Teacher(mf).topk(5))


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_score_only_methods_match_the_vector_teacher(
    method: str, onnx_path: Path, mf: MF, tiny_dataset: Dataset
) -> None:
    losses = []
    for teacher in (Teacher(mf), OnnxScoresTeacher.from_file(onnx_path, tiny_dataset.n_users, tiny_dataset.n_items)):
        torch.manual_seed(1)
        student = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=4, init_std=0.1)
        distiller = make_distiller(method, teacher, tiny_dataset, seed=0, **OPTIONS[method])
        distiller.on_epoch_start(student, 1)
        batch = next(student.batches(tiny_dataset.train, 64, np.random.default_rng(0)))
        losses.append(float(distiller.loss(batch, student).detach()))
    assert losses[0] > 0 and abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0]))


# ------------------------------------------------------------------------------------ refusals
def test_malicious_pickles_are_refused_without_running(mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save(MakesMarker(marker), tmp_path / "evil.pt")
    torch.save({"state_dict": {"user_emb.weight": MakesMarker(marker)}}, tmp_path / "nested.pth")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(MakesMarker(marker)))
    torch.save(mf.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name, message in [
        ("evil.pt", "other than tensors.*io.open"),
        ("nested.pth", "other than tensors"),
        ("raw.pt", "raw pickle"),
        ("legacy.pt", "legacy"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            import_teacher(tmp_path / name, tiny_dataset, tmp_path / "work", arch="mf", hyperparameters={"dim": 8})
    assert not marker.exists()


def _evil_tar(path: Path, kind: str, target: Path) -> Path:
    with tarfile.open(path, "w") as archive:
        data = b"owned"
        info = tarfile.TarInfo("../evil" if kind == "dotdot" else str(target) if kind == "absolute" else "mf/link")
        if kind in ("symlink", "hardlink"):
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = str(target)
            archive.addfile(info)
        elif kind == "device":
            info.type = tarfile.CHRTYPE
            archive.addfile(info)
        else:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_tar_members_are_refused(kind: str, tiny_dataset: Dataset, tmp_path: Path) -> None:
    work = tmp_path / "deep" / "work"
    outside = tmp_path / "deep" / "evil"
    upload = _evil_tar(tmp_path / "upload.tar", kind, outside)
    with pytest.raises(CheckpointError, match="refused"):
        import_teacher(upload, tiny_dataset, work)
    assert not outside.exists() and not (tmp_path / "evil").exists()
    assert _left_in(work) == []


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_zip_members_are_refused(kind: str, tiny_dataset: Dataset, tmp_path: Path) -> None:
    upload, outside = tmp_path / "upload.zip", tmp_path / "evil"
    with zipfile.ZipFile(upload, "w") as archive:
        archive.writestr("mf/manifest.json", "{}")
        if kind == "symlink":
            link = zipfile.ZipInfo("mf/weights.safetensors")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(link, str(outside))
        else:
            archive.writestr("mf/../../evil" if kind == "dotdot" else str(outside), b"owned")
    with pytest.raises(CheckpointError, match="refused"):
        import_teacher(upload, tiny_dataset, tmp_path / "work")
    assert not outside.exists() and _left_in(tmp_path / "work") == []


def test_oversized_archives_are_refused(mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:
    source = _artifact(tmp_path / "src" / "mf", mf, tiny_dataset)
    tar = _tar(tmp_path / "a.tar.gz", source, "mf")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mf/manifest.json", "{}")
        archive.writestr("mf/zeros", bytes(8 << 20))  # 8 MiB of zeros, a few KiB compressed
    assert bomb.stat().st_size < 100_000
    for upload in (tar, bomb):
        with pytest.raises(CheckpointError, match="bytes"):
            import_teacher(
                upload, tiny_dataset, tmp_path / "work", max_extract_bytes=1 << 20 if upload == bomb else 500
            )
    with pytest.raises(CheckpointError, match="members"):
        import_teacher(tar, tiny_dataset, tmp_path / "work", max_members=2)
    assert _left_in(tmp_path / "work") == []


def test_wrong_shapes_name_the_weight(mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(mf.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"user_emb\.weight has shape \(40, 8\), config expects \(40, 16\)"):
        import_teacher(path, tiny_dataset, tmp_path / "work", arch="mf", hyperparameters={"dim": 16})
    torch.save(MF(41, tiny_dataset.n_items, dim=8).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"\(41, 8\).*\(40, 8\).*40 users × 60 items"):
        import_teacher(path, tiny_dataset, tmp_path / "work", arch="mf", hyperparameters={"dim": 8})
    other = MF(41, tiny_dataset.n_items, dim=8)
    save_file(
        dict(other.state_dict()), str(tmp_path / "w.safetensors"), metadata={"config": json.dumps(other.config())}
    )
    with pytest.raises(CheckpointError, match="41 users × 60 items, the dataset 40 × 60"):
        import_teacher(tmp_path / "w.safetensors", tiny_dataset, tmp_path / "work")


def test_fingerprint_mismatch_is_refused(
    mf: MF, tiny_dataset: Dataset, tiny_dataset_carved: Dataset, tmp_path: Path
) -> None:
    assert tiny_dataset_carved.fingerprint != tiny_dataset.fingerprint
    source = _artifact(tmp_path / "src" / "mf", mf, tiny_dataset_carved)
    upload = _tar(tmp_path / "a.tar.gz", source, "mf")
    with pytest.raises(CheckpointError, match=f"trained on dataset {tiny_dataset_carved.fingerprint[:12]}"):
        import_teacher(upload, tiny_dataset, tmp_path / "work")
    assert _left_in(tmp_path / "work") == []  # the refused teacher's files are gone
    path = tmp_path / "w.safetensors"
    save_file(
        dict(mf.state_dict()), str(path), metadata={"config": json.dumps(mf.config()), "dataset_fingerprint": "x"}
    )
    with pytest.raises(CheckpointError, match="this dataset is"):
        import_teacher(path, tiny_dataset, tmp_path / "work")


def test_hetcomp_needs_a_trajectory(mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:
    plain = _tar(tmp_path / "plain.tar.gz", _artifact(tmp_path / "a" / "mf", mf, tiny_dataset), "mf")
    imported = import_teacher(plain, tiny_dataset, tmp_path / "work")
    with pytest.raises(MethodUnsupported, match="trajectory"):
        require_method(imported, "hetcomp")
    with pytest.raises(MethodUnsupported, match="unknown"):
        require_method(imported, "nope")
    source = _artifact(tmp_path / "b" / "mf", mf, tiny_dataset, trajectory=True)
    imported = import_teacher(_tar(tmp_path / "traj.tar.gz", source, "mf"), tiny_dataset, tmp_path / "work")
    require_method(imported, "hetcomp")
    assert imported.supports == VECTOR_METHODS and imported.trajectory_dir is not None
    assert imported.trajectory_dir.is_relative_to(tmp_path / "work")
    options = {"p": 2, "top_k": 20, "n_negatives": 30, "max_positives": 10}
    make_distiller("hetcomp", imported.teacher, tiny_dataset, trajectory=str(imported.trajectory_dir), **options)


def _gather_graph(n_users: int, width: int, *, out_name: str = "scores", in_type: int = TensorProto.INT64) -> bytes:
    """user_ids → table[user_ids]: a scores graph whose output has ``width`` columns (shape left symbolic)."""
    table = numpy_helper.from_array(np.zeros((n_users, width), dtype=np.float32), "table")
    ids = helper.make_tensor_value_info("user_ids", in_type, ["batch"])
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", "n"])
    nodes = [helper.make_node("Cast", ["user_ids"], ["ids"], to=TensorProto.INT64)]
    nodes.append(helper.make_node("Gather", ["table", "ids"], [out_name], axis=0))
    graph = helper.make_graph(nodes, "scores", [ids], [out], initializer=[table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 61}, r"float32\[2, 60\]"),
        ({"width": 60, "out_name": "logits"}, "must output 'scores'"),
        ({"width": 60, "in_type": TensorProto.INT32}, "must be int64"),
    ],
)
def test_bad_onnx_teachers_are_refused(
    options: dict[str, Any], message: str, tiny_dataset: Dataset, tmp_path: Path
) -> None:
    path = tmp_path / "teacher.onnx"
    path.write_bytes(_gather_graph(tiny_dataset.n_users, **options))
    onnx.checker.check_model(onnx.load(str(path)))  # valid ONNX: refused for its contract, not its syntax
    with pytest.raises(CheckpointError, match=message):
        import_teacher(path, tiny_dataset, tmp_path / "work")


@pytest.mark.parametrize("data", [b"", b"hello, not a model at all\n" * 40, bytes(range(256)) * 8])
def test_garbage_is_unrecognised(data: bytes, tiny_dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="unrecognised"):
        import_teacher(path, tiny_dataset, tmp_path / "work")
