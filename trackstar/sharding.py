"""Scale-out with JAX SPMD: one mesh, path rules for parameters, placement (docs/scaling.md).

The mesh has a ``data`` axis (examples, train-store rows) and a ``model`` axis (parameters:
tensor-parallel or FSDP). Every kernel of the pipeline runs on a mesh (one device is a 1-device
mesh, ``single_device_mesh``): the feature kernel (``trackstar.featurize.make_mesh_feature_fn``),
the Gauss-Newton sum (``trackstar.hessian.gauss_newton``) and scoring
(``trackstar.score.top_k_scores``); the rows they stream are placed by ``trackstar.rows`` and a
multi-host run is started by ``trackstar.multihost``. This module holds the mesh, the rules and
the memory report.

- **Rules** (big_vision / nanodo style): ``(regex, spec)`` pairs matched against parameter paths
  (``trackstar.tree.path_name``); the first ``re.search`` hit wins. A spec is a tuple of mesh
  axis names / None per tensor dimension, or ``"fsdp"``: shard the largest dimension the
  ``model`` axis divides. Shardings are derived from ``jax.eval_shape`` shapes, so a model's
  layout (and its memory per device) is known before any parameter exists. Presets
  (``mesh.rules``, ``preset_rules``): ``"tensor"`` is the model family's own tensor-parallel
  rules (``trackstar.families``); ``"fsdp"`` and ``"replicated"`` fit any model.
- **Placement**: ``param_shardings`` (parameters by the rules), ``matched_shardings`` (trees
  that mirror the parameters: optimizer state, preconditioner), ``place``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trackstar.tree import named_leaves, path_name

PyTree = Any
DATA = "data"  # Mesh axis of examples / store rows.
MODEL = "model"  # Mesh axis of parameters (tensor-parallel or FSDP).
ALL_AXES = (DATA, MODEL)
FSDP = "fsdp"  # Rule spec: shard the largest dimension the model axis divides.

# Any model: every matrix sharded along its largest divisible dimension; vectors replicated.
FSDP_RULES: tuple[tuple[str, Any], ...] = ((r".*", FSDP),)
REPLICATED_RULES: tuple[tuple[str, Any], ...] = ((r".*", ()),)
GENERIC_RULES = {"fsdp": FSDP_RULES, "replicated": REPLICATED_RULES}
# "tensor": the model family's own tensor-parallel rules (trackstar.families; e.g.
# trackstar.model.TENSOR_RULES for the "gpt2" family), see preset_rules.
RULE_PRESETS = ("tensor", *GENERIC_RULES)


class ShardingError(ValueError):
    """A mesh, rule or input that cannot be sharded as asked; the message says what to change."""


# ----------------------------------------------------------------------------- mesh


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all devices of all processes).

    ``data = -1`` takes every device the model axis leaves. Devices are laid out so that a
    model-axis group is contiguous in ``devices`` order (within one host for the default
    order), which keeps the parameter collectives on the fast local links.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise ShardingError(
            f"mesh.model = {model} must be >= 1 and divide the {n} devices; pick a divisor of {n}"
        )
    if data == -1:
        data = n // model
    if data < 1 or data * model > n:
        raise ShardingError(
            f"mesh.data x mesh.model = {data} x {model} needs {data * model} devices, "
            f"{n} available; set mesh.data = -1 to use all of them"
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, ALL_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_from_config(cfg_mesh: Any, scope: str | None = None) -> Mesh:
    """The mesh of the ``mesh`` config section.

    ``scope`` (default ``"global"``; featurize passes ``mesh.featurize_scope``): ``"global"``
    spans every device of every process; ``"local"`` only this process's devices (featurize:
    processes then run independently and a failed host stalls no other).
    """
    scope = scope or "global"
    if scope not in ("global", "local"):
        raise ShardingError(f"mesh scope must be 'global' or 'local', got {scope!r}")
    devices = jax.devices() if scope == "global" else jax.local_devices()
    return make_mesh(int(cfg_mesh.data), int(cfg_mesh.model), devices)


def single_device_mesh() -> Mesh:
    """The 1-device mesh (this process's first device) kernels run on when given no mesh."""
    return make_mesh(1, 1, jax.local_devices()[:1])


def default_mesh(mesh: Mesh | None) -> Mesh:
    """``mesh``, or ``single_device_mesh()`` for None."""
    return single_device_mesh() if mesh is None else mesh


def mesh_size(mesh: Mesh) -> int:
    """Number of devices in ``mesh``."""
    return int(mesh.devices.size)


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over every device of the mesh (``data`` then ``model``): store rows, u uᵀ terms."""
    return NamedSharding(mesh, P(ALL_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A ``B x ...`` batch split over the ``data`` axis (replicated over ``model``)."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- rules


def parse_spec(text: str) -> Any:
    """Parses a spec written in config text: ``"None,model"``, ``"model"``, ``""``, ``"fsdp"``."""
    text = text.strip()
    if text == FSDP:
        return FSDP
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if part in ("None", "none", ""):
            out.append(None)
        elif part in ALL_AXES:
            out.append(part)
        else:
            raise ShardingError(
                f"unknown mesh axis {part!r} in spec {text!r}; use {DATA!r}, {MODEL!r} or None"
            )
    return tuple(out)


def preset_rules(preset: str, family: Any = None) -> tuple[tuple[str, Any], ...]:
    """The rules of a ``mesh.rules`` preset for a model family (``trackstar.families``).

    ``"tensor"`` is the family's own tensor-parallel rules (``ModelFamily.tensor_rules``);
    ``"fsdp"`` and ``"replicated"`` fit any model. ``family``: a name, a ``model`` config section
    or a ``ModelFamily``; None is the default family (``"gpt2"``).
    """
    from trackstar import families

    if preset not in RULE_PRESETS:
        raise ShardingError(
            f"mesh.rules = {preset!r}; choose one of {', '.join(RULE_PRESETS)} (and add "
            "model-specific rules with mesh.rule_overrides)"
        )
    if preset != "tensor":
        return GENERIC_RULES[preset]
    fam = families.get_family(family)
    if fam.tensor_rules is None:
        raise ShardingError(
            f"model family {fam.name!r} has no tensor-parallel rules; set mesh.rules to "
            f"{' or '.join(repr(p) for p in GENERIC_RULES)}, or give mesh.rule_overrides"
        )
    return tuple(fam.tensor_rules)


def rules_from_config(cfg_mesh: Any, family: Any = None) -> tuple[tuple[str, Any], ...]:
    """``mesh.rule_overrides`` ("regex=spec" strings, tried first) + the ``mesh.rules`` preset.

    ``family`` (a name, the ``model`` config section or a ``ModelFamily``; None: the default
    ``"gpt2"``) decides what the ``"tensor"`` preset means (``preset_rules``).
    """
    preset = str(cfg_mesh.rules)
    if preset not in RULE_PRESETS:
        raise ShardingError(
            f"mesh.rules = {preset!r}; choose one of {', '.join(RULE_PRESETS)} (and add "
            "model-specific rules with mesh.rule_overrides)"
        )
    extra = []
    for item in cfg_mesh.rule_overrides:
        if "=" not in item:
            raise ShardingError(
                f"mesh.rule_overrides entry {item!r} must read 'regex=spec', e.g. "
                "'mlp/fc_in/kernel$=None,model'"
            )
        regex, spec = item.rsplit("=", 1)
        extra.append((regex, parse_spec(spec)))
    return tuple(extra) + preset_rules(preset, family)


def _axis_size(mesh_shape: dict[str, int], axis: Any) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh_shape[a] for a in names)


def spec_for(path: str, shape: tuple[int, ...], rules: Sequence, mesh_shape: dict[str, int]) -> P:
    """The ``PartitionSpec`` the first matching rule gives a tensor (checked against its shape).

    Raises:
      ShardingError: no rule matches, the spec is longer than the tensor's rank, or a sharded
        dimension is not divisible by its mesh axis size.
    """
    for regex, rule_spec in rules:
        if re.search(regex, path):
            spec = rule_spec
            break
    else:
        raise ShardingError(f"no sharding rule matches parameter {path!r}; end the rules with '.*'")
    if spec == FSDP:
        size = mesh_shape.get(MODEL, 1)
        dims = [i for i in np.argsort(shape, kind="stable")[::-1] if shape[i] % size == 0]
        if len(shape) < 2 or size == 1 or not dims:
            return P()
        out = [None] * len(shape)
        out[int(dims[0])] = MODEL
        return P(*out)
    spec = tuple(spec)
    if len(spec) > len(shape):
        raise ShardingError(
            f"rule {regex!r} gives {path!r} (shape {shape}) the spec {spec}, longer than its "
            "rank; fix the rule or add a more specific one before it"
        )
    for dim, axis in zip(shape, spec, strict=False):
        size = _axis_size(mesh_shape, axis)
        if dim % size:
            raise ShardingError(
                f"{path!r} dimension {dim} (shape {shape}) is not divisible by mesh axis "
                f"{axis!r} of size {size} (rule {regex!r}); change mesh.model or add a "
                "mesh.rule_overrides entry that replicates this tensor"
            )
    return P(*spec)


def param_specs(params_like: PyTree, rules: Sequence, mesh_shape: dict[str, int]) -> PyTree:
    """A pytree of ``PartitionSpec`` shaped like ``params_like`` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: spec_for(path_name(kp), tuple(np.shape(x)), rules, mesh_shape),
        params_like,
    )


