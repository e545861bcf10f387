"""A small continuous-batching generator over the SSM state cache.

Requests arrive with prompts. Each engine step runs one packed varlen batch:
- prefill work first: requests admitted while slots are free, their prompts cut into chunks so a
  step never exceeds `max_prefill_tokens` (a long prompt is prefilled over several steps, its
  state carried in its slot: has_initial_state marks the continuation chunks); decoding requests
  ride along in the same batch as length-1 sequences;
- otherwise a decode step for every running request through the model's decode path, which on
  CUDA replays a captured CUDA graph for the padded batch size (padding rows use pad_slot_id).
  The graph covers the greedy choice too: ids and slots go in through pinned host buffers
  (asynchronous copies), the argmax tokens come out through one, and reading them is the step's
  only host synchronisation unless a row samples (its logits are read then). With a
  vocabulary-parallel head the step keeps each rank's logit columns and picks greedy tokens
  from the ranks' (max, token) pairs; whole logits are gathered only when a row samples.
A request that finishes frees its slot; waiting requests take it. Requests with the same prompt
(several samples of one prompt, say) running together share its prefill when the model can copy
states between slots: the first prefills, the others wait, take a copy of its state and draw
their first token from its logits.

Under tensor parallelism every rank runs the same engine on the same requests; sampled tokens
are broadcast from rank 0 so all ranks stay in lockstep even with sampling.

The model is anything with the small interface of `GenerationModel` below; `tpssm.models`
provides it for every supported family.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Optional, Protocol, Sequence, Union

import torch
import torch.distributed as dist

from tpssm.generate import NON_FINITE_LOGITS, argmax_tokens, check_sampling_args, select_tokens
from tpssm.ops import PAD_SLOT_ID
from tpssm.parallel import TPContext

__all__ = ["GenerationModel", "CachedModel", "Request", "SamplingParams", "GenerationEngine",
           "CudaGraphCapture"]


class GenerationModel(Protocol):
    """What the engine needs from a model (shapes: T packed tokens, B requests)."""

    vocab_size: int
    device: torch.device

    def prefill(self, input_ids: torch.Tensor, query_start_loc: torch.Tensor,
                cache_indices: torch.Tensor, has_initial_state: torch.Tensor,
                decode_rows: torch.Tensor) -> torch.Tensor:
        """input_ids (T,) int64, query_start_loc (B + 1,) int32, cache_indices (B,) int32,
        has_initial_state (B,) bool, decode_rows (B,) bool (the rows that are decode steps, not
        prompt chunks) -> last-token logits (B, vocab) float32."""

    def decode(self, input_ids: torch.Tensor, cache_indices: torch.Tensor) -> torch.Tensor:
        """One token per request: input_ids (B,) int64, cache_indices (B,) int32 (pad rows
        PAD_SLOT_ID) -> logits (B, vocab) float32 (pad rows undefined)."""

    # Optional: a model whose logits are split over TP ranks by vocabulary (CachedModel) has all
    # four; the engine then runs its steps through them.
    # prefill_shard(...), decode_shard(...) -> as prefill / decode, but this rank's logit
    # columns (B, local vocab);
    # greedy_tokens(shard) -> (B,) int64 argmax over the whole vocabulary, equal on every rank
    # (-1 for a row whose largest logit is NaN or infinite);
    # gather_logits(shard) -> (B, vocab) float32. Both are collectives over the ranks.

    # Optional: `ctx`, the model's TPContext; the engine then exchanges tokens over its group.

    # Optional: copy_slots(src, dst) -> None, copies slot src[i]'s state into dst[i]
    # (SSMStateCache.copy): requests with the same prompt then share its prefill.

    def allocate_slot(self) -> int: ...

    def free_slot(self, slot: int) -> None: ...

    def num_free_slots(self) -> int: ...


class CachedModel:
    """A tpssm.models model (any family) and its SSMStateCache, seen as a GenerationModel."""

    def __init__(self, model, cache):
        self.model = model
        self.cache = cache
        self.vocab_size = model.config.vocab_size
        self.device = model.ctx.device
        self.ctx = model.ctx
        # Tokens a request may hold (prompt + output) in a hybrid model's KV cache; None when
        # the model keeps only a fixed-size state.
        self.max_seq_len = cache.max_seq_len if cache.has_kv else None

    def prefill(self, input_ids, query_start_loc, cache_indices, has_initial_state,
                decode_rows):
        return self.model(input_ids, query_start_loc, cache_indices, has_initial_state,
                          self.cache, decode_rows=decode_rows)

    def decode(self, input_ids, cache_indices):
        return self.model.decode(input_ids, cache_indices, self.cache)

    def prefill_shard(self, input_ids, query_start_loc, cache_indices, has_initial_state,
                      decode_rows):
        return self.model(input_ids, query_start_loc, cache_indices, has_initial_state,
                          self.cache, gather_logits=False, decode_rows=decode_rows)

    def decode_shard(self, input_ids, cache_indices):
        return self.model.decode(input_ids, cache_indices, self.cache, gather_logits=False)

    def greedy_tokens(self, shard):
        return self.model.greedy_tokens(shard)

    def gather_logits(self, shard):
        return self.model.gather_logits(shard)

    def reserve_step(self, num_tokens: int) -> None:
        """Sizes the model's all-reduce buffers for steps of up to num_tokens tokens (before any
        decode step is captured in a CUDA graph)."""
        self.model.allreduce.reserve(num_tokens * self.model.config.hidden_size)

    def copy_slots(self, src: List[int], dst: List[int]) -> None:
        self.cache.copy(src, dst)

    def allocate_slot(self) -> int:
        return self.cache.allocate()

    def free_slot(self, slot: int) -> None:
        self.cache.free(slot)

    def num_free_slots(self) -> int:
        return self.cache.num_free


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 keep every token (top_p < 1 samples among
    the most likely tokens whose probabilities sum to top_p). eos_token_id: one stop token or
    several (transformers' configs list several); the stop token is included in the output.
    seed None draws a request's tokens from a generator seeded with its request id: requests
    draw different tokens, the same on every run."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: Union[None, int, Collection[int]] = None
    seed: Optional[int] = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        stop = self.eos_token_id
        if stop is not None and not (_is_int(stop) or (
                isinstance(stop, (list, tuple, set, frozenset))
                and all(_is_int(t) for t in stop))):
            raise ValueError(f"eos_token_id must be an int or a list, tuple or set of ints, "
                             f"got {stop!r}")

    def stop_ids(self) -> frozenset:
        stop = self.eos_token_id
        return frozenset() if stop is None else frozenset([stop] if _is_int(stop) else stop)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Request:
    request_id: int
    prompt: List[int]
    sampling: SamplingParams
    output: List[int] = field(default_factory=list)
    slot: Optional[int] = None
    num_prefilled: int = 0
    arrival_s: float = 0.0
    first_token_s: Optional[float] = None
    finish_s: Optional[float] = None
    generator: Optional[torch.Generator] = None
    stop_ids: frozenset = frozenset()
    # A digest of the prompt, made once by the engine when it shares prefills (requests with
    # equal keys share one); None: the request shares nothing.
    prompt_key: Optional[bytes] = None
    # Set when a step this request was part of raised (its slot's state may be partly advanced)
    # or when its logits were not finite (NON_FINITE_LOGITS): the request is finished there,
    # with the tokens it had, rather than continued.
    error: Optional[str] = None

    @property
    def done(self) -> bool:
        if self.error is not None or len(self.output) >= self.sampling.max_new_tokens:
            return True
        return bool(self.output) and self.output[-1] in self.stop_ids

    @property
    def prefilling(self) -> bool:
        return self.num_prefilled < len(self.prompt)

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


class GenerationEngine:
    """Continuous batching over a GenerationModel (see the module docstring).

    max_batch_size: most requests running at once (at most the cache's slots).
    max_prefill_tokens: token budget of one prefill step (chunked prefill above it).
    max_prompt_tokens: longer prompts are rejected when added.
    use_cuda_graphs: capture decode steps per padded batch size on CUDA (under TP only with an
      NCCL group: gloo's collectives cannot be captured).
    use_state_cache: False is the baseline without a carried state: every step recomputes each
      request's whole sequence (prompt + tokens so far) from a zero state, as a model without an
      SSM state cache must.
    group: the ranks the sampled tokens are exchanged over, for a model without `ctx`; a model
      with one (CachedModel) uses its own TP group, and another group is refused.
    """

    def __init__(self, model: GenerationModel, *, max_batch_size: int = 8,
                 max_prefill_tokens: int = 2048, max_prompt_tokens: int = 1 << 20,
                 use_cuda_graphs: bool = True, use_state_cache: bool = True,
                 group: Optional[dist.ProcessGroup] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if model.num_free_slots() < 1:
            raise ValueError("the state cache has no free slot: it cannot hold even one request")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.device = model.device
        # The token exchange's group is the model's own TP group: with several model replicas
        # in one torch.distributed world, the default group would hand one replica's tokens to
        # another. A model without `ctx` uses `group`, or the default group when
        # torch.distributed is initialised (a lone process has nothing to broadcast to).
        model_ctx = getattr(model, "ctx", None)
        if model_ctx is not None:
            if group is not None and group is not model_ctx.group:
                raise ValueError("group: the model runs on another process group; leave group "
                                 "unset to exchange tokens over the model's own")
            self._tp = model_ctx
        else:
            self._tp = TPContext(group, self.device)
        self.group = self._tp.group
        # A decode graph holds the step's collectives too: NCCL's can be captured, gloo's
        # (TP ranks sharing one GPU) cannot, so those ranks decode eagerly.
        self.use_cuda_graphs = (use_cuda_graphs and self.device.type == "cuda"
                                and (not self._tp.communicates
                                     or dist.get_backend(self._tp.group) == "nccl"))
        self._sharded_logits = all(hasattr(model, name) for name in (
            "prefill_shard", "decode_shard", "greedy_tokens", "gather_logits"))
        self.use_state_cache = use_state_cache
        # Requests with one prompt share its prefill (see the module docstring).
        self._forks = hasattr(model, "copy_slots")
        self.waiting: List[Request] = []
        self.running: List[Request] = []
        self.finished: List[Request] = []
        self._next_id = 0
        self._graphs: Dict[int, "_DecodeGraph"] = {}
        self._step_rows: List[Request] = []  # the requests the current step runs
        self._graph_capture = CudaGraphCapture
        self.num_steps = 0
        # The largest step: a full prefill chunk plus every other running request's token.
        reserve = getattr(model, "reserve_step", None)
        if reserve is not None:
            reserve(max_prefill_tokens + max_batch_size)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int], sampling: Optional[SamplingParams] = None
                    ) -> Request:
        sampling = sampling or SamplingParams()
        sampling.validate()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than the configured "
                             f"limit max_prompt_tokens={self.max_prompt_tokens}")
        bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.model.vocab_size}), "
                             f"got {bad[:5]}")
        # A hybrid model's KV cache holds a bounded number of tokens per request: refuse a
        # request that could outgrow it here, before any of its work is done. The last new
        # token is never fed back, so the cache holds at most prompt + max_new_tokens - 1.
        max_len = getattr(self.model, "max_seq_len", None)
        need = len(prompt) + sampling.max_new_tokens - 1
        if max_len and need > max_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens and max_new_tokens "
                             f"{sampling.max_new_tokens} need {need} keys, more than the KV "
                             f"cache's max_seq_len {max_len}")
        req = Request(self._next_id, prompt, sampling, arrival_s=time.perf_counter(),
                      stop_ids=sampling.stop_ids())
        if self._forks:
            # 128 bits of BLAKE2: equal keys are equal prompts, and a step compares no tokens.
            req.prompt_key = hashlib.blake2b(array("q", prompt).tobytes(),
                                             digest_size=16).digest()
        if sampling.temperature > 0:
            seed = self._next_id if sampling.seed is None else sampling.seed
            req.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._next_id += 1
        self.waiting.append(req)
        return req

    def close(self) -> None:
        """Releases the captured decode graphs. Call before tearing down the process group:
        NCCL (>= 2.26) waits for graphs that captured its collectives to be destroyed first."""
        if self._graphs:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._graphs.clear()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> List[Request]:
        """Step until every request is finished; returns the requests finished during this call,
        in request order (`finished` keeps every finished request)."""
        start = len(self.finished)
        while self.has_work():
            self.step()
        return sorted(self.finished[start:], key=lambda r: r.request_id)

    # ---- one step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One engine step. If it raises, the step's requests are finished with `error` set and
        their slots freed (a forward that stopped part way leaves their states neither before
        nor after the step), then the error propagates; in one process the engine stays usable
        for the other requests. Under tensor parallelism a failure on one rank leaves the ranks
        out of step (the others' next collective times out): end the run. With no request to
        run it does nothing (no forward, no step counted)."""
        self._admit()
        if not self.running:
            return
        self._step_rows = list(self.running)
        try:
            if not self.use_state_cache:
                self._recompute_step()
            elif any(r.prefilling for r in self.running):
                self._prefill_step()
            else:
                self._decode_step()
        except BaseException as exc:
            for r in self._step_rows:
                r.error = f"{type(exc).__name__}: {exc}"
            self._retire_done()
            raise
        finally:
            self._step_rows = []
        self.num_steps += 1
        self._retire_done()

    def _retire_done(self) -> None:
        still = []
        for r in self.running:
            if r.done:
                r.finish_s = time.perf_counter()
                self.model.free_slot(r.slot)
                r.slot = None
                self.finished.append(r)
            else:
                still.append(r)
        self.running = still

    def _admit(self) -> None:
        while (self.waiting and len(self.running) < self.max_batch_size
               and self.model.num_free_slots() > 0):
            req = self.waiting.pop(0)
            req.slot = self.model.allocate_slot()
            self.running.append(req)

    def _prefill_step(self) -> None:
        budget = self.max_prefill_tokens
        rows: List[Request] = []
        chunks: List[List[int]] = []
        initial: List[bool] = []
        decoding: List[bool] = []
        # A request whose prefill has not begun waits for an earlier one with the same prompt
        # (its leader) and forks from it once the leader's prefill completes.
        leaders: Dict[bytes, Request] = {}
        followers: Dict[int, List[Request]] = {}
        for r in self.running:
            if r.prefilling:
                if r.prompt_key is not None:
                    leader = leaders.setdefault(r.prompt_key, r)
                    if leader is not r and r.num_prefilled == 0:
                        followers.setdefault(id(leader), []).append(r)
                        continue
                if budget <= 0:
                    continue
                n = min(len(r.prompt) - r.num_prefilled, budget)
                chunk = r.prompt[r.num_prefilled:r.num_prefilled + n]
                initial.append(r.num_prefilled > 0)
                decoding.append(False)
                r.num_prefilled += n
                budget -= n
            else:  # decoding request: its last token rides along as a length-1 sequence
                chunk = [r.output[-1]]
                initial.append(True)
                decoding.append(True)
            rows.append(r)
            chunks.append(chunk)
        # A request whose prompt is complete after this step samples its next token, and so do
        # its followers, from its logits and its state.
        emit = [r for r in rows if not r.prefilling]
        forks = [(f, r) for r in emit for f in followers.get(id(r), [])]
        self._step_rows = rows
        self._run_packed(rows, chunks, initial, emit, decoding, forks)

    def _run_packed(self, rows: List[Request], chunks: List[List[int]], initial: List[bool],
                    emit: List[Request], decoding: Optional[List[bool]] = None,
                    forks: Sequence = ()) -> None:
        """One varlen forward over rows' token chunks; samples a token for the rows in emit.
        decoding: the rows whose chunk is a decode step (default none): a one-token prompt
        chunk is prefill, not decode, for the models whose dt limits apply in prefill only.
        forks: (follower, leader in emit) pairs: after the forward the leader's state is
        copied to the follower's slot, whose prompt then counts as prefilled, and the follower
        samples from the leader's logits row."""
        dev = self.device
        qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(torch.tensor([len(c) for c in chunks], dtype=torch.int32), 0)
        args = (torch.tensor([t for c in chunks for t in c], dtype=torch.int64, device=dev),
                qsl.to(dev),
                torch.tensor([r.slot for r in rows], dtype=torch.int32, device=dev),
                torch.tensor(initial, dtype=torch.bool, device=dev),
                torch.tensor(decoding or [False] * len(rows), dtype=torch.bool))
        index = {id(r): i for i, r in enumerate(rows)}
        pick = [index[id(r)] for r in emit] + [index[id(leader)] for _, leader in forks]
        emit = list(emit) + [f for f, _ in forks]
        logits = (self.model.prefill_shard if self._sharded_logits else self.model.prefill)(*args)
        if forks:
            # From here a failure leaves the followers' slots part-copied: they fail with it.
            self._step_rows = self._step_rows + [f for f, _ in forks]
            self.model.copy_slots([leader.slot for _, leader in forks], [f.slot for f, _ in forks])
            for f, _ in forks:
                f.num_prefilled = len(f.prompt)
        if self._sharded_logits:
            shard = logits[pick]
            greedy = self.model.greedy_tokens(shard).cpu() if emit else None
            self._sample_into(emit, shard, greedy, agreed=True, sharded=True)
        else:
            self._sample_into(emit, logits[pick])

    def _recompute_step(self) -> None:
        rows = self.running
        seqs = [r.prompt + r.output for r in rows]
        for r in rows:
            r.num_prefilled = len(r.prompt)
        self._run_packed(rows, seqs, [False] * len(rows), rows)

    def _decode_step(self) -> None:
        rows = self.running
        ids = [r.output[-1] for r in rows]
        slots = [r.slot for r in rows]
        if self.use_cuda_graphs:
            graph = self._graph_for(len(rows))
            logits, greedy = graph.replay(ids, slots)
            self._sample_into(rows, logits, greedy, agreed=True, sharded=self._sharded_logits)
            return
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        slots_t = torch.tensor(slots, dtype=torch.int32, device=dev)
        if self._sharded_logits:
            shard = self.model.decode_shard(ids_t, slots_t)
            self._sample_into(rows, shard, self.model.greedy_tokens(shard).cpu(), agreed=True,
                              sharded=True)
        else:
            self._sample_into(rows, self.model.decode(ids_t, slots_t))

    def _graph_for(self, batch: int) -> "_DecodeGraph":
        size = 1
        while size < batch:
            size *= 2
        graph = self._graphs.get(size)
        if graph is None:
            graph = _DecodeGraph(self.model, size, self._tp, self._sharded_logits,
                                 self._graph_capture())
            self._graphs[size] = graph
        return graph

    # ---- sampling ---------------------------------------------------------------------------
    def _sample_into(self, rows: List[Request], logits: torch.Tensor,
                     greedy: Optional[torch.Tensor] = None, agreed: bool = False,
                     sharded: bool = False) -> None:
        """Appends each row's next token. greedy: the rows' argmax tokens on the host when
        already computed; agreed: they are equal on every rank already; sharded: logits are
        this rank's columns (decode_shard), gathered here only if a row samples."""
        if not rows:
            return
        # Greedy rows share one argmax; a sampling row draws from its own generator, so its
        # tokens do not depend on which requests it was batched with.
        next_ids = argmax_tokens(logits).cpu() if greedy is None else greedy
        sampling = [i for i, r in enumerate(rows) if r.sampling.temperature > 0]
        if sampling:
            # Only the sampling rows' logits travel (gathered from the ranks' columns when
            # sharded: every rank runs the same requests, so every rank joins this collective)
            # and come to the host, in one copy.
            picked = logits[sampling] if len(sampling) < logits.shape[0] else logits
            if sharded:
                picked = self.model.gather_logits(picked)
            picked = picked.cpu()
            for j, i in enumerate(sampling):
                s = rows[i].sampling
                next_ids[i] = select_tokens(picked[j:j + 1], do_sample=True,
                                            temperature=s.temperature, top_k=s.top_k,
                                            top_p=s.top_p, generator=rows[i].generator)[0]
        # Ranks agree on every token: rank 0's choice is the one all ranks use.
        if self._tp.communicates and (sampling or not agreed):
            next_ids = self._tp.broadcast(next_ids.to(self.device), src=0).cpu()
        now = time.perf_counter()
        for r, t in zip(rows, next_ids.tolist()):
            if t < 0:  # no finite logits: the request ends here, its earlier tokens kept
                r.error = f"new token {len(r.output)}: {NON_FINITE_LOGITS}"
                continue
            if r.first_token_s is None:
                r.first_token_s = now
            r.output.append(t)


class CudaGraphCapture:
    """The CUDA side of a captured decode step: pinned host buffers, the capture (after a
    warm-up on a side stream, as torch.cuda.graphs asks), the replay and the wait for its
    results. tests/graph_replay.py provides the same interface on the CPU."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()
        self.done = torch.cuda.Event()

    @staticmethod
    def host_buffer(size: int, dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
        return torch.full((size,), fill, dtype=dtype, pin_memory=True)

    def capture(self, step):
        """Runs step twice to warm up, then captures it; returns what the captured call
        returned (tensors whose contents each replay recomputes)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            return step()

    def replay(self) -> None:
        self.graph.replay()

    def wait(self) -> None:
        """Blocks until the work queued so far (the replay, copies after it) is done."""
        self.done.record()
        self.done.synchronize()


class _DecodeGraph:
    """A decode step captured as a CUDA graph for one padded batch size: the model's step and
    the greedy token of every row, equal on every rank - picked from the ranks' (max, token)
    pairs when the logits are split by vocabulary (sharded), else rank 0's tokens broadcast
    under tensor parallelism with NCCL. Inputs and greedy tokens pass through pinned host
    buffers with asynchronous copies, so a replay synchronises with the host once: to read the
    tokens. `logits` are what the step produced: this rank's columns when sharded."""

    def __init__(self, model: GenerationModel, batch: int, tp: TPContext, sharded: bool,
                 capture: CudaGraphCapture):
        dev = model.device
        self.batch = batch
        self.capture = capture
        self.host_ids = capture.host_buffer(batch, torch.int64)
        self.host_slots = capture.host_buffer(batch, torch.int32, PAD_SLOT_ID)
        self.host_tokens = capture.host_buffer(batch, torch.int64)
        self.ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.slots = torch.full((batch,), PAD_SLOT_ID, dtype=torch.int32, device=dev)
        broadcasts = not sharded and tp.communicates

        def step():
            if sharded:
                logits = model.decode_shard(self.ids, self.slots)
                return logits, model.greedy_tokens(logits)
            logits = model.decode(self.ids, self.slots)
            tokens = argmax_tokens(logits)
            if broadcasts:
                tp.broadcast(tokens, src=0)
            return logits, tokens

        # Warm-up and capture with every row padded: no state moves.
        self.logits, self.tokens = capture.capture(step)

    def replay(self, ids: List[int], slots: List[int]):
        """-> (logits (n, vocab or this rank's columns) on the device, greedy tokens (n,) int64
        on the host)."""
        n = len(ids)
        # The previous replay's copies finished before its tokens were read: the pinned
        # buffers are free to overwrite.
        self.host_ids[:n] = torch.tensor(ids, dtype=torch.int64)
        self.host_slots[:n] = torch.tensor(slots, dtype=torch.int32)
        self.host_slots[n:] = PAD_SLOT_ID
        self.ids.copy_(self.host_ids, non_blocking=True)
        self.slots.copy_(self.host_slots, non_blocking=True)
        self.capture.replay()
        self.host_tokens.copy_(self.tokens, non_blocking=True)
        self.capture.wait()
        return self.logits[:n], self.host_tokens[:n].clone()
