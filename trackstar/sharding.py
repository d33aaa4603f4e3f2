"""Scale-out with JAX SPMD: one mesh, path rules for parameters, sharded kernels (docs/scaling.md).

The mesh has a ``data`` axis (examples, train-store rows) and a ``model`` axis (parameters:
tensor-parallel or FSDP). Everything here is ``jax.jit`` with explicit ``NamedSharding``s (or
``jax.shard_map`` where a kernel is per device by nature); multi-host runs add
``jax.distributed`` and nothing else, so the same code runs on one CPU, a multi-GPU machine or a
TPU pod slice.

- **Rules** (big_vision / nanodo style): ``(regex, spec)`` pairs matched against parameter paths
  (``trackstar.tree.path_name``); the first ``re.search`` hit wins. A spec is a tuple of mesh
  axis names / None per tensor dimension, or ``"fsdp"``: shard the largest dimension the
  ``model`` axis divides. Shardings are derived from ``jax.eval_shape`` shapes, so a model's
  layout (and its memory per device) is known before any parameter exists. Presets
  (``mesh.rules``, ``preset_rules``): ``"tensor"`` is the model family's own tensor-parallel
  rules (``trackstar.families``); ``"fsdp"`` and ``"replicated"`` fit any model.
- **Feature kernel**: the jitted per-example gradient + correction + projection of
  ``trackstar.gradients.make_feature_fn``, re-jitted with explicit in/out shardings: batch rows
  over ``data``, parameters and the preconditioner by the rules, vectors out over ``data``.
  GSPMD then partitions the per-example gradients like the parameters, and the projection
  contracts the sharded dimensions with partial sums and one all-reduce of ``B x d``, so a
  per-example gradient of a sharded model is never gathered onto one device
  (tests/test_sharding.py checks the compiled HLO).
- **Gauss-Newton**: rows sharded over every device; each device sums its own ``u uᵀ``
  (Kahan-compensated float32) and one ``psum`` at the end combines them.
- **Scoring**: train rows sharded over every device, queries replicated; each device keeps its
  own running top-k, and one final merge (ties to the lower example id) gives exactly the
  single-device ranking.
- **Multi-host**: ``initialize_distributed`` (config or environment), per-process chunk
  assignment into one ``VectorStore`` (disjoint chunks, each committed atomically, finalized by
  process 0 after a barrier). Store-backed Hessian and scoring run over the global mesh in
  lockstep: round r gives process p chunk ``r * P + p``, so no coordination beyond the
  collectives is needed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
# trackstar.model.TENSOR_RULES for the "transformer" family), see preset_rules.
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
    or a ``ModelFamily``; None is the default family (``"transformer"``).
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
    ``"transformer"``) decides what the ``"tensor"`` preset means (``preset_rules``).
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
    ``"transformer"``, ``trackstar.model``).
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


# ----------------------------------------------------------------------------- feature kernel


def make_sharded_feature_fn(
    apply_fn: Callable,
    output_fn: str,
    projector: Any,
    preconditioner: PyTree | None,
    mesh: Mesh,
    shardings: PyTree,
) -> Callable[[PyTree, Any, Any], jax.Array]:
    """``fn(params, tokens_BxT, weights_BxT) -> vectors_BxD`` jitted with explicit shardings.

    Wraps ``trackstar.gradients.make_feature_fn`` (same math, same compiled body): batch rows
    over the ``data`` axis, ``params`` and the preconditioner by ``shardings`` (from
    ``param_shardings``), vectors out over ``data``. Pass params already placed with
    ``place(params, shardings)``; host arrays would be transferred on every call. The batch
    size must be a multiple of the data axis size. ``fn.jitted`` is the sharded jit (for
    ``.lower(...)``) and ``fn.precond`` the placed preconditioner.
    """
    from trackstar.gradients import make_feature_fn

    base = make_feature_fn(apply_fn, output_fn, projector, preconditioner)
    data_size = mesh.shape[DATA]
    batch = batch_sharding(mesh)
    precond_sh = None
    precond = None
    if preconditioner is not None:
        precond_sh = matched_shardings(preconditioner, projector.params_like, shardings, mesh)
        precond = jax.device_put(preconditioner, precond_sh)
    jitted = jax.jit(
        base.jitted,
        in_shardings=(shardings, precond_sh, batch, batch),
        out_shardings=batch,
    )

    def feature_fn(params: PyTree, tokens_BxT: Any, weights_BxT: Any) -> jax.Array:
        if np.shape(tokens_BxT)[0] % data_size:
            raise ShardingError(
                f"batch of {np.shape(tokens_BxT)[0]} rows cannot be split over the data axis of "
                f"size {data_size}; set featurize.batch_size to a multiple of {data_size}"
            )
        tokens_BxT, weights_BxT = (_to_global(x, batch) for x in (tokens_BxT, weights_BxT))
        return jitted(params, precond, tokens_BxT, weights_BxT)

    feature_fn.jitted = jitted
    feature_fn.precond = precond
    return feature_fn


def _to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Host rows -> a sharded array (multi-process JAX refuses numpy with a sharded jit input).

    On a mesh of this process's devices the rows are the whole batch; on a mesh spanning
    processes they are this process's share.
    """
    if isinstance(x, jax.Array):
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


