"""The continuous-batching engine on a toy model whose next token depends on the whole history
through a per-slot state: any slot mix-up, lost continuation state or wrong chunk shows up as a
different token sequence."""

import pytest
import torch

from tpssm.engine import GenerationEngine, SamplingParams

VOCAB = 97


class ToyStateModel:
    """state[slot] = (31 * state + token + 1) mod VOCAB per token; next token = state."""

    vocab_size = VOCAB
    device = torch.device("cpu")

    def __init__(self, num_slots):
        self.state = torch.full((num_slots,), -999, dtype=torch.int64)
        self.free = list(range(num_slots))
        self.prefill_calls = []
        self.prefill_rows = []  # per prefill call: (tokens, has_initial_state, decode) a row

    def allocate_slot(self):
        if not self.free:
            raise RuntimeError("out of slots")
        return self.free.pop(0)

    def free_slot(self, slot):
        assert slot not in self.free
        self.free.append(slot)

    def num_free_slots(self):
        return len(self.free)

    def _advance(self, slot, tokens, initial):
        s = int(self.state[slot]) if initial else 0
        assert s != -999, "continuation read a slot that was never written"
        for t in tokens:
            s = (31 * s + t + 1) % VOCAB
        self.state[slot] = s
        return s

    def _logits(self, states):
        return torch.nn.functional.one_hot(torch.tensor(states), VOCAB).float()

    def prefill(self, input_ids, query_start_loc, cache_indices, has_initial_state,
                decode_rows):
        qsl = query_start_loc.tolist()
        self.prefill_calls.append(qsl[-1])
        self.prefill_rows.append([(qsl[b + 1] - qsl[b], bool(has_initial_state[b]),
                                   bool(decode_rows[b])) for b in range(len(qsl) - 1)])
        states = [self._advance(int(cache_indices[b]), input_ids[qsl[b]:qsl[b + 1]].tolist(),
                                bool(has_initial_state[b])) for b in range(len(qsl) - 1)]
        return self._logits(states)

    def decode(self, input_ids, cache_indices):
        return self._logits([self._advance(int(s), [int(t)], True)
                             for t, s in zip(input_ids, cache_indices)])


def expected_tokens(prompt, n):
    s, out = 0, []
    for t in prompt:
        s = (31 * s + t + 1) % VOCAB
    for _ in range(n):
        out.append(s)
        s = (31 * s + s + 1) % VOCAB
    return out


def test_more_requests_than_slots_all_complete_with_their_own_tokens():
    model = ToyStateModel(num_slots=3)
    engine = GenerationEngine(model, max_batch_size=3, max_prefill_tokens=7)
    prompts = [[(7 * i + j) % VOCAB for j in range(1 + 5 * i)] for i in range(8)]
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_new_tokens=3 + i % 4))
    done = engine.run()
    assert [r.request_id for r in done] == list(range(8))
    for r, p in zip(done, prompts):
        assert r.output == expected_tokens(p, r.sampling.max_new_tokens)
        assert r.ttft_s is not None and r.ttft_s >= 0
    assert model.num_free_slots() == 3
    assert max(model.prefill_calls) <= 7 + 3  # chunk budget plus the riding decode rows


def test_prefill_steps_flag_their_decode_rows():
    """A decode token riding in a prefill step is flagged as a decode row; a prompt's one-token
    last chunk, which looks the same (one continuing token), is not."""
    model = ToyStateModel(num_slots=2)
    engine = GenerationEngine(model, max_batch_size=2, max_prefill_tokens=7)
    a = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=3))
    b = engine.add_request([4, 5, 6, 7, 8], SamplingParams(max_new_tokens=3))
    engine.run()
    assert model.prefill_rows[:2] == [[(3, False, False), (4, False, False)],
                                      [(1, True, True), (1, True, False)]]
    assert a.output == expected_tokens([1, 2, 3], 3)
    assert b.output == expected_tokens([4, 5, 6, 7, 8], 3)


def test_state_cache_off_recomputes_and_matches():
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    outs = []
    for use_cache in (True, False):
        model = ToyStateModel(num_slots=2)
        engine = GenerationEngine(model, max_batch_size=2, use_state_cache=use_cache)
        for p in prompts:
            engine.add_request(p, SamplingParams(max_new_tokens=4))
        outs.append([r.output for r in engine.run()])
    assert outs[0] == outs[1] == [expected_tokens(p, 4) for p in prompts]


