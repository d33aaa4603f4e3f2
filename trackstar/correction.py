"""Optimizer second-moment correction ``g / (sqrt(v_hat) + eps)`` (docs/design.md).

``preconditioner(opt_state, params, ...)`` returns a pytree with the params' paths whose leaves
are the elementwise factor the gradient is multiplied by:

- Adam / AdamW (optax ``ScaleByAdamState`` anywhere in the state):
  ``1 / (sqrt(max(v_hat, v_floor * mean(v_hat))) + eps)`` with ``v_hat = nu / (1 - b2^t)``,
  ``t`` the state's step count and ``mean`` over every parameter element (``v_floor = 0``: the
  plain formula); with ``drop_unmoved`` 0 wherever ``nu == 0`` exactly.
- Adafactor (optax ``FactoredState`` from ``scale_by_factored_rms``): exactly the factor optax
  divides the gradient by, using the stored moments. Factored leaves stay factored
  (``FactoredScale``: a row and a column factor), so a projector can fold them into its
  Kronecker factors; ``dense()`` expands them for tests.
- An estimated V (``VEstimate``, from ``trackstar.v_estimate`` for checkpoints without an
  optimizer state; store label ``"estimate"``): the Adam form on the mean squared gradients,
  ``1 / (sqrt(max(v, v_floor * mean(v))) + eps)``, no bias correction.

Each parameter's factor is used through one interface, ``Scale`` (``dense()``,
``in_out_factors()`` or ``None``, ``apply(g)``): ``ElementwiseScale`` (an array; preconditioner
pytrees keep these as plain arrays, ``as_scale`` / ``named_scales`` wrap them) and
``FactoredScale``. Featurize (``trackstar.gradients``), projection folding and tail-patch go
through it and never ask which kind a scale is.

``CORRECTIONS`` registers the corrections by store label (``Correction``: the optimizer whose
moments it reads, the optax state it recognizes, how it reads its settings and builds its
scales); the store's allowed labels, ``OPTIMIZER_KINDS`` and the stages read from it.

The settings a correction depends on (optimizer kind, b2, eps, step count, V floor,
drop_unmoved) come from one place, ``settings_from``, which reads them from the checkpoint's own
training config and optimizer state; ``preconditioner_for(settings, ...)`` builds the factor
from them, and the settings' ``to_dict()`` is what a vector store records, so a store is never
a mix of two corrections.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trackstar.tree import named_leaves, path_name

PyTree = Any


class CorrectionError(ValueError):
    """An optimizer state that cannot give a correction; the message says how to fix it."""


class PathMismatchError(CorrectionError):
    """Params and optimizer-state moments do not cover the same parameter paths."""


@runtime_checkable
class Scale(Protocol):
    """The correction of one parameter: what featurize, projection folding and tail-patch use.

    Every correction's per-parameter factor is one of these (``ElementwiseScale``,
    ``FactoredScale``); a new shape of factor is a new class with these methods, registered as
    a pytree node so a preconditioner can be a jit argument. Plain arrays in a preconditioner
    pytree stand for ``ElementwiseScale`` (``as_scale``).
    """

    kind: str  # How messages name it: "elementwise", "factored".

    def dense(self) -> jax.Array:
        """The full elementwise factor (shaped like the parameter, or broadcasting to it)."""
        ...

    def in_out_factors(self) -> tuple[jax.Array, jax.Array] | None:
        """``(in_N, out_M)`` with ``dense() == outer(in, out)`` in the ``(n_in, n_out)`` view,
        which a Kronecker projector folds into its factors; ``None`` when not of that form."""
        ...

    def apply(self, g: jax.Array, dtype: Any = None) -> jax.Array:
        """``g * dense()`` (the factor cast to ``dtype`` first when given)."""
        ...

    def shape(self) -> tuple[int, ...]:
        """The dense factor's shape (checked against the parameter's)."""
        ...


@jax.tree_util.register_pytree_node_class
class ElementwiseScale:
    """A full elementwise factor (Adam's, or an unfactored Adafactor tensor's).

    Preconditioner pytrees hold such factors as plain arrays; ``as_scale`` wraps them.
    """

    kind = "elementwise"

    def __init__(self, array: Any):
        self.array = array

    def tree_flatten(self):
        return (self.array,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def dense(self) -> Any:
        return self.array

    def in_out_factors(self) -> None:
        return None

    def apply(self, g: jax.Array, dtype: Any = None) -> jax.Array:
        return g * (self.array if dtype is None else self.array.astype(dtype))

    def shape(self) -> tuple[int, ...]:
        """The factor's shape (checked against the parameter's)."""
        return tuple(np.shape(self.array))


@jax.tree_util.register_pytree_node_class
class FactoredScale:
    """Adafactor's factored scale of one tensor: ``expand(row, d0) * expand(col, d1)``.

    Mirrors optax's ``scale_by_factored_rms``: ``row`` has the tensor's shape without axis
    ``d0`` and ``col`` its shape without axis ``d1``.
    """

    kind = "factored"

    def __init__(self, row: jax.Array, col: jax.Array, d0: int, d1: int):
        self.row, self.col, self.d0, self.d1 = row, col, d0, d1

    def tree_flatten(self):
        return (self.row, self.col), (self.d0, self.d1)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def dense(self) -> jax.Array:
        """The full elementwise scale, shaped like the parameter."""
        return jnp.expand_dims(self.row, self.d0) * jnp.expand_dims(self.col, self.d1)

    def in_out_factors(self) -> tuple[jax.Array, jax.Array] | None:
        """``(in_N, out_M)`` with ``dense() == outer(in, out)`` in the ``(n_in, n_out)`` view.

        Only 2-D tensors have this form (for higher ranks each factor spans the other axes);
        returns ``None`` otherwise, and callers multiply by ``dense()`` instead.
        """
        if self.row.ndim != 1:
            return None
        # For 2-D, row is indexed by axis d1 (it has d0 removed) and col by axis d0.
        by_axis = {self.d1: self.row, self.d0: self.col}
        return by_axis[0], by_axis[1]

    def apply(self, g: jax.Array, dtype: Any = None) -> jax.Array:
        full = self.dense()
        return g * (full if dtype is None else full.astype(dtype))

    def shape(self) -> tuple[int, ...]:
        """The dense factor's shape; ``TypeError``/``ValueError`` when row and column do not
        combine into one scale."""
        return tuple(jax.eval_shape(self.dense).shape)


def is_scale(x: Any) -> bool:
    """Whether ``x`` is one parameter's scale object (a pytree node standing for one leaf)."""
    return isinstance(x, Scale)


