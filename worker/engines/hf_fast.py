"""Fast decoding for Qwen3-VL in transformers: static KV cache, one CUDA graph per step.

Why not ``model.generate``: every decode step of the 4B model is a few milliseconds of GPU
work (reading 8 GB of weights), but eager transformers spends ~30 ms of Python and kernel
launches on it, and its own static-cache + compile path still syncs, processes logits in
Python and re-reads the whole cache. Here:

* prefill runs the model's own vision tower, then the text layers through a per-layer
  function (compiled once for all layers) that writes keys/values straight into a
  preallocated cache;
* each decode step (embed -> 36 layers -> lm_head -> token choice -> log-prob of the chosen
  token -> EOS bookkeeping) runs on the device without any host round trip, captured once as
  a CUDA graph per (batch bucket, cache-length chunk) and replayed; optionally compiled by
  Inductor first so the small element-wise kernels fuse; q|k|v and gate|up projections are
  one GEMM each;
* batch sizes are bucketed to powers of two and cache lengths to chunks of 128, so a handful
  of graphs serve every request shape; attention reads only the chunk in use;
* the host checks for "all finished" every few steps only.

Pausing for other work (``between_steps``, issue 13): :meth:`StaticCacheDecoder.generate` may be
given a callable that it calls at points where the batch can wait: before the prefill, every
``PREFILL_CHECK_EVERY`` text layers of the prefill and every ``FINISH_CHECK_EVERY`` decode steps
(on the GPU after a sync, so whatever the callable runs does not queue behind the rest of this
batch); with such a callable the vision tower runs ``VISION_CHUNK`` images at a time with a pause
between. The worker uses it to run an interactive job to completion in the middle of a bulk batch.
That callable may call :meth:`generate` again (one level deep, never deeper): the inner batch gets
a workspace of its own (a second one of the same bucket if the paused batch holds that bucket's),
the least-recently-used eviction of workspaces never evicts a paused batch's, and the paused
batch's buffers are not touched, so its tokens and log-probs are exactly those it gives without
the pause (greedy; sampling draws from the one global generator, so a pause changes which random
numbers a sampled batch gets, as any other work in the process would).

Decode-time positions: after the image, all three M-RoPE axes of a text token are equal
(position = text index + the per-row rope delta), so M-RoPE reduces to ordinary RoPE at that
position; the model's own rotary module computes it from a (3, B, 1) position tensor.

The same code runs eagerly on the CPU (no graphs), which is how tests check that it
produces exactly what ``model.generate`` produces.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

LEN_CHUNK = 128
#: host checks whether every row finished once per this many steps (each check is a sync)
FINISH_CHECK_EVERY = 8
#: with a ``between_steps`` callable, the prefill offers a pause once per this many text layers
PREFILL_CHECK_EVERY = 6
#: ... and the vision tower runs this many images at a time, with a pause between
VISION_CHUNK = 16
#: generate() calls may nest this deep (a paused batch and the one that runs meanwhile)
MAX_NESTING = 2

Pause = Callable[[], None]


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def select_tokens(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Next token per row: argmax, or temperature -> top-k -> top-p -> sample (as transformers).

    Sampling uses the Gumbel-max trick so it has static shapes and no host sync (graph-safe).
    """
    if sp.greedy:
        return logits.argmax(dim=-1)
    scores = logits / sp.temperature
    k = scores.shape[-1] if sp.top_k <= 0 else min(sp.top_k, scores.shape[-1])
    vals, idx = scores.topk(k, dim=-1)  # sorted, descending
    if sp.top_p < 1.0:
        probs = vals.softmax(dim=-1)
        # drop a token when the mass before it already exceeds top_p (the top token always stays)
        drop = (probs.cumsum(dim=-1) - probs) > sp.top_p
        vals = vals.masked_fill(drop, float("-inf"))
    u = torch.rand_like(vals).clamp_(min=1e-20, max=1.0 - 1e-7)
    choice = (vals - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)
    return idx.gather(-1, choice).squeeze(-1)


