"""ModelServer.close, which Serve's multiplexer calls (through ``__del__``) when it evicts a model:
the alias-following thread stops, and the batch queue's task (which would keep the model in
memory) is cancelled once the requests in flight are done. No Ray started."""

import asyncio
import threading

import pytest

from rayline.serve.model import ModelConfig, ModelServer


@pytest.fixture
def server(monkeypatch):
    """A ModelServer without a model: the parts close() deals with."""
    from ray import serve
    from ray.serve import batching

    # outside a replica there is no max_ongoing_requests to compare the batch size with
    monkeypatch.setattr(
        batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda s: None
    )
    s = object.__new__(ModelServer)
    s._name = "m"
    s._cfg = ModelConfig(poll_interval_s=30)
    s._stop = threading.Event()
    s._inflight = 0

    async def score(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    s._score_batch = serve.batch(max_batch_size=4)(score)
    s._poller = threading.Thread(target=s._follow, daemon=True)
    s._poller.start()
    return s


def test_close_stops_following_and_releases_the_batch_queue_after_requests(server):
    async def run() -> None:
        assert await server._score_batch(3) == 6  # the queue and its task exist now
        task = server._score_batch.set_max_batch_size.__self__._queue._handle_batch_task
        server._inflight = 1  # a request admitted before the eviction
        await asyncio.to_thread(server.__del__)  # as the multiplexer does: in a worker thread
        assert server.closed
        server._poller.join(5)
        assert not server._poller.is_alive()  # the 30 s poll wait ended at once
        await asyncio.sleep(0.5)
        assert not task.done()  # still serving the request in flight
        server._inflight = 0
        for _ in range(50):
            if task.done():
                break
            await asyncio.sleep(0.1)
        assert task.cancelled()
        server.close()  # again: nothing to do

    asyncio.run(run())


def test_close_before_any_request_and_after_a_failed_init():
    s = object.__new__(ModelServer)
    s._stop = threading.Event()
    s.close()  # no batch queue yet (nor a _score_batch: __init__ failed before it)
    assert s.closed
    object.__new__(ModelServer).__del__()  # nothing set at all: no error