def as_scale(x: Any) -> Scale:
    """A preconditioner leaf as a ``Scale``: scale objects as they are, arrays wrapped."""
    return x if is_scale(x) else ElementwiseScale(x)


def named_scales(precond: PyTree) -> list[tuple[str, Any]]:
    """``[(path, Scale), ...]`` of a preconditioner pytree, one per parameter, in order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(precond, is_leaf=is_scale)
    return [(path_name(p), as_scale(leaf)) for p, leaf in leaves]


def dense(precond: PyTree) -> PyTree:
    """Expands every scale object in a preconditioner pytree to a full array."""
    return jax.tree.map(lambda s: as_scale(s).dense(), precond, is_leaf=is_scale)


def _field(state: Any, name: str) -> Any:
    return state[name] if isinstance(state, dict) else getattr(state, name)


def _kind(node: Any) -> str | None:
    """The registered moment-state kind of ``node`` (``Correction.state_kind``), or None."""
    for c in CORRECTIONS.values():
        if isinstance(node, c.state_type):
            return c.state_kind
    # A state restored without a target (e.g. Orbax into plain dicts) keeps the field names.
    for c in CORRECTIONS.values():
        if isinstance(node, dict) and set(node) == c.state_fields:
            return c.state_kind
    return None


def find_moment_states(opt_state: Any) -> list[tuple[str, Any]]:
    """All Adam / Adafactor moment states inside a nested optax state, as ``(kind, state)``."""
    found: list[tuple[str, Any]] = []

    def walk(node: Any) -> None:
        kind = _kind(node)
        if kind is not None:
            found.append((kind, node))
            return
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, tuple | list):  # also namedtuples (optax chain / inject states)
            for v in node:
                walk(v)

    walk(opt_state)
    return found


def _check_paths(params: PyTree, moments: PyTree, what: str) -> dict[str, Any]:
    want = {p: leaf for p, leaf in named_leaves(params)}
    have = {p: leaf for p, leaf in named_leaves(moments)}
    if set(want) != set(have):
        raise PathMismatchError(
            f"optimizer-state {what} and params cover different parameter paths: "
            f"missing in state {sorted(set(want) - set(have))}, extra in state "
            f"{sorted(set(have) - set(want))}; load the params and opt_state of the same "
            "checkpoint"
        )
    return have


def _count(state: Any) -> int:
    t = int(np.asarray(_field(state, "count")))
    if t < 1:
        raise CorrectionError(
            f"optimizer state has step count {t}; the second moment is undefined before the "
            "first update (use a checkpoint saved after training steps)"
        )
    return t


# Adafactor's epsilon when a train config does not record it (trackstar.train's default too).
_OPTAX_ADAFACTOR_EPS = 1e-30


@dataclasses.dataclass(frozen=True)
class CorrectionSettings:
    """Everything the correction of one checkpoint depends on besides the moments themselves.

    Built only by ``settings_from`` (from the checkpoint's own training config and optimizer
    state), recorded by every store as ``StoreMeta.correction_settings`` (``to_dict``), and
    turned into the factor by ``preconditioner_for``, so the vectors of a store, the store's
    metadata and a tail-patch step all use one set of numbers.
    """

    # The checkpoint's train.optimizer: "adamw" or "adafactor"; None for an estimated V
    # (``estimate_settings``), which reads no optimizer state.
    optimizer: str | None
    kind: str  # The correction's label: "adam", "adafactor", "estimate" (StoreMeta.correction).
    b2: float | None  # Adam's bias-correction decay; None for Adafactor and the estimate.
    eps: float | None  # The correction's epsilon (Adam and the estimate; Adafactor's is in
    #                    its moments).
    # The moment state's step count t (Adam's bias correction 1 - b2^t); for the estimate the
    # number of squared batch gradients averaged.
    count: int
    v_floor: float  # The V floor relative to mean(v) (``preconditioner``); 0 = off.
    # Factor 0 where the second moment is exactly 0 (``preconditioner``). Last and defaulted,
    # so a dict recorded before the field existed still builds its settings.
    drop_unmoved: bool = False
    # The estimated V's sample and fingerprint (``estimate_settings``: "per", "batch",
    # "examples", "seed", "key", ...); None for a correction read from an optimizer state.
    estimate: dict | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict (what a store records).

        ``drop_unmoved`` is recorded only when True and ``estimate`` only when set: stores
        featurized before those fields existed were made with the same factor as their
        defaults and keep matching (resume, compatibility checks, cache keys), while a store
        made with them carries the keys and is told apart from them in both directions.
        """
        d = dataclasses.asdict(self)
        if not self.drop_unmoved:
            del d["drop_unmoved"]
        if self.estimate is None:
            del d["estimate"]
        return d


