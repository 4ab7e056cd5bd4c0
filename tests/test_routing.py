"""The routing rule: route tables, route()/feedback(), the gradient, both learners, learning that routes."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from sona_shm import InstantLoop, InvalidInputError, Step, Trajectory
from sona_shm.config import DEFAULT_LR, MAX_ROUTES
from sona_shm.learn import routing as routing_module
from sona_shm.learn.routes import RouteTable, load_routes

F32 = np.float32
SMALL_LR = 0.01  # conftest.SMALL["lr"]


def unit_rows(rng: np.random.Generator, k: int, h: int) -> np.ndarray:
    v = rng.standard_normal((k, h))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(F32)


class Task:
    """A small router: clusters of queries near a route vector, some best served by another route."""

    def __init__(self, seed: int, h: int = 32, k: int = 4, clusters: int = 6, flipped: int = 2, noise: float = 0.3) -> None:
        rng = np.random.default_rng(seed)
        self.h, self.k = h, k
        self.routes = unit_rows(rng, k, h)
        near = rng.integers(0, k, clusters)
        away = unit_rows(rng, clusters, h)
        centres = 0.6 * self.routes[near] + 0.8 * away
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        pick = np.argmax(self.centres @ self.routes.T, axis=1)
        self.best = pick.copy()
        for j in rng.choice(clusters, flipped, replace=False):
            self.best[j] = (pick[j] + 1 + rng.integers(0, k - 1)) % k
        self.noise, self.rng = noise, rng

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        j = self.rng.integers(0, len(self.centres), n)
        x = self.centres[j] + self.noise * self.rng.standard_normal((n, self.h)) / np.sqrt(self.h)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(F32), self.best[j]


def accuracy(route, x: np.ndarray, y: np.ndarray) -> float:
    return float((route(x).index == y).mean())


# ----------------------------------------------------------------- route tables


def test_route_table_validates_and_names_what_is_wrong(tmp_path):
    rng = np.random.default_rng(0)
    v = unit_rows(rng, 3, 8)
    table = RouteTable.build(v * 2, ["a", "b", "c"], hidden_dim=8)
    assert table.names == ("a", "b", "c") and np.allclose(np.linalg.norm(table.unit, axis=1), 1)
    assert RouteTable.build(v).names == ("route0", "route1", "route2")
    bad = [
        (dict(vectors=v[:1]), "expected 2 to 256 route vectors, got 1"),
        (dict(vectors=np.ones((MAX_ROUTES + 1, 8))), "expected 2 to 256 route vectors, got 257"),
        (dict(vectors=v, hidden_dim=9), "expected vectors of hidden_dim 9 values, got 8"),
        (dict(vectors=np.where(np.eye(3, 8) > 0, np.nan, v)), "expected finite values"),
        (dict(vectors=np.vstack([v[:2], np.zeros(8)])), "vector 2 is all zeros"),
        (dict(vectors=v, names=["a", "a", "b"]), "expected unique names, 'a' is both names[0] and names[1]"),
        (dict(vectors=v, names=["a", "b"]), "expected 3 names (one per vector), got 2"),
        (dict(vectors=v, names=["a", "", "b"]), "names[1]: expected a non-empty string"),
        (dict(vectors=v, names=["a", "x" * 65, "b"]), "at most 64 UTF-8 bytes"),
        (dict(vectors=v.astype(complex)), "array of real numbers"),
        (dict(vectors=v[0]), "K x hidden_dim array"),
    ]
    for kwargs, fragment in bad:
        vectors = kwargs.pop("vectors")
        with pytest.raises(InvalidInputError, match="^routes") as info:
            RouteTable.build(vectors, kwargs.pop("names", None), **kwargs)
        assert fragment in str(info.value), (fragment, str(info.value))


def test_routes_files_npy_and_npz(tmp_path):
    rng = np.random.default_rng(1)
    v = unit_rows(rng, 4, 16)
    np.save(tmp_path / "r.npy", v)
    np.savez(tmp_path / "r.npz", vectors=v, names=np.array(["code", "math", "chat", "search"]))
    assert load_routes(str(tmp_path / "r.npy")).names == ("route0", "route1", "route2", "route3")
    table = load_routes(str(tmp_path / "r.npz"), hidden_dim=16)
    assert table.names == ("code", "math", "chat", "search") and np.array_equal(table.vectors, v)
    np.savez(tmp_path / "bad.npz", vecs=v)
    with pytest.raises(InvalidInputError, match="expected an array named 'vectors'"):
        load_routes(str(tmp_path / "bad.npz"))
    with pytest.raises(InvalidInputError, match="expected vectors of hidden_dim 8 values, got 16"):
        load_routes(str(tmp_path / "r.npz"), hidden_dim=8)
    with pytest.raises(InvalidInputError, match="expected an existing .npy or .npz file"):
        load_routes(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    with pytest.raises(InvalidInputError, match="expected a .npy"):
        load_routes(str(tmp_path / "junk.npz"))


def test_routes_files_with_unreadable_members_or_a_single_name_are_refused(tmp_path):
    """An .npz member that needs pickle (an object array) or is damaged, and a names array
    that is one string (0-d), are InvalidInputErrors naming the file, not tracebacks or names
    made of the string's characters."""
    import zipfile

    v = unit_rows(np.random.default_rng(14), 3, 8)
    cases = {
        "object_names.npz": dict(vectors=v, names=np.array(["a", "b", "c"], dtype=object)),
        "object_vectors.npz": dict(vectors=v.astype(object)),
        "one_name.npz": dict(vectors=v, names=np.array("abc")),
    }
    for file, arrays in cases.items():
        np.savez(tmp_path / file, **arrays)
    with zipfile.ZipFile(tmp_path / "damaged.npz", "w") as z:  # a member whose CRC does not match
        z.writestr("vectors.npy", b"\x93NUMPY" + b"x" * 200)
    raw = (tmp_path / "damaged.npz").read_bytes()
    (tmp_path / "damaged.npz").write_bytes(raw.replace(b"x" * 50, b"y" * 50, 1))
    for file, fragment in [
        ("object_names.npz", "names: cannot be read without pickle"),
        ("object_vectors.npz", "vectors: cannot be read without pickle"),
        ("one_name.npz", "names: expected 3 names, got one string 'abc'"),
        ("damaged.npz", "vectors: cannot be read"),
    ]:
        path = str(tmp_path / file)
        with pytest.raises(InvalidInputError) as info:
            load_routes(path)
        assert str(info.value).startswith(f"routes file {path}") and fragment in str(info.value), (file, str(info.value))


