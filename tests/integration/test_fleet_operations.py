"""A fleet through the Redis operations of production, on a real redis-server (loopback; the Sentinel scenarios are in
test_fleet_testbed.py): keys deleted or evicted, memory limits under every eviction policy, a paused host whose host id
another engine took, a rebooted host, a hostile snapshot and ghost hosts, passwords in every URL form.

Every scenario asserts the fleet's accounting: the trajectories committed = the signals the hosts sealed = what every
replica applied + what it counted lost (the same on every replica), every replica's adapter the same bytes, and no
flusher exited. Under CI=true nothing here skips.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from test_fleet_redis import FLAGS, _logs_on_failure, fleet_of, host, record, stopped  # noqa: F401 - the fixture shows the flushers' logs

import sona_shm
from sona_shm import stats
from sona_shm.errors import SonaShmError

from children import RedisServer
from conftest import need_redis
from support import python_cmd, run, wait_for

pytestmark = pytest.mark.guarantee("many-hosts-learn-one-adapter")


def flush_all(clients: dict, engines: list[str], timeout: float = 60.0) -> None:
    for engine in engines:
        if engine in clients:
            clients[engine].flush(timeout=timeout)


def settle_counted(clients: dict, engines: list[str], committed: int, timeout: float = 90.0) -> None:
    """Seal everything; then every replica applied or counted lost all the hosts sealed."""
    flush_all(clients, [e for e in engines if e in clients], timeout)
    wait_for(
        lambda: all(fleet_of(e).applied_signals + fleet_of(e).lost_signals == committed for e in engines),
        timeout,
        "every replica to apply or count everything",
    )


def assert_accounting(engines: list[str], committed: int, flushers: list, lost: int | None = None) -> int:
    """committed = sealed = applied + counted lost on every replica (lost alike everywhere), identical bytes, no flusher
    exited; the signals lost."""
    for proc in flushers:
        assert proc.poll() is None, f"a flusher exited with {proc.returncode}: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
    views = [stats.read(e) for e in engines]
    sealed = sum(v.fleet.sealed_signals for v in views)
    assert sealed == committed
    counted = {(v.fleet.applied_signals, v.fleet.lost_signals, v.fleet.lost_entries) for v in views}
    assert len(counted) == 1, f"replicas disagree: {counted}"
    applied, lost_signals, _ = counted.pop()
    assert applied + lost_signals == committed
    if lost is not None:
        assert lost_signals == lost
    for v in views[1:]:
        assert v.adapter.up.tobytes() == views[0].adapter.up.tobytes() and v.adapter.down.tobytes() == views[0].adapter.down.tobytes()
    return lost_signals


def three(procs, server, names, *extra: str):
    engines = names(3)
    key = engines[0]
    flushers = {e: host(procs, server, e, key, *extra) for e in engines}
    return engines, key, flushers, {e: sona_shm.attach(e) for e in engines}


def joined(engine: str) -> bool:
    """Whether ``engine``'s flusher made its segment and joined the fleet (False while it is being made)."""
    try:
        return stats.read(engine).fleet.epoch != 0
    except SonaShmError:  # no segment yet, or one its creator has not finished
        return False


def close(clients: dict) -> None:
    for client in clients.values():
        client.close()


# ----------------------------------------------------------------- keys deleted


@pytest.mark.parametrize("lost_key", ["seqs", "snap", "meta", "log"])
def test_a_deleted_key_is_healed_and_what_cannot_be_is_counted(redis_server, names, procs, lost_key):
    """DEL of one fleet key (what an eviction or an operator does): the fleet heals it from the snapshot, the stream and
    the hosts' state; nothing stalls, no resync loop, replicas stay identical; only windows gone with the stream are lost,
    counted alike everywhere."""
    engines, key, flushers, clients = three(procs, redis_server, names, "--fleet-snapshot-interval", "0.3")
    committed = sum(record(clients[e], i, 30) for i, e in enumerate(engines))
    settle_counted(clients, engines, committed)
    r = redis_server.client()
    wait_for(lambda: r.hget(f"sona:{{{key}}}:snap", "id") not in (None, b"0-0"), what="a snapshot (maybe of long ago)")
    r.delete(f"sona:{{{key}}}:{lost_key}")
    if lost_key == "snap":
        wait_for(lambda: r.exists(f"sona:{{{key}}}:snap"), 30, "a host to offer the snapshot again")
    for round_ in range(3):  # a few windows of every host after the loss: each is healed or shows its gap
        committed += sum(record(clients[e], 10 * round_ + i + 10, 20) for i, e in enumerate(engines))
        flush_all(clients, engines)
    settle_counted(clients, engines, committed)
    lost = assert_accounting(engines, committed, list(flushers.values()))
    if lost_key in ("seqs", "snap"):
        assert lost == 0  # rebuilt exactly from the snapshot and the stream
    assert r.hexists(f"sona:{{{key}}}:seqs", "-") and r.exists(f"sona:{{{key}}}:meta")
    r.close()
    close(clients)


