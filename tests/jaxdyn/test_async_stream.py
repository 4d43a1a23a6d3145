"""AsyncEngine streams: outputs that pile up while the consumer is busy reach it folded into one (deltas
joined in order, the latest cumulative state), errors after them still arrive, nothing is lost."""

import asyncio

import pytest

from jaxdyn.engine.async_engine import AsyncEngine, RequestFailedError
from jaxdyn.engine.request import CompletionOutput, Logprob, RequestOutput, merge_outputs
from jaxdyn.engine.sampling_params import SamplingParams


def out(step: int, *, n: int = 1, finished: bool = False, logprobs: bool = False) -> RequestOutput:
    """The output of a request after ``step`` steps: each completion has drawn token 10 * index + step."""
    comps = []
    for i in range(n):
        ids = [10 * i + k for k in range(1, step + 1)]
        lps = [{t: Logprob(-float(t))} for t in ids] if logprobs else None
        comps.append(CompletionOutput(i, "".join(f"<{t}>" for t in ids), ids, f"<{ids[-1]}>", [ids[-1]],
                                      -float(sum(ids)) if logprobs else None, lps,
                                      lps[-1:] if logprobs else None, "length" if finished else None))
    return RequestOutput("r", [1, 2], comps, finished)


def test_merge_joins_deltas_in_order_and_keeps_the_latest_state():
    m = merge_outputs(merge_outputs(out(1, n=2, logprobs=True), out(2, n=2, logprobs=True)),
                      out(3, n=2, finished=True, logprobs=True))
    assert m.finished and [c.index for c in m.outputs] == [0, 1]
    for i, c in enumerate(m.outputs):
        ids = [10 * i + 1, 10 * i + 2, 10 * i + 3]
        assert c.delta_token_ids == ids and c.delta_text == "".join(f"<{t}>" for t in ids)
        assert c.token_ids == ids and c.text == c.delta_text and c.finish_reason == "length"
        assert [list(d) for d in c.delta_logprobs] == [[t] for t in ids] and c.cumulative_logprob == -sum(ids)


def test_merge_keeps_a_completion_the_later_output_lacks():
    a = out(1, n=2)
    b = RequestOutput("r", [1, 2], [out(2, n=2).outputs[1]], False)
    m = merge_outputs(a, b)
    assert [c.index for c in m.outputs] == [0, 1]
    assert m.outputs[0].delta_token_ids == [1] and m.outputs[1].delta_token_ids == [11, 12]


class _IdleCore:
    def has_unfinished(self):
        return False

    def add_request(self, *a, **k):
        pass

    def abort(self, rid):
        return None


@pytest.fixture
def engine():
    e = AsyncEngine(_IdleCore())
    yield e
    e.shutdown()


def test_a_consumer_behind_gets_one_folded_output_then_the_rest(engine):
    async def run():
        s = engine.add_request([1, 2], SamplingParams(max_tokens=4), "r")
        got = []
        for k in (1, 2, 3):
            s.queue.put_nowait(out(k))
        async for o in engine.stream(s):
            got.append(o)
            if len(got) == 1:              # the consumer was busy: the last step comes later on its own
                s.queue.put_nowait(out(4, finished=True))
        return got

    got = asyncio.run(run())
    assert [o.outputs[0].delta_token_ids for o in got] == [[1, 2, 3], [4]]
    assert got[-1].finished and got[-1].outputs[0].token_ids == [1, 2, 3, 4]


def test_an_error_after_waiting_outputs_comes_after_them(engine):
    async def run():
        s = engine.add_request([1, 2], SamplingParams(max_tokens=4), "r")
        s.queue.put_nowait(out(1))
        s.queue.put_nowait(out(2))
        s.queue.put_nowait(RequestFailedError("prefill worker lost"))
        got = []
        with pytest.raises(RequestFailedError, match="prefill worker lost"):
            async for o in engine.stream(s):
                got.append(o)
        return got

    got = asyncio.run(run())
    assert [o.outputs[0].delta_token_ids for o in got] == [[1, 2]]


