"""`kimi-mlx doctor --report FILE`: one Markdown file with the machine, the versions, every kernel check with its
whole error, the active paths and a speed sample, written atomically; a path it cannot write is a one-line error."""

import errno
import os
import platform
import re
import sys
from importlib.metadata import version

import mlx.core as mx
import pytest

import metal_kernels
from kimi_mlx import doctor


def cli(*args, capsys):
    """Run `kimi-mlx doctor ARGS` in-process as the console script does; (exit code, stdout, stderr)."""
    from kimi_mlx.cli import main

    argv, sys.argv = sys.argv, ["kimi-mlx", "doctor", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def short_sample(monkeypatch):
    monkeypatch.setattr(doctor, "SPEED_SECONDS", 0.3)
    # on a GPU machine with the memory for it the report would build the full shape (~26 GiB, minutes): here the
    # device reports too little, so the report says why it skipped it
    monkeypatch.setattr(doctor, "device_memory", lambda: (24 * 2**30, "the GPU's recommended working set"))


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no '## {title}' section in:\n{text}"
    return match.group(1)


def test_report_has_every_section_with_real_values(tmp_path, capsys):
    path = tmp_path / "kimi-mlx-report.md"
    code, out, err = cli("--report", path, capsys=capsys)
    assert code == 0, err
    assert out.rstrip().endswith(f"report written to {path}")
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left beside it
    text = path.read_text()

    machine = section(text, "Machine")
    assert f"- machine: {platform.machine()}\n" in machine and f"- CPU cores: {os.cpu_count()}\n" in machine
    ram = float(re.search(r"^- memory: ([\d.]+) GiB$", machine, re.M).group(1))
    assert ram > 0.1
    assert re.search(r"^- chip: \S", machine, re.M) and re.search(r"^- OS: \S", machine, re.M)

    versions = section(text, "Versions")
    assert f"- MLX: {mx.__version__}\n" in versions
    assert f"- kimi-mlx: {version('kimi-mlx')}\n" in versions
    assert f"- Python: {platform.python_version()} (" in versions

    checks = section(text, "Kernel checks")
    for c in doctor.run_checks():
        result = "skip" if c.error is None else "ok" if c.ok else "FAIL"
        row = re.search(rf"^\| {re.escape(doctor._cell(c.name))} \| (\S+) \| {c.tol:.0e} \| {result} \|", checks, re.M)
        assert row, (c, checks)
        if c.error is not None:
            assert float(row.group(1)) <= c.tol
    assert "checks that ran passed" in text.splitlines()[2]

    paths = section(text, "Active paths")
    for key, value in doctor.environment():
        assert f"- {key}: {value}\n" in paths
    assert "- kernels switched off on this machine: none\n" in paths  # nothing switched off

    speed = section(text, "Speed")
    rate = float(re.search(r"^- demo decode: ([\d.]+) tok/s \((\d+) greedy tokens", speed, re.M).group(1))
    assert rate > 0
    assert re.search(r"^- full-shape decode: skipped: ", speed, re.M)
    assert "speed sample: demo decode" in err


def test_console_output_stays_as_without_report(tmp_path, capsys):
    code, plain, _ = cli(capsys=capsys)
    code_r, with_report, _ = cli("--report", tmp_path / "r.md", "--no-speed", capsys=capsys)
    assert code == code_r == 0
    assert with_report == plain + f"\nreport written to {tmp_path / 'r.md'}\n"


def test_a_failing_check_keeps_its_whole_error_in_the_report(tmp_path, capsys, monkeypatch):
    # what MLX raises for Metal source that does not compile: its first line says only that, the compiler's
    # diagnostics follow
    message = ("[metal::Device] Unable to build metal library from source\n"
               "program_source:412:17: error: use of undeclared identifier 'gu_half'; " + "x" * 300 + " END")

    def broken(path, **kw):
        raise RuntimeError(message)

    monkeypatch.setattr(doctor, "check_decode", broken)
    path = tmp_path / "r.md"
    code, out, err = cli("--report", path, "--no-speed", capsys=capsys)
    assert code == 1 and "error: a fast path disagrees with its reference" in err
    fail = [line for line in out.splitlines() if line.startswith("  FAIL  decode step, fused ops")]
    assert len(fail) == 1 and "Unable to build metal library" in fail[0] and "END" not in fail[0]
    text = path.read_text()
    assert "**1 of 2 checks FAILED.**" in text
    assert re.search(r"^\| decode step, fused ops \| inf \| 1e-04 \| FAIL \|", text, re.M)
    block = section(text, "Kernel checks").split("### FAIL: decode step, fused ops\n", 1)[1]
    assert f"```text\nRuntimeError: {message}\n```" in block


def test_the_home_directory_is_written_as_a_tilde(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    monkeypatch.setattr(doctor.sys, "executable", str(tmp_path / "alice" / ".venv" / "bin" / "python3"))
    monkeypatch.setenv("KIMI_MLX_CACHE", str(tmp_path / "alice" / "cache"))
    path = tmp_path / "r.md"
    assert cli("--report", path, "--no-speed", capsys=capsys)[0] == 0
    text = path.read_text()
    assert f"({platform.python_implementation()}, ~/.venv/bin/python3)" in text and "`KIMI_MLX_CACHE=~/cache`" in text
    assert "alice" not in text


def test_switched_off_kernels_are_listed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metal_kernels, "_off", {"moe_down": "Unable to build metal library from source"})
    path = tmp_path / "r.md"
    assert cli("--report", path, "--no-speed", capsys=capsys)[0] == 0
    assert "- kernels switched off on this machine: moe_down (Unable to build metal library from source)\n" in path.read_text()


def test_no_speed_omits_the_sample(tmp_path, capsys):
    path = tmp_path / "r.md"
    code, _, err = cli("--report", path, "--no-speed", capsys=capsys)
    text = path.read_text()
    assert code == 0 and "tok/s" not in text and "speed sample" not in err
    assert section(text, "Speed").strip() == "- not measured (--no-speed)"


@pytest.mark.parametrize("where, says", [
    ("missing/r.md", "the directory {d}/missing does not exist; create it or give a path in an existing directory"),
    ("", "is a directory; give a file name, e.g. {d}/kimi-mlx-report.md"),
])
def test_a_bad_path_is_one_line_and_writes_nothing(tmp_path, capsys, where, says):
    code, out, err = cli("--report", tmp_path / where, capsys=capsys)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.splitlines() == [f"error: --report {tmp_path / where}: " + says.format(d=tmp_path)]
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write in any directory")
def test_a_directory_without_write_permission_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, out, err = cli("--report", locked / "r.md", capsys=capsys)
    assert code == 1 and out == "" and err.startswith(f"error: --report {locked / 'r.md'}: the directory {locked} "
                                                      "is not writable by you") and len(err.splitlines()) == 1


def test_a_failed_write_leaves_the_old_report_whole(tmp_path, monkeypatch):
    path = tmp_path / "r.md"
    path.write_text("the previous report\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(doctor.os, "fsync", full_disk)
    with pytest.raises(doctor.KimiError, match=rf"^--report {re.escape(str(path))}: could not write it \("
                       + re.escape(os.strerror(errno.ENOSPC))):
        doctor.write_atomically(path, "# a new report\n")
    assert path.read_text() == "the previous report\n" and os.listdir(tmp_path) == ["r.md"]
    monkeypatch.undo()
    doctor.write_atomically(path, "# a new report\n")
    assert path.read_text() == "# a new report\n" and os.listdir(tmp_path) == ["r.md"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_full_shape_skipped_for_memory_says_how_much(monkeypatch):
    monkeypatch.setattr(doctor.kda_ops, "gpu_backend", lambda: "metal")
    weights = 28 * 10**9
    assert doctor.full_shape_skip(weights) == ("skipped: 24.0 GiB of memory (the GPU's recommended working set), the "
                                               "full shape needs ~30 GiB (26.1 GiB of 4-bit weights + 4 GiB headroom)")
    monkeypatch.setattr(doctor, "device_memory", lambda: (64 * 2**30, "the GPU's recommended working set"))
    assert doctor.full_shape_skip(weights) is None


def test_full_shape_bytes_matches_the_measured_full_shape():
    # `kimi-mlx bench --shape full` printed "weights: 27.75 GB" (benchmarks/RESULTS.md); the count here is of the
    # model before fuse_model, which drops a few matrices
    assert 27.7e9 < doctor.full_shape_bytes() < 28.0e9


def test_a_sample_that_fails_is_reported_and_the_report_still_written(tmp_path, capsys, monkeypatch):
    def broken(model, seconds):
        raise RuntimeError("[metal::Device] Unable to build metal library from source\nprogram_source:3:1: error: x")

    monkeypatch.setattr(doctor, "_decode_rate", broken)
    path = tmp_path / "r.md"
    code, _, err = cli("--report", path, capsys=capsys)
    assert code == 0 and "speed sample: the demo model failed: RuntimeError: [metal::Device]" in err
    speed = section(path.read_text(), "Speed")
    assert speed.startswith("\n- the demo model failed:\n\n```text\nRuntimeError: [metal::Device] Unable to build "
                            "metal library from source\nprogram_source:3:1: error: x\n```")


def test_the_full_shape_sample_where_the_memory_allows(monkeypatch):
    # the branch a GPU with room for the full shape takes, here at a tiny shape put in the full one's place
    from kimi_mlx import bench

    tiny = {**bench.SMALL, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16, "v_head_dim": 32, "num_experts": 8, "num_experts_per_token": 2,
            "moe_intermediate_size": 64,
            "linear_attn_config": {"kda_layers": [1], "full_attn_layers": [2], "num_heads": 2, "head_dim": 64,
                                   "short_conv_kernel_size": 4}}
    monkeypatch.setitem(bench.SHAPES, "full", tiny)
    monkeypatch.setattr(doctor, "full_shape_skip", lambda weights: None)
    lines = doctor.speed_sample(0.2, say=lambda line: None)
    assert len(lines) == 2, lines
    assert lines[0].startswith("- demo decode: ")
    full = re.fullmatch(r"- full-shape decode: ([\d.]+) tok/s \((\d+) greedy tokens after a 64-token prompt; random "
                        r"48B-A3B weights, 4-bit affine, as `kimi-mlx bench --shape full`; built in [\d.]+ s; peak "
                        r"memory ([\d.]+) GiB\)", lines[1])
    assert full, lines[1]
    assert float(full.group(1)) > 0 and int(full.group(2)) >= 4  # (the tiny shape's peak rounds to 0.0 GiB)


def test_machine_facts_on_a_mac(monkeypatch):
    # what macOS answers (sysctl) and what MLX's Metal backend reports, on a 32 GB M2 Max
    answers = {("sysctl", "-n", "machdep.cpu.brand_string"): "Apple M2 Max",
               ("sysctl", "-n", "hw.memsize"): "34359738368"}
    monkeypatch.setattr(doctor.sys, "platform", "darwin")
    monkeypatch.setattr(doctor.platform, "mac_ver", lambda: ("14.5", ("", "", ""), "arm64"))
    monkeypatch.setattr(doctor, "_run", lambda *cmd: answers.get(cmd, ""))
    monkeypatch.setattr(doctor, "_device_info", lambda: {
        "device_name": "Apple M2 Max", "architecture": "applegpu_g14s", "memory_size": 34359738368,
        "max_recommended_working_set_size": 22906503168})
    rows = dict(doctor.machine())
    assert rows["OS"].startswith("macOS 14.5 (") and rows["chip"] == "Apple M2 Max" and rows["memory"] == "32.0 GiB"
    assert rows["MLX device architecture"] == "applegpu_g14s"
    assert rows["MLX device max_recommended_working_set_size"] == "21.3 GiB"
    monkeypatch.undo()  # the fixture's stand-in device_memory too: the real one runs below
    monkeypatch.setattr(doctor, "_device_info", lambda: {"memory_size": 34359738368,
                                                         "max_recommended_working_set_size": 22906503168})
    assert doctor.device_memory() == (22906503168, "the GPU's recommended working set")
    monkeypatch.setattr(doctor, "_device_info", lambda: {"memory_size": 80 * 2**30})
    assert doctor.device_memory() == (80 * 2**30, "device memory")