def _chosen_logprob(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    # log_softmax(logits)[chosen] without writing the whole [B, V] log-softmax
    return logits.gather(1, chosen.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # same arithmetic as Qwen3VLTextRMSNorm (fp32 statistics, weight applied in the input dtype)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fuse_rows(linears: list[nn.Linear], cache_name: str, owner: nn.Module) -> torch.Tensor:
    """One weight matrix for several projections of the same input (q|k|v, gate|up): one GEMM
    instead of several small ones. The modules' weights become views into it, so the fused copy
    costs no extra memory and the model's own forward (prefill) keeps working unchanged."""
    fused = getattr(owner, cache_name, None)
    if fused is not None:
        return fused
    with torch.no_grad():
        fused = torch.cat([lin.weight for lin in linears], dim=0)
        start = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
            start += rows
    setattr(owner, cache_name, fused)
    return fused


def layer_weights(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """One decoder layer's tensors, in :func:`_layer_step`'s order. Passing tensors rather than
    modules lets one compiled graph serve all 36 layers: compile once, not once per layer."""
    a, m = layer.self_attn, layer.mlp
    for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
        if lin.bias is not None:
            raise NotImplementedError("attention/MLP biases are not supported by the fast decoder")
    qkv = _fuse_rows([a.q_proj, a.k_proj, a.v_proj], "_egm_fused_qkv", a)
    gate_up = _fuse_rows([m.gate_proj, m.up_proj], "_egm_fused_gate_up", m)
    return (layer.input_layernorm.weight, qkv, a.q_norm.weight, a.k_norm.weight, a.o_proj.weight,
            layer.post_attention_layernorm.weight, gate_up, m.down_proj.weight)


def linear_patch_embed(model: nn.Module) -> None:
    """Run the vision patch embedding as a matrix product instead of a Conv3d.

    The kernel equals the stride, so the convolution is exactly a linear map of each flattened
    patch; cuDNN's bf16 Conv3d is much slower than the GEMM on 10^4-10^5 patches."""
    embed = model.model.visual.patch_embed
    proj = embed.proj
    if not isinstance(proj, nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride):
        return
    weight = proj.weight.view(proj.weight.shape[0], -1)  # (c, t, h, w) flattened like the input

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.view(-1, weight.shape[1]).to(weight.dtype), weight, proj.bias)

    embed.forward = forward


def _layer_step(h, cos, sin, bias, idx, k_cache, v_cache, w, eps: float, head_dim: int, q_width: int,
                kv_width: int):
    """One decoder layer for a single new token per row. Writes its K/V at slot ``idx``."""
    in_norm, w_qkv, q_norm, k_norm, wo, post_norm, w_gate_up, down = w
    b = h.shape[0]
    lc = bias.shape[-1]
    x = _rms_norm(h, in_norm, eps)
    q, k, v = F.linear(x, w_qkv).split([q_width, kv_width, kv_width], dim=-1)
    q = _rms_norm(q.reshape(b, -1, head_dim), q_norm, eps)  # [B, Hq, D]
    k = _rms_norm(k.reshape(b, -1, head_dim), k_norm, eps)  # [B, Hkv, D]
    v = v.reshape(b, -1, head_dim)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.index_copy_(2, idx, k.unsqueeze(2))
    v_cache.index_copy_(2, idx, v.unsqueeze(2))
    # GQA without repeating the cache: the query heads of one KV head form a [G, D] block, so
    # two batched GEMMs read every cached K/V byte once. (Fused attention kernels tile 64 query
    # rows and took twice as long for these 4-row blocks.) Scores in the model dtype with a
    # float32 softmax, like transformers' eager attention.
    qg = (q * head_dim ** -0.5).view(b, k.shape[1], -1, head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(qg, k_cache[:, :, :lc].transpose(-1, -2)) + bias  # [B, Hkv, G, Lc]
    probs = scores.float().softmax(dim=-1).to(qg.dtype)
    o = torch.matmul(probs, v_cache[:, :, :lc])  # [B, Hkv, G, D]
    h = h + F.linear(o.reshape(b, 1, -1), wo)
    gate, up = F.linear(_rms_norm(h, post_norm, eps), w_gate_up).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, down)


def _prefill_layer(h, cos, sin, bias, w, eps: float, head_dim: int, q_width: int, kv_width: int):
    """One decoder layer over whole prompts [B, P, H]; returns the new hidden states and this
    layer's keys/values [B, Hkv, P, D] for the cache. ``bias`` is None when nothing is padded."""
    in_norm, w_qkv, q_norm, k_norm, wo, post_norm, w_gate_up, down = w
    b, p, _ = h.shape
    x = _rms_norm(h, in_norm, eps)
    q, k, v = F.linear(x, w_qkv).split([q_width, kv_width, kv_width], dim=-1)
    q = _rms_norm(q.reshape(b, p, -1, head_dim), q_norm, eps).transpose(1, 2)  # [B, Hq, P, D]
    k = _rms_norm(k.reshape(b, p, -1, head_dim), k_norm, eps).transpose(1, 2)  # [B, Hkv, P, D]
    v = v.reshape(b, p, -1, head_dim).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    groups = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
        attn_mask=bias, is_causal=bias is None, scale=head_dim ** -0.5,
    )
    h = h + F.linear(o.transpose(1, 2).reshape(b, p, -1), wo)
    gate, up = F.linear(_rms_norm(h, post_norm, eps), w_gate_up).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, down), k, v