def test_eos_stops_early():
    model = ToyStateModel(num_slots=1)
    engine = GenerationEngine(model)
    full = expected_tokens([5], 6)
    r = engine.add_request([5], SamplingParams(max_new_tokens=6, eos_token_id=full[2]))
    engine.run()
    assert r.output == full[:full.index(full[2]) + 1]
    # Several stop tokens (transformers' configs list them): the first one emitted stops.
    for stop in ([full[4], full[2]], (full[3],)):
        engine = GenerationEngine(ToyStateModel(num_slots=1))
        r = engine.add_request([5], SamplingParams(max_new_tokens=6, eos_token_id=stop))
        engine.run()
        first = min(full.index(t) for t in stop)
        assert r.output == full[:first + 1], stop


def test_sampling_is_seeded():
    def run(seed):
        engine = GenerationEngine(ToyStateModel(num_slots=1))
        r = engine.add_request([1], SamplingParams(max_new_tokens=5, temperature=1.0, seed=seed))
        engine.run()
        return r.output
    assert run(3) == run(3)


def test_requests_without_a_seed_draw_their_own_tokens():
    """seed None: each request's generator is seeded with its id - four samples of one prompt
    differ (they were one sample four times with a shared default seed), and a rerun repeats
    them."""
    def run():
        engine = GenerationEngine(ToyStateModel(num_slots=4), max_batch_size=4)
        reqs = [engine.add_request([1], SamplingParams(max_new_tokens=6, temperature=5.0))
                for _ in range(4)]
        engine.run()
        return [r.output for r in reqs]
    outs = run()
    assert len({tuple(o) for o in outs}) > 1, outs
    assert run() == outs


def test_top_p_narrows_each_requests_draw():
    """top_p reaches each request's draw: at temperature 5 the draws differ from the greedy
    tokens, and with a top_p below every probability only the top token is left (greedy
    again), for each seed; a top_p of 1 draws as no top_p."""
    prompt, n = [1, 2], 6
    greedy = expected_tokens(prompt, n)

    def run(**kw):
        engine = GenerationEngine(ToyStateModel(num_slots=4), max_batch_size=4)
        reqs = [engine.add_request(prompt, SamplingParams(max_new_tokens=n, temperature=5.0,
                                                          seed=s, **kw)) for s in range(4)]
        engine.run()
        return [r.output for r in reqs]

    wide = run()
    assert any(out != greedy for out in wide), wide
    assert run(top_p=1e-6) == [greedy] * 4
    assert run(top_p=1.0) == wide


def test_sampling_rows_among_greedy_rows_keep_their_own_tokens():
    """Greedy and sampling requests in one batch: each request's tokens equal its tokens run
    alone (a sampling row draws from its own generator and its own logits row, whichever rows
    of the step sample). A low temperature puts most of a row's mass on its own state, so a
    row sampling another row's logits comes out different."""
    prompts = [[1, 2], [3], [4, 5, 6], [7, 8], [9]]
    params = [SamplingParams(max_new_tokens=6, temperature=0.2 if i % 2 else 0.0, seed=5 + i)
              for i in range(len(prompts))]

    def run(indices):
        engine = GenerationEngine(ToyStateModel(num_slots=len(indices)),
                                  max_batch_size=len(indices))
        reqs = [engine.add_request(prompts[i], params[i]) for i in indices]
        engine.run()
        return [r.output for r in reqs]

    together = run(range(len(prompts)))
    alone = [run([i])[0] for i in range(len(prompts))]
    assert together == alone
    assert together[0] == expected_tokens(prompts[0], 6)
    assert together[1] != expected_tokens(prompts[1], 6)  # it did sample


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-1.0), "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite and >= 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(eos_token_id="2"), "eos_token_id must be an int or a list, tuple or set of ints"),
    (dict(eos_token_id=[2, 1.5]), "eos_token_id must be"),
    (dict(eos_token_id=True), "eos_token_id must be"),
])
def test_bad_sampling_params(kwargs, match):
    engine = GenerationEngine(ToyStateModel(num_slots=1))
    with pytest.raises(ValueError, match=match):
        engine.add_request([1], SamplingParams(**kwargs))


