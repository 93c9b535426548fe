"""A standard Lightning program on scikit-learn's digits, with phalanx's strategy as the only
change (`strategy=PhalanxStrategy()`), surviving a worker killed mid-epoch:

    phalanx run -np 3 --min-np 2 --chaos kill:rank=1,step=40 python examples/lightning_digits.py

Without faults: `phalanx run -np 4 python examples/lightning_digits.py`; plain
`python examples/lightning_digits.py` is a one-worker job. Expect ~96% validation accuracy.
Needs `pip install "phalanx[lightning,examples]"`.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from phalanx.lightning import PhalanxStrategy


def datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Standardised digits, split 80/20 with a fixed seed (the same on every rank)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(xtr)

    def tensors(a, b):
        return TensorDataset(torch.tensor(scaler.transform(a), dtype=torch.float32),
                             torch.tensor(b))
    return tensors(xtr, ytr), tensors(xte, yte)


class Digits(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.net(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc, sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16, help="per worker")
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()
    torch.set_num_threads(1)
    train, val = datasets()
    trainer = L.Trainer(strategy=PhalanxStrategy(), accelerator="cpu", max_epochs=args.epochs,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False)
    model = Digits(args.lr)
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True),
                DataLoader(val, batch_size=64))
    if trainer.is_global_zero:
        print(f"val_acc {float(trainer.callback_metrics['val_acc']):.3f} after "
              f"{trainer.global_step} steps on {trainer.world_size} workers, "
              f"{len(trainer.strategy.recoveries)} recovery(ies)")


if __name__ == "__main__":
    main()
