"""Reading a Lightning checkpoint written by `fit`, safely: the archive checked whole (zip CRCs),
then loaded with weights_only=True (a checkpoint is data, never code). Used to resume a run and
to evaluate a checkpoint.

Trainable-only checkpoints (LoRA, RMU: runs whose frozen tensors outnumber the trained ones) leave
the frozen base out and name it instead (`run_identity`: name_or_path, revision, and `base_digest`,
a SHA-256 over the frozen tensors' names, dtypes, shapes and bytes, hashed once per process at about
1.5 GB/s: ~10 s for a 7B base). Whoever loads one rebuilds the base from its config, hashes the
tensors the checkpoint leaves out, and refuses a different base (`check_base`).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from core.errors import UserError


def read_checkpoint(path: Path, label: str = "resume checkpoint") -> dict:
    """Every member of a checkpoint file checked (zip CRCs) and its header loaded (weights_only,
    memory-mapped): a corrupt checkpoint is refused before anything is written."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UserError(f"{label} {path} is not a PyTorch checkpoint (truncated or another file)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"{label} {path} is corrupt: {err}") from err
    if bad is not None:
        raise UserError(f"{label} {path} is corrupt: member '{bad}' fails its CRC check")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise UserError(f"cannot load {label} {path} with weights_only=True: "
                        f"{str(err).strip().splitlines()[0]}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{label} {path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def tensors_digest(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """SHA-256 over the tensors `keys` of `state` (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(state[key].shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def base_label(identity: Mapping) -> str:
    """A base as a message names it: name_or_path@revision (weights sha256 prefix)."""
    digest = identity.get("base_digest")
    revision = identity.get("revision")
    return f"{identity.get('name_or_path')}{f'@{revision}' if revision else ''}" + \
        (f" (weights {digest[:12]})" if digest else "")


def check_base(saved: Mapping, current: Mapping, path, label: str = "resume checkpoint") -> None:
    """A trainable-only checkpoint goes only onto the frozen base it was trained on."""
    if saved.get("base_digest") != current.get("base_digest"):
        raise UserError(f"{label} {path} holds only the trained tensors of base {base_label(saved)}, but this run's "
                        f"base is {base_label(current)}: load the checkpoint's base (model.name_or_path, model.revision; "
                        "a model built from config: its model.tiny settings and seed)")


# -- sharded checkpoints (DeepSpeed, torch.distributed.checkpoint): every pickle checked as data -----
# DeepSpeed's checkpoint engine loads its .pt files with weights_only=False, and DCP unpickles its
# `.metadata` and its non-tensor items with plain pickle: before either loader runs, each of those
# pickles is read here by a loader that can only build data. What passes builds the same objects
# under the library's loader afterwards, so no code runs from the checkpoint.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",  # objects DeepSpeed itself puts in
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address",
                     "deepspeed.runtime.zero.config.ZeroStageEnum")
DCP_CLASSES = {"torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
               "torch.serialization": {"_get_layout"}, "torch": {"Size"}, "collections": {"OrderedDict"},
               "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}}


def _deepspeed_globals() -> list:
    import importlib

    found = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # DeepSpeed not installed: its classes cannot be in a file we load
            pass
    return found


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses, torch dtypes / sizes / layouts and paths; nothing else."""

    def find_class(self, module: str, name: str):
        import inspect

        if module == "torch.distributed.checkpoint.metadata":
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if inspect.isclass(found):
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None),
                                              (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        elif name in DCP_CLASSES.get(module, ()):
            return getattr(__import__(module, fromlist=[name]), name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not checkpoint data")


def _refused(label: str, path, file: Path, err: Exception) -> UserError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"{label} {path}: {file.name} is refused, it is not plain checkpoint data and loading it "
                     f"could run code ({detail[:200]})")


def check_sharded_checkpoint(path: Path, label: str = "resume checkpoint") -> None:
    """Every pickle of a sharded checkpoint directory loads as data (else one line naming the file):
    each *.pt file (DeepSpeed's model and optimizer states, Lightning's meta.pt) with
    weights_only=True and DeepSpeed's own classes allowed by name; DCP's .metadata with an
    unpickler that builds its metadata classes only, and each non-tensor item it points to with
    weights_only=True."""
    path = Path(path)
    files = sorted(path.rglob("*.pt"))
    allowed = _deepspeed_globals() if files else []
    for file in files:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as err:
            raise _refused(label, path, file, err) from err
    for file in sorted(path.rglob(".metadata")):
        try:
            with file.open("rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            _check_dcp_bytes(file.parent, metadata)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError,
                TypeError, KeyError) as err:
            raise _refused(label, path, file, err) from err


def load_deepspeed_file(file, map_location=None, directory=None, label: str = "resume checkpoint", mmap: bool = False):
    """A file of a DeepSpeed checkpoint loaded as data: in place of DeepSpeed's TorchCheckpointEngine.load
    (which passes weights_only=False), weights_only=True with DeepSpeed's own classes allowed by name;
    anything else is refused in one line naming the file (`directory`: the checkpoint it belongs to)."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        raise _refused(label, directory or Path(file).parent, Path(file), err) from err


def _check_dcp_bytes(directory: Path, metadata) -> None:
    """DCP's non-tensor items (loaded by its planner with weights_only=False) load with weights_only=True."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_items:
            continue
        with (directory / info.relative_path).open("rb") as stream:
            stream.seek(info.offset)
            data = stream.read(info.length)
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
