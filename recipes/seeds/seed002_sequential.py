"""Seed 002's model as the article builds it: an nn.Sequential ending in a sigmoid."""

import torch.nn as nn


def model():
    return nn.Sequential(
        nn.Linear(30, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 1),
        nn.Sigmoid(),
    )
