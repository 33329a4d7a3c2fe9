"""ChatSession against fresh computation: turns, undo, regenerate, edit, interrupts, save -> load (new process)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import fresh_logprobs

import kimi_mlx
import kimi_mlx.session as session_mod
from kimi_mlx import ChatSession
from kimi_mlx.chat_template import TokenIds
from kimi_mlx.errors import KimiError

ATOL = 1e-4
SYSTEM = "You are a test."


@pytest.fixture(scope="module")
def demo(demo_random):
    return demo_random


def reply(session, text=None, **kw):
    """(responses, generated content ids) of one turn; text None = regenerate."""
    rs = list(session.send(text, **kw) if text is not None else session.regenerate(**kw))
    ids = [r.token for r in rs]
    if rs[-1].finish_reason == "stop" and ids[-1] in (session.tokenizer.im_end_id, session.tokenizer.eos_id):
        ids = ids[:-1]
    return rs, ids


def history_tokens(tok, turns, add_generation_prompt):
    """Template ids for [(user text, reply ids)...]; the last reply may be None (prompt only)."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for user, ids in turns:
        msgs.append({"role": "user", "content": user})
        if ids is not None:
            msgs.append({"role": "assistant", "content": TokenIds(ids)})
    return tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt)


def check_turn(model, tok, session, rs, turns):
    """First-step logits equal a fresh prefill of the whole history; tokens equal the template's."""
    prompt = history_tokens(tok, turns[:-1] + [(turns[-1][0], None)], True)
    np.testing.assert_allclose(np.array(rs[0].logprobs), fresh_logprobs(model, prompt), atol=ATOL)
    assert session.tokens == history_tokens(tok, turns, False)
    assert session.state.offset == len(session.tokens)


def test_turns_feed_only_new_tokens_and_match_fresh_prefill(demo):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=6, temperature=0.0)
    rs1, ids1 = reply(s, "Hello there")
    check_turn(model, tok, s, rs1, [("Hello there", ids1)])
    assert rs1[0].prompt_tokens == len(history_tokens(tok, [("Hello there", None)], True))
    before = len(s.tokens)
    rs2, ids2 = reply(s, "And again")
    turns = [("Hello there", ids1), ("And again", ids2)]
    check_turn(model, tok, s, rs2, turns)
    assert rs2[-1].prompt_tokens == len(history_tokens(tok, turns[:1] + [("And again", None)], True)) - before
    assert rs1[-1].finish_reason == "length" and s.tokens[-1] == tok.im_end_id  # max_tokens cut, turn closed
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[2]["content"] == tok.decode(ids1)


def test_long_history_crosses_cache_pages(demo):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=4, temperature=0.0)
    turns = []
    for i in range(3):
        text = f"message {i}: " + "lorem ipsum " * 12
        rs, ids = reply(s, text)
        turns.append((text, ids))
    assert len(s.tokens) > 300
    check_turn(model, tok, s, rs, turns)


def test_stop_tokens_close_the_turn_exactly(demo):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=6, temperature=0.0)
    rs, ids = reply(s, "one", logit_bias={tok.eos_id: 100.0})  # [EOS] is fed ahead, then taken back
    assert rs[-1].token == tok.eos_id and ids == []
    assert s.tokens == history_tokens(tok, [("one", [])], False)
    rs, ids2 = reply(s, "two", logit_bias={tok.im_end_id: 100.0})
    assert rs[-1].token == tok.im_end_id and ids2 == []
    rs, ids3 = reply(s, "three")
    check_turn(model, tok, s, rs, [("one", []), ("two", []), ("three", ids3)])


def test_undo_regenerate_edit_equal_fresh_computation(demo):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=8, temperature=1.0, seed=5)
    _, ids1 = reply(s, "first")
    rs2, ids2 = reply(s, "second")
    s.undo()
    rs, again = reply(s, "second")
    assert again == ids2 and rs[-1].prompt_tokens == 1  # same draw; the prompt was still in the state
    check_turn(model, tok, s, rs, [("first", ids1), ("second", again)])
    rs, regen = reply(s, None)
    assert regen != ids2 and rs[-1].prompt_tokens == 1
    check_turn(model, tok, s, rs, [("first", ids1), ("second", regen)])
    rs = list(s.edit_last("second, edited"))
    edited = [r.token for r in rs][: len(rs) - (rs[-1].token in (tok.im_end_id, tok.eos_id))]
    check_turn(model, tok, s, rs, [("first", ids1), ("second, edited", edited)])
    before = s.messages
    s.regenerate(), s.edit_last("never sent"), s.send("never sent")  # not iterated: nothing changes
    assert s.messages == before
    s.undo()
    s.undo()
    rs, new = reply(s, "fresh start")
    check_turn(model, tok, s, rs, [("fresh start", new)])
    with pytest.raises(KimiError, match="nothing to undo"):
        s.undo(), s.undo()


