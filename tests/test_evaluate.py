"""Off-policy evaluation (``sona_shm.learn.evaluate``, ``sona_shm.evaluate``, ``sona-shm evaluate``).

Validated on the synthetic router task (``scripts/router_task.py``): a router learns from on-policy bandit feedback
with epsilon-greedy exploration, logging the probability of each route served; IPS and SNIPS of fixed policies (no
adaptation, the router early on, the router when logging began) must hold their true on-policy reward — the accuracy
of their greedy choice on fresh queries — within their intervals, with fixed seeds. The intervals are asymptotic 95 %
ones: over 40 seeds of that test each held the true reward 35 to 39 times (logs of a router that learns while it
logs); with a fixed logging policy, 94 % to 97 % of 200 logs (the coverage test below checks it stays near).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from router_task import RouterTask

from sona_shm import InstantLoop
from sona_shm.cli import EXIT_CHECKPOINT, EXIT_OK, EXIT_USAGE, main
from sona_shm.config import DEFAULT_LR
from sona_shm.evaluate import evaluate
from sona_shm.learn.evaluate import LoggedDecisions, estimate, greedy_choices, logged_decisions
from sona_shm.learn.routes import Router, RouteTable, choose
from sona_shm.stats import read
from sona_shm.store.checkpoint import checkpoint_segment

H, K = 32, 4
NAMES = ["code", "math", "chat", "search"]


def task(seed: int) -> RouterTask:
    """Noisy enough that no router is always right (the intervals are not degenerate)."""
    return RouterTask(seed, h=H, routes=K, clusters=8, misrouted=3, noise=1.2)


def frozen(loop: InstantLoop) -> Router:
    """A copy of the router ``loop`` serves with now (it keeps learning; this does not)."""
    r = loop._router()
    return Router(r.down.copy(), r.up_scaled.copy(), r.vectors.copy(), r.bias.copy(), r.active.copy(), r.names, r.temperature)


def true_reward(world: RouterTask, router: Router, seed: int, n: int = 50_000) -> float:
    """The on-policy mean reward of ``router``'s greedy choice: its accuracy on ``n`` fresh queries (s.e. < 0.0023)."""
    x, y = world.sample(n, np.random.default_rng(seed))
    return float((greedy_choices(router, x) == y).mean())


def feed(loop: InstantLoop, world: RouterTask, n: int, rng, draws, explore: float = 0.2) -> None:
    """``n`` on-policy bandit feedbacks with the probability of each route served."""
    x, y = world.sample(n, rng)
    for i in range(n):
        choice = loop.route(x[i], explore=explore, rng=draws)
        loop.feedback(x[i], route=choice.index, reward=float(choice.index == y[i]), probability=choice.probability)


@pytest.mark.parametrize("seed", [0, 5, 6])
def test_ips_and_snips_of_a_learning_routers_logs_hold_the_true_reward_of_fixed_policies(seed):
    world = task(seed)
    loop = InstantLoop(H, 2, DEFAULT_LR["routing"], 20, capacity=4000, rule="routing", routes=world.routes, route_names=NAMES)
    rng, draws = np.random.default_rng(seed + 1), random.Random(seed + 2)
    unadapted = frozen(loop)
    feed(loop, world, 120, rng, draws)
    early = frozen(loop)
    feed(loop, world, 1380, rng, draws)
    at_start = frozen(loop)  # the router when logging begins: it learned nothing of the logged decisions
    loop.drain()
    feed(loop, world, 4000, rng, draws)  # logged while it keeps learning: each probability is that of its time
    logged = logged_decisions(loop.drain())
    assert len(logged) == logged.trajectories == 4000 and logged.no_probability == logged.no_route == 0
    truths = {}
    for label, router in (("unadapted", unadapted), ("early", early), ("at start", at_start)):
        truth = truths[label] = true_reward(world, router, seed + 3)
        e = estimate(label, greedy_choices(router, logged.query), logged)
        assert e.ips_low <= truth <= e.ips_high, (label, truth, e)
        assert e.snips_low <= truth <= e.snips_high, (label, truth, e)
        assert e.ips_high - e.ips_low < 0.1 and e.support > 1500 and abs(e.weight_mean - 1) < 0.15, e
    assert truths["unadapted"] + 0.2 < truths["at start"]  # learning made a difference the estimates must see