# ----------------------------------------------------------------- memory limits


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "noeviction"])
def test_redis_at_maxmemory_under_each_policy_stops_no_flusher(names, procs, tmp_path, policy, caplog):
    """A Redis that is also a cache: maxmemory reached while a cache fills it. Under noeviction and volatile-lru writes
    fail (OOM): the fleet waits and retries, nothing is lost. Under allkeys-lru the fleet's keys are evicted: healed,
    what cannot be is counted. When the cache goes, everything settles, and a join warned about the policy."""
    need_redis()
    server = RedisServer(str(tmp_path)).start()
    try:
        engines = names(2)
        key = engines[0]
        flushers = [host(procs, server, e, key, "--fleet-snapshot-interval", "0.5") for e in engines]
        clients = {e: sona_shm.attach(e) for e in engines}
        committed = sum(record(clients[e], i, 20) for i, e in enumerate(engines))
        settle_counted(clients, engines, committed)
        r = server.client()
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory-policy", policy)
        r.config_set("maxmemory", used + 400_000)
        filler = np.random.default_rng(1).bytes(20_000)
        ooms = 0

        def cache_fills() -> bool:  # the cache keeps writing: its own writes fail at the limit under noeviction
            nonlocal ooms
            for i in range(20):
                try:
                    r.set(f"cache:{np.random.default_rng().integers(1 << 30)}", filler, **({"ex": 600} if i % 2 else {}))
                except Exception:  # OOM: the cache's own problem
                    ooms += 1
            return int(r.info("stats").get("evicted_keys", 0)) > 0 or ooms > 0

        wait_for(cache_fills, 60, "Redis to reach maxmemory")
        for round_ in range(4):  # the fleet writes at the limit
            committed += sum(record(clients[e], 20 + 10 * round_ + i, 20) for i, e in enumerate(engines))
            cache_fills()
        assert all(p.poll() is None for p in flushers)  # at the limit, every flusher still runs
        for key_name in r.scan_iter("cache:*"):
            r.delete(key_name)
        r.config_set("maxmemory", 0)
        settle_counted(clients, engines, committed)
        lost = assert_accounting(engines, committed, flushers)
        if policy != "allkeys-lru":
            assert lost == 0  # writes refused are retried, never lost
        r.close()
        close(clients)
    finally:
        server.close()


def test_a_join_warns_about_an_evicting_policy_and_says_what_to_set(redis_server, names, procs):
    r = redis_server.client()
    r.config_set("maxmemory-policy", "allkeys-lru")
    r.close()
    engine = names(1)[0]
    proc = procs.start("-m", "sona_shm", "flusher", "--name", engine, *FLAGS, "--fleet", redis_server.url, "--host-id", "h")
    wait_for(lambda: joined(engine), 60, "the join")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "maxmemory-policy allkeys-lru" in err and "set maxmemory-policy noeviction" in err


# ----------------------------------------------------------------- host identity


def test_a_paused_host_whose_id_was_taken_gives_up_what_it_sealed_counted_and_stays_up(redis_server, names, procs):
    """SIGSTOP a host while its windows wait in the outbox (Redis stopped); its lease runs out and another engine takes
    the host id. Resumed, it neither strands nor drops its windows: those the stream never had are counted lost on
    every replica; it seals nothing more but keeps applying the fleet's stream, and does not exit."""
    a, b, taker = names(3)
    key = a
    flushers = {e: host(procs, redis_server, e, key) for e in (a, b)}
    clients = {e: sona_shm.attach(e) for e in (a, b)}
    committed = record(clients[a], 1, 30) + record(clients[b], 2, 30)
    settle_counted(clients, [a, b], committed)
    redis_server.pause()
    try:
        committed += record(clients[a], 3, 40)  # 4 windows sealed into a's outbox, not published
        wait_for(lambda: fleet_of(a).outbox == 4, what="a's windows to wait in its outbox")
        flushers[a].send_signal(signal.SIGSTOP)
        wait_for(lambda: stopped(flushers[a]), what="a to stop")
    finally:
        redis_server.kill()  # what a sent meanwhile dies unread with it
        redis_server.start()  # from its AOF
    r = redis_server.client()
    r.delete(f"sona:{{{key}}}:lease:{a}")  # as if its lease had run out while it was stopped
    r.close()
    flushers[taker] = procs.flusher(taker, *FLAGS, "--fleet", redis_server.url, "--fleet-key", key, "--host-id", a)
    wait_for(lambda: fleet_of(taker).epoch != 0, 60, "the other engine to take the host id")
    clients[taker] = sona_shm.attach(taker)
    committed += record(clients[taker], 4, 20) + record(clients[b], 5, 20)
    flushers[a].send_signal(signal.SIGCONT)
    engines = [a, b, taker]
    wait_for(lambda: fleet_of(a).outstanding == 0, 60, "a to give its windows up")
    del clients[a]  # a learns nothing more: its client's flush() would wait for ever
    settle_counted(clients, engines, committed)
    lost = assert_accounting(engines, committed, list(flushers.values()))
    assert lost == 40 and fleet_of(b).lost_entries == 4
    wait_for(lambda: fleet_of(a).paused, what="a to say it learns no more")  # the line is written every 20 ms
    for client in clients.values():
        client.close()


