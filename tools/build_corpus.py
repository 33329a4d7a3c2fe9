"""Build the demo model's training corpus from redistributable Python source on this machine.

Sources: the CPython standard library (PSF licence) and the venv packages whose licence metadata is
MIT, BSD or Apache only (checked here, per package). Whole files are held out for evaluation
(`heldout(relpath)`, a fixed hash rule; the list is written next to the corpus). Every kept file is
one plain-code document; functions with docstrings also become chat pairs (user turn = signature +
docstring, assistant turn = the body), grouped up to three to a conversation.

    python tools/build_corpus.py --out .demo_build/corpus.jsonl

Output: JSON lines {"split": "train"|"heldout", "kind": "code"|"chat", "source": relpath,
"text": str} for code, or "messages": [...] for chat; plus `<out>.sources.json` (packages, licences,
file counts, the held-out files with their sha256, from which `heldout_documents` rebuilds them).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import textwrap
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

STDLIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
PERMISSIVE = ("MIT", "BSD", "Apache")  # a licence string must name only these
PACKAGES = (  # import name -> distribution name; all checked against PERMISSIVE at build time
    ("annotated_types", "annotated-types"), ("anyio", "anyio"), ("charset_normalizer", "charset-normalizer"),
    ("click", "click"), ("fastapi", "fastapi"), ("filelock", "filelock"), ("fsspec", "fsspec"),
    ("h11", "h11"), ("httpcore", "httpcore"), ("httpx", "httpx"), ("huggingface_hub", "huggingface-hub"),
    ("idna", "idna"), ("iniconfig", "iniconfig"), ("jinja2", "jinja2"), ("markdown_it", "markdown-it-py"),
    ("markupsafe", "markupsafe"), ("mdurl", "mdurl"), ("mlx_lm", "mlx-lm"), ("networkx", "networkx"),
    ("packaging", "packaging"), ("pluggy", "pluggy"), ("pydantic", "pydantic"), ("pygments", "pygments"),
    ("_pytest", "pytest"), ("yaml", "pyyaml"), ("requests", "requests"), ("rich", "rich"),
    ("safetensors", "safetensors"), ("starlette", "starlette"), ("tiktoken", "tiktoken"), ("typer", "typer"),
    ("urllib3", "urllib3"), ("uvicorn", "uvicorn"), ("typing_inspection", "typing-inspection"),
)
SKIP_DIRS = {"site-packages", "__pycache__", "_vendor", "vendor", "encodings", "lib2to3", "idlelib",
             "test_lib2to3", "tkinter", "turtledemo", "data"}
MAX_FILE_BYTES = 300_000
MAX_LINE = 400
HELDOUT_PER_MILLE = 15
MAX_PAIR_CHARS = 2_000


@dataclass
class Source:
    name: str  # prefix of relpaths: "stdlib" or the import name
    root: Path
    licence: str
    version: str


def licence_of(dist: str) -> str:
    """The licence a distribution declares (License-Expression, License, then classifiers)."""
    meta = metadata.metadata(dist)
    text = meta.get("License-Expression") or ""
    if not text or len(text) > 80:
        text = meta.get("License") or ""
    if not text or len(text) > 80:
        text = "; ".join(c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if "License ::" in c)
    return text.strip()


def permissive(licence: str) -> bool:
    words = [w for w in licence.replace("(", " ").replace(")", " ").replace(";", " ").split()
             if w not in ("OR", "AND", "License", "Software", "2.0", "OSI", "Approved")]
    return bool(words) and all(any(w.startswith(p) for p in PERMISSIVE) for w in words)


def sources() -> list[Source]:
    out = [Source("stdlib", STDLIB, "PSF-2.0", sys.version.split()[0])]
    for mod, dist in PACKAGES:
        try:
            lic = licence_of(dist)
            root = Path(__import__(mod).__file__).parent
        except Exception as e:  # noqa: BLE001 - a missing package is simply not part of the corpus
            print(f"skip {dist}: {type(e).__name__}", file=sys.stderr)
            continue
        if not permissive(lic):
            print(f"skip {dist}: licence {lic!r} is not MIT/BSD/Apache only", file=sys.stderr)
            continue
        out.append(Source(mod, root, lic, metadata.version(dist)))
    return out


def keep_file(path: Path, rel: Path) -> str | None:
    """The file's text if it is ordinary, parseable Python source worth training on."""
    if any(p in SKIP_DIRS for p in rel.parts[:-1]) or path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        text = path.read_text(encoding="utf-8")
        ast.parse(text)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None
    lines = text.splitlines()
    if len(text) < 200 or max(map(len, lines)) > MAX_LINE:
        return None
    if sum(ord(c) > 127 for c in text) > 0.01 * len(text):
        return None
    return text


