"""Quality report of a quantized conversion, computed while the converter streams the layers.

The source model and the converted model each run a short fixed prompt, one group at a time: the
converter hands over each group's source modules (float, source precision) and converted modules
(quantized, cast), and the probe advances one hidden-state stream through each. Activations are float32
in both streams, so the report measures what the conversion changed: the weights. At the end the
next-token distributions are compared (KL(source || converted) mean and max over positions, top-1
agreement), and per tensor class the relative RMS weight error ||W - dequant(Q)|| / ||W|| (on a sample of rows).
Memory: one group of each model at a time, the same bound as the conversion itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelConfig
from ..state import new_state
from .recipes import tensor_class

PROMPT = ("The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers that "
          "changed physics; the first explained the photoelectric effect, and")
FALLBACK_TOKENS = 32
SAMPLE = 2**22  # weights per module checked for the weight error


def prompt_tokens(src: Path, vocab_size: int) -> tuple[list[int], str]:
    """The prompt's token ids and a description (SRC's tokenizer: convert refuses a source without one); fixed
    ids when none of the prompt's ids is inside the model's vocabulary (a test model's tiny one)."""
    from ..tokenizer import Tokenizer

    ids = [t for t in Tokenizer(src).encode(PROMPT) if t < vocab_size]
    if ids:
        return ids, f"{len(ids)} tokens of a fixed English prompt"
    ids = [(i * 7919 + 13) % vocab_size for i in range(FALLBACK_TOKENS)]
    return ids, f"{len(ids)} fixed token ids (the prompt's ids lie outside the model's vocabulary)"


@dataclass
class ClassError:
    sq_err: float = 0.0
    sq_norm: float = 0.0
    params: int = 0
    specs: set = field(default_factory=set)

    @property
    def relative(self) -> float:
        return (self.sq_err / self.sq_norm) ** 0.5 if self.sq_norm else 0.0


@dataclass
class QualityReport:
    prompt: str
    kl_mean: float
    kl_max: float
    top1: float
    classes: dict[str, ClassError]

    def lines(self) -> list[str]:
        out = [f"quality vs source ({self.prompt}): KL mean {self.kl_mean:.3g}, KL max {self.kl_max:.3g}, "
               f"top-1 agreement {self.top1:.1%}"]
        for name, c in sorted(self.classes.items()):
            out.append(f"  {name:<15} {', '.join(sorted(c.specs)):<28} {c.params / 1e6:9.2f}M params  "
                       f"relative weight error {c.relative:.4f}")
        return out


def _rows(a: mx.array, idx: mx.array) -> mx.array:
    return a.reshape(-1, a.shape[-1])[idx]


def weight_error(ref: mx.array, q: nn.Module) -> tuple[float, float]:
    """(||W - dequant(Q)||^2, ||W||^2) over up to SAMPLE weights: evenly spaced rows of the module (a row
    is quantized on its own, so a sample of rows is an unbiased estimate and costs no full dequantize)."""
    rows = ref.size // ref.shape[-1]
    idx = mx.arange(0, rows, max(1, rows * ref.shape[-1] // SAMPLE))
    w = _rows(ref, idx).astype(mx.float32)
    biases = _rows(q.biases, idx) if "biases" in q else None
    d = mx.dequantize(_rows(q.weight, idx), _rows(q.scales, idx), biases, group_size=q.group_size, bits=q.bits,
                      mode=q.mode, dtype=mx.float32) - w
    e, n = mx.sum(d * d), mx.sum(w * w)
    mx.eval(e, n)
    scale = rows / idx.size  # back to the whole module, so classes add up by size
    return e.item() * scale, n.item() * scale


def _kl(ref_logits: mx.array, q_logits: mx.array) -> tuple[mx.array, mx.array]:
    logp = ref_logits - mx.logsumexp(ref_logits, axis=-1, keepdims=True)
    logq = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    kl = mx.sum(mx.exp(logp) * (logp - logq), axis=-1)
    agree = mx.argmax(ref_logits, axis=-1) == mx.argmax(q_logits, axis=-1)
    return kl, agree


class QualityProbe:
    """Two hidden-state streams (source, converted) advanced group by group."""

    def __init__(self, cfg: ModelConfig, tokens: list[int], prompt: str):
        self.cfg = cfg
        self.tokens = mx.array([tokens])
        self.prompt = prompt
        self.h: list[mx.array | None] = [None, None]
        self.states = [new_state(cfg, 1, mx.float32), new_state(cfg, 1, mx.float32)]
        self.classes: dict[str, ClassError] = {}
        self.logits: list[mx.array | None] = [None, None]

    def embed(self, ref: nn.Module, conv: nn.Module) -> None:
        self.h = [m(self.tokens).astype(mx.float32) for m in (ref, conv)]
        mx.eval(self.h)

    def layer(self, i: int, ref: nn.Module, conv: nn.Module) -> None:
        self.h = [m(h, s.layers[i]) for m, h, s in zip((ref, conv), self.h, self.states)]
        mx.eval(self.h)
        self.states[0].layers[i] = self.states[1].layers[i] = None  # a prompt pass needs no state afterwards

    def head(self, ref_norm, ref_out, conv_norm, conv_out) -> None:
        """ref_out / conv_out map final hidden states to logits (lm_head or the tied embedding)."""
        self.logits = [out(norm(h)).astype(mx.float32)[0]
                       for norm, out, h in zip((ref_norm, conv_norm), (ref_out, conv_out), self.h)]
        mx.eval(self.logits)

    def weights(self, prefix: str, ref: nn.Module, conv: nn.Module) -> None:
        """Accumulate the weight error of every quantized module of `conv` (paths relative to prefix)."""
        ref_params = dict(tree_flatten(ref.parameters()))
        for path, m in conv.named_modules():
            if "scales" not in m or not path:
                continue
            cls = tensor_class(prefix + path, self.cfg)
            c = self.classes.setdefault(cls, ClassError())
            w = ref_params[f"{path}.weight"]
            e, n = weight_error(w, m)
            c.sq_err, c.sq_norm, c.params = c.sq_err + e, c.sq_norm + n, c.params + w.size
            c.specs.add(f"{m.mode} {m.bits}b gs{m.group_size}")

    def report(self) -> QualityReport:
        kl, agree = _kl(*self.logits)
        return QualityReport(self.prompt, mx.mean(kl).item(), mx.max(kl).item(),
                             mx.mean(agree.astype(mx.float32)).item(), self.classes)