def test_the_intervals_cover_the_true_reward_about_as_often_as_they_say():
    """100 logs of 2000 epsilon-greedy decisions of one router; the 95 % intervals of three fixed policies."""
    world = task(7)
    loop = InstantLoop(H, 2, DEFAULT_LR["routing"], 20, capacity=0, rule="routing", routes=world.routes, route_names=NAMES)
    rng, draws = np.random.default_rng(1), random.Random(2)
    unadapted = frozen(loop)
    feed(loop, world, 120, rng, draws)
    early = frozen(loop)
    feed(loop, world, 1380, rng, draws)
    logging = frozen(loop)
    policies = (("unadapted", unadapted), ("early", early), ("logging", logging))
    truths = {label: true_reward(world, router, 99) for label, router in policies}
    covered = {label: [0, 0] for label, _ in policies}
    runs = 100
    for run in range(runs):
        g = np.random.default_rng(1000 + run)
        x, y = world.sample(2000, g)
        served = choose(logging, x, mode="epsilon", parameter=0.2, rng=g)
        logged = LoggedDecisions(x, served.index, (served.index == y).astype(np.float64), served.probability, len(y), 0, 0)
        for label, router in policies:
            e = estimate(label, greedy_choices(router, x), logged)
            covered[label][0] += e.ips_low <= truths[label] <= e.ips_high
            covered[label][1] += e.snips_low <= truths[label] <= e.snips_high
    for label, (ips, snips) in covered.items():
        assert ips >= 0.88 * runs and snips >= 0.88 * runs, (label, covered)  # 95 % nominal; P(< 88 of 100) < 0.003


def test_estimates_by_hand():
    """Four decisions, two routes: the formulas of the module docstring."""
    logged = LoggedDecisions(
        np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]), np.array([1.0, 0.0, 0.5, 1.0]), np.array([0.5, 0.25, 1.0, 0.5]), 4, 0, 0
    )
    e = estimate("p", np.array([0, 0, 0, 1]), logged)  # agrees on decisions 0, 2, 3: weights 2, 0, 1, 2
    w, r = np.array([2.0, 0, 1, 2]), logged.reward
    assert e.ips == pytest.approx((w * r).mean()) == pytest.approx(4.5 / 4)
    assert e.snips == pytest.approx(4.5 / 5) and e.support == 3 and e.decisions == 4
    assert e.effective == pytest.approx(25 / 9) and e.weight_mean == pytest.approx(5 / 4)
    half = 1.959964 * np.std(w * r, ddof=1) / 2
    assert (e.ips_low, e.ips_high) == pytest.approx((4.5 / 4 - half, 4.5 / 4 + half), rel=1e-5)
    none = estimate("q", np.array([1, 0, 1, 0]), logged)  # never agrees
    assert none.support == 0 and none.ips == 0 and none.snips is None and none.effective == 0


# ----------------------------------------------------------------- the engine and the command line


def routing_engine(engine, world: RouterTask, tmp_path):
    return engine(
        routes=RouteTable.build(world.routes, NAMES),
        rule="routing",
        hidden_dim=H,
        flush_threshold=20,
        lr=DEFAULT_LR["routing"],
        lane_slots=512,
        capacity=5000,
        options={"checkpoint": str(tmp_path / "ck.safetensors")},
    )


