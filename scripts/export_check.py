"""Exports a trained run as a Hugging Face GPT-2 checkpoint and checks the round trip.

    python scripts/export_check.py --config configs/demo.py --out runs/demo/hf_export

1. ``trackstar.stages.export_run`` (``trackstar.hf.export``) writes ``config.json``,
   ``model.safetensors`` and ``tokenizer.json`` (the run's model must be a gpt2-family
   configuration, as the demo's is).
2. With ``transformers`` installed (the test extra; never needed at run time):
   ``GPT2LMHeadModel.from_pretrained`` gives the native model's logits on the run's task queries
   (max |difference| relative to max |logit| is printed).
3. ``trackstar.hf.loader.load_checkpoint`` reads it back: the params equal the run's leaf by
   leaf, and an ``Attributor`` built from the imported model and its exported tokenizer over the
   run's own store, Hessian fit and query settings returns the native Attributor's proponents
   (ids and scores) for the task queries.

Prints a table; exits non-zero when a check fails.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trackstar import cli, data, stages  # noqa: E402
from trackstar.attributor import Attributor  # noqa: E402
from trackstar.hf import loader  # noqa: E402
from trackstar.tree import named_leaves  # noqa: E402


def transformers_logits(out_dir: str, tokens_NxT: np.ndarray) -> np.ndarray | None:
    """Logits of the exported checkpoint under ``transformers`` (None when it is not installed)."""
    try:
        import torch
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    model = GPT2LMHeadModel.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.as_tensor(tokens_NxT, dtype=torch.long)
        return model(ids, attention_mask=torch.ones_like(ids)).logits.numpy()


def main(argv: list[str] | None = None) -> int:
    def flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="directory of the exported checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace an existing export")
        p.add_argument("--queries", type=int, default=200, help="task queries compared (0: all)")
        p.add_argument("--k", type=int, default=10, help="proponents compared per query")

    cfg, args = cli.parse(__doc__, flags, argv=argv)
    stages.export_run(cfg, args.out, overwrite=args.overwrite)
    trained = stages.load_trained(cfg)
    queries = list(trained.world.task_queries)[: args.queries or None]
    prompts, targets = [q.prompt for q in queries], [q.target for q in queries]
    rows: list[tuple[str, str, bool]] = []

    tokens, _ = data.encode_queries(trained.tok, prompts, targets, cfg.model.max_len)
    native = np.asarray(jax.jit(trained.apply_fn)(trained.params, tokens))
    hf = transformers_logits(args.out, np.asarray(tokens))
    if hf is None:
        rows.append(("transformers logits", "skipped (transformers not installed)", True))
    else:
        rel = float(np.abs(hf - native).max() / np.abs(native).max())
        rows.append(("transformers logits: max |diff| / max |logit|", f"{rel:.2e}", rel < 1e-4))

    imported = loader.load_checkpoint(args.out)
    same = all(
        p == q and np.array_equal(np.asarray(a), np.asarray(b))
        for (p, a), (q, b) in zip(
            named_leaves(imported.params), named_leaves(trained.params), strict=True
        )
    )
    rows.append(("imported params equal the run's (bitwise)", str(same), same))

    ref = Attributor.from_run(cfg)
    att = Attributor(
        imported.apply_fn,
        imported.params,
        imported.tokenizer,
        ref.train_store,
        ref.hessian_fit,
        ref.query,
        preset=ref.preset,
        texts=ref.texts,
    )
    want = ref.proponents_batch(prompts, targets, args.k)
    got = att.proponents_batch(prompts, targets, args.k)
    ids_equal = all(list(a.ids) == list(b.ids) for a, b in zip(got, want, strict=True))
    score_diff = max(
        float(np.abs(np.asarray(a.scores) - np.asarray(b.scores)).max())
        for a, b in zip(got, want, strict=True)
    )
    rows.append(
        (f"top-{args.k} proponents of {len(queries)} task queries equal", str(ids_equal), ids_equal)
    )
    rows.append(("max |score difference|", f"{score_diff:.2e}", score_diff <= 1e-6))

    print(f"exported {cfg.run_dir} -> {args.out}\n")
    print("| check | value | ok |\n|---|---|---|")
    for name, value, ok in rows:
        print(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    cli.install_one_line_errors()
    sys.exit(main())
