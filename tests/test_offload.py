"""Routed experts streamed from disk into a bounded pool (model/offload.py): the same tokens and logits as the resident
model, memory held below it by most of the expert bytes, the pool's miss / hit / eviction paths, budgets, and a
shard that breaks while streaming."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx import settings
from kimi_mlx.bench import SMALL, write_checkpoint
from kimi_mlx.errors import ConfigError, KimiError, WeightsError
from kimi_mlx.model.fuse import FusedMoE
from kimi_mlx.model.offload import OffloadedMoE, minimum_bytes, plan_slots
from kimi_mlx.weights.load import load_model

# routed experts are ~90% of this checkpoint's bytes (4-bit, bfloat16 scales): 8 MoE layers x 64 experts
TINY = {**SMALL, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_experts": 64,
        "num_experts_per_token": 4, "moe_intermediate_size": 256, "kv_lora_rank": 64, "num_hidden_layers": 9,
        "linear_attn_config": {"kda_layers": [1, 2, 3, 5, 6, 7, 9], "full_attn_layers": [4, 8], "num_heads": 4,
                               "head_dim": 32, "short_conv_kernel_size": 4}}
MOE_LAYERS = 8
EXPERT_BYTES = MOE_LAYERS * 64 * 3 * (256 * 256 // 2 + 2 * 2 * 256 * 256 // 64)  # as stored: words, scales, biases


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("offload") / "tiny"
    write_checkpoint(TINY, out, bits=4, group_size=64)
    return out


def greedy(model, prompt, n):
    """(generated ids, logits of every step) from a prefill of `prompt` and n greedy one-token steps."""
    state = model.new_state(1)
    logits = [model(mx.array([prompt]), state)[0, -1]]
    ids = []
    for _ in range(n):
        ids.append(int(mx.argmax(logits[-1])))
        logits.append(model(mx.array([[ids[-1]]]), state)[0, -1])
    return ids, mx.stack(logits)


def moe_layers(model):
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, OffloadedMoE)]


@pytest.mark.parametrize("prefetch, share", [("off", 0.3), ("on", 0.3), ("off", 0.9)])
def test_streamed_equals_resident(ckpt, prefetch, share):
    """float32 (the bfloat16 scales cast as they are read, as the resident load casts them). share 0.9: the
    prefill's experts fit the pool (the prefill path over slot indices)."""
    ref = load_model(ckpt, dtype=mx.float32)
    off = load_model(ckpt, dtype=mx.float32, experts_memory_gb=EXPERT_BYTES * share / 1e9)
    assert len(moe_layers(off)) == MOE_LAYERS and off.offload.slots < 64
    rng = np.random.default_rng(1)
    with settings.override(KIMI_MLX_PREFETCH=prefetch):
        for prompt_len in (40, 16, 3):  # 40: a working set (more experts than slots); 16: 64 pairs (prefill path), 3
            prompt = rng.integers(0, TINY["vocab_size"], prompt_len).tolist()
            ids, logits = greedy(ref, prompt, 10)
            got_ids, got = greedy(off, prompt, 10)
            assert got_ids == ids
            assert mx.array_equal(got, logits).item()
    s = off.offload
    assert (s.prefetched > 0) == (prefetch == "on") and s.prefetch_used <= s.prefetched
    assert s.prefill_tokens == 56 and s.decode_tokens == 33  # a 3-token prompt takes the decode path (12 pairs)
    assert 0 < s.decode_hits < s.decode_lookups and s.decode_bytes > 0 and s.evictions > 0
    assert "hit rate" in s.line() and "read/token" in s.line()


def test_streamed_equals_resident_stored_dtype(ckpt):
    """The file's bfloat16 kept: bytes read straight into the pool (CPU bfloat16 is slow: a short run)."""
    ref = load_model(ckpt)
    off = load_model(ckpt, experts_memory_gb=EXPERT_BYTES * 0.15 / 1e9)
    prompt = list(range(7, 27))
    ids, logits = greedy(ref, prompt, 2)
    got_ids, got = greedy(off, prompt, 2)
    assert got_ids == ids and mx.array_equal(got, logits).item()


