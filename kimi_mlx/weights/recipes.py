"""Quantization recipes: which module gets which (bits, group size, mode).

A recipe maps a module path (this project's names, e.g. `model.layers.3.mlp.experts.down_proj`) to a
QuantSpec or None (kept in floating point). The loader rebuilds the same modules from the config's
`quantization` block (weights/load.py `_quantize`): a global spec plus one entry per module that differs.

Recipes:
  kimi       (default) everything at the chosen spec, except the KDA gate/beta projections (f_a, f_b, b,
             g_a, g_b: small, and their errors pass through exp/softplus into every step of the
             recurrence) at affine 8-bit; the router is never quantized.
  uniform    everything quantizable at the chosen spec (the KDA gates too).
  mixed_X_Y  affine, X bits with Y bits for lm_head and, in the first and last eighth of the layers and
             every third layer, the down projections and the KDA qkv projection (it holds v); in the
             spirit of mlx-lm's mixed_3_4 / mixed_4_6 (llama.cpp's Q*_K_M rule). KDA gates as in kimi.
Overrides `PATTERN=SPEC` (fnmatch on the module path; the last matching one wins) apply on top.
The embedding table always uses affine: MLX's fp-mode QuantizedEmbedding returns bfloat16 whatever
the model's dtype, and a lookup table gains no matmul speed from an fp mode.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..config import KDA, ModelConfig
from ..errors import KimiError

# mode -> (allowed bits, allowed group sizes, default bits, default group size); MLX 0.32.4's rules
MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 4, 64),
    "mxfp4": ((4,), (32,), 4, 32),
    "mxfp8": ((8,), (32,), 8, 32),
    "nvfp4": ((4,), (16,), 4, 16),
}
MIXED = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
RECIPES = ("kimi", "uniform", *MIXED)
KDA_GATES = ("f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj")


class RecipeError(KimiError):
    pass


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def to_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def __str__(self) -> str:
        return f"{self.mode} {self.bits}-bit gs{self.group_size}"


PROTECTED = QuantSpec(8, 64)


def make_spec(bits: int | None = None, group_size: int | None = None, mode: str | None = None) -> QuantSpec:
    """A validated spec; missing values take the mode's defaults. Raises RecipeError (one line)."""
    mode = mode or "affine"
    if mode not in MODES:
        raise RecipeError(f"--mode {mode} is not supported; use one of {', '.join(MODES)}")
    allowed_bits, allowed_groups, default_bits, default_group = MODES[mode]
    bits = default_bits if bits is None else bits
    group_size = default_group if group_size is None else group_size
    if bits not in allowed_bits:
        raise RecipeError(f"--bits {bits} is not supported with mode {mode}; use {_list(allowed_bits)}")
    if group_size not in allowed_groups:
        raise RecipeError(f"--group-size {group_size} is not supported with mode {mode}; use {_list(allowed_groups)}")
    return QuantSpec(bits, group_size, mode)


def _list(xs) -> str:
    xs = [str(x) for x in xs]
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " or " + xs[-1]


def parse_override(text: str) -> tuple[str, QuantSpec | None]:
    """'PATTERN=SPEC', SPEC one of: none | BITS[:GROUP] | MODE[:BITS[:GROUP]] (e.g. 8, 6:32, mxfp8)."""
    pattern, sep, spec = text.partition("=")
    if not sep or not pattern or not spec:
        raise RecipeError(f"--override {text!r}: expected PATTERN=SPEC, e.g. '*.experts.down_proj=6' or 'lm_head=none'")
    if spec == "none":
        return pattern, None
    parts = spec.split(":")
    mode = parts.pop(0) if parts[0] in MODES else None
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise RecipeError(f"--override {text!r}: SPEC must be none, BITS[:GROUP] or MODE[:BITS[:GROUP]]") from None
    if len(nums) > 2:
        raise RecipeError(f"--override {text!r}: SPEC has too many fields")
    return pattern, make_spec(*(nums + [None] * (2 - len(nums))), mode=mode)