def settings_from(
    opt_state: Any,
    train_config: Mapping,
    *,
    featurize_eps: float = -1.0,
    v_floor: float = 0.0,
    drop_unmoved: bool = False,
) -> CorrectionSettings:
    """The effective correction settings of a checkpoint.

    Args:
      opt_state: the checkpoint's optimizer state (its moment kind and step count are read).
      train_config: the ``train`` config the checkpoint was trained with (the ``train_config``
        of its metadata, ``trackstar.checkpoint.read_meta``), not the current config: the
        optimizer that made the moments defines how they are read.
      featurize_eps: the correction epsilon when >= 0; < 0 means the optimizer's own
        ``train_config["eps"]`` (Adam only).
      v_floor: the V floor (see ``preconditioner``), recorded so stores with other floors
        are told apart.
      drop_unmoved: give entries with a second moment of exactly 0 the factor 0 (see
        ``preconditioner``), recorded likewise.

    Raises:
      CorrectionError: an unknown optimizer, a moment state of another kind than the config
        says, a missing b2/eps, a state before its first update, a bad ``v_floor``, or
        ``drop_unmoved`` with an Adafactor checkpoint whose epsilon is > 0 (it could not
        drop anything there).
    """
    optimizer = str(train_config.get("optimizer", "adamw"))
    if optimizer not in OPTIMIZER_KINDS:
        raise CorrectionError(
            f"the checkpoint was trained with optimizer {optimizer!r}, which has no known "
            f"second-moment correction; the correction supports {sorted(OPTIMIZER_KINDS)}"
        )
    kind = OPTIMIZER_KINDS[optimizer]
    state_kind, state = _single_state(opt_state)
    if _STATE_KINDS[state_kind] != kind:
        raise CorrectionError(
            f"the checkpoint's train config says optimizer {optimizer!r} but its optimizer "
            f"state holds {_STATE_KINDS[state_kind]} moments; the checkpoint is inconsistent, "
            "restore params, opt_state and meta from one checkpoint step"
        )
    count = _count(state)
    v_floor = _check_v_floor(v_floor)
    b2, eps = CORRECTIONS[kind].read_settings(train_config, featurize_eps, bool(drop_unmoved))
    return CorrectionSettings(optimizer, kind, b2, eps, count, v_floor, bool(drop_unmoved))


