"""FSDP2 (train.strategy: fsdp): the model, its gradients and the optimizer state sharded over ranks.

``torch.distributed.fsdp.fully_shard`` is called directly, on an explicit device mesh (CPU/gloo or
CUDA/NCCL): Accelerate keeps the launch, the process group and the device, not the sharding (its
FSDP plugin is enabled only from GPU launch types and its FSDP2 sharded save/load has open bugs,
accelerate#3971, #3896).

Every parameter is a DTensor sharded along dim 0 (torch.chunk sizes: the first ranks hold one row
more). Checkpoints keep that: each rank writes its own rows (``model-rank-<r>.safetensors``,
``optimizer-rank-<r>.safetensors``) and ``sharding.json`` says which rows are whose, so a resume on
any number of ranks, sharded or not, reads the rows it needs (see :func:`read_full`). No pickle:
PyTorch's DCP default format keeps its metadata as one.

Which modules become FSDP units (all-gathered for their forward, resharded after): the classes
named in ``train.fsdp_wrap``, or by default the outermost modules below the root that own
parameters directly (each Linear of an MLP, each GCNConv); the root takes the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from harness.contracts import CheckpointError, ConfigError

SHARDING = "sharding.json"
REFUSED_LAUNCHERS = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def strategy_from_launch(configured: str) -> str:
    """The strategy this run uses: the recipe's ``train.strategy``, or FSDP when the Accelerate
    config asks for it. DeepSpeed, Megatron-LM and XLA configs are refused: never a silent DDP."""
    for variable, name in REFUSED_LAUNCHERS.items():
        if os.environ.get(variable, "").lower() in ("true", "1"):
            raise ConfigError(f"the Accelerate config asks for {name} ({variable}=true). The harness supports "
                              "DDP (distributed_type: MULTI_GPU, or MULTI_GPU with use_cpu: true for CPU ranks) and "
                              "its own FSDP2 (distributed_type: FSDP, or train.strategy: fsdp); use one of "
                              "recipes/accelerate/*.yaml")
    if os.environ.get("PJRT_DEVICE") or os.environ.get("XRT_TPU_CONFIG"):
        raise ConfigError("the launch asks for XLA/TPU; the harness supports DDP and FSDP2 on CPUs and CUDA GPUs")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1"):
        # Accelerator() would build its own FSDP plugin from this: the harness shards the model itself.
        del os.environ["ACCELERATE_USE_FSDP"]
        if configured == "ddp":
            raise ConfigError("train.strategy: the recipe says ddp but the Accelerate config asks for FSDP "
                              "(distributed_type: FSDP); drop one of the two")
        return "fsdp"
    return "ddp" if configured == "auto" else configured


def join_single_rank_group(accelerator) -> bool:
    """One process started by torchrun (RANK set): a one-rank process group, so FSDP2 runs for real
    (e.g. on one GPU). A plain ``python -m harness`` has no launcher: it trains unsharded."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if accelerator.device.type == "cuda" else "gloo")
    return True


def units(model: nn.Module, wrap: Optional[list[str]]) -> list[nn.Module]:
    """The submodules that become FSDP units (outermost first)."""
    if wrap:
        wanted = set(wrap)
        found = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
        missing = wanted - {type(m).__name__ for m in found}
        if missing:
            classes = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"train.fsdp_wrap: no module of class {sorted(missing)} in the model; its classes: "
                              f"{', '.join(classes)}")
        return found
    out = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if any(True for _ in child.parameters(recurse=False)):
                out.append(child)
            else:
                visit(child)

    visit(model)
    return out


def tied_groups(model: nn.Module, found: list[nn.Module]) -> list[list[nn.Module]]:
    """The units as FSDP groups: units that hold one tied parameter (an embedding and its LM
    head) share a group (FSDP2 refuses a parameter in two groups), and units tied to a parameter
    the root holds are left to the root's group."""
    index = {id(unit): i for i, unit in enumerate(found)}
    root = len(found)
    holders: dict[int, set[int]] = {}  # id(parameter) -> the innermost units holding it (or the root)

    def visit(module: nn.Module, unit: int) -> None:
        unit = index.get(id(module), unit)
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(unit)
        for child in module.children():
            visit(child, unit)

    visit(model, root)
    group_of = list(range(len(found) + 1))  # union-find over the units and the root

    def root_of(i: int) -> int:
        while group_of[i] != i:
            group_of[i] = group_of[group_of[i]]
            i = group_of[i]
        return i

    for units_holding in holders.values():
        first, *rest = sorted(units_holding)
        for other in rest:
            group_of[root_of(other)] = root_of(first)
    groups: dict[int, list[nn.Module]] = {}
    for i, unit in enumerate(found):
        if root_of(i) != root_of(root):
            groups.setdefault(root_of(i), []).append(unit)
    return list(groups.values())