def test_shutdown_ends_the_streams_in_flight_and_refuses_later_requests():
    """A shutdown with a request in flight (the idle core never finishes it) ends its stream with ShutdownError
    instead of leaving it waiting for outputs that never come; a request after it is refused."""
    from jaxdyn.engine.async_engine import EngineDeadError, ShutdownError
    e = AsyncEngine(_IdleCore())

    async def run():
        s = e.add_request([1, 2], SamplingParams(max_tokens=4), "r")
        await asyncio.get_running_loop().run_in_executor(None, e.shutdown)
        with pytest.raises(ShutdownError, match="shut down"):
            async for _ in e.stream(s):
                pass
        with pytest.raises(ShutdownError, match="shut down"):
            e.add_request([1], SamplingParams(max_tokens=1), "later")
        assert not e.is_healthy and not e._streams

    asyncio.run(asyncio.wait_for(run(), 10))
    # a server whose event loop closed before its engine shut down (a request left in flight): the shutdown is
    # still a shutdown, not an engine death ("Event loop is closed")
    e = AsyncEngine(_IdleCore())

    async def submit():
        e.add_request([1, 2], SamplingParams(max_tokens=4), "r")

    asyncio.run(submit())
    e.shutdown()
    assert isinstance(e.dead, ShutdownError)
    assert issubclass(ShutdownError, EngineDeadError)


class _StepCore:
    """Each request draws one token a step and ends after max_tokens; abort ends it with an "abort" output."""

    def __init__(self):
        self.requests, self.log = {}, []

    def add_request(self, rid, prompt, params, priority=0, arrival_time=None):
        self.requests[rid] = [list(prompt), params, 0]
        self.log.append(("add", rid))

    def abort(self, rid):
        r = self.requests.pop(rid, None)
        self.log.append(("abort", rid))
        if r is None:
            return None
        return RequestOutput(rid, r[0], [CompletionOutput(0, "", [], "", [], None, None, None, "abort")], True)

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        import time
        time.sleep(0.005)
        outs = []
        for rid, r in list(self.requests.items()):
            r[2] += 1
            done = r[2] >= r[1].max_tokens
            outs.append(RequestOutput(rid, r[0], [CompletionOutput(0, "", list(range(r[2])), "", [r[2]], None, None,
                                                                   None, "length" if done else None)], done))
            if done:
                del self.requests[rid]
        return outs


def test_an_id_whose_consumer_left_is_taken_until_its_abort_lands():
    """The consumer of "X" leaves (its abort queued); a request that reused "X" at once was handed the old
    request's outputs and its abort as its own end, while it ran in the engine with no one reading it. Now the
    id is refused until the abort has come back, and then serves the new request its own outputs."""
    from jaxdyn.engine.core import RequestError

    core = _StepCore()
    eng = AsyncEngine(core)

    async def run():
        for leave in ("stream", "generate"):
            if leave == "stream":
                outs = eng.stream(eng.add_request([1, 2, 3], SamplingParams(max_tokens=50), "X"))
            else:       # generate's inner stream closes with it (it was left to the garbage collector)
                outs = eng.generate([1, 2, 3], SamplingParams(max_tokens=50), "X")
            async for _ in outs:
                break                                     # the client leaves early
            await outs.aclose()
            await reused()
        return [o async for o in eng.generate([7, 7], SamplingParams(max_tokens=5), "X")]

    async def reused():
        with pytest.raises(RequestError, match="already in use"):
            eng.add_request([7, 7], SamplingParams(max_tokens=5), "X")
        for _ in range(400):
            if "X" not in eng._streams:
                break
            await asyncio.sleep(0.005)
        assert "X" not in eng._streams and eng.num_unfinished == 0

    try:
        outs = asyncio.run(run())
    finally:
        eng.shutdown()
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert all(o.prompt_token_ids == [7, 7] for o in outs)
    assert core.log == [("add", "X"), ("abort", "X")] * 2 + [("add", "X")]