# ----------------------------------------------------------------- the rule (its maths: test_routing_properties.py; C: test_routing_c.py)


def test_the_learner_starts_as_the_cosine_router_and_learns_the_route_table_not_the_adapter():
    task = Task(2)
    loop = InstantLoop(task.h, 2, rule="routing", routes=task.routes * 3, capacity=0)
    x, y = task.sample(50)
    cosine = np.argmax(x @ task.routes.T, axis=1)
    assert np.array_equal(loop.route(x).index, cosine)  # nothing learned: the cosine router
    for xi, yi in zip(x, y):
        loop.feedback(xi, best=int(yi))
    stats = loop.route_stats()
    assert max(s["drift"] for s in stats.values()) > 0  # the route vectors moved
    assert np.array_equal(loop.down, InstantLoop(task.h, 2).down) and not loop.up.any()  # adapter_lr 0: forward() is unchanged
    learns = InstantLoop(task.h, 2, rule="routing", routes=task.routes, adapter_lr=0.01, capacity=0)
    for xi, yi in zip(x, y):
        learns.feedback(xi, best=int(yi))
    assert learns.up.any() and not np.array_equal(learns.down, loop.down)


def test_windows_start_at_one_feedback_and_grow_to_the_flush_threshold():
    """A new engine publishes what it learned after every feedback at first; windows grow by one every GROWTH
    feedbacks up to flush_threshold, so a busy engine publishes (and a fleet ships) one per threshold."""
    task = Task(3)
    loop = InstantLoop(task.h, 2, rule="routing", routes=task.routes, flush_threshold=5, capacity=0)
    x, y = task.sample(300)
    sizes, last = [], 0
    for xi, yi in zip(x, y):
        loop.feedback(xi, best=int(yi))
        if loop.metrics.updates_applied != last:
            sizes.append(loop.metrics.updates_applied - last)
            last = loop.metrics.updates_applied
    expected = [routing_module.window_size(n, 5) for n in np.cumsum([0] + sizes)[:-1]]
    assert sizes == expected and sizes[:3] == [1, 1, 1] and sizes[-1] == 5 and sum(sizes) + loop.pending == 300


# ----------------------------------------------------------------- in-process learning


def test_full_information_feedback_learns_to_route():
    """From the unadapted router's accuracy to >= 0.99 within 1k feedbacks (seeded), with the defaults."""
    task = Task(5)
    loop = InstantLoop(task.h, 2, rule="routing", routes=task.routes, capacity=0)
    x_test, y_test = task.sample(1000)
    before = accuracy(loop.route, x_test, y_test)
    assert before < 0.8  # the flipped clusters are misrouted
    x, y = task.sample(1000)
    for xi, yi in zip(x, y):
        assert loop.feedback(xi, best=int(yi))
    after = accuracy(loop.route, x_test, y_test)
    assert after >= 0.99, (before, after)
    assert loop.metrics.signals_accumulated == 1000


@pytest.mark.parametrize("explore", [0.1, "softmax", "squarecb"])
def test_bandit_feedback_with_exploration_learns_to_route(explore):
    task = Task(6)
    loop = InstantLoop(task.h, 2, rule="routing", routes=task.routes, capacity=0)
    x_test, y_test = task.sample(1000)
    before = accuracy(loop.route, x_test, y_test)
    rng = np.random.default_rng(6)
    x, y = task.sample(3000)
    for xi, yi in zip(x, y):
        choice = loop.route(xi, explore=explore, rng=rng)
        assert 0 < choice.probability <= 1
        loop.feedback(xi, route=choice.index, reward=float(choice.index == yi), probability=choice.probability)
    after = accuracy(loop.route, x_test, y_test)
    assert after >= 0.95 > before, (before, after)
    stats = loop.route_stats()
    assert sum(s["chosen"] for s in stats.values()) == 3000 and all(s["best"] == 0 for s in stats.values())