def test_sona_shm_evaluate_reads_the_buffer_without_draining_it_and_a_drained_file_against_a_checkpoint(engine, name, tmp_path, capsys):
    world = task(11)
    flusher = routing_engine(engine, world, tmp_path)
    client = engine.attach()
    rng, draws = np.random.default_rng(5), random.Random(6)
    x, y = world.sample(1500, rng)
    for i in range(1500):
        choice = client.route(x[i], explore=0.2, rng=draws)
        assert client.feedback(x[i], route=choice.index, reward=float(choice.index == y[i]), probability=choice.probability)
        if i % 100 == 99:
            flusher.scan()
    assert client.feedback(x[0], best=int(y[0]))  # full information, no route served: counted, not used
    assert client.feedback(x[1], route=0, reward=1.0)  # no probability: counted, not used
    flusher.scan()
    early = str(tmp_path / "early.safetensors")
    checkpoint_segment(name, early)  # the state now, as the checkpoint to compare with

    assert main(["evaluate", "--name", name, "--json"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["trajectories"] == 1502 and out["decisions"] == 1500 and out["no_route"] == out["no_probability"] == 1
    assert [e["policy"] for e in out["estimates"]] == ["current", "unadapted"]
    assert read(name).buffer.len == 1502  # read, not drained
    ours = evaluate(name)
    assert [e["ips"] for e in out["estimates"]] == [e.ips for e in ours.estimates]

    drained = str(tmp_path / "logged.npz")
    assert main(["drain", "--name", name, "--out", drained]) == EXIT_OK
    capsys.readouterr()
    assert main(["evaluate", "--from", drained, "--against", early]) == EXIT_OK
    text = capsys.readouterr().out
    assert "1,500 logged decisions from" in text and "1 without a probability" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:4]}
    assert set(rows) == {"unadapted", "checkpoint"}
    again = evaluate(files=[drained, drained], against=early)  # two files: their decisions one after the other
    assert len(again.logged) == 3000 and again.estimates[1].ips == pytest.approx(ours.estimates[0].ips)
    assert f"{again.estimates[1].ips:.4f}" == rows["checkpoint"][1]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--from", "LOGGED"], "--from: needs --name N (whose current adapter is evaluated) or --against CHECKPOINT"),
        (["--name", "NAME", "--confidence", "1.5"], "confidence: expected a probability in (0, 1), such as 0.95, got 1.5"),
        (["--name", "NAME", "--from", "MISSING"], "--from: expected a file `sona-shm drain` wrote, got"),
        (["--name", "NAME", "--against", "OTHER"], "--against: expected a checkpoint over engine"),
        (["--name", "NAME", "--from", "NOPROB"], "got none in"),
        (["--name", "NAME", "--against", "MISSING"], "--against: expected a checkpoint file, got"),
    ],
)
def test_bad_evaluations_are_refused_naming_the_argument(engine, name, names, tmp_path, capsys, argv, fragment):
    world = task(11)
    flusher = routing_engine(engine, world, tmp_path)
    client = engine.attach()
    x, y = world.sample(40, np.random.default_rng(1))
    for i in range(40):
        assert client.feedback(x[i], route=int(y[i]), reward=1.0)  # no probability
    flusher.scan()
    (other,) = names(1)
    paths = {"NAME": name, "MISSING": str(tmp_path / "missing.npz"), "LOGGED": str(tmp_path / "l.npz")}
    if "OTHER" in argv:
        from sona_shm.engine.provision import create

        create(other, config_overrides={"hidden_dim": H, "rule": "routing"}, routes=RouteTable.build(task(12).routes, NAMES))
        paths["OTHER"] = str(tmp_path / "other.safetensors")
        checkpoint_segment(other, paths["OTHER"])
    if "NOPROB" in argv or "LOGGED" in argv:
        paths["NOPROB"] = paths["LOGGED"]
        assert main(["drain", "--name", name, "--out", paths["LOGGED"]]) == EXIT_OK
    capsys.readouterr()
    code = EXIT_CHECKPOINT if argv[-2:] == ["--against", "MISSING"] else EXIT_USAGE
    assert main(["evaluate", *[paths.get(a, a) for a in argv]]) == code
    err = capsys.readouterr().err
    assert fragment in err, err