# ----------------------------------------------------------------------------- multi-host


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in a (possibly multi-host) run."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int


def _env(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def initialize_distributed(cfg_mesh: Any = None) -> ProcessInfo:
    """Starts ``jax.distributed`` from config or environment; call before any JAX computation.

    Coordinator, process count and id come from ``mesh.coordinator`` / ``num_processes`` /
    ``process_id`` when set, else from ``TRACKSTAR_COORDINATOR`` / ``TRACKSTAR_NUM_PROCESSES``
    / ``TRACKSTAR_PROCESS_ID``. ``mesh.distributed``: ``"off"`` (single process), ``"on"``
    (initialize; with no coordinator given, JAX auto-detects TPU pods, SLURM, Open MPI) or
    ``"auto"`` (initialize when a coordinator is given). On CPU, collectives use gloo.
    """
    get = (lambda k, d: getattr(cfg_mesh, k, d)) if cfg_mesh is not None else (lambda k, d: d)
    mode = str(get("distributed", "auto"))
    if mode not in ("off", "on", "auto"):
        raise ShardingError(f"mesh.distributed = {mode!r}; use 'off', 'on' or 'auto'")
    coordinator = str(get("coordinator", "")) or _env("TRACKSTAR_COORDINATOR")
    n_proc = int(get("num_processes", 0)) or int(_env("TRACKSTAR_NUM_PROCESSES") or 0)
    pid = int(get("process_id", -1))
    if pid < 0 and _env("TRACKSTAR_PROCESS_ID") is not None:
        pid = int(_env("TRACKSTAR_PROCESS_ID"))
    if mode == "on" or (mode == "auto" and coordinator):
        collectives = str(get("cpu_collectives", "gloo"))
        if collectives:
            # Affects only the CPU backend (GPU/TPU runs keep NCCL / ICI).
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        kwargs: dict[str, Any] = {}
        if coordinator:
            if n_proc < 1 or pid < 0:
                raise ShardingError(
                    f"coordinator {coordinator!r} given without the process count and id; set "
                    "mesh.num_processes and mesh.process_id (or TRACKSTAR_NUM_PROCESSES / "
                    "TRACKSTAR_PROCESS_ID)"
                )
            kwargs = dict(coordinator_address=coordinator, num_processes=n_proc, process_id=pid)
        jax.distributed.initialize(**kwargs)
    return process_info()


def process_info() -> ProcessInfo:
    """This process's index and the run's process / device counts."""
    return ProcessInfo(
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()
    )


def barrier(name: str) -> None:
    """Blocks until every process reaches ``name`` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def featurize_distributed(
    feature_fn: Callable,
    params: PyTree,
    examples: Any,
    store: Any,
    batch_size: int,
    *,
    skip_bad_examples: bool = False,
    progress: bool = True,
    desc: str = "featurize",
    finalize: bool = True,
) -> int:
    """Each process writes its own missing chunks (``c % P == p``); process 0 finalizes.

    Chunks are committed atomically by the store, so a process killed mid-run leaves only
    temporaries; rerunning every process writes exactly the chunks still missing, and
    ``finalize`` proves each example position is covered once. Returns this process's rows.
    """
    info = process_info()
    from trackstar.featurize import featurize_into_store

    mine = store.chunks_for_process(info.process_index, info.process_count)
    written = featurize_into_store(
        feature_fn,
        params,
        examples,
        store,
        batch_size,
        chunks=mine,
        skip_bad_examples=skip_bad_examples,
        progress=progress and info.process_index == 0,
        desc=desc,
    )
    if finalize:
        barrier(f"trackstar-featurized-{os.path.basename(store.path)}")
        if info.process_index == 0:
            store.finalize()
        barrier(f"trackstar-finalized-{os.path.basename(store.path)}")
    return written


# ----------------------------------------------------------------------------- row streams


def _local_blocks(
    source: Any, rows_per_step: int | None
) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int, int]:
    """``(blocks, rounds, local_rows)``: this process's share of ``source`` in lockstep rounds.

    A store is split by chunk (round r: chunk ``r * P + p``); with one process any source
    works and is cut into ``rows_per_step`` rows (an array / iterable has no known length, so
    its rounds are 0 = "until exhausted").
    """
    info = process_info()
    if hasattr(source, "read_chunk") and hasattr(source, "meta"):
        meta = source.meta
        n_chunks, P_ = meta.num_chunks, info.process_count
        rounds = -(-n_chunks // P_)

        def blocks():
            for r in range(rounds):
                c = r * P_ + info.process_index
                if c < n_chunks:
                    yield source.read_chunk(c)
                else:
                    yield np.zeros(0, np.int64), np.zeros((0, meta.dim), np.float32)

        if not getattr(source, "is_complete", True):
            raise ShardingError(f"the store at {source.path} is incomplete; finish featurize first")
        return blocks(), rounds, meta.chunk_size
    if info.process_count > 1:
        raise ShardingError(
            "with several processes, pass a VectorStore (each process reads its own chunks); "
            "arrays and iterables are single-process only"
        )
    from trackstar.hessian import iter_vector_chunks

    return iter_vector_chunks(source, rows_per_step), 0, rows_per_step or 0


def _global_rows(
    mesh: Mesh, local_rows: int, ids: np.ndarray, vecs: np.ndarray, dim: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pads this process's rows to ``local_rows`` and forms row-sharded global arrays."""
    n = len(ids)
    pad = local_rows - n
    valid = np.zeros(local_rows, bool)
    valid[:n] = True
    ids_p = np.concatenate([np.asarray(ids, np.int32), np.full(pad, -1, np.int32)])
    vecs_p = np.concatenate([np.asarray(vecs, np.float32), np.zeros((pad, dim), np.float32)])
    sh = row_sharding(mesh)
    mk = jax.make_array_from_process_local_data
    return mk(sh, ids_p), mk(sh, valid), mk(sh, vecs_p)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _local_mesh_devices(mesh: Mesh) -> int:
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


# ----------------------------------------------------------------------------- Gauss-Newton


def _gn_step(mesh: Mesh):
    spec = P(ALL_AXES)

    def local(acc_1xDxD, comp_1xDxD, u_NxD):
        # Kahan-compensated float32 running sum of this device's u uᵀ terms.
        term = (u_NxD.T @ u_NxD)[None]
        y = term - comp_1xDxD
        t = acc_1xDxD + y
        return t, (t - acc_1xDxD) - y

    return jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec)),
        donate_argnums=(0, 1),
    )