def test_reference_rule_learns_feedback_as_trajectories_bit_for_bit():
    """Under the reference rule a feedback is the trajectory its encoding says."""
    task = Task(7)
    a = InstantLoop(task.h, 2, routes=task.routes, route_names=["w", "x", "y", "z"])
    b = InstantLoop(task.h, 2)
    x, y = task.sample(250)
    for i, (xi, yi) in enumerate(zip(x, y)):
        if i % 2:
            a.feedback(xi, route=int(yi), reward=-0.5)
            b.on_trajectory(Trajectory(xi, [Step(task.routes[yi], None, -0.5)], -0.5))
        else:
            a.feedback(xi, best="wxyz"[(int(yi) + 3) % 4], route=0)
            b.on_trajectory(Trajectory(xi, [Step(task.routes[(int(yi) + 3) % 4], None, 1.0)], 1.0))
    assert np.array_equal(a.up, b.up) and a.up.any() and np.array_equal(a.down, b.down)
    drained = a.drain_n(2)
    assert drained[0].best_index == (int(y[0]) + 3) % 4 and drained[0].route_index == 0 and drained[0].route == "w"
    assert drained[1].route_index == int(y[1]) and drained[1].best_index is None and drained[1].quality == -0.5


def test_route_returns_a_choice_for_one_vector_or_a_batch():
    task = Task(8)
    loop = InstantLoop(task.h, 2, rule="routing", routes=task.routes, route_names=["a", "b", "c", "d"])
    x, _ = task.sample(5)
    one = loop.route(x[0])
    assert isinstance(one.index, int) and one.name == "abcd"[one.index] and one.explored is False
    assert one.scores.shape == (4,) and one.scores.dtype == F32 and one.adapted.shape == (task.h,)
    cos = task.routes @ x[0] / np.linalg.norm(x[0])  # nothing learned: forward(x) == x
    np.testing.assert_allclose(one.scores, cos, atol=1e-6)
    batch = loop.route(x)
    assert batch.index.shape == (5,) and batch.scores.shape == (5, 4) and batch.name == ["abcd"[i] for i in batch.index]
    assert not batch.explored.any()
    rng = np.random.default_rng(0)
    explored = [loop.route(x[0], explore=1.0, rng=rng) for _ in range(200)]
    assert {c.index for c in explored} == {0, 1, 2, 3} and any(c.explored for c in explored)
    sampled = [loop.route(x[0], sample=True, rng=rng).index for _ in range(300)]
    assert max(set(sampled), key=sampled.count) == one.index  # the softmax favours the best score