def estimate_settings(
    estimate: VEstimate,
    sample: Mapping,
    *,
    featurize_eps: float = -1.0,
    v_floor: float = 0.0,
    drop_unmoved: bool = False,
) -> CorrectionSettings:
    """The settings of the correction built from an estimated V (``VEstimate``) instead of an
    optimizer state: the Adam form ``1 / (sqrt(max(V, v_floor * mean V)) + eps)`` with no bias
    correction (the estimate is a plain mean).

    Args:
      estimate: the estimate (its ``count``, the number of squared gradients averaged, is
        recorded and checked by ``preconditioner_for``).
      sample: what identifies the estimate (``trackstar.v_estimate.VEstimateRecord.to_dict``:
        per, batch, examples, seed, key, ...); recorded as ``CorrectionSettings.estimate``, so
        stores made from different estimates, or from an estimate and an optimizer state,
        refuse each other.
      featurize_eps: the epsilon when >= 0; < 0 means ``ESTIMATE_EPS`` (optax Adam's 1e-8).
      v_floor, drop_unmoved: as for ``settings_from``.
    """
    b2, eps = CORRECTIONS[ESTIMATE].read_settings({}, featurize_eps, bool(drop_unmoved))
    return CorrectionSettings(
        optimizer=None,
        kind=ESTIMATE,
        b2=b2,
        eps=eps,
        count=_count(estimate),
        v_floor=_check_v_floor(v_floor),
        drop_unmoved=bool(drop_unmoved),
        estimate=dict(sample),
    )


def _adam_settings(
    train_config: Mapping, featurize_eps: float, drop_unmoved: bool
) -> tuple[float, float]:
    """Adam's ``(b2, eps)``: the checkpoint's b2, and its eps unless ``featurize_eps >= 0``."""
    missing = [k for k in ("b2", "eps") if k not in train_config]
    if missing:
        raise CorrectionError(
            f"the checkpoint's train config has no {missing}; an Adam correction needs the "
            "b2 and eps the optimizer ran with (retrain with this trackstar version)"
        )
    b2 = float(train_config["b2"])
    eps = float(featurize_eps) if featurize_eps >= 0 else float(train_config["eps"])
    if not 0.0 <= b2 < 1.0:
        raise CorrectionError(f"the checkpoint's train.b2 = {b2}; it must be in [0, 1)")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise CorrectionError(f"correction eps = {eps}; it must be a finite number >= 0")
    return b2, eps


def _adafactor_settings(
    train_config: Mapping, featurize_eps: float, drop_unmoved: bool
) -> tuple[None, None]:
    """Adafactor records no b2/eps (its epsilon is inside the moments); refuses settings that
    would not change anything."""
    if featurize_eps >= 0:
        raise CorrectionError(
            f"featurize.eps = {featurize_eps} sets Adam's correction epsilon, but the "
            "checkpoint was trained with adafactor, whose epsilon is inside its stored "
            "moments (train.adafactor_eps); set featurize.eps = -1"
        )
    adafactor_eps = float(train_config.get("adafactor_eps", _OPTAX_ADAFACTOR_EPS))
    if drop_unmoved and adafactor_eps > 0:
        # optax adds epsilon to every squared gradient before averaging, so a statistic
        # is never exactly 0 and the option would silently change nothing.
        raise CorrectionError(
            "featurize.drop_unmoved drops entries whose second moment is exactly 0, but "
            f"this adafactor checkpoint was trained with train.adafactor_eps = "
            f"{adafactor_eps:g}, which optax adds to every squared gradient, so no stored "
            "statistic is 0 and nothing would be dropped; set featurize.drop_unmoved = "
            "False (featurize.v_floor still bounds entries training never moved)"
        )
    return None, None


def _estimate_settings(
    train_config: Mapping, featurize_eps: float, drop_unmoved: bool
) -> tuple[None, float]:
    """The estimate's ``(b2, eps)``: no bias correction; ``featurize_eps`` when >= 0, else
    ``ESTIMATE_EPS`` (the estimate reads no optimizer, so no optimizer's epsilon)."""
    del train_config, drop_unmoved
    eps = float(featurize_eps) if featurize_eps >= 0 else ESTIMATE_EPS
    if not (math.isfinite(eps) and eps >= 0.0):
        raise CorrectionError(f"correction eps = {eps}; it must be a finite number >= 0")
    return None, eps


