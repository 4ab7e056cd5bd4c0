"""scripts/bench_learning.py --quick runs end to end and every learner produces numbers (never judged on time)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

from support import ROOT, run


def test_bench_learning_quick_reports_every_learner(tmp_path):
    out, md = tmp_path / "learning.json", tmp_path / "learning.md"
    command = [sys.executable, str(ROOT / "scripts" / "bench_learning.py"), "--quick", "--json", str(out), "--markdown", str(md)]
    done = run(command, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["quick"] and report["seeds"] == 1 and report["feedbacks"] == 1000
    learners = report["learners"]
    vw = importlib.util.find_spec("vowpalwabbit") is not None
    expected = {"none", "rule", "rule_eps", "rule_softmax", "previous", "softmax", "ridge", "linucb"}
    expected |= {"vw_csoaa", "vw_cb_eps", "vw_cb_squarecb"} if vw else set()
    assert set(learners) == expected
    if not vw:
        assert set(report["skipped"]) >= {"vw_csoaa", "vw_cb_eps", "vw_cb_squarecb"}
    tasks = report["results"]
    assert "synth" in tasks  # and "real" when its embeddings are cached (quick never builds them)
    for task, by_regime in tasks.items():
        assert set(by_regime) == {"full", "bandit"}
        for regime, results in by_regime.items():
            assert set(results) == {k for k in expected if regime in learners[k]["regimes"]}, (task, regime)
            starts = set()
            for key, r in results.items():
                assert r["at"] == [0, 100, 200, 500, 1000], (task, regime, key)
                assert all(0 <= a <= 1 for a in r["mean"]) and all(s == 0 for s in r["sd"])  # one seed
                assert all(0 <= a <= 1 for a in r["progressive"][1:]) and math.isnan(r["progressive"][0])
                assert r["flags"]
                if not key.startswith("vw"):  # VW starts from zero weights; the others from the router
                    starts.add(r["mean"][0])
            assert len(starts) == 1, (task, regime, starts)
            assert results["rule"]["mean"][-1] > results["none"]["mean"][-1]  # the package's rule learned
    for task, table in report["throughput"].items():
        for key in expected - {"none", "previous", "rule_eps", "rule_softmax"}:
            for regime in learners[key]["regimes"]:
                assert table[key][regime] > 0, (task, key, regime)
        assert set(table["c_learner"]) == {"label", "full", "bandit"}  # a rate, or why it is not available
    assert report["targets"] == {}  # judged on full runs only
    text = md.read_text()
    assert "**sona_shm routing rule (defaults)**" in text and "Throughput" in text
