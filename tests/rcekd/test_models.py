"""The backbone contract, run for every backbone: vectors, scores, learning, saving, seeding."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from rcekd.checkpoint import load_model, save_artifact, sha256_file
from rcekd.data import Dataset, Interactions
from rcekd.metrics import evaluate_model, full_report, ranking_metrics
from rcekd.models import HSTU, MF, MODELS, LightGCN, Recommender, build_model
from rcekd.models.base import bpr_batches
from rcekd.pipeline import dataset_record
from rcekd.train import TrainConfig, TrainResult, train

METRIC_NAMES = {"recall@10", "recall@20", "ndcg@10", "ndcg@20"}


@pytest.fixture(scope="module")
def random_valid_ndcg(tiny_dataset: Dataset) -> float:
    """Validation NDCG@10 of random scores: what a model that learned nothing gets."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(tiny_dataset.n_users, tiny_dataset.n_items, generator=generator)
    return float(ranking_metrics(lambda users: scores[users].clone(), tiny_dataset, "valid", ks=(10,))["ndcg@10"])


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


class BackboneContract:
    """What every :class:`Recommender` must do; a subclass per backbone fills in the settings."""

    arch: ClassVar[str]
    params: ClassVar[dict[str, Any]]  # tiny model hyper-parameters
    fit: ClassVar[dict[str, Any]]  # TrainConfig fields that make it learn the tiny data quickly

    @classmethod
    def build(cls, dataset: Dataset, init_seed: int = 0) -> Recommender:
        torch.manual_seed(init_seed)
        return build_model(cls.arch, dataset, **cls.params)

    @classmethod
    def config(cls, **overrides: Any) -> TrainConfig:
        fields = {"epochs": 30, "eval_every": 5, "patience": 100, "seed": 0, "device": "cpu", **cls.fit}
        return TrainConfig(**{**fields, **overrides})

    @pytest.fixture(scope="class")
    @classmethod
    def trained(cls, tiny_dataset: Dataset) -> tuple[Recommender, TrainResult]:
        """30 epochs on the tiny data, shared by the tests of one backbone (which must not modify it)."""
        model = cls.build(tiny_dataset)
        result = train(model, tiny_dataset, cls.config())
        model.eval()
        return model, result

    @pytest.fixture(scope="class")
    @classmethod
    def artifact(
        cls,
        trained: tuple[Recommender, TrainResult],
        tiny_dataset: Dataset,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> tuple[Path, dict[str, Any]]:
        model, result = trained
        directory = tmp_path_factory.mktemp(f"artifact_{cls.arch}") / "model"
        manifest = save_artifact(
            directory,
            model,
            role="teacher",
            dataset=dataset_record(tiny_dataset),
            metrics=full_report(model, tiny_dataset),
            training={"best_epoch": result.best_epoch},
        )
        return directory, manifest

    # --------------------------------------------------------------------------- (a) shapes
    def test_vectors_and_scores_have_the_documented_shapes(self, tiny_dataset: Dataset) -> None:
        model = self.build(tiny_dataset).eval()
        dim = self.params["dim"]
        users = torch.tensor([0, 5, 17, tiny_dataset.n_users - 1])
        items = torch.randint(0, tiny_dataset.n_items, (len(users), 7))
        with torch.no_grad():
            all_users, all_items = model.all_vectors()
            assert model.user_vectors(users).shape == (len(users), dim)
            assert model.item_vectors().shape == (tiny_dataset.n_items, dim)
            assert all_users.shape == (tiny_dataset.n_users, dim)
            assert all_items.shape == (tiny_dataset.n_items, dim)
            assert model.score(users, items).shape == (len(users), 7)
            assert model.full_scores(users).shape == (len(users), tiny_dataset.n_items)

    def test_arch_and_config_rebuild_the_same_architecture(self, tiny_dataset: Dataset) -> None:
        model = self.build(tiny_dataset)
        config = model.config()
        assert MODELS[config["arch"]] is type(model)
        assert (config["n_users"], config["n_items"]) == (tiny_dataset.n_users, tiny_dataset.n_items)
        assert {k: config[k] for k in self.params} == self.params
        assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0

    # --------------------------------------------------------------------------- (b) vectors = scores
    def test_score_is_the_dot_product_of_the_vectors(
        self, trained: tuple[Recommender, TrainResult], tiny_dataset: Dataset
    ) -> None:
        model, _ = trained
        users = torch.tensor([3, 0, 39, 12, 3])
        items = torch.randint(0, tiny_dataset.n_items, (len(users), 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            scores = model.score(users, items)
            from_vectors = (model.user_vectors(users) @ model.item_vectors().T).gather(1, items)
            all_users, all_items = model.all_vectors()
            from_all = (all_users[users] @ all_items.T).gather(1, items)
            full = model.full_scores(users)
        assert scores.abs().max() > 1e-3, "a trained model should not score everything ~0"
        torch.testing.assert_close(scores, from_vectors, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores, from_all, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full.gather(1, items), scores, rtol=1e-5, atol=1e-6)

    def test_all_vectors_agree_with_per_user_vectors(self, trained: tuple[Recommender, TrainResult]) -> None:
        model, _ = trained
        users = torch.tensor([7, 1, 30])
        with torch.no_grad():
            all_users, all_items = model.all_vectors()
            torch.testing.assert_close(all_users[users], model.user_vectors(users), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(all_items, model.item_vectors(), rtol=1e-5, atol=1e-6)

    def test_eval_mode_scores_are_repeatable(self, trained: tuple[Recommender, TrainResult]) -> None:
        model, _ = trained
        users = torch.arange(10)
        with torch.no_grad():
            assert torch.equal(model.full_scores(users), model.full_scores(users))

    # --------------------------------------------------------------------------- (c) learning
    def test_training_lowers_the_base_loss(self, trained: tuple[Recommender, TrainResult]) -> None:
        _, result = trained
        losses = [record["loss"] for record in result.history]
        assert len(losses) == 30
        assert np.isfinite(losses).all()
        assert max(losses[-5:]) < 0.5 * losses[0], losses

    def test_trained_model_beats_random_scores_on_validation(
        self, trained: tuple[Recommender, TrainResult], tiny_dataset: Dataset, random_valid_ndcg: float
    ) -> None:
        model, result = trained
        ndcg = evaluate_model(model, tiny_dataset, "valid")["ndcg@10"]
        assert ndcg == result.best_valid_ndcg
        assert ndcg > random_valid_ndcg + 0.1, (ndcg, random_valid_ndcg)

    # --------------------------------------------------------------------------- (d) save → load
    def test_manifest_records_identity_data_and_metrics(
        self,
        artifact: tuple[Path, dict[str, Any]],
        trained: tuple[Recommender, TrainResult],
        tiny_dataset: Dataset,
    ) -> None:
        model, _ = trained
        _, manifest = artifact
        assert isinstance(manifest["id"], str) and len(manifest["id"]) >= 16
        assert manifest["role"] == "teacher"
        assert manifest["arch"] == self.arch
        assert manifest["hyperparameters"] == {k: v for k, v in model.config().items() if k != "arch"}
        assert manifest["dataset"]["fingerprint"] == tiny_dataset.fingerprint
        assert set(manifest["metrics"]) == {"valid", "test", "test_paper"}
        for block in manifest["metrics"].values():
            assert set(block) == METRIC_NAMES
            assert all(0.0 <= value <= 1.0 for value in block.values())
        assert manifest["n_parameters"] == model.num_parameters()

    def test_manifest_file_hashes_match_the_files_on_disk(self, artifact: tuple[Path, dict[str, Any]]) -> None:
        directory, manifest = artifact
        on_disk = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        assert set(manifest["files"]) == on_disk - {"manifest.json"}
        assert {"weights.safetensors", "config.json"} <= set(manifest["files"])
        for name, meta in manifest["files"].items():
            assert meta["bytes"] == (directory / name).stat().st_size
            assert meta["sha256"] == sha256_file(directory / name)

    def test_loaded_model_has_identical_vectors_and_metrics(
        self,
        artifact: tuple[Path, dict[str, Any]],
        trained: tuple[Recommender, TrainResult],
        tiny_dataset: Dataset,
    ) -> None:
        model, _ = trained
        directory, manifest = artifact
        loaded, read_back = load_model(directory)
        assert read_back == manifest
        assert type(loaded) is type(model)
        assert not loaded.training
        assert state_equal(loaded.state_dict(), model.state_dict())
        with torch.no_grad():
            for theirs, ours in zip(loaded.all_vectors(), model.all_vectors(), strict=True):
                assert torch.equal(theirs, ours)
        assert full_report(loaded, tiny_dataset) == manifest["metrics"]

    # --------------------------------------------------------------------------- (e) seeding
    def test_same_seed_reproduces_and_another_seed_differs(self, tiny_dataset: Dataset) -> None:
        states, metrics = [], []
        for seed in (5, 5, 6):
            model = self.build(tiny_dataset, init_seed=123)
            train(model, tiny_dataset, self.config(epochs=6, eval_every=2, seed=seed))
            states.append(model.state_dict())
            metrics.append(evaluate_model(model, tiny_dataset, "test"))
        assert state_equal(states[0], states[1])
        assert metrics[0] == metrics[1]
        assert not state_equal(states[0], states[2])


class TestMF(BackboneContract):
    arch = "mf"
    params: ClassVar[dict[str, Any]] = {"dim": 16, "init_std": 0.1}
    fit: ClassVar[dict[str, Any]] = {"lr": 0.05, "batch_size": 128}

    def test_sparse_embedding_gradients_touch_only_the_batch_rows(self, tiny_dataset: Dataset) -> None:
        model = build_model("mf", tiny_dataset, **{**self.params, "sparse": True})
        batch = next(iter(model.batches(tiny_dataset.train, 8, np.random.default_rng(0))))
        model.base_loss(batch).backward()
        grad = model.user_emb.weight.grad
        assert grad is not None and grad.is_sparse
        assert set(grad.coalesce().indices()[0].tolist()) == set(batch["users"].tolist())

    def test_dense_and_sparse_updates_compute_the_same_loss_and_gradient(self, tiny_dataset: Dataset) -> None:
        torch.manual_seed(0)
        sparse = build_model("mf", tiny_dataset, **{**self.params, "sparse": True})
        dense = build_model("mf", tiny_dataset, **{**self.params, "sparse": False})
        dense.load_state_dict(sparse.state_dict())
        batch = next(iter(sparse.batches(tiny_dataset.train, 16, np.random.default_rng(0))))
        for model in (sparse, dense):
            model.base_loss(batch).backward()
        torch.testing.assert_close(sparse.item_emb.weight.grad.to_dense(), dense.item_emb.weight.grad)

    def test_sparse_updates_are_chosen_by_table_size(self) -> None:
        assert not MF(5_000, 25_000, dim=20).sparse_embeddings  # a student: dense is cheaper
        assert MF(30_000, 41_000, dim=300).sparse_embeddings  # Gowalla's teacher: 21M weights


class TestLightGCN(BackboneContract):
    arch = "lightgcn"
    params: ClassVar[dict[str, Any]] = {"dim": 16, "n_layers": 2, "init_std": 0.1}
    fit: ClassVar[dict[str, Any]] = {"lr": 0.05, "batch_size": 128}

    def test_propagation_is_the_mean_of_normalised_layers(self, tiny_dataset: Dataset) -> None:
        model = self.build(tiny_dataset)
        assert isinstance(model, LightGCN)
        R = torch.from_numpy(tiny_dataset.csr("train").toarray()).double()
        deg_u, deg_i = R.sum(1).clamp(min=1), R.sum(0).clamp(min=1)
        A = R / deg_u.sqrt()[:, None] / deg_i.sqrt()[None, :]
        users, items = model.user_emb.weight.detach().double(), model.item_emb.weight.detach().double()
        layers_u, layers_i = [users], [items]
        for _ in range(self.params["n_layers"]):
            users, items = A @ items, A.T @ users
            layers_u.append(users)
            layers_i.append(items)
        with torch.no_grad():
            got_users, got_items = model.all_vectors()
        torch.testing.assert_close(got_users.double(), torch.stack(layers_u).mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got_items.double(), torch.stack(layers_i).mean(0), rtol=1e-5, atol=1e-7)


class TestHSTU(BackboneContract):
    arch = "hstu"
    params: ClassVar[dict[str, Any]] = {
        "dim": 16,
        "n_blocks": 2,
        "n_heads": 2,
        "dqk": 4,
        "dv": 8,
        "max_len": 12,
        "dropout": 0.1,
        "temperature": 0.1,
        "n_negatives": 32,
    }
    fit: ClassVar[dict[str, Any]] = {"lr": 0.01, "batch_size": 16}

    def test_histories_are_the_last_items_left_padded(self, tiny_dataset: Dataset) -> None:
        max_len = 5
        histories = HSTU.left_padded(tiny_dataset.train, max_len)
        for user in range(tiny_dataset.n_users):
            part = tiny_dataset.train
            items = part.items[part.indptr[user] : part.indptr[user + 1]].tolist()[-max_len:]
            expected = [0] * (max_len - len(items)) + [item + 1 for item in items]
            assert histories[user].tolist() == expected

    def test_outputs_only_see_earlier_positions(self, tiny_dataset: Dataset) -> None:
        model = self.build(tiny_dataset).eval()
        tokens = torch.tensor([[0, 0, 4, 9, 2, 7, 1, 3, 5, 8, 6, 11]])
        changed = tokens.clone()
        changed[0, 7:] = torch.tensor([20, 21, 22, 23, 24])
        with torch.no_grad():
            before, after = model.encode(tokens), model.encode(changed)
        torch.testing.assert_close(before[:, :7], after[:, :7])
        assert not torch.allclose(before[:, 7:], after[:, 7:])

    def test_batches_visit_each_user_with_two_items_once(self, tiny_dataset: Dataset) -> None:
        model = self.build(tiny_dataset)
        batches = list(model.batches(tiny_dataset.train, 16, np.random.default_rng(0)))
        users = torch.cat([batch["users"] for batch in batches]).tolist()
        assert sorted(users) == np.flatnonzero(tiny_dataset.train.lengths() >= 2).tolist()
        assert all(batch["negatives"].shape == (self.params["n_negatives"],) for batch in batches)


# ------------------------------------------------------------------------------ BPR sampling


def bpr_epochs(train_part: Interactions, n_items: int, epochs: int, batch_size: int = 7) -> list[list[dict]]:
    rng = np.random.default_rng(0)
    return [list(bpr_batches(train_part, n_items, batch_size, rng, torch.device("cpu"))) for _ in range(epochs)]


def crowded_interactions() -> tuple[Interactions, int]:
    """12 items; one user holds 9 of them (most negative draws collide), one holds none."""
    rows = {
        0: np.array([0, 1, 2, 3, 4, 5, 6, 7, 8]),
        1: np.array([11, 3, 5]),
        2: np.array([7]),
        4: np.array([2, 9]),
    }
    return Interactions.from_rows(rows, 5), 12


def test_bpr_negatives_are_never_training_positives_of_their_user() -> None:
    train_part, n_items = crowded_interactions()
    positives = {u: set(train_part.items[train_part.indptr[u] : train_part.indptr[u + 1]].tolist()) for u in range(5)}
    for epoch in bpr_epochs(train_part, n_items, epochs=20):
        for batch in epoch:
            for user, negative in zip(batch["users"].tolist(), batch["neg"].tolist(), strict=True):
                assert negative not in positives[user]
                assert 0 <= negative < n_items


def test_bpr_epoch_yields_every_training_pair_exactly_once() -> None:
    train_part, n_items = crowded_interactions()
    expected = sorted(zip(train_part.users().tolist(), train_part.items.tolist(), strict=True))
    for epoch in bpr_epochs(train_part, n_items, epochs=3):
        assert all(len(batch["users"]) <= 7 for batch in epoch)
        pairs = [pair for b in epoch for pair in zip(b["users"].tolist(), b["pos"].tolist(), strict=True)]
        assert sorted(pairs) == expected


def test_bpr_negatives_are_redrawn_each_epoch() -> None:
    train_part, n_items = crowded_interactions()
    first, second = bpr_epochs(train_part, n_items, epochs=2)

    def negatives_by_pair(epoch: list[dict]) -> dict[tuple[int, int], int]:
        return {
            (u, p): n
            for b in epoch
            for u, p, n in zip(b["users"].tolist(), b["pos"].tolist(), b["neg"].tolist(), strict=True)
        }

    assert negatives_by_pair(first) != negatives_by_pair(second)


def test_bpr_negatives_stay_valid_for_a_user_holding_all_but_one_item() -> None:
    n_items = 200
    train_part = Interactions.from_rows({0: np.arange(1, n_items), 1: np.array([0])}, 2)
    (epoch,) = bpr_epochs(train_part, n_items, epochs=1, batch_size=512)
    negatives = torch.cat([b["neg"][b["users"] == 0] for b in epoch])
    assert set(negatives.tolist()) == {0}


def test_hstu_trimming_leading_padding_changes_nothing(tiny_dataset: Dataset) -> None:
    """Training and all_vectors skip all-padding columns; outputs must equal the full-width forward."""
    torch.manual_seed(0)
    model = build_model("hstu", tiny_dataset, dim=8, n_blocks=2, n_heads=2, dqk=4, dv=4, max_len=32).eval()
    full = model.encode(model.histories)[:, -1]
    trimmed, _ = model.all_vectors()
    torch.testing.assert_close(trimmed, full)
    assert (model.histories[:, :8] == 0).all()  # the tiny histories are short: trimming really happens

    batch = next(model.batches(tiny_dataset.train, 16, np.random.default_rng(0)))
    targets = model.histories[batch["users"]]
    inputs = torch.nn.functional.pad(targets[:, :-1], (1, 0))
    valid = inputs != 0
    outputs = model.encode(inputs)[valid]
    positives = targets[valid]
    item_vecs = torch.nn.functional.normalize(model.item_emb.weight, dim=-1)
    neg = batch["negatives"] + 1
    logits = torch.cat([(outputs * item_vecs[positives]).sum(-1, keepdim=True), outputs @ item_vecs[neg].T], 1)
    logits[:, 1:] = logits[:, 1:].masked_fill(neg.unsqueeze(0) == positives.unsqueeze(1), float("-inf"))
    logits = logits / model.hparams["temperature"]
    expected = (torch.logsumexp(logits, 1) - logits[:, 0]).sum() / batch["norm"]
    torch.testing.assert_close(model.base_loss(batch), expected)