def _psum_all(mesh: Mesh):
    def local(acc_1xDxD):
        return jax.lax.psum(acc_1xDxD[0], ALL_AXES)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(ALL_AXES),), out_specs=P()))


def _fetch_replicated(x: jax.Array) -> np.ndarray:
    """A fully replicated global array as numpy (every process holds a full copy)."""
    return np.asarray(x.addressable_data(0))


def gauss_newton_sharded(
    source: Any,
    mesh: Mesh,
    *,
    rows_per_step: int | None = None,
    sample_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """``(R_DxD float64, rows_used)``: mean of u uᵀ, each device summing its own rows.

    Rows are sharded over every mesh device; each device accumulates its ``u uᵀ`` terms in
    compensated float32, and one ``psum`` combines the devices at the end. With several
    processes ``source`` must be a store (each process reads its own chunks). ``sample_ids``
    keeps only those example ids (``trackstar.hessian.sample_rows`` positions map to ids
    through ``store.read_ids()``).
    """
    blocks, _, local_rows = _local_blocks(source, rows_per_step)
    n_local = _local_mesh_devices(mesh)
    keep = None if sample_ids is None else np.unique(np.asarray(sample_ids, np.int64))
    step = _gn_step(mesh)
    acc = comp = None
    used = 0
    dim = None
    for ids, vecs in blocks:
        vecs = np.asarray(vecs, np.float32)
        if dim is None:
            dim = vecs.shape[1]
            acc = jax.make_array_from_process_local_data(
                row_sharding(mesh), np.zeros((n_local, dim, dim), np.float32)
            )
            comp = jax.make_array_from_process_local_data(
                row_sharding(mesh), np.zeros((n_local, dim, dim), np.float32)
            )
        if keep is not None:
            vecs = vecs[np.isin(ids, keep)]
            ids = ids[np.isin(ids, keep)]
        if not np.all(np.isfinite(vecs)):
            raise ShardingError("non-finite values in the vectors; re-featurize the store")
        rows = _round_up(max(local_rows or len(ids), len(ids), 1), n_local)
        _, _, u = _global_rows(mesh, rows, ids, vecs, dim)
        acc, comp = step(acc, comp, u)
        used += len(ids)
    if dim is None:
        raise ShardingError("no vectors in the source; featurize some examples first")
    used = _sum_over_processes(used)
    if used == 0:
        raise ShardingError("no rows selected for the Gauss-Newton matrix; check sample_ids")
    R = _fetch_replicated(_psum_all(mesh)(acc)).astype(np.float64)
    return R / used, used


def _sum_over_processes(n: int) -> int:
    if jax.process_count() == 1:
        return int(n)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray([n], np.int64))))