def preconditioner_for(settings: CorrectionSettings, opt_state: Any, params: PyTree) -> PyTree:
    """``preconditioner`` with the numbers of ``settings`` (from ``settings_from``, or
    ``estimate_settings`` with the ``VEstimate`` as ``opt_state``).

    Raises ``CorrectionError`` when ``opt_state`` is not the state the settings were read from
    (another moment kind or step count), so settings cannot be paired with another checkpoint.
    """
    state_kind, state = _single_state(opt_state)
    count = _count(state)
    if _STATE_KINDS[state_kind] != settings.kind or count != settings.count:
        raise CorrectionError(
            f"the correction settings were read from a {settings.kind} state at step "
            f"{settings.count}, but this opt_state holds {_STATE_KINDS[state_kind]} moments at "
            f"step {count}; build the settings from this checkpoint with settings_from"
        )
    return preconditioner(
        opt_state,
        params,
        settings.eps,
        b2=settings.b2,
        v_floor=settings.v_floor,
        drop_unmoved=settings.drop_unmoved,
    )


def _single_state(opt_state: Any) -> tuple[str, Any]:
    states = find_moment_states(opt_state)
    if len(states) != 1:
        kinds = [k for k, _ in states]
        raise CorrectionError(
            f"expected one Adam or Adafactor moment state in opt_state, found {len(states)} "
            f"({kinds}); pass the state of a single adam/adamw/adafactor optimizer"
        )
    return states[0]


def _check_v_floor(v_floor: float) -> float:
    v_floor = float(v_floor)
    if not (math.isfinite(v_floor) and v_floor >= 0.0):
        raise CorrectionError(
            f"v_floor = {v_floor}; it must be a finite number >= 0 (0 disables the guard; "
            "config field featurize.v_floor)"
        )
    return v_floor


def preconditioner(
    opt_state: Any,
    params: PyTree,
    eps: float | None = None,
    *,
    b2: float | None = None,
    v_floor: float = 0.0,
    drop_unmoved: bool = False,
) -> PyTree:
    """The optimizer correction factor, a pytree with the same paths as ``params``.

    Args:
      opt_state: an optax state holding exactly one ``ScaleByAdamState`` (Adam/AdamW) or one
        ``FactoredState`` (Adafactor), at any nesting depth.
      params: the parameters (paths and shapes are checked against the moments).
      eps: Adam's ``eps`` (pass the optimizer's; required for Adam). Unused for Adafactor,
        whose epsilon is already inside the stored moments.
      b2: Adam's ``b2`` for bias correction (required for Adam; the state does not record it).
      v_floor: guard against parameters the optimizer never moved. Every element's second
        moment is raised to at least ``v_floor * mean(v)``, the mean taken over every element
        of every parameter, before the inverse square root. A parameter whose gradient was
        always zero in training (an input embedding row of a token the corpus never has, such
        as UNK; an attention key bias, whose gradient vanishes identically) has ``v = 0`` and,
        without the guard, a factor ``1 / eps`` (1e8 for eps = 1e-8): one such row then
        dominates every vector that touches it, and float32 rounding noise on a zero-gradient
        bias is amplified into a visible share of every vector. With the guard no element is
        weighted more than ``1 / sqrt(v_floor)`` times an element of mean second moment. The
        mean (not a per-tensor scale) is used because a tensor can be zero-gradient as a
        whole. 0 disables the guard (the plain formula). For Adafactor the same floor is
        applied to the (dense) second moment optax divides by; a factored tensor with any
        element below the floor is returned dense (the floored values are not rank one),
        the others stay factored.
      drop_unmoved: give the factor 0 to entries whose second moment is exactly 0, instead
        of the (floored) inverse square root. A second moment of exactly 0 means every
        gradient the optimizer saw there was exactly 0, so training never moved the entry
        through its gradient (only weight decay, if any, touched it); the question "which
        training example moved this parameter" then has no answer there, and any weight
        given to it (1/eps, or the floor's 1/sqrt(v_floor * mean)) only lets examples that
        touch it (e.g. texts with tokens training never had) gain vector length that no
        query can match. Every other entry keeps exactly the factor it has without the
        option (the floor's mean still counts the zeros). Adam: ``nu == 0``. Adafactor
        (whose factored moments keep one statistic per row and per column): an unfactored
        ``v`` entry that is 0, and for a factored tensor every element whose row statistic
        or column statistic is 0 (a statistic is a mean of squared gradients, so 0 means
        every element it covers had gradient 0); a never-updated element whose row and
        column both saw gradient elsewhere cannot be told apart in factored moments and is
        kept. optax adds Adafactor's epsilon to each squared gradient, so with epsilon > 0
        (as trackstar trains) no statistic is 0 and nothing is dropped; ``settings_from``
        refuses the option there.

    Returns:
      Adam: arrays ``1 / (sqrt(max(v_hat, v_floor * mean(v_hat))) + eps)`` (0 where dropped);
      a ``VEstimate`` the same with ``v_hat = v``.
      Adafactor: ``FactoredScale`` for factored tensors and arrays ``max(v, floor)^-1/2`` for
      the rest (0 where dropped).
    """
    kind, state = _single_state(opt_state)
    v_floor = _check_v_floor(v_floor)
    return CORRECTIONS[_STATE_KINDS[kind]].build(
        state, params, eps=eps, b2=b2, v_floor=v_floor, drop_unmoved=bool(drop_unmoved)
    )