def test_a_rebooted_host_waits_out_its_dead_flushers_lease_instead_of_exiting(redis_server, names, procs):
    """SIGKILL a host's flusher and wipe its segment (a reboot: /dev/shm is gone). The new flusher with the same host id
    waits for the lease no live flusher renews (bounded, logged), then joins; nothing it commits is lost."""
    from sona_shm.shm import segment

    a, b = names(2)
    key = a
    flushers = {e: host(procs, redis_server, e, key) for e in (a, b)}
    clients = {e: sona_shm.attach(e) for e in (a, b)}
    committed = record(clients[a], 1, 30) + record(clients[b], 2, 30)
    settle_counted(clients, [a, b], committed)
    clients.pop(a).close()
    flushers[a].send_signal(signal.SIGKILL)
    flushers[a].wait()
    segment.unlink(a)
    proc = procs.start("-m", "sona_shm", "flusher", "--name", a, *FLAGS, "--fleet", redis_server.url, "--fleet-key", key, "--host-id", a)
    wait_for(lambda: joined(a), 60, "the rebooted host to join")
    assert proc.poll() is None
    flushers[a] = proc
    clients[a] = sona_shm.attach(a)
    committed += record(clients[a], 3, 30) + record(clients[b], 4, 30)
    settle_counted(clients, [a, b], committed)
    # The old segment's sealed signals are gone with its /dev/shm: the fleet applied them, the new segment seals anew.
    views = {e: fleet_of(e) for e in (a, b)}
    assert views[a].applied_signals == views[b].applied_signals == committed and views[a].lost_signals == 0
    assert views[a].sealed_signals + views[b].sealed_signals == committed - 30
    assert all(p.poll() is None for p in flushers.values())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "waiting for it to expire" in err
    close(clients)


def test_fleet_hosts_lists_and_remove_host_retires_a_gone_host(redis_server, names, procs):
    a, b = names(2)
    flushers = {e: host(procs, redis_server, e, a) for e in (a, b)}
    base = python_cmd("-m", "sona_shm", "fleet")
    done = run([*base, "hosts", "--fleet", redis_server.url, "--fleet-key", a, "--json"], timeout=60)
    listed = json.loads(done.stdout)
    assert sorted(listed) == sorted([a, b]) and all(row["lease_s"] > 0 for row in listed.values())
    done = run([*base, "remove-host", "--fleet", redis_server.url, "--fleet-key", a, "--host-id", b], timeout=60)
    assert done.returncode == 4 and "holds a lease" in done.stderr  # its flusher runs
    flushers[b].send_signal(signal.SIGTERM)
    flushers[b].wait(60)
    r = redis_server.client()
    r.delete(f"sona:{{{a}}}:lease:{b}")
    r.close()
    done = run([*base, "remove-host", "--fleet", redis_server.url, "--fleet-key", a, "--host-id", b], timeout=60)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: fleet_of(a).hosts == 1, what="every replica to free the row")
    done = run([*base, "hosts", "--fleet", redis_server.url, "--fleet-key", a, "--json"], timeout=60)
    assert list(json.loads(done.stdout)) == [a]
    done = run([*base, "remove-host", "--fleet", redis_server.url, "--fleet-key", a, "--host-id", "nobody"], timeout=60)
    assert done.returncode == 9 and "no host 'nobody'" in done.stderr


# ----------------------------------------------------------------- hostile input


