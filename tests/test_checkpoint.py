"""mlplab.callbacks.ModelCheckpoint: last.ckpt at every epoch end, stored paths kept inside the run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from conftest import assert_same_nested, load_ckpt
from mlplab.callbacks import AtomicCheckpointIO, ModelCheckpoint


class Scripted(L.LightningModule):
    """A tiny regression whose monitored score per epoch is scripted."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("score", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(dirpath: Path, callback_cls, scores: list[float], epochs: int) -> None:
    L.seed_everything(0, verbose=False)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    ckpt = callback_cls(
        dirpath=dirpath,
        filename="epoch_{epoch:03d}",
        monitor="score",
        mode="max",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[ckpt],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Scripted(scores), loader, loader)


def test_last_checkpoint_holds_what_lightning_writes(tmp_path):
    scores = [0.1, 0.3]  # the last epoch is the best: Lightning writes the same state twice
    _fit(tmp_path / "ckpt", LightningModelCheckpoint, scores, 2)
    theirs = {name: load_ckpt(tmp_path / "ckpt" / name) for name in ("last.ckpt", "epoch_001.ckpt")}
    shutil.rmtree(tmp_path / "ckpt")  # the same dirpath: the paths stored in the states agree

    _fit(tmp_path / "ckpt", ModelCheckpoint, scores, 2)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch_001.ckpt", "last.ckpt"]  # no .partial left
    for name, expected in theirs.items():
        assert_same_nested(load_ckpt(tmp_path / "ckpt" / name), expected, name)
    assert not os.path.samefile(tmp_path / "ckpt" / "last.ckpt", tmp_path / "ckpt" / "epoch_001.ckpt")


def test_last_checkpoint_is_the_last_epoch_even_when_it_was_not_the_best(tmp_path):
    """Lightning 2.6 writes last.ckpt only with a top-k save: here it would stay at epoch 1."""
    _fit(tmp_path / "lightning", LightningModelCheckpoint, [0.1, 0.3, 0.2], 3)
    assert load_ckpt(tmp_path / "lightning" / "last.ckpt")["epoch"] == 1  # what this class fixes

    _fit(tmp_path / "ckpt", ModelCheckpoint, [0.1, 0.3, 0.2], 3)
    last, best = load_ckpt(tmp_path / "ckpt" / "last.ckpt"), load_ckpt(tmp_path / "ckpt" / "epoch_001.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 12)
    assert (best["epoch"], best["global_step"]) == (1, 8)  # left alone by the later save
    assert not os.path.samefile(tmp_path / "ckpt" / "last.ckpt", tmp_path / "ckpt" / "epoch_001.ckpt")
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["best_model_path"] == str(tmp_path / "ckpt" / "epoch_001.ckpt")
    assert state["last_model_path"] == str(tmp_path / "ckpt" / "last.ckpt")
    assert not torch.equal(last["state_dict"]["layer.weight"], best["state_dict"]["layer.weight"])


def test_a_last_checkpoint_of_something_else_is_left_alone(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.ckpt").write_bytes(b"a user's file")
    _fit(tmp_path / "ckpt", ModelCheckpoint, [0.1, 0.3], 2)
    assert (tmp_path / "ckpt" / "last.ckpt").read_bytes() == b"a user's file"  # Lightning versions the name
    assert load_ckpt(tmp_path / "ckpt" / "last-v1.ckpt")["epoch"] == 1