def fit_hessian_sharded(
    train_source: Any,
    eval_source: Any | None,
    cfg_hessian: Any,
    dim: int,
    mesh: Mesh,
    *,
    rows_per_step: int | None = None,
    provenance: dict | None = None,
) -> Any:
    """``trackstar.hessian.fit_hessian`` with both Gauss-Newton sums as sharded reductions.

    Same λ rule, damping and transforms (the d×d eigendecompositions stay on the host in
    float64); returns a ``HessianFit``.
    """
    from trackstar import hessian as h

    n_sample = int(h.cfg_get(cfg_hessian, "train_sample", 0))
    seed = int(h.cfg_get(cfg_hessian, "sample_seed", 0))
    sample_ids = None
    if n_sample > 0:
        if not hasattr(train_source, "read_ids"):
            raise ShardingError("hessian.train_sample > 0 needs a store as the train source")
        pos = h.sample_rows(train_source.num_rows, n_sample, seed)
        sample_ids = None if pos is None else train_source.read_ids()[pos]
    R_train, n_train = gauss_newton_sharded(
        train_source, mesh, rows_per_step=rows_per_step, sample_ids=sample_ids
    )
    if R_train.shape[0] != dim:
        raise ShardingError(f"train vectors have d = {R_train.shape[0]}, expected {dim}")
    prov = dict(provenance or {})
    for key, src in (("train_meta", train_source), ("eval_meta", eval_source)):
        meta = h.source_meta(src) if src is not None else None
        if meta is not None:
            prov.setdefault(key, meta)
    prov.update(
        train_rows_total=h.source_num_rows(train_source),
        train_rows_used=n_train,
        train_sample_seed=seed,
        sharded_devices=mesh_size(mesh),
    )
    R_eval = None
    if eval_source is not None:
        R_eval, n_eval = gauss_newton_sharded(eval_source, mesh, rows_per_step=rows_per_step)
        prov["eval_rows_used"] = n_eval
    return h.fit_from_moments(R_train, R_eval, cfg_hessian, dim, provenance=prov)


