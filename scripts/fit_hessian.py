"""Stage 4: fit R = λ R_eval + (1 − λ) R_train and R^{-1/2} from the stores.

The `trackstar hessian` command (trackstar/cli.py); same flags.
"""

from _cli import run_command

if __name__ == "__main__":
    run_command("hessian")
