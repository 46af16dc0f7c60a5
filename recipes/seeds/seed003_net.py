"""Seed 003's Net, unmodified (``layer2`` is never used by ``forward``), its data and its LR factor."""

import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.layer = nn.Linear(10, 2)
        self.layer2 = nn.Linear(2, 10)

    def forward(self, input):
        return self.layer(input)


def table(samples: int = 1000, seed: int = 0):
    """10 features, 2 classes (scikit-learn's generator: nothing to download)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=samples, n_features=10, n_informative=6, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    cut = int(0.8 * samples)
    return {"train": (x[:cut], y[:cut]), "val": (x[cut:], y[cut:]), "task": "multiclass"}


def every_five_epochs(epoch):
    """The article's manual schedule: lr *= 0.9 every 5 epochs, as a LambdaLR factor."""
    return 0.9 ** (epoch // 5)