class DecodeStep:
    """One decode step for a batch, reading and writing only preallocated buffers.

    Inputs (mutated in place where noted): ``tok`` [B] last token (-> next token), ``pos``
    [B] its rope position (+1), ``idx`` [1] its cache slot (+1), ``t`` [1] output column
    (+1), ``pad_ok`` [B, Lmax] prompt padding mask, ``positions`` [Lc] = arange(Lc) (its
    length picks the attended chunk), ``finished`` [B], ``out_tok``/``out_lp`` [B, T],
    ``keys``/``values`` per layer [B, Hkv, Lmax, D], ``eos`` [E].

    The parts (embedding + rope + mask, one decode layer, head + token choice, one prefill
    layer) are compiled separately when ``inductor`` is set; eager otherwise.
    """

    def __init__(self, model: nn.Module, sampling: SamplingParams, pad_id: int, stop_on_eos: bool,
                 inductor: bool = False) -> None:
        lm = model.model.language_model
        cfg = model.config.text_config
        self.embed = lm.embed_tokens.weight
        self.rotary = lm.rotary_emb
        self.final_norm = lm.norm.weight
        self.lm_head = model.lm_head.weight
        if getattr(model.lm_head, "bias", None) is not None:
            raise NotImplementedError("an lm_head bias is not supported by the fast decoder")
        self.layers = [layer_weights(layer) for layer in lm.layers]
        self.eps = float(cfg.rms_norm_eps)
        self.head_dim = int(cfg.head_dim)
        self.q_width = int(cfg.num_attention_heads * cfg.head_dim)
        self.kv_width = int(cfg.num_key_value_heads * cfg.head_dim)
        self.sampling = sampling
        self.pad_id = pad_id
        self.stop_on_eos = stop_on_eos
        self._head, self._layer, self._tail = self._head_impl, _layer_step, self._tail_impl
        self._prefill_layer = _prefill_layer
        if inductor:
            self._head = torch.compile(self._head_impl, fullgraph=True)
            self._layer = torch.compile(_layer_step, fullgraph=True)
            self._tail = torch.compile(self._tail_impl, fullgraph=True)
            self._prefill_layer = torch.compile(_prefill_layer, fullgraph=True)

    def __call__(self, tok, pos, idx, t, pad_ok, positions, finished, out_tok, out_lp, keys, values, eos) -> None:
        h, cos, sin, bias = self._head(tok, pos, idx, pad_ok, positions)
        for i, w in enumerate(self.layers):
            h = self._layer(h, cos, sin, bias, idx, keys[i], values[i], w, self.eps, self.head_dim, self.q_width,
                            self.kv_width)
        self._tail(h, tok, pos, idx, t, finished, out_tok, out_lp, eos)

    def prefill(self, embeds, pos3, attention_mask, visual, deepstack, keys, values,
                between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """All prompt tokens through the text layers; K/V go to ``keys``/``values`` rows [:B, :, :P].

        Mirrors the model's own forward: 3-D M-RoPE from ``pos3``, causal attention that skips
        left padding, and DeepStack (visual features of early vision layers added to the image
        tokens after the first text layers). Returns float32 logits of the last position."""
        b, p, _ = embeds.shape
        cos, sin = self.rotary(embeds, pos3)  # [B, P, D]
        bias = None
        if not bool(attention_mask.all()):
            allowed = torch.ones(p, p, dtype=torch.bool, device=embeds.device).tril()
            allowed = allowed.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # [B, P(query), P(key)]
            # finfo.min, not -inf: padded query rows see nothing and must not turn into NaN
            bias = torch.zeros(b, 1, p, p, dtype=embeds.dtype, device=embeds.device)
            bias = bias.masked_fill(~allowed.unsqueeze(1), torch.finfo(embeds.dtype).min)
        h = embeds
        for i, w in enumerate(self.layers):
            h, k, v = self._prefill_layer(h, cos, sin, bias, w, self.eps, self.head_dim, self.q_width,
                                          self.kv_width)
            keys[i][:b, :, :p].copy_(k)
            values[i][:b, :, :p].copy_(v)
            if visual is not None and i < len(deepstack):
                h = h.clone()
                h[visual] = h[visual] + deepstack[i]
            if between_layers is not None and (i + 1) % PREFILL_CHECK_EVERY == 0 and i + 1 < len(self.layers):
                between_layers()
        h = _rms_norm(h[:, -1], self.final_norm, self.eps)
        return F.linear(h, self.lm_head).float()

    def _head_impl(self, tok, pos, idx, pad_ok, positions):
        b = tok.shape[0]
        lc = positions.shape[0]
        h = F.embedding(tok, self.embed).unsqueeze(1)  # [B, 1, H]
        cos, sin = self.rotary(h, pos.view(1, b, 1).expand(3, b, 1))  # [B, 1, D]
        attend = pad_ok[:, :lc] & (positions <= idx)
        bias = torch.zeros(b, 1, 1, lc, dtype=h.dtype, device=h.device)
        bias = bias.masked_fill(~attend.view(b, 1, 1, lc), torch.finfo(h.dtype).min)
        return h, cos, sin, bias

    def _tail_impl(self, h, tok, pos, idx, t, finished, out_tok, out_lp, eos) -> None:
        h = _rms_norm(h[:, 0], self.final_norm, self.eps)
        logits = F.linear(h, self.lm_head).float()
        nxt = select_tokens(logits, self.sampling)
        lp = _chosen_logprob(logits, nxt)
        nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
        lp = torch.where(finished, torch.zeros_like(lp), lp)
        out_tok.index_copy_(1, t, nxt.unsqueeze(1))
        out_lp.index_copy_(1, t, lp.unsqueeze(1))
        if self.stop_on_eos:
            finished.logical_or_(nxt.unsqueeze(1).eq(eos.unsqueeze(0)).any(dim=1))
        tok.copy_(nxt)
        pos.add_(1)
        idx.add_(1)
        t.add_(1)


@dataclass
class _Workspace:
    """Preallocated state of one batch bucket; CUDA graphs are recorded against these tensors."""

    batch: int
    max_len: int
    max_new: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    tok: torch.Tensor
    pos: torch.Tensor
    idx: torch.Tensor
    t: torch.Tensor
    pad_ok: torch.Tensor
    arange: torch.Tensor
    finished: torch.Tensor
    out_tok: torch.Tensor
    out_lp: torch.Tensor
    graphs: dict[int, Any] = field(default_factory=dict)

    def step_args(self, lc: int, eos: torch.Tensor) -> tuple:
        return (self.tok, self.pos, self.idx, self.t, self.pad_ok, self.arange[:lc], self.finished,
                self.out_tok, self.out_lp, self.keys, self.values, eos)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def batch_bucket(n: int, max_batch: int) -> int:
    """Smallest power of two >= n, but never above max(n, max_batch)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(n, max_batch))


class _StartOver(Exception):
    """Internal: the compiled code failed after graphs were set up; generate again eagerly."""


class StaticCacheDecoder:
    """Batched greedy/sampled decoding of a loaded Qwen3-VL model, see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_ids: list[int],
        pad_id: int,
        sampling: SamplingParams,
        max_new_tokens: int,
        max_batch: int,
        stop_on_eos: bool = True,
        cuda_graphs: bool | None = None,
        inductor: bool = False,
        max_workspaces: int = 4,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pad_id = pad_id
        self.sampling = sampling
        self.max_new = max_new_tokens
        self.max_batch = max_batch
        self.stop_on_eos = stop_on_eos
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        self.inductor = inductor
        linear_patch_embed(model)
        if inductor:
            _raise_recompile_limit(32)
        self._step_fn = DecodeStep(model, sampling, pad_id, stop_on_eos, inductor=inductor)
        #: set True to synchronise after each phase and record ``last_timings`` (benchmarks)
        self.timing = False
        self.last_timings: dict[str, float] = {}
        self._rope_index_s = 0.0
        #: keyed by (batch bucket, copy): copy 1 serves a batch that runs while copy 0's is paused
        self._workspaces: OrderedDict[tuple[int, int], _Workspace] = OrderedDict()
        self._max_workspaces = max_workspaces
        #: workspaces of the generate() calls in progress, outermost first
        self._active: list[tuple[int, int]] = []
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def generate(self, inputs: dict[str, torch.Tensor],
                 between_steps: Pause | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [n, T] and their log-probs [n, T] on the CPU (rows padded with pad_id / 0 after EOS).

        ``between_steps``: called where this batch can pause (module docstring); it may run one
        more :meth:`generate` to completion. Ignored in a call that is itself nested."""
        if len(self._active) >= MAX_NESTING:
            raise RuntimeError(f"generate() nested more than {MAX_NESTING - 1} level deep")
        if self._active:
            between_steps = None  # the inner batch runs straight through
        try:
            return self._generate(inputs, between_steps)
        except _StartOver:  # the compiled prefill failed: graphs were dropped, run again eagerly
            return self._generate(inputs, between_steps)

    def _generate(self, inputs: dict[str, torch.Tensor],
                  between_steps: Pause | None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = inputs["input_ids"]
        n, prompt_len = ids.shape
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds max_batch={self.max_batch}")
        key = self._workspace(batch_bucket(n, self.max_batch), prompt_len + self.max_new)
        self._active.append(key)
        try:
            return self._run(inputs, self._workspaces[key], self._pauser(between_steps))
        finally:
            self._active.remove(key)

    def _run(self, inputs: dict[str, torch.Tensor], ws: _Workspace,
             pause: Pause | None) -> tuple[torch.Tensor, torch.Tensor]:
        n, prompt_len = inputs["input_ids"].shape
        chunks = sorted({self._chunk(prompt_len + s) for s in range(max(self.max_new - 1, 0))})
        t0 = self._tick()
        if self.cuda_graphs:
            for lc in chunks:
                if lc not in ws.graphs:
                    ws.graphs[lc] = self._capture_or_fall_back(ws, lc)
            for lc in chunks:  # a fall-back to eager graphs drops the graphs captured before it
                if lc not in ws.graphs:
                    ws.graphs[lc] = self._capture(ws, lc)
        t1 = self._tick()
        if pause is not None:
            pause()

        logits, pos3 = self._prefill(inputs, ws, pause)
        first = select_tokens(logits, self.sampling)
        first_lp = _chosen_logprob(logits, first)
        self._load_state(ws, inputs["attention_mask"], pos3, first, first_lp, n)
        t2 = self._tick()

        steps_done = 1
        for s in range(self.max_new - 1):
            lc = self._chunk(prompt_len + s)
            graph = ws.graphs.get(lc) if self.cuda_graphs else None
            if graph is not None:
                graph.replay()
            else:  # no graphs, or a batch that ran during a pause dropped them (compiler failure)
                self._step_fn(*ws.step_args(lc, self.eos))
            steps_done += 1
            if steps_done % FINISH_CHECK_EVERY == 0:
                if self.stop_on_eos and bool(ws.finished.all()):
                    break
                if pause is not None:
                    pause()
        tokens, logprobs = ws.out_tok[:n, :steps_done].cpu(), ws.out_lp[:n, :steps_done].cpu()
        if self.timing:
            t3 = self._tick()
            self.last_timings = {"capture_s": t1 - t0, "prefill_s": t2 - t1, "rope_index_s": self._rope_index_s,
                                 "decode_s": t3 - t2,
                                 "steps": float(steps_done), "bucket": float(ws.batch)}
        return tokens, logprobs

    def _pauser(self, between_steps: Pause | None) -> Pause | None:
        """``between_steps`` behind a device sync (work it starts must not queue behind this batch's),
        and switched off for the rest of the batch if it raises (a pause must never fail the batch)."""
        if between_steps is None:
            return None
        broken = False

        def pause() -> None:
            nonlocal broken
            if broken:
                return
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            try:
                between_steps()
            except Exception:  # noqa: BLE001
                broken = True
                log.warning("between_steps failed; no more pauses in this batch", exc_info=True)

        return pause

    def _tick(self) -> float:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset(self) -> None:
        """Drop every cache and graph (frees GPU memory), but those of a batch still running."""
        for key in [k for k in self._workspaces if k not in self._active]:
            del self._workspaces[key]

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _chunk(cache_index: int) -> int:
        return (cache_index // LEN_CHUNK + 1) * LEN_CHUNK

    def _prefill(self, inputs: dict[str, torch.Tensor], ws: _Workspace,
                 pause: Pause | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision tower (the model's own), then the text layers through our (compiled) prefill
        layer, writing keys/values straight into the static cache. Returns last-position logits
        and the 3-D rope positions."""
        if inputs.get("pixel_values_videos") is not None:
            raise NotImplementedError("the fast decoder handles images, not videos")
        ids = inputs["input_ids"]
        t0 = self._tick()
        pos3, _ = self.model.model.get_rope_index(
            ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
        self._rope_index_s = self._tick() - t0
        step: DecodeStep = self._step_fn
        embeds = F.embedding(ids, step.embed)
        visual, deepstack = None, []
        if inputs.get("pixel_values") is not None:
            pooled, deep = self._image_features(inputs["pixel_values"], inputs["image_grid_thw"], pause)
            image_embeds = torch.cat(pooled, dim=0).to(embeds.dtype)
            visual = ids == self.model.config.image_token_id
            if int(visual.sum()) != image_embeds.shape[0]:
                raise ValueError(f"{int(visual.sum())} image tokens but {image_embeds.shape[0]} image features")
            embeds = embeds.masked_scatter(visual.unsqueeze(-1), image_embeds)
            deepstack = [d.to(embeds.dtype) for d in deep]
        args = (embeds, pos3, inputs["attention_mask"], visual, deepstack, ws.keys, ws.values)
        try:
            logits = step.prefill(*args, between_layers=pause)
        except Exception as exc:  # noqa: BLE001
            if not self.inductor or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            self._drop_inductor(exc)
            raise _StartOver from exc
        return logits, pos3

    def _image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                        pause: Pause | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The vision tower (the model's own): per-image features and the DeepStack features.

        With ``pause`` it runs ``VISION_CHUNK`` images at a time and offers a pause between the
        chunks, so the vision tower of a large batch is not one long stretch nothing can
        interrupt. Images never attend to each other in the tower (per-image attention and
        positions), so the chunks compute the same features up to the rounding of matrix
        products of another shape (in bf16 on a GPU; the same kind of difference as putting an
        image in a batch of another size). A batch run with a ``between_steps`` hook always runs
        in chunks, whether or not anything runs in its pauses, so a pause changes nothing."""
        get = self.model.model.get_image_features
        n = grid_thw.shape[0]
        if pause is None or n <= VISION_CHUNK:
            feats = get(pixel_values, grid_thw, return_dict=True)
            return list(feats.pooler_output), list(feats.deepstack_features)
        rows = grid_thw.prod(-1).tolist()  # patch rows of each image, concatenated in image order
        pooled: list[torch.Tensor] = []
        deep_parts: list[list[torch.Tensor]] = []
        row = 0
        for start in range(0, n, VISION_CHUNK):
            take = sum(rows[start:start + VISION_CHUNK])
            feats = get(pixel_values[row:row + take], grid_thw[start:start + VISION_CHUNK], return_dict=True)
            row += take
            pooled.extend(feats.pooler_output)
            deep_parts.append(list(feats.deepstack_features))
            pause()
        deep = [torch.cat([part[i] for part in deep_parts], dim=0) for i in range(len(deep_parts[0]))]
        return pooled, deep

    def _load_state(self, ws: _Workspace, attention_mask, pos3, first, first_lp, n: int) -> None:
        prompt_len = attention_mask.shape[1]
        ws.pad_ok.fill_(True)
        ws.pad_ok[:n, :prompt_len].copy_(attention_mask.bool())
        ws.tok.fill_(self.pad_id)
        ws.tok[:n].copy_(first)
        ws.pos.zero_()
        # first generated token sits one past the largest prompt position (of any rope axis)
        ws.pos[:n].copy_(pos3.amax(dim=(0, 2)) + 1)
        ws.idx.fill_(prompt_len)
        ws.t.fill_(1)
        ws.finished.fill_(True)
        if self.stop_on_eos:
            ws.finished[:n].copy_(first.unsqueeze(1).eq(self.eos.unsqueeze(0)).any(dim=1))
        else:
            ws.finished[:n].fill_(False)
        ws.out_tok.fill_(self.pad_id)
        ws.out_lp.zero_()
        ws.out_tok[:n, 0].copy_(first)
        ws.out_lp[:n, 0].copy_(first_lp)

    def _workspace(self, batch: int, need_len: int) -> tuple[int, int]:
        """The key (bucket, copy) of a workspace for this batch: copy 1 of a bucket when a paused
        batch holds copy 0. Least recently used workspaces make room, never one in use."""
        copy = 0
        while (batch, copy) in self._active:
            copy += 1
        key = (batch, copy)
        ws = self._workspaces.get(key)
        if ws is not None and ws.max_len >= need_len:
            self._workspaces.move_to_end(key)
            self._trim(self._max_workspaces, keep=key)  # over the limit after a pause: back to it
            return key
        if ws is not None:  # too short: replace (its graphs point at the old buffers)
            del self._workspaces[key]
        self._trim(self._max_workspaces - 1, keep=key)
        self._workspaces[key] = self._allocate(batch, _round_up(need_len, 2 * LEN_CHUNK))
        return key

    def _trim(self, limit: int, keep: tuple[int, int]) -> None:
        """Evict least recently used workspaces down to ``limit``, never one in use (nor ``keep``)."""
        idle = [k for k in self._workspaces if k not in self._active and k != keep]  # oldest first
        while len(self._workspaces) > limit and idle:
            del self._workspaces[idle.pop(0)]

    def _allocate(self, batch: int, max_len: int) -> _Workspace:
        cfg = self.model.config.text_config
        dev = self.device
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)

        def kv() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(cfg.num_hidden_layers)]

        return _Workspace(
            batch=batch, max_len=max_len, max_new=self.max_new, keys=kv(), values=kv(),
            tok=torch.full((batch,), self.pad_id, dtype=torch.long, device=dev),
            pos=torch.zeros(batch, dtype=torch.long, device=dev),
            idx=torch.zeros(1, dtype=torch.long, device=dev),
            t=torch.zeros(1, dtype=torch.long, device=dev),
            pad_ok=torch.ones(batch, max_len, dtype=torch.bool, device=dev),
            arange=torch.arange(max_len, dtype=torch.long, device=dev),
            finished=torch.zeros(batch, dtype=torch.bool, device=dev),
            out_tok=torch.full((batch, max(self.max_new, 1)), self.pad_id, dtype=torch.long, device=dev),
            out_lp=torch.zeros(batch, max(self.max_new, 1), dtype=torch.float32, device=dev),
        )

    def _reset_counters(self, ws: _Workspace) -> None:
        ws.idx.zero_()
        ws.t.zero_()
        ws.tok.fill_(self.pad_id)
        ws.pos.zero_()
        ws.finished.fill_(False)

    def _capture_or_fall_back(self, ws: _Workspace, lc: int):
        try:
            return self._capture(ws, lc)
        except Exception as exc:  # noqa: BLE001 - compiler trouble must not take the engine down
            if not self.inductor:
                raise
            self._drop_inductor(exc)
            return self._capture(ws, lc)

    def _drop_inductor(self, exc: Exception) -> None:
        """Compiler trouble must not take the engine down: continue with the eager step (still
        replayed as CUDA graphs). Graphs recorded with compiled code are dropped."""
        log.warning("Inductor-compiled step failed (%s: %s); falling back to eager code", type(exc).__name__, exc)
        self.inductor = False
        self._step_fn = DecodeStep(self.model, self.sampling, self.pad_id, self.stop_on_eos)
        for other in self._workspaces.values():
            other.graphs.clear()

    def _capture(self, ws: _Workspace, lc: int):
        """Record one decode step as a CUDA graph. Runs before prefill: the warm-up steps write
        garbage only into slots that prefill or later steps overwrite before anyone reads them."""
        args = ws.step_args(lc, self.eos)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # first call compiles (Inductor) and initialises cuBLAS
                self._reset_counters(ws)
                self._step_fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        self._reset_counters(ws)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_fn(*args)
        log.debug("captured decode graph batch=%d len=%d", ws.batch, lc)
        return graph


def _raise_recompile_limit(limit: int) -> None:
    """The compiled step sees a few shapes (batch 1, other batches, several chunk lengths) and
    several model instances in one process (tests, benchmarks); the default limit of 8
    recompiles per function would silently fall back to eager code."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)