def tensor_class(path: str, cfg: ModelConfig) -> str:
    """A coarse name for reporting and recipes: experts, shared_experts, dense_mlp, kda_gates, kda_attn,
    mla_attn, router, embed, lm_head (or 'other')."""
    parts = path.split(".")
    if path == "model.embed_tokens":
        return "embed"
    if path == "lm_head":
        return "lm_head"
    if len(parts) < 5 or parts[1] != "layers":
        return "other"
    i, block, name = int(parts[2]), parts[3], parts[4]
    if block == "self_attn":
        if cfg.layer_types[i] != KDA:
            return "mla_attn"
        return "kda_gates" if name in KDA_GATES else "kda_attn"
    if name == "experts":
        return "experts"
    if name == "shared_experts":
        return "shared_experts"
    if name == "gate":
        return "router"
    return "dense_mlp"


def more_bits_layer(i: int, n: int) -> bool:
    """llama.cpp's Q*_K_M choice of layers that get the higher bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class Recipe:
    name: str
    base: QuantSpec
    high: QuantSpec | None = None  # mixed recipes only
    overrides: list[tuple[str, QuantSpec | None]] = field(default_factory=list)

    def spec_for(self, path: str, cfg: ModelConfig) -> QuantSpec | None:
        """The spec of module `path` before the divisibility check (None = keep floating point)."""
        spec = self._recipe_spec(path, cfg)
        for pattern, over in self.overrides:
            if fnmatch.fnmatchcase(path, pattern):
                spec = over
        return spec

    def _recipe_spec(self, path: str, cfg: ModelConfig) -> QuantSpec | None:
        kind = tensor_class(path, cfg)
        if kind == "router":
            return None
        if kind == "kda_gates" and self.name != "uniform":
            return PROTECTED
        if kind == "embed":
            return self.base if self.base.mode == "affine" else make_spec(self.base.bits, 64, "affine")
        if self.high is not None:
            leaf = path.rsplit(".", 1)[-1]
            if kind == "lm_head":
                return self.high
            i = int(path.split(".")[2]) if kind != "other" else 0
            if more_bits_layer(i, cfg.num_hidden_layers) and (leaf == "down_proj" or leaf == "qkv_proj"):
                return self.high
        return self.base

    def describe(self) -> str:
        text = f"{self.name} ({self.base}" + (f", high {self.high}" if self.high else "") + ")"
        for pattern, spec in self.overrides:
            text += f", {pattern}={spec or 'none'}"
        return text


def make_recipe(bits: int | None, group_size: int | None, mode: str | None, recipe: str | None,
                overrides: list[str] | None = None) -> Recipe | None:
    """The recipe for the CLI flags, or None for no quantization. Raises RecipeError on a bad combination."""
    overrides = overrides or []
    if recipe is not None and recipe not in RECIPES:
        raise RecipeError(f"--recipe {recipe} is unknown; use one of {', '.join(RECIPES)}")
    if bits is None and mode is None and recipe is None:
        if group_size is not None or overrides:
            raise RecipeError("--group-size and --override need --bits, --mode or --recipe (quantization is off)")
        return None
    parsed = [parse_override(o) for o in overrides]
    if recipe in MIXED:
        if bits is not None:
            raise RecipeError(f"--recipe {recipe} sets the bits itself; drop --bits")
        if mode not in (None, "affine"):
            raise RecipeError(f"--recipe {recipe} is affine only; drop --mode {mode}")
        low, high = MIXED[recipe]
        return Recipe(recipe, make_spec(low, group_size), make_spec(high, group_size), parsed)
    return Recipe(recipe or "kimi", make_spec(bits, group_size, mode), None, parsed)


def check_overrides(recipe: Recipe, paths: list[str]) -> None:
    """Each override pattern must match at least one quantizable module."""
    for pattern, _ in recipe.overrides:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            raise RecipeError(f"--override pattern {pattern!r} matches no quantizable module "
                              f"(module paths look like 'model.layers.1.mlp.experts.down_proj', 'lm_head')")
