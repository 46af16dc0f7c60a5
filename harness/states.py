"""Optimizer, RNG and environment state as plain tensors and JSON values: what the checkpoint
parts (harness/parts.py) write, read back exactly."""

from __future__ import annotations

import random
import sys

import accelerate
import numpy as np
import safetensors
import torch


def optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{name}"] = value
            else:
                scalars[f"{index}/{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalar_state"].items()):
        index, _, name = key.partition("/")
        state.setdefault(int(index), {})[name] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group and isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def raw_rng_state() -> tuple:
    """The generators' states as their own getters give them (no conversion to JSON: ~80 us), to
    put back with set_raw_rng_state in this process."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda


def set_raw_rng_state(state: tuple) -> None:
    cpu, python, numpy_state, cuda = state
    torch.set_rng_state(cpu)
    random.setstate(python)
    np.random.set_state(numpy_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def library_versions() -> dict:
    """What a run's numbers depend on besides its recipe and seed: the libraries that compute, and
    the CPU kernels torch picked (AVX2, AVX512...) or the GPU. Recorded in every checkpoint; a resume
    where any of them changed says it cannot be bitwise (resume.warn_about_changed_environment)."""
    versions = {"torch": torch.__version__, "accelerate": accelerate.__version__, "safetensors": safetensors.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0],
                "cpu": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
    return versions