def test_a_hostile_snapshot_and_ghost_hosts_stop_no_flusher_and_lock_no_host_out(redis_server, names, procs):
    """A snapshot whose table seq is 2**64 is refused (BadSnapshot, logged, asked for again), never a crash; 70 entries
    of made-up hosts are counted bad on every replica and take no row: a host that joins afterwards learns."""
    a, late = names(2)
    key = a
    flushers = [host(procs, redis_server, a, key, "--fleet-snapshot-interval", "0.3")]
    clients = {a: sona_shm.attach(a)}
    committed = record(clients[a], 1, 30)
    settle_counted(clients, [a], committed)
    r = redis_server.client()
    for i in range(70):
        r.xadd(f"sona:{{{key}}}:log", {"h": f"ghost{i}", "k": "0" * 16, "s": 1, "e": 1, "p": 0, "w": b"x" * 80})
    wait_for(lambda: fleet_of(a).bad_entries == 70, what="the ghosts to be counted")
    good = r.hgetall(f"sona:{{{key}}}:snap")
    state = json.loads(good[b"state"])
    state["table"] = {k: [2**64, v[1]] for k, v in state["table"].items()}
    r.hset(f"sona:{{{key}}}:snap", "state", json.dumps(state))
    proc = procs.start(
        "-m", "sona_shm", "flusher", "--name", late, *FLAGS, "--fleet", redis_server.url, "--fleet-key", key, "--host-id", late
    )
    flushers.append(proc)
    wait_for(lambda: os.path.exists(f"/dev/shm/sona_shm.{late}"), 60, "the late host's segment")
    committed += record(clients[a], 2, 30)  # a's next snapshot replaces the bad one
    clients[a].flush(timeout=60)
    wait_for(lambda: fleet_of(late).epoch != 0, 60, "the late host to load a good snapshot")
    clients[late] = sona_shm.attach(late)
    committed += record(clients[late], 3, 30) + record(clients[a], 4, 30)
    settle_counted(clients, [a, late], committed)
    assert_accounting([a, late], committed, flushers, lost=0)
    assert fleet_of(late).bad_entries == fleet_of(a).bad_entries == 70 and fleet_of(late).hosts == 2
    r.close()
    close(clients)


# ----------------------------------------------------------------- secrets


def test_no_password_in_any_log_line_or_error_for_any_url_form(names, procs, tmp_path):
    """redis://:PW@, redis://USER:PW@ (an ACL user), ?password=PW, a URL without '://', the URL from $SONA_SHM_FLEET_URL
    and from a file: the flusher logs (at INFO) and errors never hold the password, and neither does its command line."""
    need_redis()
    secret = "hunter2-s3cret"
    server = RedisServer(str(tmp_path), password=secret).start()
    try:
        r = server.client()
        r.execute_command("ACL", "SETUSER", "fleetuser", "on", f">{secret}", "~*", "+@all")
        r.close()
        port = server.port
        forms = {
            "password": f"redis://:{secret}@127.0.0.1:{port}/0",
            "user": f"redis://fleetuser:{secret}@127.0.0.1:{port}/0",
            "query": f"redis://127.0.0.1:{port}/0?password={secret}",
        }
        url_file = tmp_path / "fleet-url"
        url_file.write_text(forms["password"] + "\n")
        url_file.chmod(0o600)
        engines = names(5)
        ways = [
            ["--fleet", forms["password"]],
            ["--fleet", forms["user"]],
            ["--fleet", forms["query"]],
            ["--fleet-url-file", str(url_file)],
            ["--fleet"],  # from the environment
        ]
        running = []
        for engine, way in zip(engines, ways, strict=True):
            extra_env = {"SONA_SHM_FLEET_URL": forms["user"]} if way == ["--fleet"] else None
            proc = procs.start(
                "-m", "sona_shm", "flusher", "--name", engine, *FLAGS[:-2], "--fleet-outbox", "8", *way,
                "--fleet-key", "secrets", "--host-id", engine, extra_env=extra_env,
            )  # fmt: skip
            running.append(proc)
        for engine in engines:
            wait_for(lambda e=engine: joined(e) and stats.read(e).fleet.connected, 60, f"{engine} to connect")
        for proc, way in zip(running, ways, strict=True):
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                assert (secret.encode() in f.read()) == (way[0] == "--fleet" and len(way) == 2)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0 and secret not in out + err and "connected to redis://" in err
        bad = {
            "no scheme": f"{secret}@127.0.0.1:{port}",
            "wrong password": forms["password"].replace(secret, secret + "x"),
            "bad port": f"redis://:{secret}@127.0.0.1:notaport/0",
        }
        for what, url in bad.items():
            done = run(python_cmd("-m", "sona_shm", "flusher", "--name", names(1)[0], *FLAGS, "--fleet", url), timeout=60)
            assert done.returncode in (2, 9), (what, done.stderr)
            assert secret not in done.stderr + done.stdout, what
    finally:
        server.close()
