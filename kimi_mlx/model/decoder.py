"""Decoder layers and the whole causal LM: embed -> 27 x (attention, FFN) -> norm -> lm_head."""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn

from ..config import KDA, MOE, ModelConfig
from ..ops.linear import one_matrix
from ..ops.norm import add_norm
from ..state import KDAState, MLAState, ModelState, check_context, new_state
from .common import MLP, RMSNorm
from .kda import KimiDeltaAttention
from .mla import KimiMLA
from .moe import KimiMoE

COMPILED_PREFILL_MULTIPLE = 1024  # prefill steps of a multiple of this many tokens compile their KDA layers
PACED_PREFILL = 256  # prefill steps of at least this many tokens queue their layers one at a time (_layers)
PACED_ON = (mx.gpu,)  # ... on these devices
PROBE_TOKENS = 64  # Model.probe_kernels' prefill: one whole KDA chunk, past ops/kda.CHUNKED_MIN_T


def prefill_memory() -> str:
    """One line on how prefill steps keep their memory (doctor and bench print it)."""
    from ..ops.attention import FREE_SLACK

    tiles = f"; attention tiles wait for freed memory past {FREE_SLACK >> 20} MB" if FREE_SLACK is not None else ""
    return f"steps of {PACED_PREFILL}+ tokens run one layer at a time on a GPU{tiles}"


def residual(h: mx.array, r: mx.array | None) -> mx.array:
    """h + r in h's dtype, r (a sublayer's output, e.g. the fused MoE's float32 sum) rounded to it first."""
    return h if r is None else h + r.astype(h.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.is_kda = cfg.layer_types[i] == KDA
        self.self_attn = KimiDeltaAttention(cfg) if self.is_kda else KimiMLA(cfg)
        self.mlp = KimiMoE(cfg) if cfg.mlp_types[i] == MOE else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, h: mx.array, state) -> mx.array:
        return self.ffn(self.attend(h, state))

    def attend(self, h: mx.array, state) -> mx.array:
        return h + self.self_attn(self.input_layernorm(h), state)

    def ffn(self, h: mx.array) -> mx.array:
        return residual(h, self.mlp(self.post_attention_layernorm(h)))

    def compiled_kda_attention(self):
        """A KDA layer's attention half under mx.compile, for prefill steps of one recurring length:
        (h, conv, recurrent) -> (h + attention, conv, recurrent). (The FFN half: compiled_ffn.)"""
        def step(h, conv, recurrent):
            s = KDAState(conv, recurrent)
            return self.attend(h, s), s.conv, s.recurrent
        return mx.compile(step)

    def ffn_path(self, tokens: int) -> str:
        """'dense', a fused MoE's expert path for this many tokens (model/fuse.py), or 'moe' (unfused)."""
        from .fuse import FusedMoE

        if isinstance(self.mlp, MLP):
            return "dense"
        return self.mlp.path(tokens) if isinstance(self.mlp, FusedMoE) else "moe"

    def compiled_ffn(self, path: str):
        """This layer's FFN half under mx.compile on FFN path `path` (ffn_path), or None where it reads something
        back to the host (the fused MoE's 'segmented' expert path) or is unfused."""
        if getattr(self.mlp, "host_routed", False):
            return None
        return mx.compile(self.ffn) if path in ("dense", "bounded") else None

    def compiled_step(self, compile=mx.compile):
        """This layer's one-token step under mx.compile (fused elementwise work, fewer launches; tests pass
        compile=lambda f: f to run the same step eagerly).

        KDA layers: (h, r, conv, recurrent) -> (h, r, conv, recurrent). MLA layers: (h, r, DecodeSlot) ->
        (h, r, last page): whole pages and a mask, so the graph is traced again only when the last page grows
        or a page is added (every PAGE_GROW tokens at most, see state.py). See kda_step for h and r.
        """
        if getattr(self.mlp, "host_routed", False):
            return self._host_routed_step(compile)
        if self.is_kda:
            return compile(self.kda_step)
        step = compile(self.mla_step)
        return lambda h, r, slot: step(h, r, slot.pages, slot.row)

    def _host_routed_step(self, compile):
        """compiled_step for a layer whose MoE reads its routing back to the host (model/offload.py): the step up to
        the FFN's input compiled, the MoE eager after it (a compiled graph cannot stop for the host)."""
        mlp = self.mlp
        if self.is_kda:
            step = compile(lambda h, r, conv, rec: self.kda_step(h, r, conv, rec, ffn=False))

            def kda(h, r, conv, rec):
                h, x, conv, rec = step(h, r, conv, rec)
                return h, mlp(x), conv, rec
            return kda
        step = compile(lambda h, r, pages, row: self.mla_step(h, r, pages, row, ffn=False))

        def mla(h, r, slot):
            h, x, last = step(h, r, slot.pages, slot.row)
            return h, mlp(x), last
        return mla

    def kda_step(self, h, r, conv, recurrent, ffn: bool = True):
        """A KDA layer's one-token step on bare arrays. The layer's input is h + r, r the FFN output of the
        layer before, not yet added (None: h alone), so each residual add runs in one op with the norm after
        it (ops.norm.add_norm); returns (h, r, conv, recurrent) of its output likewise. ffn False: r is the FFN's
        input instead (its normed input, the FFN not run)."""
        s = KDAState(conv, recurrent)
        h, x = self._seam(h, r, self.input_layernorm)
        h, r = self._ffn_seam(h, self.self_attn(x, s), ffn)
        return h, r, s.conv, s.recurrent

    def mla_step(self, h, r, pages, row, ffn: bool = True):
        """An MLA layer's one-token step over a DecodeSlot's parts: (h, r as in kda_step, the last page as
        written)."""
        h, x = self._seam(h, r, self.input_layernorm)
        a, last = self.self_attn.decode(x, pages, row)
        h, r = self._ffn_seam(h, a, ffn)
        return h, r, last

    def _ffn_seam(self, h, a, ffn: bool = True):
        """(h + a, the FFN of its norm); ffn False: (h + a, its norm)."""
        h, x = self._seam(h, a, self.post_attention_layernorm)
        return h, self.mlp(x) if ffn else x

    @staticmethod
    def _seam(h, r, norm: RMSNorm):
        """(h + r, norm(h + r)); r None: (h, norm(h))."""
        if r is None:
            return h, norm(h)
        return add_norm(h, r, norm.weight, norm.eps)