def shard(model: nn.Module, device: torch.device, world_size: int, wrap: Optional[list[str]],
          mixed_precision: Optional[str], from_rank0: bool = False) -> nn.Module:
    """fully_shard each unit, then the root, on a 1-D mesh of all ranks.

    The model arrives built on the CPU and is not moved as a whole: ``fully_shard`` moves each
    unit's parameters to the mesh's device as it shards them (then frees the full copy), so a
    GPU holds its shards plus at most one unit in full, never the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import torch.distributed as dist

    # train.fsdp_init rank0: rank 0's weights (the real model; the others are on the meta device),
    # kept before sharding replaces its parameters, and sent to every rank after.
    full = model.state_dict() if from_rank0 and dist.get_rank() == 0 else None
    mesh = init_device_mesh(device.type, (world_size,))
    kwargs = {"mesh": mesh}
    if device.type == "cuda" and mixed_precision == "bf16":
        # bf16 parameters for compute, fp32 gradient reduction: the usual FSDP2 policy.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for group in tied_groups(model, units(model, wrap)):
        fully_shard(group if len(group) > 1 else group[0], **kwargs)
    fully_shard(model, **kwargs)
    if from_rank0:
        receive_from_rank0(model, full, device)
    return model


def receive_from_rank0(model: nn.Module, full: Optional[dict], device: torch.device) -> None:
    """Every rank's shards (and buffers) from rank 0's full weights: the meta-device model of the
    other ranks gets memory (``to_empty``), then rank 0 broadcasts one tensor at a time and each
    rank keeps its rows, so a rank holds its shards plus one full tensor at most.
    (torch.distributed.checkpoint's ``broadcast_from_rank0`` keeps every received full tensor until
    the end on torch 2.13: as much memory as building the model.) Then every buffer, the
    non-persistent ones (in no state dict) included."""
    import torch.distributed as dist

    if full is None:
        model.to_empty(device=device)
    with torch.no_grad():
        for name, mine in model.state_dict().items():
            if dist.get_rank() == 0:
                tensor = full.pop(name).to(device)  # its last reference: freed once sent
            else:
                tensor = torch.empty(mine.shape, dtype=mine.dtype, device=device)
            dist.broadcast(tensor, src=0)
            if is_dtensor(mine):
                start, stop = own_rows(mine)
                mine.to_local().copy_(tensor[start:stop])
            else:
                mine.copy_(tensor)
            del tensor
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def is_dtensor(value) -> bool:
    return type(value).__name__ == "DTensor"


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP's no_sync: skip the reduce-scatter of micro-batches before the last."""
    model.set_requires_gradient_sync(enabled)


def local(value):
    return value.to_local() if is_dtensor(value) else value


def row_ranges(rows: int, world_size: int) -> list[tuple[int, int]]:
    """The rows of dim 0 each rank holds under Shard(0) (torch.chunk: ceil-sized chunks, the last
    ranks may hold fewer or none)."""
    size = -(-rows // world_size) if rows else 0
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world_size)]


def split_for_files(tensors: dict[str, torch.Tensor], rank: int, world_size: int) -> tuple[dict, dict]:
    """(this rank's local rows of each DTensor + plain tensors on rank 0, layout of the DTensors)."""
    out, layout = {}, {}
    for name, value in tensors.items():
        if is_dtensor(value):
            placements = [type(p).__name__ + str(getattr(p, "dim", "")) for p in value.placements]
            if placements != ["Shard0"]:
                raise NotImplementedError(f"{name}: placements {value.placements}; only Shard(0) is saved")
            shape = list(value.shape)
            layout[name] = {"shape": shape, "dtype": str(value.dtype).removeprefix("torch."),
                            "rows": row_ranges(shape[0], world_size)}
            out[name] = value.to_local()
        elif rank == 0:
            out[name] = value
    return out, layout


# safetensors metadata key of a tensor file whose tied tensors are stored once: JSON {alias: name}.
ALIASES_KEY = "harness.aliases"