def _global_mean(leaves: Iterable[jax.Array]) -> float:
    """Mean over every element of every leaf, summed leaf by leaf on device in float32 and
    across leaves in float64 on the host (a float32 running sum over many leaves drifts).
    ``leaves`` is consumed one at a time, so a generator keeps one leaf alive at once."""
    total, count = 0.0, 0
    for x in leaves:
        total += float(jnp.sum(x))
        count += int(np.prod(np.shape(x)))
    return total / max(count, 1)


def _adam_preconditioner(
    state: Any,
    params: PyTree,
    *,
    eps: float | None,
    b2: float | None,
    v_floor: float,
    drop_unmoved: bool,
) -> PyTree:
    if b2 is None or eps is None:
        raise CorrectionError(
            "an Adam state needs the optimizer's b2 (bias correction) and eps: build the "
            "correction with settings_from(opt_state, train_config) and preconditioner_for, "
            "or pass b2= and eps= explicitly"
        )
    if not 0.0 <= b2 < 1.0:
        raise CorrectionError(f"b2 must be in [0, 1), got {b2}")
    nu = _field(state, "nu")
    moments = _check_paths(params, nu, "nu")
    t = _count(state)
    denom_scale = 1.0 / (1.0 - float(b2) ** t)

    v_hats: dict[str, jax.Array] = {}
    for path, p in named_leaves(params):
        v = moments[path]
        if np.shape(v) != np.shape(p):
            raise PathMismatchError(
                f"nu for {path!r} has shape {np.shape(v)}, params {np.shape(p)}"
            )
        v_hats[path] = jnp.asarray(v, jnp.float32) * denom_scale
    return _adam_form(v_hats, params, eps=eps, v_floor=v_floor, drop_unmoved=drop_unmoved)


def _adam_form(
    v_hats: dict[str, jax.Array], params: PyTree, *, eps: float, v_floor: float, drop_unmoved: bool
) -> PyTree:
    """``1 / (sqrt(max(v_hat, v_floor * mean(v_hat))) + eps)`` per parameter (0 where
    ``drop_unmoved`` and ``v_hat == 0``): Adam's factor from its bias-corrected second
    moments, and the estimated V's (``VEstimate``) from its mean squared gradients."""
    floor = v_floor * _global_mean(list(v_hats.values())) if v_floor > 0 else 0.0

    def factor(path: str, p: Any) -> jax.Array:
        v_hat = v_hats[path]
        if floor > 0:
            v_hat = jnp.maximum(v_hat, floor)
        f = 1.0 / (jnp.sqrt(v_hat) + eps)
        if drop_unmoved:
            # v_hat = nu * (a scale >= 1) is 0 exactly where nu is: no underflow to mistake.
            f = jnp.where(v_hats[path] == 0, 0.0, f)
        return f

    return _map_with_path(factor, params)


def _estimate_preconditioner(
    state: Any,
    params: PyTree,
    *,
    eps: float | None,
    b2: float | None = None,
    v_floor: float,
    drop_unmoved: bool,
) -> PyTree:
    del b2  # A plain mean of squared gradients: nothing to bias-correct.
    if eps is None:
        raise CorrectionError(
            "an estimated V needs the correction eps: build the settings with "
            "estimate_settings and the factor with preconditioner_for, or pass eps="
        )
    _count(state)
    moments = _check_paths(params, _field(state, "v"), "v")
    v_hats: dict[str, jax.Array] = {}
    for path, p in named_leaves(params):
        if np.shape(moments[path]) != np.shape(p):
            raise PathMismatchError(
                f"the estimated v for {path!r} has shape {np.shape(moments[path])}, params "
                f"{np.shape(p)}"
            )
        v_hats[path] = jnp.asarray(moments[path], jnp.float32)
    return _adam_form(v_hats, params, eps=eps, v_floor=v_floor, drop_unmoved=drop_unmoved)