def test_undo_past_the_kept_marks_re_prefills_exactly(demo, monkeypatch):
    model, tok = demo
    monkeypatch.setattr(session_mod, "MAX_MARKS", 2)
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=3, temperature=0.0)
    turns = [(f"turn {i}", reply(s, f"turn {i}")[1]) for i in range(4)]
    for _ in range(3):
        s.undo()
    rs, ids = reply(s, "turn 1")
    assert rs[-1].prompt_tokens > 1  # the mark was dropped: re-prefilled from an older one
    check_turn(model, tok, s, rs, [turns[0], ("turn 1", ids)])


def test_interrupted_reply_is_kept_and_closed(demo):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=20, temperature=0.0,
                    logit_bias={tok.im_end_id: -100.0, tok.eos_id: -100.0})
    gen = s.send("talk")
    partial = [next(gen).token for _ in range(3)]
    gen.close()
    assert s.tokens == history_tokens(tok, [("talk", partial)], False)
    rs, ids = reply(s, "go on")
    check_turn(model, tok, s, rs, [("talk", partial), ("go on", ids)])


def test_error_during_prefill_rolls_the_turn_back(demo):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=4, temperature=0.0, prefill_step_size=4)
    _, ids1 = reply(s, "ok")

    def boom(done, total):
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(s.send("a long message " * 3, progress=boom))
    assert len(s.messages) == 3
    rs, ids2 = reply(s, "next")
    check_turn(model, tok, s, rs, [("ok", ids1), ("next", ids2)])


def test_full_context_caps_the_reply_then_refuses_cleanly(demo, monkeypatch):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=50, temperature=0.0,
                    logit_bias={tok.im_end_id: -100.0, tok.eos_id: -100.0})
    limit = len(history_tokens(tok, [("hi", None)], True)) + 6
    monkeypatch.setattr(model.config, "max_position_embeddings", limit)
    rs, ids = reply(s, "hi")
    assert rs[-1].finish_reason == "length" and len(s.tokens) == limit  # the closing token still fits
    assert s.tokens == history_tokens(tok, [("hi", ids)], False)
    with pytest.raises(KimiError, match="context full"):
        list(s.send("more"))
    assert len(s.messages) == 3 and s.tokens == history_tokens(tok, [("hi", ids)], False)


SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import kimi_mlx
    model, tok = kimi_mlx.load("demo-random")
    s = kimi_mlx.ChatSession.load(sys.argv[1], model, tok)
    rs = list(s.send("after load"))
    np.save(sys.argv[2], np.array(rs[0].logprobs))
    print(json.dumps({"ids": [r.token for r in rs], "prompt_tokens": rs[-1].prompt_tokens}))
""")


def test_save_then_load_in_a_new_process_continues_exactly(demo, tmp_path):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=5, temperature=1.0, seed=3)
    _, ids1 = reply(s, "remember this")
    path = tmp_path / "chat.session"
    s.save(path)
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "lp.npy")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout.strip().splitlines()[-1])
    prompt = history_tokens(tok, [("remember this", ids1), ("after load", None)], True)
    np.testing.assert_allclose(np.load(tmp_path / "lp.npy"), fresh_logprobs(model, prompt), atol=ATOL)
    rs, ids2 = reply(s, "after load")
    assert [r.token for r in rs] == child["ids"]  # same seed and history: the same draw
    assert child["prompt_tokens"] == rs[-1].prompt_tokens < len(prompt)


def test_bad_session_files_are_one_line_errors(demo, tmp_path, hf_checkpoint):
    model, tok = demo
    s = ChatSession(model, tok, system=SYSTEM, max_tokens=3, temperature=0.0)
    reply(s, "hi")
    good = tmp_path / "good.session"
    s.save(good)
    data = good.read_bytes()

    def fails(blob, match, other=None):
        p = tmp_path / "bad.session"
        p.write_bytes(blob)
        with pytest.raises(KimiError, match=match) as e:
            ChatSession.load(p, other or model, tok)
        assert "\n" not in str(e.value)

    with pytest.raises(KimiError, match="no such session file"):
        ChatSession.load(tmp_path / "missing", model, tok)
    fails(b"", "not a kimi-mlx session file")
    fails(data[: len(data) // 2], "not a kimi-mlx session file")
    fails(b"garbage" * 100, "not a kimi-mlx session file")
    fails(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:], "corrupt")
    header_len = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_len].decode()
    fails(data[:8] + header.replace('\\"version\\": 1', '\\"version\\": 9').encode() + data[8 + header_len :],
          "format version 9")
    other = kimi_mlx.load_model(hf_checkpoint("kmkm")[1])
    fails(data, "different model", other)