# ----------------------------------------------------------------------------- scoring


def _score_step(mesh: Mesh, normalize: bool, k: int, has_transform: bool):
    from trackstar.score import track_non_finite, unit_rows

    rows = P(ALL_AXES)

    def local(best_1xQxK, best_ids_1xQxK, bad, ids_N, valid_N, vecs_NxD, t_DxD, q_QxD):
        if has_transform:
            vecs_NxD = vecs_NxD @ t_DxD.T
        if normalize:
            vecs_NxD = unit_rows(vecs_NxD)
        s_QxN = q_QxD @ vecs_NxD.T
        # Each device tracks its own rows' non-finite scores; merged once after the loop.
        count_1, bad_ids_1xB, bad_q_1xQ = bad
        count, bad_ids_B, bad_q_Q = track_non_finite(
            (count_1[0], bad_ids_1xB[0], bad_q_1xQ[0]), s_QxN, ids_N, valid_N
        )
        bad = (count[None], bad_ids_B[None], bad_q_Q[None])
        s_QxN = jnp.where(valid_N[None, :], s_QxN, -jnp.inf)
        # Running entries first: on this device they have lower ids than this block's rows,
        # and top_k puts the lower position first on equal scores.
        cand = jnp.concatenate([best_1xQxK[0], s_QxN], axis=1)
        cand_ids = jnp.concatenate(
            [best_ids_1xQxK[0], jnp.broadcast_to(ids_N[None, :], s_QxN.shape)], axis=1
        )
        top_QxK, pos_QxK = jax.lax.top_k(cand, k)
        return top_QxK[None], jnp.take_along_axis(cand_ids, pos_QxK, axis=1)[None], bad

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, (rows, rows, rows), rows, rows, rows, P(), P()),
        out_specs=(rows, rows, (rows, rows, rows)),
    )
    return jax.jit(fn, donate_argnums=(0, 1, 2))


