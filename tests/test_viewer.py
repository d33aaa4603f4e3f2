"""The static viewer (trackstar.viewer): its data joined from results files, the page escaped,
and the page itself in headless Chromium: rows equal the data, filters change the counts as
the data says, the metrics equal results.json, a screenshot is not blank."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from browser import distinct_colors, open_page

from trackstar import cli, viewer
from trackstar.release import ResultRecord, read_results, write_results

BUCKETS = (1, 4, 16)
RELATIONS = ("P19", "P27")


def _records(method: str, n: int, seed: int, k: int = 12) -> list[ResultRecord]:
    """``n`` fact queries with per-query metrics, the way E1 writes them."""
    rng = np.random.default_rng(seed)
    out = []
    for q in range(n):
        correct = [bool(c) for c in rng.random(k) < 0.2]
        rr = next((1.0 / (i + 1) for i, c in enumerate(correct) if c), 0.0)
        tp = None if q % 3 == 2 else float(rng.normal(1.0, 0.5))
        rec = ResultRecord(
            example_id=q,
            inputs_plaintext=f"The birthplace of Person {q} is",
            targets_plaintext=f"City{q % 5}",
            proponents=[f"Person {q} was born in City{q % 5} ({method} {j})." for j in range(k)],
            proponent_ids=list(range(100 * q, 100 * q + k)),
            proponent_scores=sorted(rng.normal(size=k).tolist(), reverse=True),
            opponents=[f"Unrelated sentence {j} </script> <!-- x" for j in range(3)],
            opponent_ids=[9000 + j for j in range(3)],
            opponent_scores=sorted(rng.normal(-2, 1, size=3).tolist()),
            fact_id=q,
            relation=RELATIONS[q % 2],
            proponent_correct=correct,
            frequency_bucket=BUCKETS[q % 3],
            model_prediction=f"City{(q + q % 2) % 5}",
            model_correct=q % 2 == 0,
            model_confidence=0.1 + 0.8 * rng.random(),
        )
        rec.extra["entity0"], rec.extra["entity1"] = f"Person {q}", f"City{q % 5}"
        rec.extra["metrics"] = {
            "mrr": rr,
            "recall@10": float(any(correct[:10])),
            "tailpatch@10": tp,
        }
        out.append(rec)
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """An experiment directory as E1 leaves it: proponents/<method>.jsonl.gz + results.json."""
    exp = str(tmp_path_factory.mktemp("view") / "e1")
    os.makedirs(os.path.join(exp, "proponents"))
    methods = {"trackstar": _records("trackstar", 30, 0), "bm25": _records("bm25", 30, 1)}
    results = {"methods": {}, "ground_truth": {"tailpatch@10": 3.5}}
    for name, recs in methods.items():
        write_results(os.path.join(exp, "proponents", f"{name}.jsonl.gz"), recs)
        results["methods"][name] = {
            key: _mean([r.extra["metrics"][key] for r in recs])
            for key in ("mrr", "recall@10", "tailpatch@10")
        }
    results["methods"]["random"] = {"mrr": 0.01, "recall@10": 0.0, "tailpatch@10": 0.02}
    with open(os.path.join(exp, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(exp, "config.json"), "w") as f:
        json.dump({"viewer": {"top_k": 10, "methods": ["trackstar", "bm25"]}}, f)
    return exp, methods, results


def test_view_data_joins_files_and_keeps_top_k(experiment):
    exp, methods, _ = experiment
    # Another tool's file: some of the queries, plain release records (no metrics).
    other = [dataclasses.replace(r, extra={}) for r in methods["trackstar"][5:12]]
    files = {
        m: list(read_results(os.path.join(exp, "proponents", f"{m}.jsonl.gz"))) for m in methods
    }
    data = viewer.view_data({**files, "other": other}, top_k=10)
    assert len(data["queries"]) == 30
    assert [q["id"] for q in data["queries"]] == list(range(30))
    cell = data["records"]["trackstar"][3]
    assert len(cell["p"]) == 10 and len(cell["o"]) == 3
    text, pid, score, ok = cell["p"][0]
    rec = methods["trackstar"][3]
    assert data["texts"][text] == rec.proponents[0] and pid == rec.proponent_ids[0]
    assert score == rec.proponent_scores[0] and ok == rec.proponent_correct[0]
    # The other file covers queries 5..11 only; its MRR comes from proponent_correct.
    assert data["records"]["other"][4] is None and data["records"]["other"][5] is not None
    want = next((1 / (i + 1) for i, c in enumerate(other[2].proponent_correct) if c), 0.0)
    assert data["records"]["other"][7]["m"] == {"mrr": want}
    # Texts are stored once however many methods show them.
    assert len(data["texts"]) == len(set(data["texts"]))


def test_page_data_survives_script_end_tags(experiment):
    exp, _, _ = experiment
    out = viewer.write_viewer(exp, out=os.path.join(exp, "page.html"))
    html = open(out, encoding="utf-8").read()
    assert html.count("</script>") == 2  # the data's own "</script>" texts are escaped
    blob = re.search(
        r'<script type="application/json" id="viewer-data">(.*?)</script>', html, re.S
    ).group(1)
    data = json.loads(blob)  # "\u003c" is a valid JSON escape of "<"
    assert "</script>" in data["texts"][-1] or any("</script>" in t for t in data["texts"])
    assert "http://" not in html and "https://" not in html  # nothing fetched


def test_bad_inputs_name_the_fix(tmp_path, capsys):
    with pytest.raises(viewer.ViewerError, match="viewer.write"):
        viewer.write_viewer(str(tmp_path))
    with pytest.raises(viewer.ViewerError, match="does not exist"):
        viewer.write_viewer(None, release_files=[str(tmp_path / "missing.jsonl")])
    assert cli.main(["view", str(tmp_path)]) == 1
    assert "viewer.write" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["view"])


def _counts(page):
    return int(page.inner_text("#shown-count")), page.locator(".query").count()


def test_page_in_chromium_rows_filters_metrics_screenshot(experiment, tmp_path):
    exp, methods, results = experiment
    other = tmp_path / "other_tool.jsonl"
    write_results(str(other), methods["bm25"][:10])
    out = viewer.write_viewer(exp, release_files=[f"other={other}"])
    recs = methods["trackstar"]
    with open_page(out) as page:
        assert page.errors == []
        # One card per query, one column per shown method (config: trackstar, bm25; + other).
        assert _counts(page) == (30, 30)
        assert page.locator(".query").first.locator(".col").count() == 3
        assert (
            page.locator(".query").first.locator(".col").first.locator("ol.props > li").count()
            == 10
        )
        # Ground-truth marks: as many as the data's proponent_correct within the top 10.
        n_gt = sum(sum(r.proponent_correct[:10]) for r in recs)
        assert page.locator('.col[data-method="trackstar"] ol.props > li.gt').count() == n_gt
        # Subject and object highlighted in the prompt and the proponents.
        assert page.locator(".query").first.locator("mark.subj").count() > 0
        assert page.locator(".query").first.locator("mark.obj").count() > 0

        # Unfiltered metrics equal results.json; random keeps its results.json row.
        for m in ("trackstar", "bm25"):
            for key in ("mrr", "recall@10", "tailpatch@10"):
                cell = page.locator(f'#metrics tr[data-method="{m}"] td[data-metric="{key}"]')
                shown = float(cell.get_attribute("data-value"))
                assert shown == pytest.approx(results["methods"][m][key], rel=1e-12, abs=1e-12)
                assert float(cell.get_attribute("data-results")) == results["methods"][m][key]
        assert page.locator('#metrics tr.static[data-method="random"]').count() == 1

        # Filters: counts as the data says, and the metrics follow the rows shown.
        page.select_option("#f-bucket", "4")
        want = [r for r in recs if r.frequency_bucket == 4]
        assert _counts(page) == (len(want), len(want))
        cell = page.locator('#metrics tr[data-method="trackstar"] td[data-metric="mrr"]')
        assert float(cell.get_attribute("data-value")) == pytest.approx(
            _mean([r.extra["metrics"]["mrr"] for r in want]), rel=1e-12
        )
        page.select_option("#f-correct", "0")
        want = [r for r in want if not r.model_correct]
        assert _counts(page) == (len(want), len(want))
        page.select_option("#f-bucket", "")
        page.select_option("#f-correct", "")
        page.select_option("#f-relation", "P27")
        assert _counts(page)[0] == sum(r.relation == "P27" for r in recs)
        page.select_option("#f-relation", "")
        page.fill("#f-text", "person 7 ")
        assert _counts(page)[0] == sum("person 7 " in r.inputs_plaintext.lower() for r in recs)
        page.fill("#f-text", "")
        # Method checkboxes add and remove columns.
        page.uncheck('#methods input[data-method="bm25"]')
        assert page.locator(".query").first.locator(".col").count() == 2
        assert _counts(page) == (30, 30)

        shot = str(tmp_path / "viewer.png")
        page.screenshot(path=shot)
    assert os.path.getsize(shot) > 10_000 and distinct_colors(shot) > 50


def test_viewer_loads_without_jax():
    """`trackstar view` only reads files: importing the viewer and the CLI must not import JAX
    (seconds of start-up on a laptop that has no accelerator to use)."""
    import subprocess
    import sys

    code = "import sys, trackstar.cli, trackstar.viewer; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
