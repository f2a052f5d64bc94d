"""The serving metrics' hold-and-flush: values reach Ray's metric objects, summed per tag set,
within one flush interval (fake metric objects stand in for Ray's, which need a Ray worker)."""

import asyncio

from rayline.serve import metrics as sm


class FakeMetric:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, dict(tags or {})))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, dict(tags or {})))


def fake_ingress() -> tuple[sm.IngressMetrics, dict[str, FakeMetric]]:
    m = sm.IngressMetrics()
    fakes = {"requests": FakeMetric(), "latency": FakeMetric(), "errors": FakeMetric()}
    m.__dict__["_m"] = fakes  # the cached_property's slot
    return m, fakes


def test_in_an_event_loop_values_are_held_then_flushed_summed_per_tag_set():
    m, fakes = fake_ingress()

    async def scenario() -> tuple[int, int]:
        for _ in range(5):
            m.record("a", 200, 0.002, None)
        m.record("a", 422, 0.001, "validation")
        m.record("b", 200, 0.003, None)
        held = len(fakes["requests"].calls) + len(fakes["latency"].calls)
        await asyncio.sleep(sm.FLUSH_S * 3)
        return held, len(fakes["latency"].calls)

    held, latencies = asyncio.run(scenario())
    assert held == 0  # nothing handed to Ray on the request path
    assert sorted(fakes["requests"].calls, key=lambda c: sorted(c[1].items())) == [
        (5.0, {"model": "a", "status": "200"}),
        (1.0, {"model": "a", "status": "422"}),
        (1.0, {"model": "b", "status": "200"}),
    ]
    assert latencies == 7  # every observation kept (a histogram cannot be summed)
    assert fakes["errors"].calls == [(1.0, {"model": "a", "kind": "validation"})]


def test_a_second_burst_after_a_flush_is_flushed_too():
    m, fakes = fake_ingress()

    async def scenario() -> None:
        m.record("a", 200, 0.001, None)
        await asyncio.sleep(sm.FLUSH_S * 2)
        m.record("a", 200, 0.001, None)
        m.record("a", 200, 0.001, None)
        await asyncio.sleep(sm.FLUSH_S * 2)

    asyncio.run(scenario())
    assert [c[0] for c in fakes["requests"].calls] == [1.0, 2.0]


def test_outside_an_event_loop_values_go_to_ray_at_once():
    m = sm.ModelMetrics("flights")
    fakes = {"batch": FakeMetric(), "rows": FakeMetric(), "flags": FakeMetric()}
    m.__dict__["_m"] = fakes
    m.batch(16, 3)
    m.flags({"unknown_category": 2, "out_of_range": 0})
    assert fakes["batch"].calls == [(16, {"model": "flights"})]
    assert fakes["rows"].calls == [(16.0, {"model": "flights", "version": "3"})]
    assert fakes["flags"].calls == [(2.0, {"model": "flights", "flag": "unknown_category"})]
