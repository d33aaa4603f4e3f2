"""Stage 4: fit R = λ R_eval + (1 − λ) R_train and R^{-1/2} from the stores."""

from _cli import parse

from trackstar import hessian, stages


def _args(p):
    p.add_argument("--candidates", default="candidates", choices=["candidates", "corpus"])
    p.add_argument("--correction", default="on", choices=["on", "off"])


if __name__ == "__main__":
    cfg, args = parse(__doc__, _args)
    out = stages.stage_hessian(cfg, args.candidates, args.correction == "on")
    fit = hessian.HessianFit.load(out)
    print(f"hessian: d={fit.dim} lambda={fit.lambda_mix:.4f} -> {out}")
