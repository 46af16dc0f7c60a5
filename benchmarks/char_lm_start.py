"""The hand-written side of figure 14: what a nanoGPT-style script does before its first optimizer
step on the char-LM recipe's data and model, in one process: import torch, read the same
standard-library sources into windows, build the same ``Gpt``, AdamW, one step. Writes the wall
time of that step to ``$BENCH_PROBE_DIR/first-step-rank-0.json`` (as benchmarks.probe does).

    python -m benchmarks.char_lm_start
"""

from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

MODULES = ("argparse", "collections/__init__", "dataclasses", "functools", "inspect", "json/decoder", "pathlib",
           "string", "textwrap", "typing")


def main() -> None:
    from harness.builtin.models import Gpt  # the recipe's model class (the harness's module imports torch only)

    folder = Path(sysconfig.get_paths()["stdlib"])
    data = b"\n".join((folder / f"{name}.py").read_bytes() for name in MODULES)[:200_000]
    text = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    windows = (len(text) - 1) // 64
    x = text[:windows * 64].view(windows, 64)
    y = text[1:windows * 64 + 1].view(windows, 64)
    torch.manual_seed(0)
    model = Gpt(64, 256, dim=64, layers=2, heads=4, dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    idx = torch.randperm(len(x))[:32]
    _, loss = model(x[idx], y[idx])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    out = os.environ.get("BENCH_PROBE_DIR")
    if out:
        Path(out, "first-step-rank-0.json").write_text(json.dumps({"first_step": time.time()}))
        Path(out, "rank-0.json").write_text(json.dumps({"rank": 0, "milestones": {"probe_started": STARTED}}))


if __name__ == "__main__":
    main()
