"""sona_shm.store.rows: drained trajectories as unpadded JSON lines and Parquet rows, read back with their values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sona_shm import RouteTable, Step, Trajectory, drain_to_file
from sona_shm.cli import EXIT_OK, EXIT_USAGE, main
from sona_shm.errors import InvalidInputError
from sona_shm.store.rows import read_rows, trajectories_of

H = 16
NAMES = ["code", "math", "chat", "search"]


def feedback_engine(engine):
    rng = np.random.default_rng(5)
    table = RouteTable.build(rng.standard_normal((4, H)).astype(np.float32), NAMES)
    flusher = engine(routes=table, rule="routing", capacity=32)
    client = engine.attach()
    x = rng.standard_normal((4, H)).astype(np.float32)
    assert client.feedback(x[0], route="math", reward=0.25, probability=0.8)
    assert client.feedback(x[1], best="chat")
    assert client.feedback(x[2], best=3, route="code", probability=0.125)
    long = Trajectory(x[3], [Step(np.arange(5, dtype=np.float32) / 3, np.ones(3, np.float32), 0.5), Step(np.ones(H), None, -1.0)], 0.75)
    assert client.record(long)
    flusher.scan()
    return table, x, client


def expected_rows(table, x):
    third = [float(v) for v in (np.arange(5, dtype=np.float32) / 3).astype(np.float32)]
    common = {"latency_us": 0}
    return [
        {
            "query": x[0],
            "quality": 0.25,
            "route": "math",
            "route_index": 1,
            "best_index": None,
            "best": None,
            "reward": 0.25,
            "probability": 0.8,
            "steps": [{"reward": 0.25, "activations": table.vectors[1], "attention": []}],
            **common,
        },
        {
            "query": x[1],
            "quality": 1.0,
            "route": "chat",
            "route_index": None,
            "best_index": 2,
            "best": "chat",
            "reward": None,
            "probability": None,
            "steps": [{"reward": 1.0, "activations": table.vectors[2], "attention": []}],
            **common,
        },
        {
            "query": x[2],
            "quality": 1.0,
            "route": "code",
            "route_index": 0,
            "best_index": 3,
            "best": "search",
            "reward": 0.0,  # the route taken was not the best
            "probability": 0.125,
            "steps": [{"reward": 1.0, "activations": table.vectors[3], "attention": []}],
            **common,
        },
        {
            "query": x[3],
            "quality": 0.75,
            "route": None,
            "route_index": None,
            "best_index": None,
            "best": None,
            "reward": None,
            "probability": None,
            "steps": [
                {"reward": 0.5, "activations": third, "attention": [1.0, 1.0, 1.0]},
                {"reward": -1.0, "activations": [1.0] * H, "attention": []},
            ],
            **common,
        },
    ]


def assert_rows(rows, table, x):
    expected = expected_rows(table, x)
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert set(row) == {"traj_id", *want}
        for key, value in want.items():
            if key == "query":
                assert np.array(row[key], np.float32).tobytes() == np.asarray(value, np.float32).tobytes()  # exact float32
            elif key == "steps":
                assert len(row["steps"]) == len(value)  # unpadded: only the real steps
                for got, step in zip(row["steps"], value):
                    assert got["reward"] == step["reward"] and got["attention"] == step["attention"]
                    assert np.array(got["activations"], np.float32).tobytes() == np.asarray(step["activations"], np.float32).tobytes()
            elif key == "probability" and value is not None:
                assert row[key] == pytest.approx(value) and np.float32(row[key]) == np.float32(value)
            else:
                assert row[key] == value, key
    assert [row["traj_id"] for row in rows] == sorted(row["traj_id"] for row in rows)
    # the rewards are what the engine's route counts summed
    assert sum(row["reward"] or 0.0 for row in rows if row["route"] == "math") == 0.25


def test_drain_to_jsonl_writes_one_unpadded_row_per_trajectory(engine, name, tmp_path):
    table, x, _ = feedback_engine(engine)
    out = tmp_path / "feedback.jsonl"
    assert drain_to_file(name, out) == 4
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    rows = read_rows(out)
    assert_rows(rows, table, x)
    assert len(json.dumps(rows[1])) < 4 * (2 * H + 40) * 8  # no padding to max_steps x h or attention
    back = trajectories_of(rows)
    assert [(t.route, t.route_index, t.best_index, t.quality) for t in back[:3]] == [
        ("math", 1, None, 0.25),
        ("chat", None, 2, 1.0),
        ("code", 0, 3, 1.0),
    ]
    assert np.array_equal(back[3].steps[0].attention, np.ones(3, np.float32)) and back[3].steps[1].attention is None


def test_drain_to_parquet_holds_the_same_rows(engine, name, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    table, x, _ = feedback_engine(engine)
    out = tmp_path / "feedback.parquet"
    assert drain_to_file(name, out) == 4
    schema = pq.read_schema(out)
    assert str(schema.field("query").type.value_type) == "float" and str(schema.field("probability").type) == "float"
    assert_rows(read_rows(out), table, x)


def test_the_cli_drains_by_suffix_and_refuses_an_unknown_one(engine, name, tmp_path, capsys):
    table, x, _ = feedback_engine(engine)
    assert main(["drain", "--name", name, "--out", str(tmp_path / "x.csv")]) == EXIT_USAGE
    assert "expected a file name ending in .npz, .jsonl, .parquet" in capsys.readouterr().err
    assert main(["drain", "--name", name, "--out", str(tmp_path / "x.jsonl")]) == EXIT_OK
    assert_rows(read_rows(tmp_path / "x.jsonl"), table, x)


def test_an_engine_without_a_buffer_says_so_when_drained(engine, name, tmp_path, capsys):
    engine(capacity=0)
    assert main(["drain", "--name", name, "--out", str(tmp_path / "x.jsonl")]) == EXIT_OK
    assert "keeps no buffer (created with capacity 0" in capsys.readouterr().err


def test_a_parquet_drain_without_pyarrow_refuses_before_anything_leaves(engine, name, tmp_path, monkeypatch):
    import builtins

    feedback_engine(engine)
    real_import = builtins.__import__

    def no_pyarrow(module, *args, **kwargs):
        if module.startswith("pyarrow"):
            raise ImportError(f"No module named {module!r}")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(Exception, match=r"pip install 'sona-shm\[parquet\]'"):
        drain_to_file(name, tmp_path / "x.parquet")
    monkeypatch.undo()
    assert drain_to_file(name, tmp_path / "x.npz") == 4  # nothing left the buffer
    with pytest.raises(InvalidInputError):
        drain_to_file(name, tmp_path / "x.txt")


def test_shortest_prints_float32_values_short_and_reads_them_back_exactly():
    from sona_shm.store.rows import shortest

    rng = np.random.default_rng(3)
    tiny = np.finfo(np.float32).tiny
    values = np.concatenate(
        [
            rng.standard_normal(5000).astype(np.float32),
            (rng.standard_normal(1000) * 1e30).astype(np.float32),
            np.array([0.1, -0.0, 0.0, 1.0, 3.4028235e38, -3.4028235e38, tiny, tiny / 8, 1e-45, 123456.789], np.float32),
        ]
    )
    back = np.array(json.loads(json.dumps(shortest(values).tolist())), np.float32)
    assert back.tobytes() == values.tobytes()  # every bit, -0.0 and subnormals too
    assert json.dumps(shortest(np.float32([0.1, 0.25, 1e-3])).tolist()) == "[0.1, 0.25, 0.001]"
    assert max(len(repr(v)) for v in shortest(values[:5000]).tolist()) <= 16  # 9 significant digits at most, not 17
