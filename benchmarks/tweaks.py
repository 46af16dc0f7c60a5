"""Ablations applied to a built trainer, to measure what a suggested fix in harness/ would save.

They are applied from the outside (``harness.loop.build_trainer`` is wrapped for one call of
``harness.loop.train``); the harness source is not touched. Each one mimics a concrete fix:

* ``inner_optimizer``: step and zero_grad the torch optimizer itself, not accelerate's
  AcceleratedOptimizer wrapper (a no-op on a harness that no longer wraps it). In accelerate 1.15 ``AcceleratedOptimizer.step`` calls
  ``is_lomo_available()`` twice per step, an uncached ``importlib.util.find_spec`` that stats
  every sys.path entry, and ``zero_grad`` calls ``inspect.signature`` each time.
* ``plain_backward``: ``loss.backward()`` instead of ``Accelerator.backward`` (a division by
  gradient_accumulation_steps = 1 that still adds an autograd node).
* ``no_logging``: no TensorBoard writer (with ``train.log_every_steps`` raised by an override).
"""

from __future__ import annotations

import contextlib


def no_logging(trainer) -> bool:
    from harness.tracking import Trackers

    trainer.trackers.close()
    trainer.trackers = Trackers(trainer.run_dir, [], enabled=False)
    return True


def inner_optimizer(trainer) -> bool:
    """A no-op (returns False) where the harness already steps the torch optimizer itself."""
    inner = getattr(trainer.optimizer, "optimizer", None)
    if inner is None or getattr(trainer.accelerator, "scaler", None) is not None:  # fp16 needs the scaler
        return False
    trainer.optimizer = inner
    return True


def plain_backward(trainer) -> bool:
    trainer.accelerator.backward = lambda loss, **kwargs: loss.backward(**kwargs)
    return True


TWEAKS = {"no_logging": no_logging, "inner_optimizer": inner_optimizer, "plain_backward": plain_backward}


def apply_all(names):
    """One callable applying the named tweaks; its ``applied`` list says which changed anything."""
    names = [n for n in names if n]

    def run(trainer) -> None:
        run.applied = [n for n in names if TWEAKS[n](trainer)]

    run.applied = []
    return run


@contextlib.contextmanager
def patched_train(after_build=None, around_fit=None):
    """Within the block, ``harness.loop.train`` runs ``after_build(trainer)`` right after
    ``build_trainer`` and calls ``fit`` through ``around_fit(fit, trainer)``."""
    import harness.loop as loop

    original_build, original_fit = loop.build_trainer, loop.fit

    def build_trainer(cfg, *args, **kwargs):  # train() passes the components given from Python too
        trainer = original_build(cfg, *args, **kwargs)
        if after_build is not None:
            after_build(trainer)
        return trainer

    def fit(trainer):
        if around_fit is None:
            return original_fit(trainer)
        return around_fit(original_fit, trainer)

    loop.build_trainer, loop.fit = build_trainer, fit
    try:
        yield
    finally:
        loop.build_trainer, loop.fit = original_build, original_fit