def _factored_preconditioner(
    state: Any,
    params: PyTree,
    *,
    eps: float | None = None,
    b2: float | None = None,
    v_floor: float,
    drop_unmoved: bool,
) -> PyTree:
    del eps, b2  # Adafactor's epsilon is inside its stored moments; it has no bias correction.
    _count(state)
    v_rows = _check_paths(params, _field(state, "v_row"), "v_row")
    v_cols = _check_paths(params, _field(state, "v_col"), "v_col")
    vs = _check_paths(params, _field(state, "v"), "v")

    def second_moment_of(path: str, p: Any) -> jax.Array | FactoredScale:
        """The divisor's square: an array, or a FactoredScale whose dense() is that array."""
        shape = tuple(np.shape(p))
        v = jnp.asarray(vs[path], jnp.float32)
        # optax keeps a full v exactly for the tensors it does not factor.
        if len(shape) < 2 or tuple(v.shape) == shape:
            if tuple(v.shape) != shape:
                raise PathMismatchError(f"v for {path!r} has shape {v.shape}, params {shape}")
            return v
        # Same axis choice as optax.scale_by_factored_rms (_factored_dims).
        sorted_dims = np.argsort(shape)
        d1, d0 = int(sorted_dims[-2]), int(sorted_dims[-1])
        v_row = jnp.asarray(v_rows[path], jnp.float32)
        v_col = jnp.asarray(v_cols[path], jnp.float32)
        want_row = tuple(s for i, s in enumerate(shape) if i != d0)
        want_col = tuple(s for i, s in enumerate(shape) if i != d1)
        if tuple(v_row.shape) != want_row or tuple(v_col.shape) != want_col:
            raise PathMismatchError(
                f"factored moments for {path!r} have shapes {v_row.shape}/{v_col.shape}, "
                f"expected {want_row}/{want_col} for params {shape}"
            )
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        row_col_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
        if drop_unmoved:
            # A zero mean means every row statistic it averages is 0: all those elements are
            # dropped, so divide by 1 there to keep them at an exact 0 instead of 0/0.
            row_col_mean = jnp.where(row_col_mean == 0, 1.0, row_col_mean)
        return FactoredScale(v_row / row_col_mean, v_col, d0, d1)

    moments = {path: second_moment_of(path, p) for path, p in named_leaves(params)}
    floor = 0.0
    if v_floor > 0:
        floor = v_floor * _global_mean(
            m.dense() if isinstance(m, FactoredScale) else m for m in moments.values()
        )

    def inv_sqrt(x: jax.Array, unmoved: jax.Array | None) -> jax.Array:
        return x**-0.5 if unmoved is None else jnp.where(unmoved, 0.0, x**-0.5)

    def factor(path: str, p: Any):
        m = moments[path]
        if not isinstance(m, FactoredScale):
            unmoved = (m == 0) if drop_unmoved else None
            return inv_sqrt(jnp.maximum(m, floor) if floor > 0 else m, unmoved)
        # Zero row or column statistics, not zeros of the dense product: a product of two
        # tiny nonzero statistics can underflow to 0 in float32.
        row0 = (m.row == 0) if drop_unmoved else None
        col0 = (m.col == 0) if drop_unmoved else None
        if floor > 0:
            full = m.dense()
            if float(jnp.min(full)) < floor:
                unmoved = None
                if drop_unmoved:
                    unmoved = jnp.expand_dims(row0, m.d0) | jnp.expand_dims(col0, m.d1)
                return inv_sqrt(jnp.maximum(full, floor), unmoved)
        # Rank one stays rank one: 0 in a row (column) factor zeroes exactly that slice.
        return FactoredScale(inv_sqrt(m.row, row0), inv_sqrt(m.col, col0), m.d0, m.d1)

    return _map_with_path(factor, params)


# The label of the estimated-V correction (StoreMeta.correction, CorrectionSettings.kind).
ESTIMATE = "estimate"
# The estimated V's epsilon when featurize.eps < 0: optax.adam's default.
ESTIMATE_EPS = 1e-8


class VEstimate(NamedTuple):
    """An estimated second moment, the state the ``"estimate"`` correction reads.

    ``v``: a pytree shaped like the params, the mean over ``count`` batches of the squared
    gradient of the training loss (``trackstar.v_estimate.estimate_v``). Passed to
    ``preconditioner`` / ``preconditioner_for`` in place of an optimizer state.
    """

    v: PyTree
    count: int


