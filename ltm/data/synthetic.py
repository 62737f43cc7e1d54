"""The built-in corpus: documents from an explicit latent-variable process with an exact likelihood.

Generative process (one document; documents are concatenated into one stream)::

    BOS
    topic k ~ Uniform(n_topics)                     which Markov chain the words follow
    plan  v_j ~ Uniform(n_values), j < n_slots      the document's "entities", one per slot
    pointer c ~ Uniform(n_slots)                    where the document enters its plan cycle
    first word ~ start_k
    after a word or a value token:
        EOS                                      with probability eta (geometric lengths, mean doc_len)
        marker of slot c, c = c + 1 mod n_slots  with probability (1 - eta) * event_prob
        next word ~ P_k(. | previous word)       otherwise (sparse rows: `branching` successors)
    after the marker of slot j: a value token, v_j with probability 1 - copy_noise, else uniform

So a document is text from a topic's bigram chain in which the slots' markers come back in
cyclic order, each followed (mostly) by the same value as its previous mention. A marker
recurs every n_slots * (1 + event_prob) / event_prob tokens (80 by default), just beyond a
64-token window but inside a 128-token block: the value can be copied from the full context
and not from the window, which is what makes the latent plan matter.

Exact likelihood. Given the tokens, the topic is a K-state filter, the pointer is known from the
first marker on (uniform before), and each slot's posterior is a categorical updated by the
noisy copies of its value; these three factors are independent given the tokens, so the forward
algorithm is exact and cheap. The first token of a scored sequence is context only, its hidden
state drawn from the stationary distribution of the stream (a block starts mid-stream).
`log_probs(tokens, window=w)` gives the Bayes-optimal log-probabilities of a predictor that sees
only the last w tokens; w = 1 is the optimal bigram predictor.

Measured (seed 0, the first 1024 validation blocks of ctx 128; perplexity per predicted token):

    defaults (vocab 512, 16 slots)    full context 9.33   window 64: 11.67 (+25 %)   window 32: 12.23   bigram 51.9
    smoke (vocab 64, 4 slots, ctx 32) full context 7.06   window 16:  7.76 (+10 %)                      bigram 23.3
    micro-rf (vocab 128, 8 slots, 4 topics, branching 4; first 64 blocks)
                                      full context 4.29   window 15:  6.25 (+46 %, 0.377 nats/token)

Defaults: documents 300 tokens on average; 20 % of tokens are slot markers and 20 % values.
A stack of L sliding-window layers has a receptive field of L * (w - 1) + 1 tokens, so the window
figure bounds one attention hop, not a deep windowed model.

Generation: 1.9M tokens/s on one core of a shared, busy 2-core machine (2.8M when idle), from
    python -c "import time; from ltm.data.synthetic import SyntheticCorpus as C; c = C(); \
t = time.time(); x = c.stream(20_000_000, 'train'); print(len(x) / (time.time() - t))"
The stream is built from fixed chunks of `CHUNK_LANES` x `CHUNK_DOCS` documents, each from its own
derived seed, so a longer stream extends a shorter one with the same seed. The exact forward pass
scores 64 blocks of 129 tokens in about 0.1 s, with a 64-token window in 0.5-0.9 s, after a one-off
table build of 0.3 s (up to 2 s on a busy machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from tqdm import tqdm

CHUNK_LANES = 512
"""Documents generated side by side; each lane is a run of whole documents."""
CHUNK_DOCS = 8
"""Documents per lane and chunk."""
_SPLIT_SEEDS = {"train": 0, "validation": 1}


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the synthetic process; the vocabulary is words, slot markers, values, EOS, BOS."""

    vocab_size: int = 512
    n_slots: int = 16
    """Slots in a document's plan; a slot's marker recurs about every n_slots * 5 tokens."""
    n_topics: int = 8
    branching: int = 8
    """Successors per word in a topic's chain."""
    event_prob: float = 0.25
    """Probability that a slot marker (and its value) follows a word."""
    copy_noise: float = 0.02
    """Probability that a value token is drawn uniformly instead of copying the slot's value."""
    doc_len: float = 300.0
    """Mean document length in tokens, BOS and EOS included."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_slots < 1 or self.n_topics < 1 or self.branching < 1:
            raise ValueError("n_slots, n_topics and branching must be >= 1")
        if self.n_words < self.branching:
            raise ValueError(
                f"synthetic vocab_size={self.vocab_size} leaves {self.n_words} word tokens after "
                f"{self.n_slots} slot markers and {self.n_values} values; raise vocab_size or lower n_slots")
        if not 0 < self.event_prob < 1 or not 0 < self.copy_noise <= 1:
            raise ValueError("event_prob must be in (0, 1) and copy_noise in (0, 1]")
        if self.doc_len < 4:
            raise ValueError(f"doc_len must be >= 4 tokens, got {self.doc_len}")

    @property
    def n_values(self) -> int:
        return self.vocab_size // 4

    @property
    def n_words(self) -> int:
        return self.vocab_size - 2 - self.n_slots - self.n_values

    @property
    def eos_prob(self) -> float:
        """Per word-like token EOS hazard giving the mean document length doc_len."""
        q = self.event_prob
        return (1 + q) / (self.doc_len - 2 + q)


class SyntheticCorpus:
    """A sampled instance of the process: token layout, generation and the exact forward algorithm."""

    def __init__(self, spec: SyntheticSpec = SyntheticSpec()) -> None:
        self.spec = spec
        s = spec
        self.n_words, self.n_slots, self.n_values = s.n_words, s.n_slots, s.n_values
        self.marker0 = self.n_words
        self.value0 = self.n_words + self.n_slots
        self.eos_id = s.vocab_size - 2
        self.bos_id = s.vocab_size - 1
        self.vocab_size = s.vocab_size
        self.cache_key = f"synthetic-{s!r}"
        rng = np.random.default_rng(np.random.SeedSequence([s.seed, 0x5EED]))
        K, W, B = s.n_topics, self.n_words, s.branching
        # Rows 0..W-1 follow a word, row W follows a value token, row W+1 follows BOS.
        self.topic_prior = np.full(K, 1.0 / K)
        self.next_words = np.argsort(rng.random((K, W + 2, W)), axis=-1)[..., :B]
        self.next_probs = rng.dirichlet(np.ones(B), size=(K, W + 2))
        self._next_cdf = np.cumsum(self.next_probs, axis=-1)
        self._next_cdf[..., -1] = 1.0

    # ------------------------------------------------------------------ token layout

    def token_name(self, t: int) -> str:
        """A readable name: w<i> words, <s<j>> slot markers, v<i> values, <eos>, <bos>."""
        if not 0 <= t < self.vocab_size:
            raise ValueError(f"token id {t} is outside the synthetic vocabulary of {self.vocab_size}")
        if t == self.eos_id:
            return "<eos>"
        if t == self.bos_id:
            return "<bos>"
        if t < self.marker0:
            return f"w{t}"
        if t < self.value0:
            return f"<s{t - self.marker0}>"
        return f"v{t - self.value0}"

    @cached_property
    def _ids_by_name(self) -> dict[str, int]:
        return {self.token_name(t): t for t in range(self.vocab_size)}

    def encode(self, text: str) -> list[int]:
        """Parse whitespace-separated token names (the output of decode)."""
        try:
            return [self._ids_by_name[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(
                f"{e.args[0]!r} is not a synthetic token name (w<i>, <s<j>>, v<i>, <eos>, <bos>)") from None

    def decode(self, ids) -> str:
        """Token names separated by spaces."""
        return " ".join(self.token_name(int(t)) for t in ids)

    # ------------------------------------------------------------------ generation

    def stream(self, n_tokens: int, split: str) -> np.ndarray:
        """The first n_tokens of the split's stream (uint16 or uint32 token ids)."""
        if split not in _SPLIT_SEEDS:
            raise ValueError(f"split must be one of {list(_SPLIT_SEEDS)}, got {split!r}")
        parts, have, chunk = [], 0, 0
        bar = tqdm(total=n_tokens, desc=f"generating synthetic {split}", unit=" tok", disable=None, leave=False)
        with bar:
            while have < n_tokens:
                part = self._chunk(_SPLIT_SEEDS[split], chunk)
                parts.append(part)
                have += len(part)
                chunk += 1
                bar.update(min(len(part), n_tokens - bar.n))
        return np.concatenate(parts)[:n_tokens] if parts else np.zeros(0, self.dtype)

    @property
    def dtype(self) -> type:
        return np.uint16 if self.vocab_size <= 65536 else np.uint32

    def _chunk(self, split_seed: int, index: int) -> np.ndarray:
        """CHUNK_LANES lanes of CHUNK_DOCS whole documents each, concatenated.

        A fixed number of documents per lane (not a fixed number of steps, which would favour
        short documents) keeps document lengths i.i.d. geometric, as the likelihood assumes."""
        s = self.spec
        rng = np.random.default_rng(np.random.SeedSequence([s.seed, split_seed, index]))
        F, M, W = self.n_slots, self.n_values, self.n_words
        eta, q, noise = s.eos_prob, s.event_prob, s.copy_noise
        cdf = self._next_cdf.reshape(-1, s.branching)
        succ = self.next_words.reshape(-1, s.branching)
        # lane state; finished lanes are dropped from these arrays as they finish
        lane = np.arange(CHUNK_LANES)
        prev = np.full(CHUNK_LANES, self.eos_id)
        topic = np.zeros(CHUNK_LANES, dtype=np.int64)
        ptr = np.zeros(CHUNK_LANES, dtype=np.int64)
        plan = np.zeros((CHUNK_LANES, F), dtype=np.int64)
        docs_left = np.full(CHUNK_LANES, CHUNK_DOCS)
        out = np.zeros((CHUNK_LANES, int(CHUNK_DOCS * s.doc_len * 2)), dtype=np.int64)
        length = np.zeros(CHUNK_LANES, dtype=np.int64)
        t = 0
        while len(lane):
            if t == out.shape[1]:
                out = np.pad(out, ((0, 0), (0, out.shape[1])))
            starts = np.flatnonzero(prev == self.bos_id)
            if len(starts):  # a new document: its latent topic, plan and plan position
                topic[starts] = rng.integers(s.n_topics, size=len(starts))
                ptr[starts] = rng.integers(F, size=len(starts))
                plan[starts] = rng.integers(M, size=(len(starts), F))
            u0, u1 = rng.random((2, len(lane)))
            row = np.where(prev < W, prev, np.where(prev == self.bos_id, W + 1, W)) + topic * (W + 2)
            nxt = succ[row, (u1[:, None] > cdf[row]).sum(1)]  # a word from the topic's chain
            wordlike = (prev < self.marker0) | ((prev >= self.value0) & (prev < self.eos_id))
            event = wordlike & (u0 >= eta) & (u0 < eta + (1 - eta) * q)
            nxt[event] = self.marker0 + ptr[event]
            ptr[event] = (ptr[event] + 1) % F
            nxt[wordlike & (u0 < eta)] = self.eos_id
            after_marker = np.flatnonzero((prev >= self.marker0) & (prev < self.value0))
            copy = plan[after_marker, prev[after_marker] - self.marker0]
            noisy = u0[after_marker] < noise
            copy[noisy] = (u1[after_marker][noisy] * M).astype(np.int64)
            nxt[after_marker] = self.value0 + copy
            nxt[prev == self.eos_id] = self.bos_id
            out[lane, t] = nxt
            t += 1
            prev = nxt
            ended = nxt == self.eos_id
            docs_left -= ended
            finished = docs_left == 0
            if finished.any():
                length[lane[finished]] = t
                keep = ~finished
                lane, prev, topic, ptr, plan, docs_left = (
                    a[keep] for a in (lane, prev, topic, ptr, plan, docs_left))
        return np.concatenate([row[:n] for row, n in zip(out, length)]).astype(self.dtype)

    # ------------------------------------------------------------------ exact likelihood

    @cached_property
    def _log_emission(self) -> torch.Tensor:
        """log p(next token | previous token, topic) as (V, V, K); markers and values get only
        the topic-dependent factor (the pointer and the plan are scored separately)."""
        s, K, W, V = self.spec, self.spec.n_topics, self.n_words, self.vocab_size
        eta, q = s.eos_prob, s.event_prob
        p = np.zeros((K, V, V))
        rows = np.arange(W + 2)
        prev_of_row = np.concatenate([np.arange(W), [self.value0], [self.bos_id]])
        for k in range(K):
            scale = np.where(rows < W + 1, (1 - eta) * (1 - q), 1.0)[:, None]
            np.add.at(p[k], (prev_of_row[:, None], self.next_words[k]), scale * self.next_probs[k])
        # every value token behaves like value0 for what follows it
        p[:, self.value0:self.eos_id] = p[:, self.value0:self.value0 + 1]
        wordlike = np.r_[0:W, self.value0:self.eos_id]
        p[:, wordlike, self.marker0:self.value0] = (1 - eta) * q
        p[:, wordlike, self.eos_id] = eta
        p[:, self.marker0:self.value0, self.value0:self.eos_id] = 1.0
        p[:, self.eos_id, self.bos_id] = 1.0
        with np.errstate(divide="ignore"):
            return torch.from_numpy(np.log(p)).permute(1, 2, 0).contiguous()

    @cached_property
    def _log_topic_given_token(self) -> torch.Tensor:
        """log p(topic | this token) at a random stream position, as (V, K)."""
        s, K, W = self.spec, self.spec.n_topics, self.n_words
        eta, q = s.eos_prob, s.event_prob
        # Expected visits per document to each token class [words, value, marker, BOS, EOS].
        VAL, MRK, BOS, EOS = W, W + 1, W + 2, W + 3
        visits = np.zeros((K, W + 4))
        for k in range(K):
            Q = np.zeros((W + 4, W + 4))
            for r, prev in enumerate(list(range(W)) + [VAL]):
                Q[prev, self.next_words[k, r]] += (1 - eta) * (1 - q) * self.next_probs[k, r]
                Q[prev, MRK], Q[prev, EOS] = (1 - eta) * q, eta
            Q[BOS, self.next_words[k, W + 1]] += self.next_probs[k, W + 1]
            Q[MRK, VAL] = 1.0
            start = np.zeros(W + 4)
            start[BOS] = 1.0
            visits[k] = np.linalg.solve((np.eye(W + 4) - Q).T, start)
        joint = self.topic_prior[:, None] * visits
        cls = np.empty(self.vocab_size, dtype=np.int64)
        cls[:W], cls[self.marker0:self.value0], cls[self.value0:self.eos_id] = np.arange(W), MRK, VAL
        cls[self.eos_id], cls[self.bos_id] = EOS, BOS
        post = joint[:, cls].T
        with np.errstate(divide="ignore"):
            return torch.from_numpy(np.log(post / post.sum(1, keepdims=True)))

    def log_probs(self, tokens: torch.Tensor, window: int | None = None, batch: int = 2048) -> torch.Tensor:
        """Exact log p(x_t | x_{max(0, t-window)} .. x_{t-1}) for t >= 1, as (N, L-1) float64.

        The first visible token's hidden state is drawn from the stationary distribution."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # many tiny sequential ops: more threads only add contention (10-20x slower)
        try:
            full = torch.cat([self._forward(tokens[i:i + batch]) for i in range(0, len(tokens), batch)])
            if window is None or window >= tokens.shape[1] - 1:
                return full
            # Predictions beyond the window: a fresh filter over each window, keep its last prediction.
            wins = tokens.unfold(1, window + 1, 1)[:, 1:].reshape(-1, window + 1)
            last = torch.cat([self._forward(wins[i:i + batch])[:, -1] for i in range(0, len(wins), batch)])
            return torch.cat([full[:, :window], last.view(len(tokens), -1)], dim=1)
        finally:
            torch.set_num_threads(threads)

    def optimal_ppl(self, tokens: torch.Tensor, window: int | None = None) -> float:
        """Bayes-optimal perplexity per predicted token (tokens[:, 1:] given the tokens before)."""
        return math.exp(-self.log_probs(tokens, window).mean().item())

    def _is_marker(self, t: torch.Tensor) -> torch.Tensor:
        return (t >= self.marker0) & (t < self.value0)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The filter over (topic, pointer, plan) along each row of x; returns (N, L-1) log-probs."""
        N, L = x.shape
        F, M, s = self.n_slots, self.n_values, self.spec
        rows = torch.arange(N)
        log_emit, log_prior = self._log_emission, torch.log(torch.from_numpy(self.topic_prior))
        log_copy = math.log((1 - s.copy_noise) * M / s.copy_noise + 1)  # posterior odds per matching copy
        log_topic = self._log_topic_given_token[x[:, 0]].clone()
        ptr = torch.where(self._is_marker(x[:, 0]), (x[:, 0] - self.marker0 + 1) % F, -1)  # -1: unknown
        # A leading value token belongs to the slot before the first marker; held until that marker.
        pending = torch.where((x[:, 0] >= self.value0) & (x[:, 0] < self.eos_id), x[:, 0] - self.value0, -1)
        counts = torch.zeros(N, F, M, dtype=torch.float64)
        out = torch.empty(N, L - 1, dtype=torch.float64)
        for t in range(1, L):
            prev, cur = x[:, t - 1], x[:, t]
            new_doc = prev == self.bos_id
            if new_doc.any():
                log_topic[new_doc] = log_prior
                ptr[new_doc], pending[new_doc], counts[new_doc] = -1, -1, 0.0
            joint = log_topic + log_emit[prev, cur]
            lp = torch.logsumexp(joint, dim=1)
            log_topic = torch.where(torch.isfinite(lp)[:, None], joint - lp[:, None], log_prior)
            # pointer: uniform until the first marker, then known
            mark = self._is_marker(cur)
            slot = cur - self.marker0
            lp = lp + torch.where(mark & (ptr < 0), -math.log(F), 0.0)
            lp = lp + torch.where(mark & (ptr >= 0) & (ptr != slot), -math.inf, 0.0)
            held = mark & (ptr < 0) & (pending >= 0)
            if held.any():
                counts[rows[held], (slot[held] - 1) % F, pending[held]] += 1
                pending[held] = -1
            ptr = torch.where(mark, (slot + 1) % F, ptr)
            # value: the slot's posterior predictive, then the posterior update
            val = (cur >= self.value0) & (cur < self.eos_id) & self._is_marker(prev)
            if val.any():
                i, y = rows[val], cur[val] - self.value0
                c = counts[i, (ptr[val] - 1) % F]
                post = torch.log_softmax(c * log_copy, dim=1).gather(1, y[:, None]).squeeze(1)
                pred = torch.log((1 - s.copy_noise) * post.exp() + s.copy_noise / M)
                lp[val] += pred
                counts[i, (ptr[val] - 1) % F, y] += 1
            out[:, t - 1] = lp
        return out