def param_shardings(params_like: PyTree, mesh: Mesh, rules: Sequence) -> PyTree:
    """A pytree of ``NamedSharding`` for the parameters under ``rules``."""
    specs = param_specs(params_like, rules, dict(mesh.shape))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def matched_shardings(tree_like: PyTree, params_like: PyTree, shardings: PyTree, mesh: Mesh):
    """Shardings for a tree that mirrors the parameters (optimizer state, preconditioner).

    A leaf whose path ends with a parameter's path and has that parameter's shape gets its
    sharding (Adam ``mu``/``nu``, Adam preconditioner factors); anything else (step counts,
    Adafactor's factored row/column moments) is replicated.
    """
    by_path = {
        p: (tuple(np.shape(x)), s)
        for (p, x), (_, s) in zip(named_leaves(params_like), _named(shardings), strict=True)
    }

    def pick(kp, leaf):
        name = path_name(kp)
        shape = tuple(np.shape(leaf))
        for p, (pshape, s) in by_path.items():
            if (name == p or name.endswith("/" + p)) and shape == pshape:
                return s
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree_like)


def _named(shardings: PyTree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    return [(path_name(p), s) for p, s in leaves]


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``jax.device_put`` of ``tree`` onto ``shardings`` (single process: from host arrays)."""
    return jax.device_put(tree, shardings)


# ----------------------------------------------------------------------------- memory


def shard_shape(shape: tuple[int, ...], spec: P, mesh_shape: dict[str, int]) -> tuple[int, ...]:
    """The per-device block shape of a ``shape`` array under ``spec`` (no devices needed)."""
    out = list(shape)
    for i, axis in enumerate(tuple(spec)):
        out[i] = -(-out[i] // _axis_size(mesh_shape, axis))
    return tuple(out)


def bytes_per_device(tree_like: PyTree, specs: PyTree, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds for ``tree_like`` (ShapeDtypeStructs) laid out by ``specs``."""
    total = 0
    for x, s in zip(
        jax.tree.leaves(tree_like), jax.tree.leaves(specs, is_leaf=_is_spec), strict=True
    ):
        total += math.prod(shard_shape(tuple(x.shape), s, mesh_shape)) * np.dtype(x.dtype).itemsize
    return int(total)


def abstract_lm_params(cfg_model: Any, vocab_size: int) -> PyTree:
    """ShapeDtypeStructs of the params of ``cfg_model``'s model family (nothing allocated).

    ``trackstar.families.abstract_params``: the family ``cfg_model.family`` names (default
    ``"gpt2"``, ``trackstar.hf.gpt2``).
    """
    from trackstar import families

    return families.abstract_params(cfg_model, vocab_size)


def memory_report(
    params_like: PyTree,
    rules: Sequence,
    mesh_shape: dict[str, int],
    *,
    optimizer_moments: int = 2,
    featurize_batch: int = 0,
) -> dict[str, float]:
    """Per-device memory (GiB) of a model laid out by ``rules`` on a mesh of ``mesh_shape``.

    Counts the parameters, ``optimizer_moments`` parameter-shaped optimizer moments (Adam: 2),
    and, for ``featurize_batch`` > 0, one float32 per-example gradient per row of a featurize
    batch split over the data axis (the kernel's peak term; activations come on top).
    """
    specs = param_specs(params_like, rules, mesh_shape)
    p_bytes = bytes_per_device(params_like, specs, mesh_shape)
    f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), params_like)
    g_bytes = bytes_per_device(f32, specs, mesh_shape)
    rows = -(-featurize_batch // mesh_shape.get(DATA, 1)) if featurize_batch else 0
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params_like))
    gib = 2.0**30
    return {
        "n_params": float(n_params),
        "params_gib": p_bytes / gib,
        "optimizer_gib": optimizer_moments * g_bytes / gib,
        "per_example_grads_gib": rows * g_bytes / gib,
        "total_gib": (p_bytes + optimizer_moments * g_bytes + rows * g_bytes) / gib,
        "replicated_params_gib": sum(
            math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params_like)
        )
        / gib,
    }
