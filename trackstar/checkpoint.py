"""Orbax checkpoints of (params, optimizer state, meta), with structure checks before restoring.

Layout: an Orbax ``CheckpointManager`` in ``ckpt_dir`` with one directory per step holding the
items ``params`` and ``opt_state`` (``StandardSave``) and ``meta`` (``JsonSave``: step, data
position, config fingerprint, the path/shape/dtype spec of both trees and their content
fingerprints). The full optimizer state is kept because its second moment is the method's V.

Orbax writes each step into a temporary directory and renames it when complete; on top of that a
step only counts as finished when every item's metadata file is present, so a stray or
half-copied step directory is never restored from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from trackstar.tree import named_leaves, tree_fingerprint

PyTree = Any
ITEMS = ("params", "opt_state", "meta")
FORMAT_VERSION = 1
# Files Orbax writes last for each item; all present == the step was finalized.
_COMPLETE_MARKERS = (
    "_CHECKPOINT_METADATA",
    "params/_METADATA",
    "opt_state/_METADATA",
    "meta/metadata",
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit; the message says how to fix it."""


def tree_spec(tree: PyTree) -> dict[str, list]:
    """``{path: [shape, dtype]}`` of a pytree of arrays or ``ShapeDtypeStruct``s."""
    return {
        name: [list(leaf.shape), str(np.dtype(leaf.dtype))] for name, leaf in named_leaves(tree)
    }