def top_k_scores_sharded(
    train_source: Any,
    query_vectors_QxD: Any,
    train_transform: np.ndarray | None,
    query_transform: np.ndarray | None,
    normalize: bool,
    k: int,
    mesh: Mesh,
    *,
    rows_per_step: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``trackstar.score.top_k_scores`` with train rows sharded over every mesh device.

    Queries (and transforms) are replicated; each device keeps a running top-k of its rows and
    the per-device lists are merged once at the end by (score descending, id ascending), so
    the result equals the single-device ranking (ties to the lower example id). With several
    processes ``train_source`` must be a store. Non-finite queries, transforms or scores are
    refused like in ``top_k_scores`` (``ShardingError`` naming the query indices or the train
    example ids and store chunks).
    """
    from trackstar.score import (
        check_finite_inputs,
        init_non_finite,
        raise_if_non_finite,
        unit_rows,
    )

    q = np.asarray(query_vectors_QxD, np.float32)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ShardingError(f"query vectors must have shape (Q, D) with Q > 0, got {q.shape}")
    if not isinstance(k, int | np.integer) or k <= 0:
        raise ShardingError(f"top_k must be a positive integer, got {k!r}")
    k, (n_q, d) = int(k), q.shape
    for name, t in (("train_transform", train_transform), ("query_transform", query_transform)):
        if t is not None and np.shape(t) != (d, d):
            raise ShardingError(f"{name} has shape {np.shape(t)}, expected ({d}, {d})")
    check_finite_inputs(
        q, {"train_transform": train_transform, "query_transform": query_transform}, ShardingError
    )
    rep = replicated(mesh)
    mk = jax.make_array_from_process_local_data
    q_dev = mk(rep, q)
    if query_transform is not None:
        q_dev = jax.jit(lambda x, t: x @ t.T, out_shardings=rep)(
            q_dev, mk(rep, np.asarray(query_transform, np.float32))
        )
    if normalize:
        q_dev = jax.jit(unit_rows, out_shardings=rep)(q_dev)
    check_finite_inputs(_fetch_replicated(q_dev), {}, ShardingError, prepared=True)
    t_dev = mk(
        rep,
        np.asarray(
            train_transform if train_transform is not None else np.zeros((1, 1)), np.float32
        ),
    )
    step = _score_step(mesh, normalize, k, train_transform is not None)
    n_local = _local_mesh_devices(mesh)
    rs = row_sharding(mesh)
    best = mk(rs, np.full((n_local, n_q, k), -np.inf, np.float32))
    best_ids = mk(rs, np.full((n_local, n_q, k), -1, np.int32))
    bad = tuple(mk(rs, np.stack([x] * n_local)) for x in init_non_finite(n_q))
    blocks, _, local_rows = _local_blocks(train_source, rows_per_step)
    seen, last = 0, -1
    for ids, vecs in blocks:
        if len(ids) and (ids[0] <= last or np.any(np.diff(ids) <= 0)):
            raise ShardingError("train rows must arrive in strictly ascending id order")
        if len(ids) and (ids[0] < 0 or ids[-1] > np.iinfo(np.int32).max):
            raise ShardingError(f"example ids must lie in [0, 2^31); got {ids[0]}..{ids[-1]}")
        if np.shape(vecs)[1] != d:
            raise ShardingError(f"train vectors have d = {np.shape(vecs)[1]}, queries d = {d}")
        last = int(ids[-1]) if len(ids) else last
        rows = _round_up(max(local_rows or len(ids), len(ids), 1), n_local)
        g_ids, g_valid, g_vecs = _global_rows(mesh, rows, ids, vecs, d)
        best, best_ids, bad = step(best, best_ids, bad, g_ids, g_valid, g_vecs, t_dev, q_dev)
        seen += len(ids)
    seen = _sum_over_processes(seen)
    if seen == 0:
        raise ShardingError("the train store is empty; featurize the training examples first")
    # Every process gathers the same per-device state, so all of them raise (or none does).
    counts, bad_ids, bad_q = (_gather_rows(x) for x in bad)
    raise_if_non_finite(
        int(counts.sum()), bad_ids.reshape(-1), bad_q.any(axis=0), train_source, ShardingError
    )
    s_all, i_all = _gather_rows(best), _gather_rows(best_ids)
    return merge_top_k(s_all, i_all, min(k, seen))


def _gather_rows(x: jax.Array) -> np.ndarray:
    """A row-sharded global array as one host array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def merge_top_k(
    scores_SxQxK: np.ndarray, ids_SxQxK: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merges per-shard top-k lists: best score first, ties to the lower id; ``(ids, scores)``."""
    s = np.moveaxis(np.asarray(scores_SxQxK), 0, 1).reshape(scores_SxQxK.shape[1], -1)
    i = np.moveaxis(np.asarray(ids_SxQxK), 0, 1).reshape(ids_SxQxK.shape[1], -1).astype(np.int64)
    # Empty slots (-inf, id -1) sort after every real row: give them the largest id.
    i_key = np.where(i < 0, np.iinfo(np.int64).max, i)
    order = np.lexsort((i_key, -s.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(i, order, 1), np.take_along_axis(s, order, 1).astype(np.float32)


def score_preset_sharded(
    train_store: Any,
    query_vectors: Any,
    preset: str,
    hessian_fit: Any,
    k: int,
    mesh: Mesh,
    *,
    rows_per_step: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A scoring preset scored with ``top_k_scores_sharded`` (transforms from ``hessian_fit``)."""
    from trackstar import score

    spec = score.get_preset(preset)
    if hasattr(query_vectors, "read_all"):
        query_vectors = query_vectors.read_all()[1]
    train_name, query_name = spec.transform_names()
    t_m = t_q = None
    if spec.hessian != "none":
        if hessian_fit is None:
            raise ShardingError(f"preset {preset!r} needs a Hessian fit; fit one first")
        t_m = None if train_name is None else hessian_fit.transform(train_name)
        t_q = hessian_fit.transform(query_name)
    return top_k_scores_sharded(
        train_store, query_vectors, t_m, t_q, spec.normalize, k, mesh, rows_per_step=rows_per_step
    )
