"""SparseAdamW as a Hugging Face Trainer optimizer: `optimizers=(opt, None)` trains a tiny model (no downloads)."""

from __future__ import annotations

import pytest
import torch

from ppt_fast.optim import SparseAdamW, freeze_unpivoted
from ppt_fast.pivots import PivotSet
from ppt_fast.sensitivity import SensitivityAccumulator

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class TinyRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh()
        )
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x, labels=None):
        pred = self.head(self.body(x)).squeeze(-1)
        out = {"logits": pred}
        if labels is not None:
            out["loss"] = torch.nn.functional.mse_loss(pred, labels)
        return out


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.sin(self.x[:, 0] * 2) + self.x[:, 1] * self.x[:, 2]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_trainer_trains_with_sparse_adamw(tmp_path):
    model = TinyRegressor()
    data = Data()
    with SensitivityAccumulator(model, "all-linear") as acc:
        for i in range(0, 64, 16):
            model(data.x[i : i + 16], labels=data.y[i : i + 16])["loss"].backward()
        ps: PivotSet = acc.pivots(ratio=0.2)
    freeze_unpivoted(model, ps)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        start_loss = float(model(data.x, labels=data.y)["loss"])
    opt = SparseAdamW(model, ps, lr=3e-2, weight_decay=0.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=64, learning_rate=3e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30  # full-batch steps: the logged loss is the dataset loss before each step
    with torch.no_grad():
        end_loss = float(model(data.x, labels=data.y)["loss"])
    assert losses[0] == pytest.approx(start_loss, rel=1e-4)
    assert end_loss < 0.75 * start_loss, losses  # measured: 1.88 -> 1.13 with a linear LR decay to 0
    assert opt._gstate[0]["step"] == 30
    masks = ps.to_masks()
    for n, p in model.named_parameters():
        keep = ~masks[n] if n in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[keep], before[n][keep]), n
