"""The converter's output side: an atomically published directory of shards, index, config and README.

Everything is written into `.OUT.partial-PID-XXXX` beside OUT; only a complete directory is renamed to
OUT (with --force, the old OUT is moved aside first and deleted after). config.json is written last, so
even a partial directory left by a killed process does not load; the next run removes such leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import mlx.core as mx

from ..config import ModelConfig
from ..errors import WeightsError

TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "tokenization_kimi.py", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
SPACE_MARGIN = 1.05


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDir:
    def __init__(self, out: Path, force: bool):
        self.out = out.expanduser().absolute()
        self.force = force
        self.prefix = f".{self.out.name}.partial-"
        if self.out.exists():
            if not force:
                raise WeightsError(f"{out} already exists; pass --force to replace it or choose another OUT")
            if not self.out.is_dir() or (any(self.out.iterdir()) and not (self.out / "config.json").exists()):
                raise WeightsError(f"{out} exists and is not a checkpoint directory; refusing to replace it "
                                   f"even with --force")

    def check_not_inside(self, src: Path) -> None:
        s, o = src.resolve(), self.out.resolve()
        if s == o or s in o.parents or o in s.parents:
            raise WeightsError(f"OUT {self.out} and SRC {src} overlap; write the conversion somewhere else")

    def check_space(self, nbytes: int) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        free = shutil.disk_usage(self.out.parent).free
        if nbytes * SPACE_MARGIN > free:
            raise WeightsError(f"not enough free disk space in {self.out.parent}: the conversion needs about "
                               f"{nbytes / 1e9:.1f} GB, {free / 1e9:.1f} GB are free")

    def _remove_stale(self) -> None:
        """Partial directories of earlier runs whose process is gone (killed before it could clean up)."""
        for d in self.out.parent.glob(self.prefix + "*"):
            pid = d.name[len(self.prefix):].split("-")[0]
            if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)

    @contextmanager
    def staging(self):
        """A temporary directory that becomes OUT when the block completes, and vanishes if it does not."""
        tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{os.getpid()}-", dir=self.out.parent))
        try:
            yield tmp
            self._publish(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WeightsError(f"writing {self.out} failed: {e.strerror or e}; nothing was written") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _publish(self, tmp: Path) -> None:
        if not self.out.exists():
            tmp.rename(self.out)
            return
        if not self.force:
            raise WeightsError(f"{self.out} appeared during the conversion; pass --force to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
        self.out.rename(old / "out")
        tmp.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Writes each group as it comes, as one or more shards of at most max_bytes."""

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max_bytes = directory, max_bytes
        self.parts: list[tuple[str, list[str]]] = []
        self.nbytes = 0

    def add(self, arrays: dict[str, mx.array]) -> None:
        chunk: dict[str, mx.array] = {}
        size = 0
        for name, arr in arrays.items():
            if chunk and size + arr.nbytes > self.max_bytes:
                self._write(chunk)
                chunk, size = {}, 0
            chunk[name] = arr
            size += arr.nbytes
        if chunk:
            self._write(chunk)

    def _write(self, chunk: dict[str, mx.array]) -> None:
        name = f"part-{len(self.parts) + 1:05d}.safetensors"
        mx.save_safetensors(str(self.dir / name), chunk, metadata={"format": "mlx"})
        self.parts.append((name, list(chunk)))
        self.nbytes += sum(a.nbytes for a in chunk.values())

    def finish(self) -> tuple[int, int]:
        """Name the shards model-XXXXX-of-YYYYY.safetensors and write the index; (shards, bytes)."""
        n = len(self.parts)
        weight_map = {}
        for k, (part, names) in enumerate(self.parts):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / part).rename(self.dir / final)
            weight_map.update({t: final for t in names})
        index = {"metadata": {"total_size": self.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        return n, self.nbytes


def write_metadata(tmp: Path, src_dir: Path, src: str, cfg: ModelConfig, dtype: str, recipe, plan: dict,
                   report) -> None:
    """Tokenizer files, README.md, then config.json (last: a directory without it does not load)."""
    from .. import __version__

    for f in TOKENIZER_FILES:
        if (src_dir / f).is_file():
            shutil.copy2(src_dir / f, tmp / f)
    raw = json.loads((src_dir / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw.pop("quantization", None)
    raw["max_position_embeddings"] = cfg.max_position_embeddings
    raw["dtype"] = dtype
    if "torch_dtype" in raw:
        raw["torch_dtype"] = dtype
    if recipe is not None:
        q = recipe.base.to_dict()
        q.update({path: spec.to_dict() for path, spec in sorted(plan.items()) if spec != recipe.base})
        raw["quantization"] = q
    lines = [f"# {Path(src).name} for kimi-mlx", "",
             f"- source: `{src}`",
             f"- quantization: {recipe.describe() if recipe else 'none'}",
             f"- dtype: {dtype}",
             f"- converted with kimi-mlx {__version__} (`kimi-mlx convert`) on {date.today().isoformat()}",
             "", "Load with `kimi_mlx.load_model(path)` or `kimi-mlx chat --model PATH`.", ""]
    if report is not None:
        lines += ["## Quality", "", "```", *report.lines(), "```", ""]
    (tmp / "README.md").write_text("\n".join(lines))
    (tmp / "config.json").write_text(json.dumps(raw, indent=1))
