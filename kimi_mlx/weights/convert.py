"""`kimi-mlx convert`: an HF Kimi Linear checkpoint -> this project's layout, optionally quantized.

Streaming: the source is checked from its safetensors headers first, then converted one group at a
time (the embedding, each layer with its experts, the head): read lazily, mapped to local names
(layout.py), cast, quantized with nn.quantize on the group's own modules (exactly what load_model
rebuilds from the config's `quantization` block), written as its own shard(s), freed. Peak memory is
a small constant plus one group. Output goes to a temporary directory beside OUT that is renamed at
the end (output.py), so an interrupted run never leaves a loadable OUT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelConfig
from ..errors import KimiError, WeightsError, first_line
from ..model import Model
from ..model.common import RMSNorm
from ..model.decoder import DecoderLayer
from .layout import hf_layer_to_local
from .load import keep_fp32
from .output import OutputDir, ShardWriter, write_metadata
from .quality import QualityProbe, QualityReport, prompt_tokens
from .recipes import QuantSpec, Recipe, check_overrides, make_recipe
from .source import SourceReader, TensorInfo, check_source, groups, scan

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
MAX_SHARD_BYTES = 5 * 10**9


@dataclass
class ConvertOptions:
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    dtype: str | None = None  # None: the source's (source_dtype)
    force: bool = False
    report: bool = True
    revision: str | None = None
    max_shard_bytes: int = MAX_SHARD_BYTES


@dataclass
class ConvertResult:
    out: Path
    shards: int
    nbytes: int
    recipe: Recipe | None
    unquantized: list[str]  # modules the recipe wanted quantized whose input width the group size does not divide
    report: QualityReport | None


def quant_plan(cfg: ModelConfig, recipe: Recipe) -> tuple[dict[str, QuantSpec], list[str]]:
    """(module path -> spec for every module that gets quantized, paths left float for divisibility)."""
    modules = {p: m for p, m in Model(cfg).named_modules() if hasattr(m, "to_quantized")}  # never evaluated
    check_overrides(recipe, list(modules))
    plan, skipped = {}, []
    for path, module in modules.items():
        spec = recipe.spec_for(path, cfg)
        if spec is None:
            continue
        if module.weight.shape[-1] % spec.group_size:
            skipped.append(path)
        else:
            plan[path] = spec
    return plan, skipped


def estimate_bytes(cfg: ModelConfig, plan: dict[str, QuantSpec], dtype: mx.Dtype) -> int:
    """Output size from the parameter shapes and the plan (scales/biases included)."""
    total = 0
    for name, arr in tree_flatten(Model(cfg).parameters()):
        spec = plan.get(name.rsplit(".", 1)[0])
        if spec is None:
            total += arr.size * (4 if keep_fp32(name) else dtype.size)
        else:
            per_group = 2 * dtype.size if spec.mode == "affine" else 1
            total += arr.size * spec.bits // 8 + arr.size // spec.group_size * per_group
    return total


def source_dtype(tensors: dict[str, TensorInfo]) -> str:
    """The dtype most of the source's bytes are stored in: what unquantized weights keep by default, so a
    float32 checkpoint is not rounded to bfloat16 before quantization (its scales and biases stay float32)."""
    nbytes: dict[str, int] = {}
    for t in tensors.values():
        nbytes[t.dtype] = nbytes.get(t.dtype, 0) + t.nbytes
    return SAFETENSORS_DTYPES[max(nbytes, key=nbytes.get)]


def stored_dtype(name: str, src: mx.Dtype, dtype: mx.Dtype) -> mx.Dtype:
    """Small sensitive tensors stay float32 (o_norm too: the gated norm runs in float32); the router is
    never down-cast (it runs in float32); block norms follow --dtype (they are applied in the activation
    dtype, so wider storage would buy nothing); everything else is --dtype."""
    if keep_fp32(name) or name.endswith("o_norm_weight"):
        return mx.float32
    if name.endswith(".mlp.gate.weight"):
        return src if src.size >= dtype.size else dtype
    return dtype


def _group_module(cfg: ModelConfig, group: str) -> tuple[str, nn.Module]:
    """(name prefix, module whose parameter paths are the local names minus the prefix)."""
    if group == "embed":
        m = nn.Module()
        m.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        return "model.", m
    if group == "head":
        m = nn.Module()
        m.model = nn.Module()
        m.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            m.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        return "", m
    i = int(group.split()[1])
    return f"model.layers.{i}.", DecoderLayer(cfg, i)


class Converter:
    def __init__(self, cfg: ModelConfig, reader: SourceReader, dtype: mx.Dtype, plan: dict[str, QuantSpec],
                 writer: ShardWriter, probe: QualityProbe | None):
        self.cfg, self.reader, self.dtype, self.plan = cfg, reader, dtype, plan
        self.writer, self.probe = writer, probe
        self.embeds: tuple | None = None  # (source, converted) embedding, kept only for tied heads

    def _predicate(self, prefix: str):
        def predicate(path: str, module: nn.Module):
            spec = self.plan.get(prefix + path)
            return spec.to_dict() if spec else False
        return predicate

    def group(self, group: str, names: list[str]) -> None:
        src = self.reader.take(names)
        if group.startswith("layer"):
            src = hf_layer_to_local(self.cfg, int(group.split()[1]), src)
        prefix, conv = _group_module(self.cfg, group)
        local = {k[len(prefix):]: v for k, v in src.items()}
        del src
        ref = None
        if self.probe:  # the source group, kept whole for the side-by-side run
            _, ref = _group_module(self.cfg, group)
            ref.load_weights(list(local.items()))
            for v in local.values():
                mx.eval(v)
        conv.load_weights([(k, v.astype(stored_dtype(prefix + k, v.dtype, self.dtype))) for k, v in local.items()])
        del local
        nn.quantize(conv, class_predicate=self._predicate(prefix))
        for _, arr in tree_flatten(conv.parameters()):  # one tensor at a time: sources read as needed
            mx.eval(arr)
        if self.probe:
            self._probe(group, prefix, ref, conv)
        self.writer.add({prefix + k: v for k, v in tree_flatten(conv.parameters())})

    def _probe(self, group: str, prefix: str, ref: nn.Module, conv: nn.Module) -> None:
        p = self.probe
        p.weights(prefix, ref, conv)
        if group == "embed":
            p.embed(ref.embed_tokens, conv.embed_tokens)
            if self.cfg.tie_word_embeddings:
                self.embeds = (ref.embed_tokens, conv.embed_tokens)
        elif group == "head":
            outs = [e.as_linear for e in self.embeds] if self.embeds else [ref.lm_head, conv.lm_head]
            p.head(ref.model.norm, outs[0], conv.model.norm, outs[1])
        else:
            p.layer(int(group.split()[1]), ref, conv)


def check_tokenizer(src_dir: Path) -> None:
    """The output loads only with Kimi's tokenizer files beside the weights (write_metadata copies them from
    SRC): refuse a source without them, or with ones that do not read, before anything is written."""
    from ..tokenizer import Tokenizer

    if not (src_dir / "tiktoken.model").is_file():
        raise KimiError(f"{src_dir} has no tiktoken.model, so the converted model would not load; copy the "
                        "tokenizer files (tiktoken.model, tokenizer_config.json) from the model's hub repo into "
                        "it, then convert again")
    Tokenizer(src_dir)  # a corrupt rank file or tokenizer_config.json: its own one-line error


def convert(src: str, out: str | Path, opts: ConvertOptions | None = None,
            log: Callable[[str], None] = print) -> ConvertResult:
    """Convert checkpoint `src` (directory or hub repo id) into directory `out`. Raises KimiError (one line)."""
    from ..loading import resolve

    opts = opts or ConvertOptions()
    recipe = make_recipe(opts.bits, opts.group_size, opts.mode, opts.recipe, opts.overrides)
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise KimiError(f"--dtype {opts.dtype} is not supported; use {', '.join(DTYPES)}")
    target = OutputDir(Path(out), opts.force)
    src_dir = resolve(src, opts.revision)
    target.check_not_inside(src_dir)
    cfg = ModelConfig.from_file(src_dir)
    tensors = check_source(cfg, scan(src_dir))
    check_tokenizer(src_dir)
    dtype_name = opts.dtype or source_dtype(tensors)
    dtype = DTYPES[dtype_name]
    plan, skipped = quant_plan(cfg, recipe) if recipe else ({}, [])
    target.check_space(estimate_bytes(cfg, plan, dtype))
    probe = None
    if recipe and opts.report:
        ids, prompt = prompt_tokens(src_dir, cfg.vocab_size)
        probe = QualityProbe(cfg, ids, prompt)
    how = recipe.describe() if recipe else "no quantization"
    dtype_note = "" if opts.dtype else " (the source's)"
    log(f"converting {src} -> {out}: {how}, dtype {dtype_name}{dtype_note}")
    with target.staging() as tmp:
        writer = ShardWriter(tmp, opts.max_shard_bytes)
        conv = Converter(cfg, SourceReader(tensors), dtype, plan, writer, probe)
        todo = groups(cfg, tensors)
        for k, (group, names) in enumerate(todo):
            t0 = time.perf_counter()
            try:
                conv.group(group, names)
            except (RuntimeError, ValueError) as e:  # MLX's errors while reading or computing a group
                msg = first_line(e)
                raise WeightsError(f"{group}: conversion failed ({msg}); is the checkpoint readable?") from None
            mx.clear_cache()
            log(f"[{k + 1}/{len(todo)}] {group}: {time.perf_counter() - t0:.1f}s")
        shards, nbytes = writer.finish()
        report = probe.report() if probe else None
        write_metadata(tmp, src_dir, src, cfg, dtype_name, recipe, plan, report)
    for line in report.lines() if report else []:
        log(line)
    if skipped:
        log(f"left in floating point (input width not divisible by the group size): {len(skipped)} modules, "
            f"e.g. {skipped[0]}")
    log(f"wrote {out}: {shards} shard(s), {nbytes / 1e9:.2f} GB")
    return ConvertResult(Path(out), shards, nbytes, recipe, skipped, report)