def test_staged_writes_equal_resident(ckpt, monkeypatch):
    """Where MLX gives no live view of an array's memory, reads land in host buffers and flush into the pool."""
    from kimi_mlx.model import offload

    monkeypatch.setattr(offload, "LIVE_VIEWS", False)
    ref = load_model(ckpt, dtype=mx.float32)
    off = load_model(ckpt, dtype=mx.float32, experts_memory_gb=EXPERT_BYTES * 0.15 / 1e9)
    assert not moe_layers(off)[0]._pool.live
    prompt = list(range(3, 43))
    with settings.override(KIMI_MLX_PREFETCH="on"):
        ids, logits = greedy(ref, prompt, 6)
        got_ids, got = greedy(off, prompt, 6)
    assert got_ids == ids and mx.array_equal(got, logits).item()
    assert off.offload.evictions > 0


def test_batched_decode_equals_resident(ckpt):
    """Two sequences a step: 8 experts a layer asked at once."""
    ref = load_model(ckpt, dtype=mx.float32)
    off = load_model(ckpt, dtype=mx.float32, experts_memory_gb=EXPERT_BYTES * 0.15 / 1e9)
    toks = mx.array([[3, 99, 250, 7, 1], [400, 2, 18, 77, 5]])
    out = []
    for m in (ref, off):
        state = m.new_state(2)
        m(toks[:, :4], state)
        out.append(m(toks[:, 4:], state))
    assert mx.array_equal(out[0], out[1]).item()


def test_pool_miss_hit_eviction(ckpt):
    ref = load_model(ckpt, dtype=mx.float32)
    off = load_model(ckpt, dtype=mx.float32, experts_memory_gb=EXPERT_BYTES * 0.15 / 1e9)
    layer, slots = moe_layers(off)[0], off.offload.slots
    assert layer._pool.live  # reads land in the pool's own memory here
    i = next(i for i, lay in enumerate(off.model.layers) if lay.mlp is layer)
    bank = ref.model.layers[i].mlp.gate_up_proj
    assert isinstance(ref.model.layers[i].mlp, FusedMoE)
    first = np.arange(slots)
    layer._ensure(first, "decode")  # all misses
    assert off.offload.decode_hits == 0 and off.offload.decode_lookups == slots and layer.resident() == list(first)
    layer._ensure(np.array([0]), "decode")  # a hit: expert 0 becomes the most recently used
    assert off.offload.decode_hits == 1 and layer.resident()[-1] == 0
    layer._ensure(np.array([slots, slots + 1]), "decode")  # two misses evict the two least recently used: 1, 2
    assert 1 not in layer.resident() and 2 not in layer.resident() and 0 in layer.resident()
    assert off.offload.evictions == 2
    for e in (0, slots, slots + 1):  # each slot holds exactly the expert's bytes
        slot = int(layer._table[e])
        for key in ("weight", "scales", "biases"):
            assert mx.array_equal(layer.gate_up_proj[key][slot], bank[key][e]).item()
            assert mx.array_equal(layer.down_proj[key][slot], ref.model.layers[i].mlp.down_proj[key][e]).item()


def test_budgets(ckpt):
    full = load_model(ckpt, experts_memory_gb=EXPERT_BYTES * 1.01 / 1e9)  # all experts fit: the resident model
    assert full.offload is None and not moe_layers(full)
    with pytest.raises(ConfigError, match=r"below one token's routed experts .* give at least") as e:
        load_model(ckpt, experts_memory_gb=EXPERT_BYTES / 64 * 3 / 1e9)  # 3 slots a layer, 4 needed
    assert "\n" not in str(e.value)
    assert minimum_bytes(1000, 8) == 8000
    assert plan_slots(10**8, 10**6, 256, 8, 26) == 100
    assert plan_slots(256 * 10**6, 10**6, 256, 8, 26) is None
    with pytest.raises(ConfigError, match="give at least"):
        plan_slots(7 * 10**6, 10**6, 256, 8, 26)
    for bad in (0, -1, "x"):
        with pytest.raises(ConfigError):
            load_model(ckpt, experts_memory_gb=bad)


