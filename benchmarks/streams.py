"""Your own IterableDataset read by the harness (harness.streams) vs a hand-written StatefulDataLoader.

    python -m benchmarks.streams --rounds 5 --items 20000 --out result.json

The stream's items are cheap (a 32-float row with noise from the global RNG), so the figure is the
worst case of the harness's per-item cost: before each item is pulled it seeds the global torch,
random and numpy generators (and, without loader workers, puts the training process's own back
after), which makes an augmentation resume exactly. The baseline is the loader a user would write:
``StatefulDataLoader(dataset, batch_size=32, num_workers=W)`` over the same dataset. Both sides
read one whole epoch per round, in alternating order; items/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import loadavg, write_json


class Rows(torch.utils.data.IterableDataset):
    def __init__(self, n: int):
        self.n, self.position = n, 0
        self.x = torch.randn(n, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from harness.streams import shard_of_stream

        index, count = shard_of_stream()
        while self.position < self.n:
            self.position += 1
            if (self.position - 1) % count == index:
                i = self.position - 1
                yield self.x[i] + 0.1 * torch.randn(32), torch.tensor(i % 2)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def harness_epoch(items: int, workers: int) -> float:
    from harness.data import LoaderSettings, as_task_data

    task = as_task_data({"train": Rows(items), "val": Rows(64), "task": "multiclass", "num_classes": 2},
                        settings=LoaderSettings(num_workers=workers))
    task.train.configure(32, 1, 1)
    started, count = time.perf_counter(), 0
    for batch in task.train.batches(range(items // 32), epoch=0):
        if batch is not None:
            count += len(batch)
    return count / (time.perf_counter() - started)


def baseline_epoch(items: int, workers: int) -> float:
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(Rows(items), batch_size=32, drop_last=True, num_workers=workers)
    started, count = time.perf_counter(), 0
    for _, targets in loader:
        count += len(targets)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = []
    for r in range(args.rounds):
        record = {}
        for workers in (0, 2):
            sides = [("harness", harness_epoch), ("baseline", baseline_epoch)]
            for name, epoch in (sides if r % 2 == 0 else sides[::-1]):
                record[f"{name}_{workers}w"] = {"median": epoch(args.items, workers)}
        rounds.append(record)
        print(f"round {r + 1}: " + " ".join(f"{k}={v['median']:.0f}/s" for k, v in record.items()), flush=True)
    write_json(args.out, {"rounds": rounds, "items": args.items, "batch_size": 32, "loadavg": loadavg()})


if __name__ == "__main__":
    main()
