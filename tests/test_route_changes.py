"""Routes that change at run time: add, rename, retire — through the flusher, with no flusher, in InstantLoop and
from the command line; what is refused, and that nothing learned for the other routes is lost."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sona_shm import InstantLoop, InvalidInputError
from sona_shm.engine import routes as route_changes
from sona_shm.engine.provision import create
from sona_shm.errors import FlusherTimeoutError
from sona_shm.learn.routes import RouteTable
from sona_shm.shm.ledger import read_route_table

H, K = 16, 4
F32 = np.float32
NAMES = ["code", "math", "chat", "search"]


def table(seed: int = 3) -> RouteTable:
    return RouteTable.build(np.random.default_rng(seed).standard_normal((K, H)), NAMES)


class Scanning:
    """The in-process flusher scanning in a thread while a test waits for its answer to a route change."""

    def __init__(self, flusher) -> None:
        self.flusher, self.stop = flusher, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.flusher.scan()
            self.stop.wait(0.001)

    def __enter__(self) -> Scanning:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def learn(client, flusher, rng, n: int, routes: int) -> None:
    for _ in range(n):
        x = rng.standard_normal(H).astype(F32)
        assert client.feedback(x, best=int(rng.integers(0, routes)))
    flusher.scan()


def test_add_rename_retire_through_the_flusher_keep_what_was_learned(engine):
    flusher = engine(routes=table(), rule="routing", max_routes=6, lane_slots=64)
    client = engine.attach()
    rng = np.random.default_rng(0)
    learn(client, flusher, rng, 50, K)
    before = client._ledger.read("route_vectors", "route_bias", "work_vectors", "route_chosen", "route_best")
    generation = client._ledger.generation()[0]
    new = rng.standard_normal(H)
    with Scanning(flusher):
        assert client.add_route("write", new * 7) == 4
        assert client.rename_route("math", "maths") == 1
        assert client.retire_route(2) == 2
    vectors, bias, work, chosen, best, used, state, names = client._ledger.read(
        "route_vectors", "route_bias", "work_vectors", "route_chosen", "route_best", "routes_used", "route_state", "route_names"
    )
    assert used == 5 and client._ledger.generation()[0] == generation + 3  # each change: workers reload
    for after, was in zip((vectors, bias, work, chosen, best), before):
        assert np.array_equal(after[:K], was[:K])  # nothing learned for the other routes changed
    np.testing.assert_allclose(vectors[4], new / np.linalg.norm(new), rtol=1e-6)  # the new route starts as given
    assert bias[4] == 0 and chosen[4] == 0 and state[:5].tolist() == [1, 1, 2, 1, 1]
    routes = client.routes
    assert routes.names == ("code", "maths", "chat", "search", "write") and routes.retired_flags() == (False, False, True, False, False)
    np.testing.assert_array_equal(routes.vectors[4], (new * 7).astype(F32))  # kept as given
    assert [n.rstrip(b"\0") for n in names[:5].tolist()] == [b"code", b"maths", b"chat", b"search", b"write"]
    # A retired route is never chosen again; the new one is, and both learn (or not) from feedback.
    x = rng.standard_normal((300, H)).astype(F32)
    assert 2 not in set(client.route(x).index.tolist()) and 4 in set(client.route(x).index.tolist())
    for xi in x[:40]:
        choice = client.route(xi, explore="squarecb")
        assert choice.index != 2 and choice.probability > 0
    assert client.route(new.astype(F32)).name == "write"
    assert client.feedback(x[0], best="write") and client.feedback(x[1], route="chat", reward=1.0)  # on a retired route: counted
    flusher.scan()
    stats = {r["name"]: r for r in client.stats()["routes"]}
    assert stats["write"]["best"] == 1 and stats["chat"]["chosen"] == chosen[2] + 1 and stats["chat"]["retired"]
    after_vectors, after_work = client._ledger.read("route_vectors", "work_vectors")
    assert np.array_equal(after_work[2], work[2])  # the retired route learned nothing from it


def test_with_no_flusher_running_the_change_is_applied_by_the_caller(name):
    create(name, config_overrides={"rule": "routing", "hidden_dim": H, "lanes": 2, "lane_slots": 8, "capacity": 0}, routes=table())
    from sona_shm.shm.segment import Segment

    segment = Segment.open(name, writable=True)
    try:
        assert route_changes.change(segment, "add", name="write", vector=np.ones(H)) == 4
        assert route_changes.change(segment, "retire", route="code") == 0
        got = read_route_table(segment)
        assert got.names[-1] == "write" and got.retired_flags() == (True, False, False, False, False)
    finally:
        segment.close()


@pytest.mark.parametrize(
    "op, kwargs, fragment",
    [
        ("add", dict(name="code", vector=np.ones(H)), "name: expected unique names, 'code' is both names[0] and names[4]"),
        ("add", dict(name="x", vector=np.ones(H + 1)), f"vector: expected vectors of hidden_dim {H} values, got {H + 1}"),
        ("add", dict(name="x", vector=np.full(H, np.nan)), "vector: expected finite values"),
        ("add", dict(name="x", vector=np.zeros(H)), "vector: expected non-zero vectors"),
        ("add", dict(name="", vector=np.ones(H)), "name[4]: expected a non-empty string"),
        ("add", dict(name="x" * 65, vector=np.ones(H)), "at most 64 UTF-8 bytes"),
        ("add", dict(name="x", vector=np.ones(H), route=1), "route: adding a route takes name= and vector="),
        ("rename", dict(route="nope", name="x"), "route: expected a route name ('code', 'math', 'chat', 'search') or index, got 'nope'"),
        ("rename", dict(route=9, name="x"), "route: expected a route index in [0, 3]"),
        ("rename", dict(route=0, name="math"), "expected unique names, 'math'"),
        ("rename", dict(route=0, name="x", vector=np.ones(H)), "vector: only adding a route takes a vector"),
        ("retire", dict(route="nope"), "route: expected a route name"),
        ("retire", dict(route=0, name="x"), "name: retiring a route takes only route="),
        ("move", dict(route=0), "op: expected one of ['add', 'rename', 'retire'], got 'move'"),
    ],
)
def test_bad_changes_are_refused_before_anything_is_written(engine, op, kwargs, fragment):
    flusher = engine(routes=table(), rule="routing", max_routes=5)
    client = engine.attach()
    before = bytes(client._segment.buf)
    with pytest.raises(InvalidInputError) as info:
        route_changes.change(client._segment, op, timeout=1.0, **kwargs)
    assert fragment in str(info.value), str(info.value)
    assert bytes(client._segment.buf) == before  # nothing written: not even the mailbox
    assert flusher.scan() == 0


def test_room_and_the_last_active_route_are_refused(engine):
    flusher = engine(routes=RouteTable.build(np.eye(2, H), ["a", "b"]), rule="routing", max_routes=3)
    client = engine.attach()
    with Scanning(flusher):
        assert client.add_route("c", np.ones(H)) == 2
        with pytest.raises(InvalidInputError, match="the engine reserved 3 routes and has them all; create it with a larger --max-routes"):
            client.add_route("d", -np.ones(H))
        assert client.retire_route("a") == 0 and client.retire_route("b") == 1
        with pytest.raises(InvalidInputError, match="'c' is the last active route; add another before retiring it"):
            client.retire_route("c")
        with pytest.raises(InvalidInputError, match="route: 'a' is retired already"):
            client.retire_route("a")
    assert client.routes.retired_flags() == (True, True, False)


def test_an_unanswered_change_is_not_overwritten_and_a_restarted_flusher_answers_it_once(engine, name):
    """The flusher is not scanning: the caller times out, the request stays; the next caller is told so; the
    flusher applies it once; had it committed without answering, the next flusher answers without applying it again."""
    flusher = engine(routes=table(), rule="routing", max_routes=6)
    client = engine.attach()
    with pytest.raises(FlusherTimeoutError, match="did not answer within 0.2 s; the request stays asked for"):
        client.add_route("write", np.ones(H), timeout=0.2)
    with pytest.raises(FlusherTimeoutError, match="has a request its flusher has not answered yet"):
        client.rename_route("code", "c", timeout=0.2)
    flusher.scan()  # applies and answers it
    assert client.routes.names[-1] == "write" and client._ledger.read("routes_used")[0] == 5
    from sona_shm.shm.admin import Mailbox

    mailbox = Mailbox(client._segment)
    try:
        assert mailbox.answered == mailbox.request == client._ledger.read("admin_request")[0] == 1
        # As if a flusher had committed request 2 and died before answering it: the ledger says it is done.
        mailbox.post("add", -1, "again", np.ones(H))
        route_changes.apply(mailbox.open_request(), flusher.learner, flusher._state[0], flusher.segment)
        flusher._commit()
        assert client._ledger.read("routes_used")[0] == 6 and mailbox.answered == 1
        flusher.scan()
        reply = mailbox.reply()
        assert mailbox.answered == 2 and (reply.done, reply.index, reply.message) == (True, 5, "")  # answered, not added twice
        assert client._ledger.read("routes_used", "admin_request") == (6, 2)
    finally:
        mailbox.close()


def test_instant_loop_changes_its_routes_alike():
    t = table()
    loop = InstantLoop(H, rule="routing", routes=t.vectors, route_names=t.names, max_routes=6, capacity=0)
    rng = np.random.default_rng(1)
    for _ in range(50):
        loop.feedback(rng.standard_normal(H).astype(F32), best=int(rng.integers(0, K)))
    learned = loop._learner.route_vectors[:K].copy()
    assert loop.add_route("write", np.ones(H)) == 4
    loop.rename_route("math", "maths")
    loop.retire_route("chat")
    assert np.array_equal(loop._learner.route_vectors[:K], learned)
    stats = loop.route_stats()
    assert list(stats) == ["code", "maths", "chat", "search", "write"] and stats["chat"]["retired"] and stats["write"]["drift"] == 0
    x = rng.standard_normal((200, H)).astype(F32)
    assert 2 not in set(loop.route(x).index.tolist())
    with pytest.raises(InvalidInputError, match="the engine reserved 6 routes"):
        loop.add_route("a", np.ones(H))
        loop.add_route("b", np.ones(H))


def test_the_command_line_lists_adds_renames_and_retires(name, tmp_path, capsys):
    import json

    from sona_shm.cli import EXIT_OK, EXIT_USAGE, main

    path = str(tmp_path / "routes.npz")
    table().save(path)
    assert (
        main(["create", "--name", name, "--rule", "routing", "--routes", path, "--max-routes", "6", "--lanes", "2", "--lane-slots", "8"])
        == EXIT_OK
    )
    examples = str(tmp_path / "examples.npy")
    np.save(examples, np.random.default_rng(4).standard_normal((5, H)))
    assert main(["routes", "add", "--name", name, "write", "--vector", examples]) == EXIT_OK
    assert main(["routes", "rename", "--name", name, "1", "maths"]) == EXIT_OK
    assert main(["routes", "retire", "--name", name, "chat"]) == EXIT_OK
    capsys.readouterr()
    assert main(["routes", "list", "--name", name, "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [(r["index"], r["name"], r["state"]) for r in rows] == [
        (0, "code", "active"),
        (1, "maths", "active"),
        (2, "chat", "retired"),
        (3, "search", "active"),
        (4, "write", "active"),
    ]
    assert main(["routes", "list", "--name", name]) == EXIT_OK
    assert "maths" in capsys.readouterr().out
    assert main(["routes", "add", "--name", name, "code", "--vector", examples]) == EXIT_USAGE
    assert "expected unique names" in capsys.readouterr().err
    assert main(["routes", "add", "--name", name, "x", "--vector", str(tmp_path / "missing.npy")]) == EXIT_USAGE
    assert "--vector: expected a .npy file" in capsys.readouterr().err
    script = tmp_path / "vector.py"
    script.write_text("v = [1, 0]\n")
    assert main(["routes", "add", "--name", name, "x", "--vector", str(script)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--vector: expected a .npy file" in err and "pickle" not in err  # numpy would advise allow_pickle
