"""sona_shm in asyncio servers: attach in an ASGI lifespan, await ``flush``/``sync`` without blocking the loop.

With FastAPI or Starlette::

    import sona_shm.asgi

    engine = sona_shm.asgi.Engine("router")           # or Engine(): the name from SONA_SHM_NAME
    app = FastAPI(lifespan=engine.lifespan)

    @app.post("/feedback")
    async def feedback(...):
        accepted = engine.client.record(trajectory)   # record() and forward() never wait: call them directly
        ...
    await engine.sync(timeout=5)                      # waits run in a thread, the loop goes on

With a raw ASGI app, wrap it: ``app = engine.wrap(app)`` handles the ``lifespan``
messages (attach at ``startup``, close at ``shutdown``) and passes everything else on.

Every server process (each ``uvicorn --workers N`` worker, each gunicorn
``UvicornWorker``) runs the lifespan and so attaches its own client, with its own lane.
One process never takes two lanes of one engine: a worker whose gunicorn hooks
(``sona_shm.gunicorn``) attached already reuses their client (and leaves closing it to
them), and ``sona_shm.gunicorn.client()`` called after a lifespan attached returns the
lifespan's client (which the lifespan closes).
Attaching runs in the default executor and waits at most ``timeout`` seconds (default
``SONA_SHM_ATTACH_TIMEOUT``, 10) for the flusher to create the segment; a failure fails
the startup with the reason, and the server does not start serving (a misconfiguration
is loud, as with ``post_fork`` under gunicorn). ``flush`` and ``sync`` run in the
executor too, each bounded by its own timeout. ``record()`` and ``forward()`` take
microseconds and never wait for another process, so handlers call them directly on the
loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from .checks import check_timeout
from .engine.client import Client, attach
from .errors import ClosedError
from .gunicorn import ENV_NAME, attach_timeout, current_client, engine_name, lifespan_attached
from .shm.segment import check_name

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds ``flush``/``sync`` wait by default (as the client's).
WAIT_TIMEOUT = 5.0


class Engine:
    """One engine as an asyncio app sees it: attached by a lifespan, awaitable waits.

    ``name``: the engine (default: ``SONA_SHM_NAME``, read at startup). ``timeout``:
    seconds to wait at startup for the segment (default: ``SONA_SHM_ATTACH_TIMEOUT``).
    """

    def __init__(self, name: str | None = None, *, timeout: float | None = None) -> None:
        self._name = None if name is None else check_name(name)
        self._timeout = None if timeout is None else check_timeout(timeout)
        self._client: Client | None = None
        self._borrowed = False  # the client is the gunicorn hooks' (they close it)

    @property
    def name(self) -> str:
        return self._name if self._name is not None else engine_name()

    @property
    def client(self) -> Client:
        """This process's client; :class:`ClosedError` outside the lifespan (before startup, after shutdown)."""
        client = self._client
        if client is None:
            raise ClosedError(
                f"sona_shm.asgi.Engine({self._name or os.environ.get(ENV_NAME)!r}) is not attached: "
                "pass engine.lifespan to the app (or wrap it with engine.wrap) so startup attaches it"
            )
        return client

    @property
    def attached(self) -> bool:
        return self._client is not None

    async def attach(self) -> Client:
        """Attach in an executor thread (waiting up to the timeout for the segment); idempotent."""
        if self._client is None:
            name = self.name
            hooks = current_client(name)
            if hooks is not None:  # the gunicorn hooks attached this worker already: one process, one lane
                self._client, self._borrowed = hooks, True
                return hooks
            timeout = attach_timeout() if self._timeout is None else self._timeout
            loop = asyncio.get_running_loop()
            self._client = await loop.run_in_executor(None, functools.partial(attach, name, timeout=timeout))
            self._borrowed = False
            lifespan_attached(name, self._client, True)
        return self._client

    async def close(self) -> None:
        """Give the lane back and unmap (in an executor: close waits for a record in progress); idempotent.
        A client borrowed from the gunicorn hooks is left to them (``worker_exit`` closes it)."""
        client, self._client = self._client, None
        if client is not None and not self._borrowed:
            lifespan_attached(client.name, client, False)
            await asyncio.get_running_loop().run_in_executor(None, client.close)

    async def flush(self, timeout: float = WAIT_TIMEOUT) -> None:
        """``client.flush(timeout)`` in an executor thread: the loop keeps serving while the flusher answers."""
        client = self.client
        await asyncio.get_running_loop().run_in_executor(None, client.flush, check_timeout(timeout))

    async def sync(self, timeout: float = WAIT_TIMEOUT) -> None:
        """``client.sync(timeout)`` in an executor thread: wait until this process's records are learned."""
        client = self.client
        await asyncio.get_running_loop().run_in_executor(None, client.sync, check_timeout(timeout))

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[dict[str, Engine]]:
        """For ``FastAPI(lifespan=engine.lifespan)``/Starlette: attach at startup, close at shutdown.

        Yields the state ``{"sona_shm": engine}`` (``request.state.sona_shm`` in Starlette).
        """
        await self.attach()
        try:
            yield {"sona_shm": self}
        finally:
            await self.close()

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """A raw ASGI app that runs this engine's lifespan around ``app`` (which then sees no lifespan messages)."""

        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "lifespan":
                await app(scope, receive, send)
                return
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self.attach()
                    except Exception as exc:  # the server prints it and does not start
                        await send({"type": "lifespan.startup.failed", "message": f"sona_shm: {exc}"})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

        return wrapped


__all__ = ["Engine", "WAIT_TIMEOUT"]