def test_feedback_and_route_refuse_bad_input_before_anything_is_written():
    task = Task(9)
    loop = InstantLoop(task.h, 2, rule="routing", routes=task.routes, route_names=["a", "b", "c", "d"])
    x = task.sample(1)[0][0]
    cases = [
        (dict(route="e", reward=1.0), "route: expected a route name ('a', 'b', 'c', 'd') or index, got 'e'"),
        (dict(route=4, reward=1.0), "route: expected a route index in [0, 3] or a route name, got 4"),
        (dict(route=True, reward=1.0), "route: expected a route index"),
        (dict(route=0, reward=float("nan")), "reward: expected a finite number"),
        (dict(route=0, reward=float("inf")), "reward: expected a finite number"),
        (dict(route=0, reward=1.5), "reward: expected a number in [0, 1] under the routing rule"),
        (dict(route=0), "feedback: expected route= and reward="),
        (dict(best=9), "best: expected a route index in [0, 3]"),
        (dict(best="a", reward=1.0), "reward: a full-information feedback (best=) carries no reward"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(InvalidInputError) as info:
            loop.feedback(x, **kwargs)
        assert fragment in str(info.value), (kwargs, str(info.value))
    with pytest.raises(InvalidInputError, match="x: expected"):
        loop.feedback(np.ones(3, F32), best=0)
    with pytest.raises(InvalidInputError, match="explore: expected a probability in"):
        loop.route(x, explore=2.0)
    with pytest.raises(InvalidInputError, match="route_index: expected None or a route index in \\[0, 3\\]"):
        loop.on_trajectory(Trajectory(x, [], 0.5, route_index=7))
    assert loop.metrics.trajectories_processed == 0 and not loop.drain()
    plain = InstantLoop(task.h, 2)
    with pytest.raises(InvalidInputError, match="feedback\\(\\): this loop has no routes"):
        plain.feedback(x, best=0)
    with pytest.raises(InvalidInputError, match="route\\(\\): this loop has no routes"):
        plain.route(x)
    with pytest.raises(InvalidInputError, match="route_index: expected None, the engine has no route table"):
        plain.on_trajectory(Trajectory(x, [], 0.5, route_index=0))
    with pytest.raises(InvalidInputError, match="routes: the routing rule learns which route serves a query"):
        InstantLoop(task.h, 2, rule="routing")
    with pytest.raises(InvalidInputError, match="rule: expected one of 'reference', 'routing'"):
        InstantLoop(task.h, 2, rule="fast", routes=task.routes)


def test_ordinary_trajectories_are_not_signals_under_the_routing_rule():
    task = Task(10)
    loop = InstantLoop(task.h, 2, rule="routing", routes=task.routes, flush_threshold=2)
    x = task.sample(1)[0][0]
    loop.on_trajectory(Trajectory(x, [Step(x, None, 1.0)], 1.0))
    assert loop.metrics.trajectories_processed == 1 and loop.metrics.signals_accumulated == 0 and loop.pending == 0
    loop.feedback(x, best=1)
    assert loop.metrics.signals_accumulated == 1 and loop.metrics.flushes_performed == 1  # the first window: one feedback
    assert loop.route_stats()["route1"]["best"] == 1


# ----------------------------------------------------------------- through shared memory


def routing_engine(engine, seed: int = 11, **config):
    task = Task(seed, h=16)
    table = RouteTable.build(task.routes, ["code", "math", "chat", "search"])
    flusher = engine(routes=table, rule="routing", **config)
    return task, table, flusher, engine.attach()


def test_client_route_and_feedback_learn_through_the_flusher(engine):
    task, table, flusher, client = routing_engine(engine, flush_threshold=10, lane_slots=64, capacity=0)
    assert client.rule == "routing" and client.routes.names == table.names and np.array_equal(client.routes.vectors, table.vectors)
    loop = InstantLoop(16, 2, lr=SMALL_LR, flush_threshold=10, capacity=0, rule="routing", routes=table.vectors, route_names=table.names)
    x, y = task.sample(300)
    rng = np.random.default_rng(0)
    for i, (xi, yi) in enumerate(zip(x, y)):
        choice = client.route(xi, explore=0.2, rng=rng)
        if i % 20 == 0:  # just after a scan: the engine published what the loop did
            mine = loop.route(xi)
            np.testing.assert_allclose(choice.scores, mine.scores, atol=1e-5)
            assert choice.explored or choice.index == mine.index
        if i % 3:
            args = dict(route=choice.name, reward=float(choice.index == yi))
        else:
            args = dict(best=int(yi), route=choice.index)
        assert client.feedback(xi, **args)
        loop.feedback(xi, **args)
        if i % 20 == 19:
            flusher.scan()
    flusher.scan()
    vectors, bias = client._ledger.read("route_vectors", "route_bias")
    learned = loop._learner
    np.testing.assert_allclose(vectors[:4], learned.route_vectors[:4], atol=1e-5)
    np.testing.assert_allclose(bias[:4], learned.route_bias[:4], atol=1e-5)
    assert not np.array_equal(vectors[:4], table.unit)  # it learned
    stats = client.stats()
    assert stats["config"]["rule"] == "routing" and [r["name"] for r in stats["routes"]] == list(table.names)
    assert sum(r["chosen"] for r in stats["routes"]) == 300 and sum(r["best"] for r in stats["routes"]) == 100
    expected = loop.route_stats()
    for r in stats["routes"]:
        assert (r["chosen"], r["best"]) == (expected[r["name"]]["chosen"], expected[r["name"]]["best"])
        assert r["reward_sum"] == pytest.approx(expected[r["name"]]["reward_sum"])
    batch = client.route(x[:7])
    np.testing.assert_array_equal(batch.index, loop.route(x[:7]).index)


def test_client_route_uses_the_same_choice_on_both_paths(engine, monkeypatch):
    from sona_shm.engine import client as client_module

    task, table, flusher, client = routing_engine(engine)
    for xi, yi in zip(*task.sample(40)):
        client.feedback(xi, best=int(yi))
    flusher.scan()
    x = task.sample(50)[0]
    fast = [client.route(xi) for xi in x]
    monkeypatch.setattr(client_module, "_speedups", None)
    slow = [client.route(xi) for xi in x]
    for f, s in zip(fast, slow):
        assert f.index == s.index and f.name == s.name and type(f.index) is int and f.explored is False
        np.testing.assert_allclose(f.scores, s.scores, atol=1e-6)
        np.testing.assert_allclose(f.adapted, s.adapted, atol=1e-6)


def test_feedback_is_drained_as_the_trajectory_it_encodes(engine):
    task, table, flusher, client = routing_engine(engine, capacity=16)
    x = task.sample(3)[0]
    client.feedback(x[0], route="math", reward=0.25)
    client.feedback(x[1], best="chat")
    client.feedback(x[2], best=3, route="code")
    flusher.scan()
    got = client.drain()
    assert [(t.route, t.route_index, t.best_index, t.quality) for t in got] == [
        ("math", 1, None, 0.25),
        ("chat", None, 2, 1.0),
        ("code", 0, 3, 1.0),
    ]
    assert np.array_equal(got[0].steps[0].activations, table.vectors[1]) and got[0].steps[0].reward == 0.25
    assert np.array_equal(got[2].steps[0].activations, table.vectors[3]) and np.array_equal(got[2].query, x[2])


def test_client_feedback_refuses_bad_input_and_writes_nothing(engine, name):
    task, table, flusher, client = routing_engine(engine)
    x = task.sample(1)[0][0]
    head = client._writer.head
    for kwargs, fragment in [
        (dict(route="nope", reward=1.0), "route: expected a route name ('code', 'math', 'chat', 'search') or index, got 'nope'"),
        (dict(route=1, reward=2.0), "reward: expected a number in [0, 1] under the routing rule"),
        (dict(route=1, reward=float("nan")), "reward: expected a finite number"),
    ]:
        with pytest.raises(InvalidInputError) as info:
            client.feedback(x, **kwargs)
        assert fragment in str(info.value)
    # The same rules hold for a feedback trajectory recorded by hand, on both writer paths.
    with pytest.raises(InvalidInputError, match="route_index: expected None or a route index in \\[0, 3\\]"):
        client.record(Trajectory(x, [], 0.5, route_index=4))
    with pytest.raises(InvalidInputError, match="quality: expected the reward of a bandit feedback in \\[0, 1\\]"):
        client.record(Trajectory(x, [], 1.5, route_index=1))
    assert client._writer.head == head and flusher.scan() == 0


def test_an_engine_without_routes_refuses_route_and_feedback(engine, name):
    engine()
    client = engine.attach()
    x = np.ones(16, F32)
    with pytest.raises(InvalidInputError, match=f"feedback\\(\\): engine '{name}' has no route table; create it with"):
        client.feedback(x, best=0)
    with pytest.raises(InvalidInputError, match="route\\(\\): engine"):
        client.route(x)
    with pytest.raises(InvalidInputError, match="route_index: expected None, the engine of segment"):
        client.record(Trajectory(x, [], 0.5, route_index=0))
    assert client.stats()["routes"] == []


def test_a_corrupt_route_index_in_a_slot_is_counted_not_learned(engine, caplog):
    task, table, flusher, client = routing_engine(engine, flush_threshold=100)
    x, y = task.sample(6)
    for xi, yi in zip(x, y):
        client.feedback(xi, best=int(yi))
    layout = client.layout
    offset = layout.lane_slot(client.lane, 2) + 34
    client._segment.buf[offset : offset + 2] = (99).to_bytes(2, "little")
    assert flusher.scan() == 5 and flusher.corrupt == 1 and "counted as corrupt" in caplog.text
    assert client.stats()["corrupt"] == 1 and client.stats()["signals_accumulated"] == 5


# ----------------------------------------------------------------- command line and checkpoints


def test_cli_creates_a_routing_engine_and_refuses_bad_route_tables(name, tmp_path, capsys):
    from sona_shm.cli import EXIT_CHECKPOINT, EXIT_LAYOUT_MISMATCH, EXIT_OK, EXIT_USAGE, main
    from sona_shm.stats import read_stats

    rng = np.random.default_rng(12)
    v = unit_rows(rng, 3, 12)
    good, other, nan = (str(tmp_path / f) for f in ("good.npz", "other.npz", "nan.npy"))
    np.savez(good, vectors=v, names=np.array(["a", "b", "c"]))
    np.savez(other, vectors=v[::-1], names=np.array(["a", "b", "c"]))
    np.save(nan, np.where(np.eye(3, 12) > 0, np.nan, v))

    def run(*argv):
        code = main(list(argv))
        return code, capsys.readouterr().err

    base = ("create", "--name", name, "--lanes", "2", "--lane-slots", "8", "--capacity", "8")
    code, err = run(*base, "--rule", "routing")
    assert code == EXIT_USAGE and "routes: the routing rule learns which route serves a query" in err
    code, err = run(*base, "--routes", nan)
    assert code == EXIT_USAGE and f"routes file {nan}: expected finite values" in err
    code, err = run(*base, "--routes", good, "--hidden-dim", "16")
    assert code == EXIT_USAGE and "expected vectors of hidden_dim 16 values, got 12" in err
    code, err = run(*base, "--rule", "routing", "--temperature", "0")
    assert code == EXIT_USAGE
    assert not os.path.exists(f"/dev/shm/sona_shm.{name}")
    assert run(*base, "--rule", "routing", "--routes", good)[0] == EXIT_OK
    stats = read_stats(name)
    assert stats["config"]["hidden_dim"] == 12 and stats["config"]["rule"] == "routing" and stats["config"]["lr"] == DEFAULT_LR["routing"]
    assert [r["name"] for r in stats["routes"]] == ["a", "b", "c"]
    assert run(*base, "--routes", good)[0] == EXIT_OK  # the same table: adopted
    code, err = run(*base, "--routes", other)
    assert code == EXIT_LAYOUT_MISMATCH and "exists with another route table" in err
    code, err = run(*base, "--rule", "reference")
    assert code == EXIT_LAYOUT_MISMATCH and "rule: segment has 'routing', requested 'reference'" in err
    # A checkpoint of it restores into the same engine, and is refused by another rule or table.
    path = str(tmp_path / "r.safetensors")
    assert main(["checkpoint", "--name", name, "--out", path]) == EXIT_OK
    assert main(["restore", "--name", name, "--from", path]) == EXIT_OK
    from sona_shm.shm import segment

    segment.unlink(name)
    assert run(*base, "--routes", other)[0] == EXIT_OK  # reference rule, other table
    code, err = run("restore", "--name", name, "--from", path)
    assert code == EXIT_CHECKPOINT and "rule is 'routing', the engine's is 'reference'" in err


def test_checkpoint_of_a_routing_engine_restores_everything(engine, name, tmp_path):
    """The learned route table, the open window (working copy and centre), counts and counters, bit for bit."""
    from sona_shm.engine.flusher import Flusher
    from sona_shm.shm import segment
    from sona_shm.store.checkpoint import WORK_TENSORS, read_checkpoint

    task, table, flusher, client = routing_engine(engine, flush_threshold=7)
    for i, (xi, yi) in enumerate(zip(*task.sample(300))):
        assert client.feedback(xi, route=int(yi), reward=0.5)
        if i % 16 == 15:
            flusher.scan()
    flusher.scan()
    assert client.stats()["pending_signals"] > 0  # an open window, with a working copy apart from the published state
    path = str(tmp_path / "c.safetensors")
    flusher.checkpoint_path = path
    assert flusher.write_checkpoint()
    saved = read_checkpoint(path)
    assert saved.config.rule == "routing" and saved.routes.names == table.names and np.array_equal(saved.routes.vectors, table.vectors)
    assert int(saved.arrays["route_chosen"].sum()) == 300 and saved.arrays["route_reward"].sum() == pytest.approx(150.0)
    assert not np.array_equal(saved.arrays["route_vectors"], table.unit)
    before = client._ledger.snapshot()[0]
    client.close()
    flusher.close()
    segment.unlink(name)
    second = Flusher(name, config_overrides={}, checkpoint=path)  # a new segment: the file's engine, table and state
    try:
        assert second.created and second.restored and second.routes.names == table.names
        after = second.ledger.snapshot()[0]
        fields = ("up", "down", "route_chosen", "route_best", "route_reward", "route_vectors", "route_bias", "route_state")
        for field in (*fields, *WORK_TENSORS, "route_names", "routes_used", "pending", "generation", "signals_accumulated"):
            assert np.array_equal(after[field], before[field]), field
    finally:
        second.close()


def test_stats_monitor_and_prometheus_show_routes_and_their_moving_share(engine, name):
    from prometheus_client.parser import text_string_to_metric_families

    from sona_shm.monitor import format_table
    from sona_shm.prometheus import exposition

    task, table, flusher, client = routing_engine(engine)
    x = task.sample(10)[0]
    for xi in x[:4]:
        client.feedback(xi, route="code", reward=1.0)
    flusher.scan()
    before = client.statistics()
    for xi in x[4:7]:
        client.feedback(xi, route="math", reward=0.5)
    client.feedback(x[7], route="code", reward=0.0)
    client.feedback(x[8], best="chat", route="chat")
    flusher.scan()
    after = client.statistics().since(before)
    routes = {r.name: r for r in after.routes}
    assert (routes["code"].chosen, routes["code"].mean_reward) == (5, 0.8)
    assert (routes["math"].chosen, routes["math"].mean_reward, routes["chat"].best) == (3, 0.5, 1)
    moving = {r.name: r for r in after.rates.routes}
    assert moving["math"].chosen_share == pytest.approx(3 / 5) and moving["code"].mean_reward == 0.0
    assert moving["chat"].mean_reward == 1.0 and moving["search"].chosen_share == 0 and moving["search"].mean_reward is None
    table_text = format_table(after)
    assert "routes (routing rule)" in table_text
    row = next(line.split() for line in table_text.splitlines() if line.strip().startswith("code "))
    drift = {r.name: r.drift for r in after.routes}
    assert row == ["code", "5", "56%", "0.800", "20%", "0.000", "0", f"{drift['code']:.2f}"] and drift["code"] > 0
    families = {f.name: f for f in text_string_to_metric_families(exposition(after).decode())}
    chosen = {s.labels["route"]: s.value for s in families["sona_shm_route_chosen"].samples if s.name.endswith("_total")}
    assert chosen == {"code": 5, "math": 3, "chat": 1, "search": 0}
    assert {s.labels["route"]: s.value for s in families["sona_shm_route_drift"].samples} == pytest.approx(drift)
    assert {s.labels["route"]: s.value for s in families["sona_shm_route_retired"].samples} == dict.fromkeys(drift, 0)
    assert [s.labels["rule"] for s in families["sona_shm_engine_rule"].samples] == ["routing"]


def test_client_route_on_a_closed_client_raises_closed_error(engine):
    from sona_shm.errors import ClosedError

    task, table, flusher, client = routing_engine(engine)
    x = task.sample(1)[0][0]
    client.close()
    for kwargs in ({}, {"explore": 0.5}):
        with pytest.raises(ClosedError, match="is closed; attach again"):
            client.route(x, **kwargs)


def test_client_and_loop_route_accept_and_refuse_the_same_exploration_arguments(engine):
    """explore/sample/rng are checked alike on the client (whichever path it takes) and on
    InstantLoop: a falsy value of the wrong type is refused, not taken for "no exploration"."""
    import random

    task, table, flusher, client = routing_engine(engine)
    loop = InstantLoop(16, 2, rule="routing", routes=table.vectors, route_names=table.names)
    x = task.sample(1)[0][0]
    good = [{}, dict(explore=None), dict(explore=0), dict(explore=0.0), dict(explore=1), dict(explore=np.float64(0.3)),
            dict(sample=True), dict(sample=False), dict(explore=0.5, rng=np.random.default_rng(1)),
            dict(sample=True, rng=random.Random(2)), dict(rng=None), dict(explore="softmax"), dict(explore="squarecb"),
            dict(explore="squarecb", gamma=50, rng=random.Random(3))]  # fmt: skip
    bad = [
        (dict(explore=False), "explore: expected a probability in [0, 1]"),
        (dict(explore=[]), "explore: expected a probability in [0, 1]"),
        (dict(explore=""), "explore: expected a probability (epsilon-greedy), 'softmax' or 'squarecb', got ''"),
        (dict(explore="ucb"), "explore: expected a probability (epsilon-greedy), 'softmax' or 'squarecb', got 'ucb'"),
        (dict(explore="softmax", sample=True), "explore, sample: choose one way to explore"),
        (dict(explore=0.1, gamma=10), "gamma: expected a finite number > 0, with explore='squarecb', got 10"),
        (dict(explore="squarecb", gamma=-1), "gamma: expected a finite number > 0"),
        (dict(explore="squarecb", gamma=math.inf), "gamma: expected a finite number > 0"),
        (dict(sample=0), "sample: expected True or False, got 0"),
        (dict(sample=None), "sample: expected True or False, got None"),
        (dict(explore=0.5, rng=42), "rng: expected None, a random.Random or a numpy Generator, got 42"),
        (dict(sample=True, rng="seed"), "rng: expected None, a random.Random or a numpy Generator, got 'seed'"),
        (dict(rng=7), "rng: expected None, a random.Random or a numpy Generator, got 7"),
    ]
    for route in (client.route, loop.route):
        for kwargs in good:
            assert route(x, **kwargs).index in range(4), kwargs
        for kwargs, fragment in bad:
            with pytest.raises(InvalidInputError) as info:
                route(x, **kwargs)
            assert fragment in str(info.value), (route, kwargs, str(info.value))


def test_route_depends_on_the_direction_of_the_query_only(engine, monkeypatch):
    """Scores are cosines: a query scaled by 1e20 or 1e-25 (float32 |f|^2 overflows or underflows)
    scores and routes as the query itself does, on the C path, the Python path and InstantLoop."""
    from sona_shm.engine import client as client_module

    task, table, flusher, client = routing_engine(engine)
    for xi, yi in zip(*task.sample(40)):
        client.feedback(xi, best=int(yi))
    flusher.scan()
    loop = InstantLoop(16, 2, rule="routing", routes=table.vectors, route_names=table.names)
    x = task.sample(20)[0]
    for path in ("C", "Python"):
        if path == "Python":
            monkeypatch.setattr(client_module, "_speedups", None)
        for route in (client.route, loop.route):
            plain = [route(xi) for xi in x]
            for scale in (F32(1e20), F32(1e-25)):
                scaled = [route(xi * scale) for xi in x]
                for p, s in zip(plain, scaled):
                    assert s.index == p.index, (path, scale)
                    np.testing.assert_allclose(s.scores, p.scores, atol=1e-5, err_msg=f"{path} {scale}")
            batch = route(x * F32(1e20))
            np.testing.assert_array_equal(batch.index, [p.index for p in plain])


def test_instant_loop_names_route_names_in_its_errors():
    v = unit_rows(np.random.default_rng(16), 3, 8)
    for names, fragment in [
        (["a", "a", "b"], "route_names: expected unique names, 'a' is both names[0] and names[1]"),
        (["a", "b"], "route_names: expected 3 names (one per vector), got 2"),
        (["a", "", "b"], "route_names[1]: expected a non-empty string"),
        ("abc", "route_names: expected 3 names, got one string 'abc'"),
    ]:
        with pytest.raises(InvalidInputError) as info:
            InstantLoop(8, 2, routes=v, route_names=names)
        assert str(info.value).startswith(fragment), str(info.value)


@pytest.mark.parametrize("path", ["c", "python"])
def test_feedback_probability_is_recorded_drained_and_refused_outside_zero_one(engine, monkeypatch, path):
    """feedback(..., probability=p) keeps p (float32) in the slot, drain returns it (NaN where none was
    recorded), and a probability outside (0, 1] is refused before anything is written, on both writer paths."""
    from sona_shm.shm import lane as lane_module

    if path == "python":
        monkeypatch.setattr(lane_module, "_speedups", None)
    elif lane_module._speedups is None:
        pytest.skip("the C extension is not built")
    task, table, flusher, client = routing_engine(engine, capacity=16)
    x = task.sample(3)[0]
    head = client._writer.head
    for bad in (0.0, -0.5, 1.5, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(InvalidInputError, match="probability"):
            client.feedback(x[0], route=1, reward=1.0, probability=bad)
    with pytest.raises(InvalidInputError, match="probability: the probability of the route taken needs route="):
        client.feedback(x[0], best=2, probability=0.5)
    assert client._writer.head == head
    assert client.feedback(x[0], route="math", reward=0.25, probability=0.05)
    assert client.feedback(x[1], best="chat", route=0, probability=1.0)
    assert client.feedback(x[2], best=3)
    flusher.scan()
    batch = client.drain_arrays()
    assert batch.probability.dtype == np.float32 and batch.probability[:2].tolist() == [np.float32(0.05), 1.0]
    assert np.isnan(batch.probability[2])
    assert [t.probability for t in batch.trajectories()] == [pytest.approx(0.05), 1.0, None]


def test_route_choice_probability_is_the_chance_of_the_route_served():
    """Greedy: 1. Epsilon-greedy: 1 - eps + eps/K for the best route, eps/K for another. Sampling: the softmax
    of the route drawn. The same in a batch."""
    import random

    task = Task(3)
    loop = InstantLoop(32, rule="routing", routes=task.routes)
    x, _ = task.sample(200)
    assert loop.route(x[0]).probability == 1.0
    rng = random.Random(5)
    seen = set()
    for q in x:
        choice = loop.route(q, explore=0.2, rng=rng)
        expected = 0.2 / 4 + (0.8 if not choice.explored or choice.index == int(np.argmax(choice.scores)) else 0.0)
        assert choice.probability == pytest.approx(expected)
        seen.add(round(choice.probability, 6))
    assert seen == {round(0.85, 6), round(0.05, 6)}
    for q in x[:20]:
        choice = loop.route(q, sample=True, rng=rng)
        z = 10.0 * choice.scores.astype(np.float64)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert choice.probability == pytest.approx(p[choice.index])
    batch = loop.route(x[:50], explore=0.2, rng=rng)
    assert batch.probability.shape == (50,) and set(np.round(batch.probability, 6)) <= {round(0.85, 6), round(0.05, 6)}


def test_a_batch_file_written_before_propensities_reads_with_nan(tmp_path):
    from sona_shm import TrajectoryBatch

    loop = InstantLoop(16, capacity=4)
    loop.on_trajectory(Trajectory(np.ones(16, np.float32), [], 1.0))
    arrays = {k: v for k, v in TrajectoryBatch(**_batch_fields(loop)).arrays().items() if k != "probability"}
    np.savez(tmp_path / "old.npz", **arrays)
    batch = TrajectoryBatch.load(tmp_path / "old.npz")
    assert batch.probability.dtype == np.float32 and np.isnan(batch.probability).all()


def _batch_fields(loop) -> dict:
    """The arrays of a one-trajectory batch, as a drain of the loop's buffer would give them."""
    [t] = loop.drain()
    return dict(
        traj_id=np.array([t.id], np.uint64),
        query=t.query[None],
        quality=np.array([t.quality], np.float32),
        latency_us=np.zeros(1, np.uint64),
        route=np.array([""], "<U64"),
        n_steps=np.zeros(1, np.int32),
        rewards=np.zeros((1, 1), np.float32),
        act_len=np.zeros((1, 1), np.int32),
        activations=np.zeros((1, 1, 16), np.float32),
        att_len=np.zeros((1, 1), np.int32),
        attention=np.zeros((1, 1, 0), np.float32),
        route_index=np.full(1, -1, np.int32),
        best_index=np.full(1, -1, np.int32),
        probability=np.full(1, np.nan, np.float32),
    )


def test_the_export_reproduces_route_offline(engine, name, tmp_path):
    """routes.npz beside the PEFT adapter holds the learned route table: with forward() (what PEFT reproduces)
    and the documented score, a model scores and chooses as route() does."""
    from sona_shm.export import ROUTES_FILE, export_engine

    task, table, flusher, client = routing_engine(engine, lane_slots=64)
    for xi, yi in zip(*task.sample(60)):
        client.feedback(xi, best=int(yi))
    flusher.scan()
    done = export_engine(name, tmp_path / "out")
    assert done.files[-1].endswith(ROUTES_FILE)
    with np.load(tmp_path / "out" / ROUTES_FILE) as f:
        vectors, bias, names, retired, given = f["vectors"], f["bias"], f["names"], f["retired"], f["given"]
        temperature, beta = float(f["temperature"]), float(f["beta"])
    assert names.tolist() == list(table.names) and not retired.any() and np.array_equal(given, table.vectors)
    x = task.sample(200)[0]
    adapted = client.forward(x).astype(np.float64)
    f = adapted / np.linalg.norm(adapted, axis=1, keepdims=True)
    scores = f @ vectors.astype(np.float64).T + (beta / temperature) * bias
    choice = client.route(x)
    np.testing.assert_allclose(scores, choice.scores, atol=1e-5)
    assert np.array_equal(np.argmax(scores, axis=1), choice.index)
