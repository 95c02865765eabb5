"""Which settings of two configs differ, for the two places that ask: a resume (`run.resume`: was
the checkpoint trained with these settings?) and compare (`experiments.plan`: is a finished row
stale?). One flattening, and one list of the keys that cannot change what a run computes."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

# Where a run writes, its name, resuming, cache locations, threads, loader workers, the encoding
# cache and the generation batch size: none of these changes what is trained or measured.
NOT_RESULT_CHANGING = ("run_dir", "name", "resume", "paths", "threads", "data.num_workers", "data.cache_encodings",
                       "data.eval_batch_size", "data.world_root", "data.forget_retain.harvest_dir", "base.cache_dir")


def _exempt(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in NOT_RESULT_CHANGING)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a (resolved) config or plain mapping, without the exempt keys."""
    if isinstance(tree, DictConfig):
        tree = OmegaConf.to_container(tree, resolve=True)
    out: dict[str, Any] = {}
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix and not _exempt(prefix) else {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any], shared_only: bool = False) -> list[str]:
    """Flattened keys whose values differ. `shared_only`: a key only one side has does not count
    (a setting the code added since, at its default, is a schema change, not a change of the run)."""
    keys = old.keys() & new.keys() if shared_only else old.keys() | new.keys()
    return sorted(k for k in keys if old.get(k) != new.get(k))
