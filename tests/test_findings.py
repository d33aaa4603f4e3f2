"""scripts/findings.py on fabricated per-query metrics: the paired diff over shared queries and
the sign / 2-se verdict rule, and the table from fabricated E1 run dirs."""

import gzip
import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "findings", os.path.join(ROOT, "scripts", "findings.py")
)
findings = importlib.util.module_from_spec(_spec)
sys.modules["findings"] = findings  # Its dataclass looks its module up there.
_spec.loader.exec_module(findings)


def test_paired_uses_only_queries_both_have():
    a = {0: {"mrr": 1.0}, 1: {"mrr": 0.5}, 2: {"mrr": 0.25}, 3: {"mrr": 1.0}}
    b = {1: {"mrr": 0.5}, 2: {"mrr": 0.0}, 3: {"mrr": None}, 4: {"mrr": 0.0}}
    diff, se, n = findings.paired(a, b, "mrr")
    assert n == 2  # Queries 1 and 2: 0 is only in a, 4 only in b, 3 has no value in b.
    assert diff == pytest.approx(0.125)
    assert se == pytest.approx(math.sqrt(((0 - 0.125) ** 2 + (0.25 - 0.125) ** 2) / 1 / 2))


def test_paired_without_shared_values():
    diff, se, n = findings.paired(
        {0: {"tailpatch@10": None}}, {0: {"tailpatch@10": 1.0}}, "tailpatch@10"
    )
    assert n == 0 and math.isnan(diff) and math.isnan(se)
    assert findings.verdict(diff, se) == "n/a"


@pytest.mark.parametrize(
    "diff, se, sign, expected",
    [
        (0.5, 0.2, 1, "yes"),  # 2.5 se, claimed sign.
        (-0.5, 0.2, 1, "no"),  # 2.5 se, opposite sign.
        (-0.5, 0.2, -1, "yes"),  # A claim that a is below b.
        (0.5, 0.2, -1, "no"),
        (0.4, 0.2, 1, "tie"),  # Exactly 2 se is not beyond it.
        (-0.39, 0.2, 1, "tie"),
        (0.0, 0.0, 1, "tie"),
    ],
)
def test_verdict_sign_and_two_se(diff, se, sign, expected):
    assert findings.verdict(diff, se, sign) == expected


def _write_run(run_dir, metrics_by_method, accuracy=0.5):
    e1 = os.path.join(run_dir, "experiments", "e1")
    os.makedirs(os.path.join(e1, "proponents"))
    results = {"accuracy": accuracy, "n_queries": 4, "tailpatch": {"n_queries": 2}, "wall_s": 9.0}
    with open(os.path.join(e1, "results.json"), "w") as f:
        json.dump(results, f)
    for method, per_query in metrics_by_method.items():
        with gzip.open(os.path.join(e1, "proponents", f"{method}.jsonl.gz"), "wt") as f:
            for qid, m in per_query.items():
                f.write(json.dumps({"example_id": qid, "metrics": m}) + "\n")