@dataclasses.dataclass(frozen=True)
class Correction:
    """One registered correction: the optimizer whose moments it reads and how.

    ``CORRECTIONS`` maps each store label to one of these; ``OPTIMIZER_KINDS``, the store's
    allowed labels (``trackstar.store.CORRECTIONS``), ``trackstar.stages.correction_kind`` and
    ``settings_from`` all read from it (docs/design.md, "Adding a correction").
    """

    label: str  # StoreMeta.correction and CorrectionSettings.kind: "adam", "adafactor", ...
    # The train.optimizer whose moments it reads (trackstar.train.OPTIMIZERS); None for a
    # correction read from no optimizer (the estimated V).
    optimizer: str | None
    state_kind: str  # find_moment_states' name for the optax moment state.
    state_type: type  # That optax state class.
    state_fields: frozenset  # Its field names (a state restored into plain dicts).
    # Train-config fields the settings read besides ``optimizer`` (a featurize config must
    # agree with the checkpoint on them: trackstar.stages.checkpoint_train_config).
    train_fields: tuple[str, ...]
    # (train_config, featurize_eps, drop_unmoved) -> (b2, eps) of CorrectionSettings; raises
    # CorrectionError for settings this correction cannot honour.
    read_settings: Callable[[Mapping, float, bool], tuple[float | None, float | None]]
    # (state, params, *, eps, b2, v_floor, drop_unmoved) -> the preconditioner pytree, whose
    # per-parameter leaves are arrays or Scale objects.
    build: Callable[..., PyTree]


CORRECTIONS: dict[str, Correction] = {
    c.label: c
    for c in (
        Correction(
            label="adam",
            optimizer="adamw",
            state_kind="adam",
            state_type=optax.ScaleByAdamState,
            state_fields=frozenset({"count", "mu", "nu"}),
            train_fields=("b2", "eps"),
            read_settings=_adam_settings,
            build=_adam_preconditioner,
        ),
        Correction(
            label="adafactor",
            optimizer="adafactor",
            state_kind="factored",
            state_type=optax.FactoredState,
            state_fields=frozenset({"count", "v_row", "v_col", "v"}),
            train_fields=(),
            read_settings=_adafactor_settings,
            build=_factored_preconditioner,
        ),
        # V estimated from squared gradients at the given parameters (trackstar.v_estimate),
        # for checkpoints without an optimizer state; the Adam form, without bias correction.
        Correction(
            label=ESTIMATE,
            optimizer=None,
            state_kind="v_estimate",
            state_type=VEstimate,
            state_fields=frozenset({"v", "count"}),
            train_fields=(),
            read_settings=_estimate_settings,
            build=_estimate_preconditioner,
        ),
    )
}
# train.optimizer -> the label of the correction that reads its moments (StoreMeta.correction).
OPTIMIZER_KINDS = {c.optimizer: c.label for c in CORRECTIONS.values() if c.optimizer is not None}
_STATE_KINDS = {c.state_kind: c.label for c in CORRECTIONS.values()}


def register(c: Correction) -> None:
    """Adds a correction to ``CORRECTIONS`` (and the lookups derived from it) at run time.

    The project's corrections are listed in ``CORRECTIONS`` above; this is for tests and
    plugins. ``trackstar.store.CORRECTIONS`` (the labels a store accepts) is fixed at import.
    """
    if c.label in CORRECTIONS or c.label == "none" or c.optimizer in OPTIMIZER_KINDS:
        raise ValueError(f"a correction labelled {c.label!r} or for {c.optimizer!r} exists")
    CORRECTIONS[c.label] = c
    if c.optimizer is not None:
        OPTIMIZER_KINDS[c.optimizer] = c.label
    _STATE_KINDS[c.state_kind] = c.label


def for_optimizer(optimizer: str) -> Correction | None:
    """The registered correction of a ``train.optimizer``, or None when it has none."""
    label = OPTIMIZER_KINDS.get(optimizer)
    return CORRECTIONS[label] if label is not None else None


def _map_with_path(fn, tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def opt_state_fingerprint(opt_state: Any, sample: int = 1024) -> str:
    """A cheap, stable fingerprint of an optimizer state for store metadata.

    Hashes every leaf's path, shape and dtype and the bytes of up to ``sample`` evenly strided
    elements (taken on device, so large states are not copied to the host).
    """
    h = hashlib.sha256()
    for path, leaf in named_leaves(opt_state):
        arr = jnp.asarray(leaf)
        h.update(f"{path}:{arr.shape}:{arr.dtype};".encode())
        flat = arr.reshape(-1)
        stride = max(1, flat.size // sample)
        h.update(np.ascontiguousarray(np.asarray(flat[::stride][:sample])).tobytes())
    return h.hexdigest()[:16]
