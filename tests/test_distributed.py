"""Pipeline parallelism on two local ranks over MLX's ring backend (mlx.launch), against one process."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kimi_mlx import load_model
from kimi_mlx.distributed import DistributedError, is_noise, plan

WORKER = Path(__file__).parent / "dist_worker.py"
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")


def launch(ckpt, out, mode="run", timeout=240):
    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "--python", sys.executable,
           "--starting-port", str(40000 + (int(time.time() * 1000) % 20000)), str(WORKER), str(ckpt), str(out), mode]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)


def test_ring_noise_filter_drops_interleaved_fragments_only():
    """MLX's ring backend writes its per-socket messages word by word from several threads: whole lines and
    interleaved fragments are dropped; our own one-line errors (which quote '[ring]') and anything else pass."""
    noise = [b"[ring] Sending to socket 5 failed with errno 32\n", b"[ring] [ring] Sending to Receiving from socket\n",
             b"5 failed with errno 104\n", b"104\n", b"[ring] Socket 7 was closed by the peer\n",
             b"[ring] Too many send/recv errors. Failing pending tasks...\n",
             b"[ring] Sending to socket 7was closed by the peer\n"]
    kept = [b"error: rank 1: lost contact with another rank ([ring] connection to a peer was lost); stopping\n",
            b"Traceback (most recent call last):\n", b"\n", b"hello 5\n"]
    assert all(is_noise(line) for line in noise) and not any(is_noise(line) for line in kept)


def test_plan_balances_bytes():
    assert plan([10, 10, 10, 10], 0, 0, 2) == [range(0, 2), range(2, 4)]
    assert plan([1, 1, 1, 10], 0, 0, 2) == [range(0, 3), range(3, 4)]
    assert plan([5, 5, 5, 5, 5], 20, 0, 2) == [range(0, 1), range(1, 5)]
    assert plan([1, 1], 0, 0, 2) == [range(0, 1), range(1, 2)]
    with pytest.raises(DistributedError):
        plan([1, 1], 0, 0, 3)


@pytest.fixture(scope="module")
def two_rank_run(hf_checkpoint, tmp_path_factory):
    _, ckpt = hf_checkpoint("kkmkkm")
    out = tmp_path_factory.mktemp("dist")
    r = launch(ckpt, out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return ckpt, [dict(np.load(out / f"rank{i}.npz")) for i in range(2)]


def test_two_ranks_match_one_process(two_rank_run):
    ckpt, ranks = two_rank_run
    model = load_model(ckpt)
    toks = mx.array(np.arange(40)[None] % 97 + 3)
    ref = np.array(model(toks))
    np.testing.assert_allclose(ranks[1]["logits"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the first rank sees the final position; every rank agrees on the greedy continuation
    np.testing.assert_allclose(ranks[0]["logits"][:, -1], ref[:, -1], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    state = model.new_state()
    model(toks[:, :25], state)
    last = model(toks[:, 25:], state)[:, -1]
    greedy = []
    for _ in range(8):
        t = int(mx.argmax(last, axis=-1).item())
        greedy.append(t)
        last = model(mx.array([[t]]), state)[:, -1]
    assert ranks[0]["greedy"].tolist() == greedy == ranks[1]["greedy"].tolist()
    for r in ranks:  # snapshot -> restore on a split state continues exactly
        np.testing.assert_array_equal(r["again"], ranks[1]["again"])


def test_each_rank_holds_about_half_the_weights(two_rank_run):
    ckpt, ranks = two_rank_run
    total = sum(v.nbytes for _, v in tree_flatten(load_model(ckpt).parameters()))
    held = [int(r["weight_bytes"]) for r in ranks]
    assert sum(held) == total
    assert all(0.3 * total < h < 0.7 * total for h in held), (held, total)
    assert ranks[0]["layers"].tolist() + ranks[1]["layers"].tolist() == list(range(6))


def free_ports(n: int) -> list[int]:
    """n ports nothing listens on now (the system's picks for port 0), so the ranks' ring never meets a port in
    use by another program."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_killed_rank_makes_the_other_exit_with_one_line(hf_checkpoint, tmp_path):
    """Ranks started by hand (no launcher to kill the survivors): rank 1 dies mid-generation."""
    _, ckpt = hf_checkpoint("kkmkkm")
    ports = free_ports(2)
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(f'[["127.0.0.1:{ports[0]}"], ["127.0.0.1:{ports[1]}"]]')
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(tmp_path), "die"],
                              env={"MLX_RANK": str(i), "MLX_HOSTFILE": str(hostfile), "PATH": "/usr/bin:/bin"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    t0 = time.time()
    out0, err0 = procs[0].communicate(timeout=120)
    _, err1 = procs[1].communicate(timeout=30)
    assert time.time() - t0 < 100
    assert procs[1].returncode == 7, err1
    assert procs[0].returncode == 1
    lines = [l for l in err0.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "lost contact with another rank" in lines[0], err0
    assert not (tmp_path / "rank0.npz").exists()


def test_unreachable_rank_is_an_error(tmp_path, hf_checkpoint):
    _, ckpt = hf_checkpoint("kkmkkm")
    hostfile = tmp_path / "ring.json"
    hostfile.write_text('[["127.0.0.1:47811"], ["127.0.0.1:47812"]]')
    env = {"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile), "PATH": "/usr/bin:/bin"}
    t0 = time.time()
    r = subprocess.run([sys.executable, str(WORKER), str(ckpt), str(tmp_path), "unreachable"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert time.time() - t0 < 30
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "every rank" in lines[0], r.stderr