def test_table_from_run_dirs(tmp_path, capsys):
    def q(mrr, tp):
        return {"mrr": mrr, "tailpatch@10": tp}

    # trackstar leads grad_dot on MRR in every query; tail-patch only on queries 0 and 1.
    _write_run(
        str(tmp_path / "w1"),
        {
            "trackstar": {0: q(1.0, 1.0), 1: q(0.9, 1.1), 2: q(0.8, None), 3: q(1.0, None)},
            "grad_dot": {0: q(0.1, 2.0), 1: q(0.2, 2.2), 2: q(0.0, None), 3: q(0.1, None)},
        },
    )
    worlds = [findings.load_world(str(tmp_path / "w1"))]
    rows = {r["label"]: r for r in findings.evaluate(worlds, findings.findings())}
    mrr = rows["TrackStar > grad_dot on MRR"]["worlds"]["w1"]
    assert mrr["n"] == 4 and mrr["verdict"] == "yes"
    assert mrr["diff"] == pytest.approx((0.9 + 0.7 + 0.8 + 0.9) / 4)
    tp = rows["TrackStar > grad_dot on tail-patch@10"]["worlds"]["w1"]
    assert tp["n"] == 2 and tp["verdict"] == "no" and tp["diff"] == pytest.approx(-1.05)
    assert rows["BM25 > TrackStar on MRR"]["worlds"]["w1"] is None  # No bm25 file: no cell.

    assert findings.main([str(tmp_path / "w1"), "--wall", "w1=1800"]) == 0
    out = capsys.readouterr().out
    assert "| TrackStar > grad_dot on MRR (paper) | yes (+0.825 ± " in out
    assert "| end-to-end wall time | 30.0 min |" in out
    assert findings.main([str(tmp_path / "w1"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["worlds"][0]["accuracy"] == 0.5


def test_lds_rows_from_e8_runs(tmp_path, capsys):
    """--lds WORLD=E8_RUN_DIR: E8's paired differences become rows with the 2-se verdict; a
    world without an E8 run gets empty cells."""
    _write_run(str(tmp_path / "w1"), {"trackstar": {0: {"mrr": 1.0}}})
    _write_run(str(tmp_path / "w2"), {"trackstar": {0: {"mrr": 1.0}}})
    e8 = tmp_path / "e8" / "experiments" / "e8"
    e8.mkdir(parents=True)
    paired = {
        "exp_opt_norm_rtrain − exp_opt_norm": {"mean": -0.03, "se": 0.01, "n": 64},
        "trackstar − exp_opt_norm": {"mean": 0.01, "se": 0.02, "n": 64},
    }
    (e8 / "results.json").write_text(json.dumps({"paired": paired}))
    rows = findings.lds_rows({"w1": str(tmp_path / "e8")}, ["w1", "w2"])
    by = {r["label"]: r["worlds"] for r in rows}
    assert by["R_train raises LDS"]["w1"]["verdict"] == "no"  # −3 se against the claim.
    assert by["mixed R raises LDS"]["w1"]["verdict"] == "tie"
    assert by["R_train raises LDS"]["w2"] is None and by["mixing raises LDS"]["w1"] is None
    args = [str(tmp_path / "w1"), str(tmp_path / "w2"), "--lds", f"w1={tmp_path / 'e8'}"]
    assert findings.main(args) == 0
    out = capsys.readouterr().out
    assert "| R_train raises LDS (hypothesis) | no (-0.030 ± 0.010) | – |" in out
    with pytest.raises(SystemExit, match="run configs/e8.py there first"):
        findings.main([str(tmp_path / "w1"), "--lds", f"w1={tmp_path}"])


def test_ground_truth_from_the_tailpatch_cache(tmp_path):
    np = pytest.importorskip("numpy")
    run = str(tmp_path / "w")
    ts = {0: 1.0, 1: 2.0, 2: None}  # Query 2 not tail-patched.
    _write_run(
        run,
        {
            "trackstar": {
                q: {"mrr": 1.0, "tailpatch@1": v, "tailpatch@10": v} for q, v in ts.items()
            }
        },
    )
    cache = os.path.join(run, "results", "cache")
    os.makedirs(cache)
    # lr multipliers x 2 tail-patched queries x 10; fractions of p, ground truth NaN-padded.
    track = np.zeros((2, 2, 10))
    track[1] = np.array([[0.01], [0.02]])  # trackstar: 1 and 2 pp at the 1x multiplier.
    gt = np.full((2, 2, 10), np.nan)
    gt[1, 0, :2] = [0.03, 0.05]  # Query 0: two statements, @1 = 3 pp, @10 = 4 pp.
    gt[1, 1, :1] = [0.06]  # Query 1: one statement, 6 pp.
    np.savez(os.path.join(cache, "tailpatch_candidates_a.npz"), value=track)
    np.savez(os.path.join(cache, "tailpatch_candidates_b.npz"), value=gt)
    path = os.path.join(run, "experiments", "e1", "results.json")
    with open(path) as f:
        results = json.load(f)
    results["tailpatch"]["lr_multipliers"] = [0.1, 1.0]
    results["ground_truth"] = {"tailpatch@1": 4.5, "tailpatch@10": 5.0}
    with open(path, "w") as f:
        json.dump(results, f)
    world = findings.load_world(run)
    assert world["methods"]["ground_truth"] == {
        0: pytest.approx(
            {"tailpatch@1": 3.0, "tailpatch@3": 4.0, "tailpatch@5": 4.0, "tailpatch@10": 4.0}
        ),
        1: pytest.approx(
            {"tailpatch@1": 6.0, "tailpatch@3": 6.0, "tailpatch@5": 6.0, "tailpatch@10": 6.0}
        ),
    }
    # Means that do not match results.json: no ground truth rather than a wrong one.
    results["ground_truth"]["tailpatch@10"] = 5.5
    with open(path, "w") as f:
        json.dump(results, f)
    assert "ground_truth" not in findings.load_world(run)["methods"]


def test_ground_truth_file_written_by_e1_is_used_first(tmp_path):
    run = str(tmp_path / "w")
    _write_run(run, {"trackstar": {0: {"mrr": 1.0, "tailpatch@10": 1.0}, 1: {"mrr": 0.5}}})
    rows = [
        {"example_id": 0, "tailpatch@1": 3.0, "tailpatch@10": 2.5},
        {"example_id": 1, "tailpatch@1": None, "tailpatch@10": None},
    ]
    with open(os.path.join(run, "experiments", "e1", "ground_truth_metrics.json"), "w") as f:
        json.dump(rows, f)
    gt = findings.load_world(run)["methods"]["ground_truth"]
    assert gt == {
        0: {"tailpatch@1": 3.0, "tailpatch@10": 2.5},
        1: {"tailpatch@1": None, "tailpatch@10": None},
    }