def saved_once(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied tensors (one parameter under two names: an embedding and its LM head) kept once:
    (the tensors without the aliases, {alias: the name kept}). safetensors refuses tensors that
    share memory; tensors that overlap only in part (views of one buffer) are copied apart."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of: dict[tuple, str] = {}
    names_on: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        local = tensor.to_local() if is_dtensor(tensor) else tensor
        if (not isinstance(local, torch.Tensor) or local.layout != torch.strided or local.device.type == "meta"
                or local.numel() == 0):  # no memory to share (what safetensors cannot store is refused on save)
            kept[name] = tensor
            continue
        storage = local.untyped_storage().data_ptr()
        view = (storage, local.storage_offset(), tuple(local.shape), local.stride(), local.dtype)
        if view in first_of:
            aliases[name] = first_of[view]
            continue
        first_of[view] = name
        kept[name] = tensor
        names_on.setdefault(storage, []).append(name)
    for names in names_on.values():
        if len(names) > 1:
            for name in names:
                kept[name] = kept[name].clone()
    return kept, aliases


def aliases_metadata(aliases: Optional[dict[str, str]]) -> dict[str, str]:
    """The metadata of a tensor file: safetensors' own ``format`` (loaders such as transformers
    look for it) and the aliases of tensors stored once."""
    return {"format": "pt", **({ALIASES_KEY: json.dumps(aliases, sort_keys=True)} if aliases else {})}


def aliases_in(metadata: Optional[dict]) -> dict[str, str]:
    return json.loads((metadata or {}).get(ALIASES_KEY, "{}"))


class Reader:
    """Full tensors from a checkpoint, sharded (``sharding.json``) or not, one at a time. A tied
    tensor stored once is listed and read under each of its names."""

    def __init__(self, folder: Path, part: str):
        from safetensors import safe_open

        self.folder, self.part = Path(folder), part
        self.layout = {}
        layout_path = self.folder / SHARDING
        if layout_path.is_file():
            self.layout = json.loads(layout_path.read_text()).get(part, {})
        self.world = json.loads(layout_path.read_text())["world_size"] if layout_path.is_file() else 1
        self._open = safe_open
        self._files = {}
        self._whole = {}  # file name -> {tensor name: tensor}, files this rank reads entirely
        self._aliases: Optional[dict[str, str]] = None

    @property
    def aliases(self) -> dict[str, str]:
        """{alias: name stored} of the tied tensors, from the files' metadata."""
        if self._aliases is None:
            self._aliases = {}
            for name in self._file_names():
                self._aliases.update(aliases_in(self._file(name).metadata()))
        return self._aliases

    def _file_names(self) -> list[str]:
        if not (self.folder / SHARDING).is_file():
            return [f"{self.part}.safetensors"]
        return [f"{self.part}-rank-{r}.safetensors" for r in range(self.world)]

    def _file(self, name: str):
        if name not in self._files:
            path = self.folder / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing")
            try:
                self._files[name] = self._open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: a damaged or foreign file
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it may be truncated, "
                                      "damaged or of another format (pickles are never loaded)") from None
        return self._files[name]

    def names(self, with_aliases: bool = True) -> list[str]:
        if not (self.folder / SHARDING).is_file():
            names = list(self._file(f"{self.part}.safetensors").keys())
        else:
            every = set(self.layout) - set(self.aliases)
            for r in range(self.world):
                every |= set(self._file(f"{self.part}-rank-{r}.safetensors").keys())
            names = sorted(every)
        return [*names, *self.aliases] if with_aliases else names

    def shape(self, name: str) -> list[int]:
        name = self.aliases.get(name, name)
        if (self.folder / SHARDING).is_file() and name in self.layout:
            return list(self.layout[name]["shape"])
        part = f"{self.part}.safetensors" if not (self.folder / SHARDING).is_file() else f"{self.part}-rank-0.safetensors"
        return list(self._file(part).get_slice(name).get_shape())

    def full(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if not (self.folder / SHARDING).is_file():
            return self._file(f"{self.part}.safetensors").get_tensor(name).clone()  # own memory, not the file's
        if name not in self.layout:
            return self._file(f"{self.part}-rank-0.safetensors").get_tensor(name)
        entry = self.layout[name]
        pieces = [self._file(f"{self.part}-rank-{r}.safetensors").get_tensor(name)
                  for r, (start, stop) in enumerate(entry["rows"]) if stop > start]
        full = torch.cat(pieces) if pieces else torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
        if list(full.shape) != entry["shape"]:
            raise CheckpointError(f"{self.folder}: {self.part} tensor {name!r} assembles to {list(full.shape)}, "
                                  f"{SHARDING} says {entry['shape']}")
        return full


    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor, read from the files that hold them and nothing else (a
        resume on the same number of ranks reads only its own file)."""
        name = self.aliases.get(name, name)
        if not (self.folder / SHARDING).is_file() or name not in self.layout:
            full = self.full(name)
            return full[start:stop].clone()
        pieces = []
        for r, (first, last) in enumerate(self.layout[name]["rows"]):
            lo, hi = max(start, first), min(stop, last)
            if (lo, hi) == (first, last) and hi > lo:
                # The whole file's rows (a resume on as many ranks: this rank's own file): one
                # sequential read of the file serves all its tensors. Slicing through the memory
                # map instead faults the pages in one by one, 3-4x slower from a cold cache.
                pieces.append(self._whole_file(f"{self.part}-rank-{r}.safetensors")[name])
            elif hi > lo:
                piece = self._file(f"{self.part}-rank-{r}.safetensors").get_slice(name)
                pieces.append(piece[lo - first:hi - first])
        if not pieces:
            shape = list(self.layout[name]["shape"])
            shape[0] = 0
            return torch.empty(shape, dtype=getattr(torch, self.layout[name]["dtype"]))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


    def _whole_file(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._whole:
            self._whole[name] = read_safetensors(self.folder / name)
        return self._whole[name]


# safetensors dtype names -> torch dtypes (the format's own table).
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file read whole, in one sequential read, its tensors views of that one buffer
    (no second copy). The header is checked against the file's size first: a truncated or foreign
    file is a CheckpointError, and nothing in it is ever executed (JSON header, raw bytes)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = bytearray(size)
            view, done = memoryview(data), 0
            while done < size:
                got = f.readinto(view[done:])
                if not got:
                    break
                done += got
        if done != size or size < 8:
            raise ValueError(f"read {done} of {size} bytes")
        header_size = int.from_bytes(data[:8], "little")
        if 8 + header_size > size:
            raise ValueError(f"header of {header_size} bytes in a {size}-byte file")
        header = json.loads(bytes(data[8:8 + header_size]))
        base, out = 8 + header_size, {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:  # a rarer dtype: let safetensors read it
                from safetensors.torch import load_file

                return load_file(str(path))
            begin, end = entry["data_offsets"]
            shape = [int(n) for n in entry["shape"]]
            count = 1
            for n in shape:
                count *= n
            item = torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= size - base or end - begin != count * item:
                raise ValueError(f"tensor {name!r}: offsets {begin}-{end} do not fit its shape {shape} or the file")
            out[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=base + begin).view(shape)
                         if count else torch.empty(shape, dtype=dtype))
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it may be truncated, damaged or "
                              "of another format (pickles are never loaded)") from None


def own_rows(current) -> tuple[int, int]:
    """The rows of dim 0 this rank holds of a DTensor like ``current``."""
    mesh = current.device_mesh
    return row_ranges(current.shape[0], mesh.size())[mesh.get_local_rank()]


def local_rows(reader: "Reader", name: str, current) -> torch.Tensor:
    """This rank's rows of ``name`` for a DTensor like ``current`` (read without the rest)."""
    return reader.rows(name, *own_rows(current))


def as_dtensor_like(local_tensor: torch.Tensor, current):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor.to(current.device), current.device_mesh, current.placements,
                              shape=current.shape, stride=current.stride())


def place_like(full: torch.Tensor, current) -> torch.Tensor:
    """``full`` laid out like ``current``: this rank's rows of a DTensor (no communication), or as is."""
    if is_dtensor(current):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(current.device), current.device_mesh, current.placements, src_data_rank=None)
    return full


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every DTensor gathered whole (a collective: every rank calls it)."""
    return {name: (value.full_tensor() if is_dtensor(value) else value) for name, value in state.items()}


def exported(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The whole model's tensors, tied ones once, and the aliases of those."""
    reader = Reader(folder, "model")
    return {name: reader.full(name).contiguous() for name in reader.names(with_aliases=False)}, reader.aliases


def lockstep(batches_of: Callable[[list], Iterable], shards: list[torch.Tensor]):
    """(batch, counts) for every shard, empty ones replaced by sample 0 (counts False): under FSDP
    every rank must run the same number of forwards (each all-gathers parameters)."""
    dummy = torch.zeros(1, dtype=torch.long)
    filled = [s if len(s) else dummy for s in shards]
    for batch, shard_indices in zip(batches_of(filled), shards):
        yield batch, len(shard_indices) > 0
