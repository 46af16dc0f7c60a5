"""harness: a distributed training harness on HF Accelerate that survives preemption.

``harness.train(model=..., data=..., recipe=...)`` trains your own objects from a Python script
(see harness/api.py); ``harness train RECIPE`` does the same from a YAML recipe.
"""

__version__ = "0.1.0"


def train(*args, **kwargs):
    """See harness.api.train (imported on first use: ``import harness`` stays light)."""
    from harness.api import train as run

    return run(*args, **kwargs)
