"""Typer flags for the generation options, shared by `generate` and `chat`: one declaration per flag, the
defaults read from GenerationOptions (so the CLI and the Python API cannot drift)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .errors import KimiError
from .generate import GenerationOptions

D = GenerationOptions  # class attributes hold the defaults

Model = Annotated[str, typer.Option("--model", "-m", help="checkpoint directory, hub repo id, or 'demo'")]
System = Annotated[Optional[str], typer.Option("--system", help="system prompt")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="most tokens to generate per reply")]
Temperature = Annotated[float, typer.Option("--temperature", "--temp", help="sampling temperature; 0 = greedy")]
TopP = Annotated[float, typer.Option("--top-p", help="nucleus sampling mass; 1 = off")]
TopK = Annotated[int, typer.Option("--top-k", help="sample among the k most likely; 0 = off")]
MinP = Annotated[float, typer.Option("--min-p", help="drop tokens below min_p x the top probability; 0 = off")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty", help="1 = off")]
RepetitionContext = Annotated[int, typer.Option("--repetition-context-size",
                                                help="tokens the repetition penalty looks back over")]
PresencePenalty = Annotated[float, typer.Option("--presence-penalty", help="OpenAI-style, over generated tokens")]
FrequencyPenalty = Annotated[float, typer.Option("--frequency-penalty", help="OpenAI-style, over generated tokens")]
LogitBias = Annotated[Optional[list[str]], typer.Option("--logit-bias", help="ID=BIAS, repeatable")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="random seed (reproducible sampling)")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="stop string, repeatable")]
PrefillStepSize = Annotated[int, typer.Option("--prefill-step-size", help="prompt tokens per prefill step (0: auto, 8192 with --experts-memory, 4096 on a GPU for prompts ending within 32768 tokens of context, else 2048)")]
ExpertsMemory = Annotated[Optional[float], typer.Option(
    "--experts-memory", metavar="GB", help="keep the routed experts on disk and at most this many GB of them in "
    "memory, read as tokens need them (runs a model larger than memory; docs/offload.md)")]
Draft = Annotated[Optional[str], typer.Option("--draft", help="speculative decoding: 'ngram' (prompt lookup: pays "
                                             "where the reply copies the prompt) or a draft model with Kimi's "
                                             "tokenizer (directory, hub repo id or 'demo'); off by default")]
NumDraft = Annotated[int, typer.Option("--num-draft", help="tokens drafted a round, 1..15 (0: 8 for ngram, 4 for a "
                                       "draft model)")]
Ngram = Annotated[int, typer.Option("--ngram", help="longest suffix --draft ngram looks up (1..16)")]
Distributed = Annotated[bool, typer.Option("--distributed", help="split the model over the ranks started by "
                                           "mlx.launch (see docs/distributed.md)")]


def parse_logit_bias(items: list[str] | None) -> dict[int, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        tok, sep, val = item.partition("=")
        try:
            out[int(tok)] = float(val)
        except ValueError:
            raise KimiError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 163586=-100") from None
        if not sep:
            raise KimiError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS, e.g. 163586=-100")
    return out


def generation_options(*, logit_bias: list[str] | None, stop: list[str] | None, **values) -> GenerationOptions:
    """GenerationOptions from the flag values (names as in the API)."""
    return GenerationOptions.from_kwargs(logit_bias=parse_logit_bias(logit_bias), stop=list(stop or []), **values)