def spec_fingerprint(spec: dict[str, list]) -> str:
    """A short hash of a ``tree_spec`` (structure only, no values)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def spec_diff(expected: dict[str, list], stored: dict[str, list]) -> list[str]:
    """Human-readable differences between two tree specs (empty when they match)."""
    lines = []
    for name in sorted(set(expected) | set(stored)):
        if name not in stored:
            lines.append(f"{name}: expected {_fmt(expected[name])}, not in checkpoint")
        elif name not in expected:
            lines.append(f"{name}: in checkpoint {_fmt(stored[name])}, not expected")
        elif (
            list(expected[name][0]) != list(stored[name][0]) or expected[name][1] != stored[name][1]
        ):
            lines.append(
                f"{name}: expected {_fmt(expected[name])}, checkpoint has {_fmt(stored[name])}"
            )
    return lines


def _fmt(entry: list) -> str:
    return f"{entry[1]}{tuple(entry[0])}"


def step_dir(ckpt_dir: str, step: int) -> str:
    """The directory Orbax uses for ``step``."""
    return os.path.join(os.path.abspath(ckpt_dir), str(int(step)))


def is_complete(ckpt_dir: str, step: int) -> bool:
    """Whether the step directory holds a finalized checkpoint (all item markers present)."""
    d = step_dir(ckpt_dir, step)
    return all(os.path.exists(os.path.join(d, m)) for m in _COMPLETE_MARKERS)


def _step_dirs(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def all_steps(ckpt_dir: str) -> list[int]:
    """Steps with a complete checkpoint, ascending (temporary and incomplete dirs excluded)."""
    return [s for s in _step_dirs(ckpt_dir) if is_complete(ckpt_dir, s)]


def latest_step(ckpt_dir: str) -> int | None:
    """The newest complete checkpoint step in ``ckpt_dir``, or ``None`` when there is none."""
    steps = all_steps(ckpt_dir)
    return steps[-1] if steps else None


def _manager(ckpt_dir: str, keep: int | None = None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        # Synchronous: the training step donates its buffers right after a save.
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options, item_names=ITEMS)


class Checkpointer:
    """A checkpoint directory kept open across saves (the training loop holds one).

    ``keep`` = number of newest checkpoints kept on disk (``None`` = all).
    """

    def __init__(self, ckpt_dir: str, keep: int | None = None):
        if keep is not None and keep < 1:
            raise CheckpointError(f"keep = {keep}; keep at least 1 checkpoint (or None for all)")
        self.ckpt_dir = os.path.abspath(ckpt_dir)
        self._mngr = _manager(self.ckpt_dir, keep=keep)

    def save(self, step: int, params: PyTree, opt_state: PyTree, meta: dict | None = None) -> str:
        """Saves one step and blocks until it is on disk; returns the step directory.

        ``meta`` (JSON-serializable) is stored with ``step``, ``data_position`` (defaults to
        ``step``), the spec and content fingerprint of both trees and a format version.
        """
        step = int(step)
        d = step_dir(self.ckpt_dir, step)
        if os.path.exists(d):
            what = "a complete" if is_complete(self.ckpt_dir, step) else "an incomplete"
            raise CheckpointError(
                f"{d} already holds {what} checkpoint; remove it or save to a fresh directory"
            )
        full = dict(meta or {})
        full.setdefault("data_position", step)
        full.update(
            step=step,
            format_version=FORMAT_VERSION,
            params_spec=tree_spec(params),
            opt_state_spec=tree_spec(opt_state),
            params_fingerprint=tree_fingerprint(params),
            opt_state_fingerprint=tree_fingerprint(opt_state),
        )
        full["params_shape_fingerprint"] = spec_fingerprint(full["params_spec"])
        full["opt_state_shape_fingerprint"] = spec_fingerprint(full["opt_state_spec"])
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(full),
        )
        self._mngr.save(step, args=args, force=True)
        self._mngr.wait_until_finished()
        return d

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save(
    ckpt_dir: str,
    step: int,
    params: PyTree,
    opt_state: PyTree,
    meta: dict | None = None,
    keep: int | None = None,
) -> str:
    """Saves a checkpoint of ``(params, opt_state, meta)`` at ``step``; returns its directory."""
    with Checkpointer(ckpt_dir, keep=keep) as ck:
        return ck.save(step, params, opt_state, meta)


def copy_step(src_dir: str, dst_dir: str, step: int) -> str:
    """Copies the complete checkpoint ``step`` of ``src_dir`` into ``dst_dir``; returns its dir.

    The copy lands under a temporary name and is renamed when whole, so an interrupted copy is
    never taken for a checkpoint. A resume from it continues the same trajectory (``train_loop``
    checks the train config's fingerprint and ``batch_fn`` is pure in the step).
    """
    step = _resolve_step(src_dir, step)
    dst = step_dir(dst_dir, step)
    if os.path.exists(dst):
        raise CheckpointError(f"{dst} already exists; copy into a directory without step {step}")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(step_dir(src_dir, step), tmp)
    os.replace(tmp, dst)
    return dst


def _resolve_step(ckpt_dir: str, step: int | None) -> int:
    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"no checkpoint directory at {ckpt_dir}; train first or fix the path")
    steps = all_steps(ckpt_dir)
    if step is None:
        if not steps:
            found = _step_dirs(ckpt_dir)
            extra = f" (incomplete step dirs ignored: {found})" if found else ""
            raise CheckpointError(f"no complete checkpoint in {ckpt_dir}{extra}")
        return steps[-1]
    if int(step) not in steps:
        d = step_dir(ckpt_dir, step)
        state = "is incomplete" if os.path.isdir(d) else "does not exist"
        raise CheckpointError(f"checkpoint {d} {state}; complete steps in {ckpt_dir}: {steps}")
    return int(step)


def read_meta(ckpt_dir: str, step: int | None = None) -> dict:
    """The ``meta`` item of a complete checkpoint (latest when ``step`` is None)."""
    step = _resolve_step(ckpt_dir, step)
    with open(os.path.join(step_dir(ckpt_dir, step), "meta", "metadata")) as f:
        return json.load(f)


def _abstract(tree: PyTree) -> PyTree:
    """``ShapeDtypeStruct``s for a tree of arrays or abstract values (sharding kept if known)."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def restore(
    ckpt_dir: str,
    abstract_params: PyTree,
    abstract_opt_state: PyTree,
    step: int | None = None,
    verify: bool = True,
) -> tuple[PyTree, PyTree, dict]:
    """Restores ``(params, opt_state, meta)`` from the latest (or given) complete step.

    ``abstract_*`` give the target structure (e.g. from ``jax.eval_shape``; concrete arrays are
    accepted too). Their paths, shapes and dtypes are compared with the stored spec before
    anything is read; differences raise ``CheckpointError`` listing each differing path.
    With ``verify``, the restored values are checked against the stored content fingerprints.
    """
    step = _resolve_step(ckpt_dir, step)
    meta = read_meta(ckpt_dir, step)
    where = step_dir(ckpt_dir, step)
    for item, target in (("params", abstract_params), ("opt_state", abstract_opt_state)):
        diff = spec_diff(tree_spec(target), meta[f"{item}_spec"])
        if diff:
            shown = "\n  ".join(diff[:20]) + (
                f"\n  ... {len(diff) - 20} more" if len(diff) > 20 else ""
            )
            raise CheckpointError(
                f"checkpoint {where} does not fit: its {item} differ from the expected "
                f"structure (model size / optimizer config changed?):\n  {shown}"
            )
    mngr = _manager(ckpt_dir, read_only=True)
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(abstract_params)),
                opt_state=ocp.args.StandardRestore(_abstract(abstract_opt_state)),
            ),
        )
    finally:
        mngr.close()
    params, opt_state = out["params"], out["opt_state"]
    if verify:
        for item, tree in (("params", params), ("opt_state", opt_state)):
            if tree_fingerprint(tree) != meta[f"{item}_fingerprint"]:
                raise CheckpointError(
                    f"checkpoint {where}: restored {item} do not match the fingerprint saved "
                    "with them (corrupted files?); restore an earlier step"
                )
    return params, opt_state, meta