class KimiLinearModel(nn.Module):
    """Embedding, decoder layers, final norm. Under pipeline parallelism a rank builds only its own
    layers (the others are empty placeholders, so parameter names stay global) and the ends it needs."""

    def __init__(self, cfg: ModelConfig, owned: range, first: bool, last: bool):
        super().__init__()
        if first or (last and cfg.tie_word_embeddings):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) if i in owned else nn.Module() for i in range(cfg.num_hidden_layers)]
        if last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Model(nn.Module):
    """Kimi Linear causal LM.  model(tokens [B, T], state) -> logits [B, T, vocab]; advances state.

    With a `pipeline` (kimi_mlx/distributed.py) every rank calls the model with the same tokens; the
    logits come back on every rank (all positions on the last rank, the final position elsewhere,
    where earlier positions are NaN), so all ranks sample the same next token.
    """

    def __init__(self, cfg: ModelConfig, pipeline=None):
        super().__init__()
        self.config = cfg
        self._pipeline = pipeline
        self.compile_decode = True  # False: run one-token steps eagerly (the reference)
        self.compile_prefill = True  # False: prefill steps run eagerly (the reference)
        self.eager_steps = False  # True: one-token steps take the decode path's functions uncompiled (tests)
        self._steps = None
        self._prefill = None
        self._prefill_ffn = None  # {(layer, tokens): compiled FFN half or None}
        self.layer_done = None  # paced prefill steps call layer_done(i) once layer i has run (memory tracing)
        self.offload = None  # OffloadStats where the routed experts stream from disk (model/offload.py)
        n = cfg.num_hidden_layers
        self.owned = pipeline.layers if pipeline else range(n)
        first, last = (pipeline.first, pipeline.last) if pipeline else (True, True)
        self.model = KimiLinearModel(cfg, self.owned, first, last)
        if last and not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def pipeline(self):
        return self._pipeline

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.layers[self.owned[0]].input_layernorm.weight.dtype

    def retrace(self) -> None:
        """Drop every traced graph (the layers' one-token steps, prefill steps and FFN halves, verification steps):
        each traces again at its next call, under the modules and settings of that moment (modules fused, a kernel
        switched off, a settings override in a test or benchmark). Graphs choose their paths when traced."""
        self._steps = self._prefill = self._prefill_ffn = None
        self.__dict__.pop("_verify_steps", None)

    def probe_kernels(self) -> list[str]:
        """Build and run once every GPU kernel this model's owned layers launch, on zeros, outside compiled steps:
        a prefill of PROBE_TOKENS tokens, then one decode step through the layers' steps run eagerly (the same
        functions decode compiles), then the MLA decode kernels for long pages. A kernel that fails to build or
        run (metal_kernels.KernelFailed: a compile error, a threadgroup the GPU refuses, ...) is switched off for
        this process and its paths take the next one down; the pass runs again until none fails. Returns one
        line per kernel switched off ("name: why"); [] on the CPU. Load calls it (weights/load.check_kernels)."""
        import metal_kernels

        from ..ops.mla_decode import probe_decode_kernels
        from ..ops.kda import gpu_backend

        if gpu_backend() is None:
            return []
        found = []
        for _ in range(len(metal_kernels.SPECS) + 1):  # each pass switches off one more kernel, or ends
            try:
                with metal_kernels.probing():
                    self._probe_pass()
                    probe_decode_kernels(self.config, self.dtype)
                break
            except metal_kernels.KernelFailed as e:
                metal_kernels.switch_off(e.name, e.why)
                found.append(f"{e.name}: {e.why}")
        self.retrace()  # graphs traced before a switch-off
        return found  # would still launch the kernel

    def _probe_pass(self) -> None:
        """A prefill and a decode step of zeros through the owned layers, every step eager."""
        state = self.new_state(1)
        D = self.config.hidden_size
        mx.eval(self._layers(mx.zeros((1, PROBE_TOKENS, D), self.dtype), state, compiled=False))
        state.offset += PROBE_TOKENS
        self._steps = {i: self.model.layers[i].compiled_step(lambda f: f) for i in self.owned}
        try:
            mx.eval(self._decode_each(mx.zeros((1, 1, D), self.dtype), state))
        finally:
            self._steps = None
        from .. import settings

        if settings.value("KIMI_MLX_KDA_ROWS") != "off" and self._pipeline is None:  # speculative verification's
            from ..ops.kda_decode import ROWS_FROM  # kernel, at a width that takes it
            from .verify import verify_forward

            eager, self.eager_steps = self.eager_steps, True
            try:
                mx.eval(verify_forward(self, [0] * ROWS_FROM, state)[0])
            finally:
                self.eager_steps = eager
                self.__dict__.pop("_verify_steps", None)

    def new_state(self, batch_size: int = 1, cache_bits: int = 0) -> ModelState:
        """A fresh state; cache_bits 8 or 4 quantizes the MLA latent caches (see state.py)."""
        state = new_state(self.config, batch_size, self.dtype, cache_bits)
        if self._pipeline:  # keep only this rank's layers' state
            state.layers = [s if i in self.owned else MLAState() for i, s in enumerate(state.layers)]
        return state

    def hidden(self, tokens: mx.array, state: ModelState | None = None) -> mx.array:
        """Final-norm hidden states [B, T, D] (no lm_head)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        if state is None:
            state = self.new_state(tokens.shape[0])
        elif state.batch_size != tokens.shape[0]:
            raise ValueError(f"state holds batch {state.batch_size}, tokens have batch {tokens.shape[0]}")
        check_context(state, tokens.shape[1], self.config.max_position_embeddings)
        p = self._pipeline
        if p is None or p.first:
            h = self.model.embed_tokens(tokens)
        else:
            h = p.recv((*tokens.shape, self.config.hidden_size), self.dtype)
        T = tokens.shape[1]
        r = None  # the last FFN output, not yet added to h (a one-token step adds it in the final norm)
        if T == 1 and self.compile_decode:
            h, r = self._decode_each(h, state)
        else:
            h = self._layers(h, state, compiled=T % COMPILED_PREFILL_MULTIPLE == 0 and self.compile_prefill)
        state.offset += tokens.shape[1]
        if p is not None and not p.last:
            p.send(residual(h, r))
            return None
        return self.final_norm(h, r)

    def decode_rows(self, tokens: mx.array, state) -> mx.array:
        """One token for each row of a ragged batched state (batch_state.BatchState: rows at their own lengths,
        whose lengths and context limits the state keeps): tokens [B, 1] -> logits [B, 1, vocab], through the
        same one-token layer steps as a single sequence's decode."""
        h, r = self._decode_each(self.model.embed_tokens(tokens), state)
        return self.logits(self.final_norm(h, r))

    def final_norm(self, h: mx.array, r: mx.array | None) -> mx.array:
        """The final norm of h + r, r the last layer's FFN output not yet added (None: h alone; see
        DecoderLayer.kda_step): the hidden states lm_head reads."""
        return DecoderLayer._seam(h, r, self.model.norm)[1]

    def _decode_each(self, h: mx.array, state: ModelState) -> tuple[mx.array, mx.array | None]:
        """The owned layers' one-token steps, each layer its own graph (self._steps: compiled unless a caller set
        them): (h, r), their output h + r (see DecoderLayer.kda_step)."""
        if self._steps is None:
            layers = {i: self.model.layers[i] for i in self.owned}
            self._steps = {i: layer.compiled_step(lambda f: f) if self.eager_steps else layer.compiled_step()
                           for i, layer in layers.items()}
        r = None
        for i in self.owned:
            layer, s, step = self.model.layers[i], state.layers[i], self._steps[i]
            if layer.is_kda:
                h, r, s.conv, s.recurrent = step(h, r, s.conv, s.recurrent)
            elif (slot := s.decode_slot()) is not None:
                h, r, last = step(h, r, slot)
                s.commit_decode(last)
            else:  # an empty cache: the first token appends the usual way
                h, r = layer(residual(h, r), s), None
        return h, r

    def _layers(self, h: mx.array, state: ModelState, compiled: bool) -> mx.array:
        """The owned layers over T > 1 tokens (or T = 1 uncompiled). compiled: each KDA layer's attention runs
        as one compiled graph, traced once per step length (the steady steps of a long prompt).

        Steps of PACED_PREFILL tokens or more are paced on a GPU: each layer is queued (async_eval) only once the
        one before has run (the host builds the next layer's graph meanwhile). MLX allocates a kernel's output
        when the host encodes it and frees a command batch's inputs only once the device has run the whole
        batch, so every layer queued ahead is memory held (its intermediates); building a graph holds nothing.
        Not on the CPU, which runs ahead by little: a small-shape prefill there measured 5% slower paced for 3%
        less memory."""
        if compiled and self._prefill is None:
            self._prefill = {i: self.model.layers[i].compiled_kda_attention() for i in self.owned
                             if self.model.layers[i].is_kda}
        paced, pending = h.shape[1] >= PACED_PREFILL and mx.default_device() in PACED_ON, []
        for i in self.owned:
            layer, s = self.model.layers[i], state.layers[i]
            if compiled and layer.is_kda:
                h, s.conv, s.recurrent = self._prefill[i](h, s.conv, s.recurrent)
            else:
                h = layer.attend(h, s)
            h = self._ffn(i, h) if compiled else layer.ffn(h)
            if paced:
                queued = [h, *s.arrays().values()]
                # await the layer before, then queue this one: its graph was built while the device ran the one
                mx.eval(pending)  # before (building allocates nothing; queuing does), so the host's build time
                mx.async_eval(queued)  # overlaps the device
                if self.layer_done:  # tracing: this layer alone (no overlap with the next one), then the hook
                    mx.eval(queued)
                    self.layer_done(i)
                pending = queued
        return h

    def _ffn(self, i: int, h: mx.array) -> mx.array:
        """Layer i's FFN half in a compiled prefill step: compiled where it reads nothing back to the host."""
        if self._prefill_ffn is None:
            self._prefill_ffn = {}
        layer, tokens = self.model.layers[i], h.shape[0] * h.shape[1]
        key = (i, tokens, layer.ffn_path(tokens))  # a changed KIMI_MLX_EXPERTS traces again
        if key not in self._prefill_ffn:
            self._prefill_ffn[key] = layer.compiled_ffn(key[2])
        step = self._prefill_ffn[key]
        return step(h) if step else layer.ffn(h)

    def logits(self, h: mx.array) -> mx.array:
        tied = self.config.tie_word_embeddings
        head = self.model.embed_tokens if tied else self.lm_head
        quantized = isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        return one_matrix(head.as_linear if tied else head, h, head if quantized else None)

    def __call__(self, tokens: mx.array, state: ModelState | None = None) -> mx.array:
        p = self._pipeline
        if p is None:
            return self.logits(self.hidden(tokens, state))
        h = self.hidden(tokens, state)
        B, T = tokens.shape
        if p.last:
            logits = self.logits(h)
            shared = p.broadcast_from_last(logits[:, -1:])
            p.eval(shared)
            return logits
        shared = p.broadcast_from_last(mx.zeros((B, 1, self.config.vocab_size), self.dtype))
        p.eval(shared)
        if T == 1:
            return shared
        return mx.concatenate([mx.full((B, T - 1, shared.shape[-1]), float("nan"), shared.dtype), shared], axis=1)
