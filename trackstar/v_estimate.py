"""The second moment V estimated from gradients, for checkpoints without an optimizer state.

TrackStar's correction divides each gradient by sqrt(V), V the optimizer's second moment. A
pretrained checkpoint usually comes without its optimizer state; ``estimate_v`` then estimates
V at the given parameters θ (docs/method.md, "Estimated V"):

    V̂ = (1/K) Σ_k (∇θ L_k(θ))²

with L_k the training loss (``trackstar.losses.mean_token_loss``: next-token cross-entropy
averaged over the counted tokens of the batch) of batch k, K batches of ``batch`` examples each.
The gradients are **per batch**, not per example: Adam's ν is an EMA of squared mini-batch
gradients, and the mean of B per-example gradients has about 1/B of their variance, so squared
batch gradients at the training batch size are on the scale of what the optimizer divided by
(squared per-example gradients would weight gradient noise B times more, relative to the
mean gradient). The batch size is part of the estimate's record and fingerprint.

The batches come from ``sample_positions``: a permutation of the example positions under a seed,
its first ``K * batch`` positions (K = examples // batch; examples = 0 means every example),
cut in order into the K batches. One streaming pass, one jitted step per batch (the squared
gradient is added to a float32 running sum on device), with a progress bar.

``trackstar.stages.v_estimate`` keys the estimate by the parameters, the sampled examples and
these settings (``stages.config_key``), saves it as ``<run_dir>/v_estimate/<key>.npz``
(``save`` / ``load``) and reuses it; the correction reads it as a ``correction.VEstimate``
(store label ``"estimate"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from trackstar.correction import VEstimate
from trackstar.files import atomic_write
from trackstar.losses import mean_token_loss
from trackstar.tree import named_leaves

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

# What one squared gradient is of: the training loss of a batch (a mean over its tokens).
PER = "batch"
LOSS = "mean_token_loss"
# Bumped when the estimate's arithmetic changes, so older files are not reused.
VERSION = 1


class VEstimateError(ValueError):
    """An estimate that cannot be made or read as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class EstimateSample:
    """Which examples the estimate averages over (config ``featurize.v_estimate_*``)."""

    examples: int  # Examples drawn (0 = all); rounded down to whole batches.
    seed: int  # Seed of the permutation the examples are drawn from.
    batch: int  # Examples per squared gradient (the batch of the loss).

    def __post_init__(self) -> None:
        for name in ("examples", "seed", "batch"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 0:
                raise VEstimateError(f"{name} = {v!r}; it must be an int >= 0")
        if self.batch < 1:
            raise VEstimateError(f"batch = {self.batch}; it must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> EstimateSample:
        """From a recorded estimate (``CorrectionSettings.estimate``) or a plain dict."""
        return cls(int(d["examples"]), int(d["seed"]), int(d["batch"]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sample_positions(n: int, sample: EstimateSample) -> np.ndarray:
    """The example positions the estimate uses, in batch order: the first ``K * batch`` of a
    permutation of ``range(n)`` seeded by ``sample.seed``, K = min(examples or n, n) // batch.

    Raises ``VEstimateError`` when not even one batch fits.
    """
    want = n if sample.examples == 0 else min(sample.examples, n)
    k = want // sample.batch
    if k < 1:
        raise VEstimateError(
            f"the estimate needs at least one batch of {sample.batch} examples, but only {want} "
            f"are available ({n} in the corpus, featurize.v_estimate_examples = "
            f"{sample.examples}); lower featurize.v_estimate_batch or raise v_estimate_examples"
        )
    perm = np.random.default_rng(sample.seed).permutation(n)
    return perm[: k * sample.batch]


def data_fingerprint(tokens_NxT: np.ndarray, weights_NxT: np.ndarray) -> str:
    """A content hash of the sampled examples (shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for a in (np.asarray(tokens_NxT), np.asarray(weights_NxT)):
        h.update(f"{a.shape}:{a.dtype};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def batch_loss(apply_fn: ApplyFn) -> Callable[[PyTree, jax.Array, jax.Array], jax.Array]:
    """``loss(params, tokens_BxT, weights_BxT)``: the training loss of one batch."""

    def loss(params: PyTree, tokens_BxT: jax.Array, weights_BxT: jax.Array) -> jax.Array:
        return mean_token_loss(apply_fn(params, tokens_BxT), tokens_BxT, weights_BxT)[0]

    return loss


def make_step(apply_fn: ApplyFn) -> Callable:
    """The jitted ``step(sum, params, tokens_BxT, weights_BxT) -> sum + grad(loss)**2``
    (float32; the running sum is donated)."""
    grad = jax.grad(batch_loss(apply_fn))

    def step(total: PyTree, params: PyTree, tokens_BxT, weights_BxT) -> PyTree:
        g = grad(params, tokens_BxT, weights_BxT)
        return jax.tree.map(lambda t, x: t + jnp.square(x.astype(jnp.float32)), total, g)

    return jax.jit(step, donate_argnums=0)


def estimate_v(
    apply_fn: ApplyFn,
    params: PyTree,
    tokens_NxT: np.ndarray,
    weights_NxT: np.ndarray,
    batch: int,
    *,
    progress: bool = True,
    desc: str = "estimate V",
) -> VEstimate:
    """The mean squared batch gradient over consecutive batches of ``batch`` rows.

    ``tokens_NxT`` / ``weights_NxT`` are the sampled examples in batch order
    (``sample_positions``); N must be a multiple of ``batch``. Returns a ``VEstimate`` whose
    ``v`` is shaped like ``params`` (float32) and ``count`` is the number of batches.
    """
    tokens_NxT, weights_NxT = np.asarray(tokens_NxT), np.asarray(weights_NxT)
    n = tokens_NxT.shape[0]
    if batch < 1 or n < batch or n % batch:
        raise VEstimateError(
            f"{n} examples do not make whole batches of {batch} (take them from sample_positions)"
        )
    step = make_step(apply_fn)
    total = jax.tree.map(lambda p: jnp.zeros(np.shape(p), jnp.float32), params)
    k = n // batch
    for i in tqdm(range(k), desc=desc, unit="batch", disable=not progress, smoothing=0.1):
        sl = slice(i * batch, (i + 1) * batch)
        total = step(total, params, tokens_NxT[sl], weights_NxT[sl])
    return VEstimate(jax.tree.map(lambda t: t / k, total), k)


def save(file: str, estimate: VEstimate, record: dict) -> None:
    """Writes ``estimate`` and its ``record`` (JSON-ready) to ``file`` (.npz), atomically."""
    named = named_leaves(estimate.v)
    meta = {"record": record, "count": int(estimate.count), "paths": [p for p, _ in named]}
    arrays = {f"leaf_{i:05d}": np.asarray(leaf, np.float32) for i, (_, leaf) in enumerate(named)}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    atomic_write(file, lambda f: np.savez(f, **arrays), binary=True)


def load(file: str, params: PyTree) -> tuple[VEstimate, dict]:
    """``(estimate, record)`` saved by ``save``; the leaves are laid out like ``params``."""
    with np.load(file) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        want = [p for p, _ in named_leaves(params)]
        if meta["paths"] != want:
            raise VEstimateError(
                f"{file} holds an estimate for other parameters ({len(meta['paths'])} tensors, "
                f"the model has {len(want)}); delete it or use the model it was made for"
            )
        leaves = [z[f"leaf_{i:05d}"] for i in range(len(want))]
    treedef = jax.tree_util.tree_structure(params)
    v = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
    return VEstimate(v, int(meta["count"])), meta["record"]