def test_streamed_prefill_takes_wide_steps(ckpt):
    """Auto steps of STREAMED_STEP tokens (a step reads every layer's experts once, whatever its length); a size
    given is kept."""
    import importlib

    g = importlib.import_module("kimi_mlx.feed")

    assert g.step_lengths(0, 20000, 0, streamed=True) == [g.STREAMED_STEP] * 2 + [20000 - 2 * g.STREAMED_STEP]
    assert g.step_lengths(0, 20, 8, streamed=True) == [8, 8, 4]
    off = load_model(ckpt, dtype=mx.float32, experts_memory_gb=EXPERT_BYTES * 0.15 / 1e9)
    state = off.new_state(1)
    g.prefill(off, state, list(range(1, 200)))
    assert state.offset == 199 and off.offload.prefill_tokens == 199


def test_missing_shard_at_load(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model-00004-of-00011.safetensors").unlink()  # layer 2: a MoE layer
    with pytest.raises(WeightsError, match="missing") as e:
        load_model(broken, experts_memory_gb=0.002)
    assert "\n" not in str(e.value)


def test_truncated_shard_mid_chat_keeps_the_session(tmp_path):
    """The demo (HF layout: an expert a tensor): a shard cut short while the chat runs is a one-line WeightsError
    for that reply; the conversation and its state stay as they were, and the next reply after a repair works."""
    from kimi_mlx.demo import demo_dir
    from kimi_mlx.session import ChatSession
    from kimi_mlx.tokenizer import Tokenizer

    src = demo_dir("demo")
    ckpt = tmp_path / "demo"
    shutil.copytree(src, ckpt)
    model = load_model(ckpt, experts_memory_gb=0.0006)  # 2 of 8 experts a layer: nearly every token misses
    session = ChatSession(model, Tokenizer(ckpt), max_tokens=6, temperature=0.0)
    first = [r.text for r in session.send("Hello")]
    assert first
    messages, tokens = list(session.messages), list(session.tokens)
    shards = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    expert_shards = {f for name, f in shards.items() if ".experts." in name}
    saved = {f: (ckpt / f).read_bytes() for f in expert_shards}
    for f in expert_shards:
        with open(ckpt / f, "r+b") as fh:
            fh.truncate(1024)
    with pytest.raises(WeightsError, match="truncated") as e:
        list(session.send("Tell me more"))
    assert "\n" not in str(e.value)
    assert session.messages == messages and session.tokens == tokens
    for f, data in saved.items():
        (ckpt / f).write_bytes(data)
    again = list(session.send("Tell me more"))
    assert again and len(session.messages) == len(messages) + 2


ANON = textwrap.dedent("""
    import sys, mlx.core as mx
    from kimi_mlx.weights.load import load_model
    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else None
    m = load_model(sys.argv[1], experts_memory_gb=budget)
    peak = anon()
    state = m.new_state(1)
    y = m(mx.arange(1, 41).reshape(1, 40), state)  # a prefill step over most experts, then decode
    for _ in range(6):
        y = m(mx.argmax(y[:, -1:], axis=-1), state)
        mx.eval(y)
        peak = max(peak, anon())
    print(peak)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is Linux's")
def test_anonymous_memory_below_resident(ckpt):
    def peak(*args):
        out = subprocess.run([sys.executable, "-c", ANON, str(ckpt), *args], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    budget = EXPERT_BYTES * 0.1
    resident, streamed = peak(), peak(str(budget / 1e9))
    # the pools (10% of the experts) and one layer's working set (a prefill step's) are all that stream: at least
    # 70% of the expert bytes must be absent
    assert resident - streamed > 0.7 * EXPERT_BYTES, (resident, streamed, EXPERT_BYTES)


def test_cli_flag(ckpt):
    from typer.testing import CliRunner

    from kimi_mlx.cli import app

    out = CliRunner().invoke(app, ["bench", "--experts-memory", "2"])
    assert isinstance(out.exception, KimiError) and "--model" in str(out.exception)


def test_truncated_shard_fails_one_server_turn(tmp_path):
    """The server's engine: a turn that meets a cut shard fails with a one-line client error; the engine keeps
    serving, and once the shard is whole the same request gives the same tokens as before."""
    import threading

    from kimi_mlx.demo import demo_dir
    from kimi_mlx.generate import GenerationOptions
    from kimi_mlx.server.worker import Engine, EngineSettings, Failed, Finished, TurnSpec
    from kimi_mlx.tokenizer import Tokenizer

    ckpt = tmp_path / "demo"
    shutil.copytree(demo_dir("demo"), ckpt)
    model, tok = load_model(ckpt, experts_memory_gb=0.0006), Tokenizer(ckpt)

    def turn(engine, text):
        events, done = [], threading.Event()

        def sink(ev):
            events.append(ev)
            if isinstance(ev, (Finished, Failed)):
                done.set()
        ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
        engine.submit(TurnSpec(ids, GenerationOptions.from_kwargs(temperature=0.0, max_tokens=5)), sink)
        assert done.wait(60)
        return events[-1]

    engine = Engine(model, tok, EngineSettings(prefix_cache_bytes=0))
    engine.start()
    try:
        first = turn(engine, "Name a colour")
        assert isinstance(first, Finished)
        shards = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        saved = {f: (ckpt / f).read_bytes() for n, f in shards.items() if ".experts." in n}
        for f in saved:
            with open(ckpt / f, "r+b") as fh:
                fh.truncate(1024)
        model.offload.reset()
        for layer in moe_layers(model):  # an empty pool: the turn must read
            layer.clear()
        failed = turn(engine, "Name a colour")
        assert isinstance(failed, Failed) and failed.client_error and "truncated" in failed.message
        assert "\n" not in failed.message
        for f, data in saved.items():
            (ckpt / f).write_bytes(data)
        again = turn(engine, "Name a colour")
        assert isinstance(again, Finished) and again.generated == first.generated
    finally:
        engine.stop()


def test_stats_in_chat_and_generate(tmp_path, capsys):
    """The chat's /stats and `kimi-mlx generate` say the pool's hit rate, bytes read per token and read waits."""
    from kimi_mlx.chat import Chat, Output
    from kimi_mlx.demo import demo_dir
    from kimi_mlx.session import ChatSession
    from kimi_mlx.tokenizer import Tokenizer

    model = load_model("demo", experts_memory_gb=0.0006)
    session = ChatSession(model, Tokenizer(demo_dir("demo")), max_tokens=4, temperature=0.0)
    chat = Chat(session, Output(False), lambda path: session)
    chat.run(iter(["Hello", "/stats"]))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "experts streamed" in text and "hit rate" in text and "read/token" in text and "waiting on reads" in text
    run = subprocess.run([sys.executable, "-m", "kimi_mlx", "generate", "--model", "demo", "--experts-memory",
                          "0.0006", "--max-tokens", "3", "--temp", "0", "-p", "Hi"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "experts streamed" in run.stderr and "hit rate" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "kimi_mlx", "generate", "--model", "demo", "--experts-memory",
                          "0.0001", "-p", "Hi"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "give at least" in bad.stderr and "Traceback" not in bad.stderr
    bench = subprocess.run([sys.executable, "-m", "kimi_mlx", "bench", "--model", "demo", "--experts-memory", "0.0006",
                            "--no-peer", "--prefill", "", "--contexts", "64", "--decode-tokens", "2"],
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stderr
    assert re.search(r"streamed experts .*hit rate [\d.]+, [\d.]+ MB read/token, [\d.]+ ms/token waiting", bench.stdout)