def test_bad_prompts_and_engine_settings():
    engine = GenerationEngine(ToyStateModel(num_slots=1), max_prompt_tokens=4)
    with pytest.raises(ValueError, match="longer than the configured limit"):
        engine.add_request([1] * 5)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request([])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        engine.add_request([1, 200])
    with pytest.raises(ValueError, match="cannot hold even one request"):
        GenerationEngine(ToyStateModel(num_slots=0))
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        GenerationEngine(ToyStateModel(num_slots=1), max_batch_size=0)


def test_a_tiny_temperature_draws_the_top_token():
    """Scores are shifted by the row's maximum before the division: a temperature whose inverse
    overflows still gives a valid (one-hot) distribution, not NaN probabilities."""
    from tpssm.generate import select_tokens

    logits = torch.randn(4, VOCAB) * 30
    for temperature in (1e-300, 1e-46, 1e-45, 1e-30, 1e-8):
        got = select_tokens(logits, do_sample=True, temperature=temperature,
                            generator=torch.Generator().manual_seed(0))
        assert got.tolist() == logits.argmax(-1).tolist(), temperature


def test_rows_without_finite_logits_get_no_token():
    """A row whose largest logit is NaN or infinite gets -1 (an overflowed model's argmax would
    be an arbitrary token), greedy or sampled; -inf entries beside a finite maximum are fine,
    and sampling such rows does not raise."""
    from tpssm.generate import argmax_tokens, select_tokens

    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(1))
    logits[0, 7] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, :VOCAB - 1] = float("-inf")  # one finite token: every draw is it
    expect = [-1, -1, -1, VOCAB - 1, int(logits[4].argmax())]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        assert argmax_tokens(x).tolist() == expect, dtype
        assert select_tokens(x).tolist() == expect, dtype
        drawn = select_tokens(x, do_sample=True, temperature=0.7, top_k=5, top_p=0.9,
                              generator=torch.Generator().manual_seed(0)).tolist()
        assert drawn[:4] == expect[:4] and 0 <= drawn[4] < VOCAB, dtype


class NonFiniteAt(ToyStateModel):
    """ToyStateModel whose logits are NaN for the rows whose state is `bad` (the token the
    clean model would emit there)."""

    def __init__(self, num_slots, bad):
        super().__init__(num_slots)
        self.bad = bad

    def _logits(self, states):
        logits = super()._logits(states)
        logits[torch.tensor(states) == self.bad] = float("nan")
        return logits


@pytest.mark.parametrize("temperature", [0.0, 0.3])
def test_a_request_without_finite_logits_ends_with_an_error(temperature):
    """The request whose logits turn NaN ends there with `error` set and the tokens it had;
    the step does not raise and the other requests, in the same steps, keep their tokens."""
    poisoned, clean, n = [4, 5, 6], [3], 6
    bad = expected_tokens(poisoned, n)[2]
    assert bad not in expected_tokens(clean, n)
    engine = GenerationEngine(NonFiniteAt(num_slots=2, bad=bad), max_batch_size=2)
    sampling = SamplingParams(max_new_tokens=n, temperature=temperature, top_k=1, seed=3)
    r_bad, r_ok = (engine.add_request(p, sampling) for p in (poisoned, clean))
    engine.run()
    assert r_bad.output == expected_tokens(poisoned, n)[:2]
    assert r_bad.error is not None and "not finite (NaN or inf)" in r_bad.error
    assert r_bad.error.startswith("new token 2:") and r_bad.slot is None
    assert r_ok.error is None and r_ok.output == expected_tokens(clean, n)
    assert engine.model.num_free_slots() == 2


class ForkingToy(ToyStateModel):
    """ToyStateModel that can copy states between slots: requests with one prompt share its
    prefill."""

    def copy_slots(self, src, dst):
        self.state[torch.tensor(dst)] = self.state[torch.tensor(src)]


def _samples_of_one_prompt(model, prompts, budget):
    engine = GenerationEngine(model, max_batch_size=len(prompts), max_prefill_tokens=budget)
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=5, temperature=2.0 * (i % 2),
                                                 seed=i)) for i, p in enumerate(prompts)]
    engine.run()
    return [r.output for r in reqs], sum(n for calls in model.prefill_rows
                                         for n, _, decode in calls if not decode)