def heldout(rel: str) -> bool:
    """Fixed split rule: a file is held out iff sha256(relpath) mod 1000 < HELDOUT_PER_MILLE."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 1000 < HELDOUT_PER_MILLE


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def code_and_chat(relpath: str, text: str, split: str) -> list[dict]:
    """The plain-code document of one file and its chat conversations."""
    docs = [{"split": split, "kind": "code", "source": relpath, "text": text}]
    for msgs in conversations(function_pairs(text)):
        docs.append({"split": split, "kind": "chat", "source": relpath, "messages": msgs})
    return docs


def heldout_documents(listing: list[dict]) -> tuple[list[dict], list[str]]:
    """Rebuild the held-out documents from a recorded list of {source, sha256}: (documents, missing).

    A file that is absent here or whose text differs (another Python or package version) is missing.
    """
    roots = {s.name: s.root for s in sources()}
    docs, missing = [], []
    for item in listing:
        name, _, rel = item["source"].partition("/")
        path = roots.get(name, Path("/nonexistent")) / rel
        text = path.read_text(encoding="utf-8") if path.is_file() else None
        if text is None or sha256(text) != item["sha256"]:
            missing.append(item["source"])
            continue
        docs += code_and_chat(item["source"], text, "heldout")
    return docs, missing


def function_pairs(text: str) -> list[dict]:
    """(user, assistant) pairs: user = signature + docstring as source, assistant = the body after it."""
    lines = text.splitlines()
    pairs = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        head = textwrap.dedent("\n".join(lines[start:doc.end_lineno]))
        body = textwrap.dedent("\n".join(lines[doc.end_lineno:node.end_lineno]))
        body = textwrap.indent(body, "    ")
        if not body.strip() or len(head) + len(body) > MAX_PAIR_CHARS:
            continue
        pairs.append({"user": head, "assistant": body})
    return pairs


def conversations(pairs: list[dict], per: int = 3) -> list[list[dict]]:
    convs = []
    for i in range(0, len(pairs), per):
        msgs = []
        for p in pairs[i : i + per]:
            msgs += [{"role": "user", "content": p["user"]}, {"role": "assistant", "content": p["assistant"]}]
        convs.append(msgs)
    return convs


def build(out: Path) -> dict:
    srcs = sources()
    summary = {"sources": [], "heldout_files": [], "counts": {}}
    counts = dict.fromkeys(("train_code", "heldout_code", "train_chat", "heldout_chat", "train_chars",
                            "heldout_chars"), 0)
    with out.open("w") as f:
        for src in srcs:
            n = 0
            for path in sorted(src.root.rglob("*.py")):
                rel = path.relative_to(src.root)
                if src.name == "stdlib" and rel.parts[0] == "test":
                    continue  # the stdlib test suite: mostly fixtures and data, not idiomatic code
                text = keep_file(path, rel)
                if text is None:
                    continue
                relpath = f"{src.name}/{rel.as_posix()}"
                split = "heldout" if heldout(relpath) else "train"
                if split == "heldout":
                    summary["heldout_files"].append({"source": relpath, "sha256": sha256(text), "chars": len(text)})
                for doc in code_and_chat(relpath, text, split):
                    f.write(json.dumps(doc) + "\n")
                    counts[f"{split}_{doc['kind']}"] += 1
                counts[f"{split}_chars"] += len(text)
                n += 1
            summary["sources"].append({"name": src.name, "version": src.version, "root": str(src.root),
                                       "licence": src.licence, "files": n})
    summary["counts"] = counts
    summary["rule"] = f"held out iff sha256(relpath) % 1000 < {HELDOUT_PER_MILLE}"
    summary["python"] = sys.version.split()[0]
    Path(str(out) + ".sources.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".demo_build/corpus.jsonl"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    s = build(args.out)
    for src in s["sources"]:
        print(f"{src['name']:20s} {src['licence'][:40]:40s} {src['files']:6d} files")
    print(json.dumps(s["counts"]))


if __name__ == "__main__":
    main()