@pytest.mark.parametrize("budget", [3, 64])
def test_requests_with_one_prompt_share_its_prefill(budget):
    """Four samples of one prompt (greedy and sampled) behind another prompt (so the leader is
    not its step's first row): the prompt is prefilled once - over several steps when the
    budget is short - and the other three copy its state; every request's tokens equal those
    of a model without state copies, which prefills the prompt four times."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    prompts = [[7, 7], prompt, prompt, prompt, prompt]
    plain, plain_tokens = _samples_of_one_prompt(ToyStateModel(num_slots=5), prompts, budget)
    shared, shared_tokens = _samples_of_one_prompt(ForkingToy(num_slots=5), prompts, budget)
    assert shared == plain
    assert len({tuple(o) for o in shared[1:]}) > 1  # the samples differ
    assert plain_tokens == 4 * len(prompt) + 2 and shared_tokens == len(prompt) + 2


class FailingOnce(ToyStateModel):
    """Raises in the forward of its `fail_at`-th call, after advancing the first row's state:
    a forward that stopped part way."""

    def __init__(self, num_slots, fail_at):
        super().__init__(num_slots)
        self.calls, self.fail_at = 0, fail_at

    def _maybe_fail(self, cache_indices):
        self.calls += 1
        if self.calls == self.fail_at:
            self.state[int(cache_indices[0])] += 1
            raise RuntimeError("out of memory (injected)")

    def prefill(self, input_ids, query_start_loc, cache_indices, has_initial_state,
                decode_rows):
        self._maybe_fail(cache_indices)
        return super().prefill(input_ids, query_start_loc, cache_indices, has_initial_state,
                               decode_rows)

    def decode(self, input_ids, cache_indices):
        self._maybe_fail(cache_indices)
        return super().decode(input_ids, cache_indices)


# Two slots, 4-token prefill budget: call 1 prefills 4 tokens of request 0 (request 1 waits for
# budget), call 2 the rest of 0 and all of 1, calls 3 and 4 decode both.
@pytest.mark.parametrize("fail_at, failing", [(1, {0}), (2, {0, 1}), (4, {0, 1})])
def test_a_failed_step_finishes_its_requests_with_the_error(fail_at, failing):
    """The failing step's requests - and only they - end with `error` set and their slots
    freed; the engine goes on with the others, whose tokens are exact (never a request continued
    from a half-advanced state)."""
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [12]]
    model = FailingOnce(num_slots=2, fail_at=fail_at)
    engine = GenerationEngine(model, max_batch_size=2, max_prefill_tokens=4)
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=3)) for p in prompts]
    with pytest.raises(RuntimeError, match="injected"):
        engine.run()
    failed = [r for r in reqs if r.error is not None]
    assert {r.request_id for r in failed} == failing
    assert all("out of memory (injected)" in r.error for r in failed)
    assert all(r.slot is None and r in engine.finished for r in failed)
    engine.run()
    assert model.num_free_slots() == 2
    for r, p in zip(reqs, prompts):
        if r.error is None:
            assert r.output == expected_tokens(p, 3)
        else:
            assert r.output == expected_tokens(p, 3)[:len(r.output)]


def test_an_idle_step_runs_no_forward():
    """A serving loop may call step() with nothing to do: no forward (a padding-only decode step
    used to run, a full read of the weights), no step counted."""
    model = ToyStateModel(num_slots=2)
    decodes = []
    real = model.decode
    model.decode = lambda ids, slots: decodes.append(len(ids)) or real(ids, slots)
    engine = GenerationEngine(model)
    engine.step()
    assert (model.prefill_calls, decodes, engine.num_steps) == ([], [], 0)
    engine.add_request([3], SamplingParams(max_new_tokens=2))
    engine.run()
    engine.step()
    assert (model.prefill_calls, decodes, engine.num_steps) == ([1], [1], 2)


def test_run_returns_the_requests_of_this_call():
    engine = GenerationEngine(ToyStateModel(num_slots=2))
    first = engine.add_request([1], SamplingParams(max_new_tokens=2))
    assert engine.run() == [first]
    second = engine.add_request([2], SamplingParams(max_new_tokens=2))
    assert engine.run() == [second]
    assert engine.finished == [first, second]
