"""The Metal text of a kernel instantiation checked as strictly as Metal's compiler, without a Mac.

libclang (the `libclang` wheel) parses it as C++ for OpenCL against kernel_shims/metal_opencl.h, where Metal's
address spaces are OpenCL's (device -> __global, constant -> __constant, threadgroup -> __local: distinct, with no
generic address space to convert to) and `half` / `bfloat` are keywords. MLX emits a kernel as a template over
its template arguments plus one explicit instantiation; OpenCL kernels cannot be templates, so the check text is
the same kernel with each template argument a constexpr int at the top of its body and no instantiation line:
the body, helpers and signature are MLX's text unchanged. On top of clang's errors, any declaration or macro the
kernel text makes with a Metal keyword or built-in type name is an error (Metal's vector types are typedefs in
the shim, which a name could shadow; in Metal they are reserved).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SHIM = Path(__file__).parent / "kernel_shims" / "metal_opencl.h"
ARGS = ["-x", "clcpp", "-cl-std=clc++2021", "-cl-no-stdinc", "-Xclang", "-cl-ext=-all,+cl_khr_fp16",
        "-Wno-unknown-attributes", "-include", str(SHIM)]

_SCALARS = ("bool", "char", "uchar", "short", "ushort", "int", "uint", "long", "ulong", "half", "float", "bfloat")
RESERVED = frozenset(
    {"device", "constant", "threadgroup", "threadgroup_imageblock", "thread", "ray_data", "object_data", "kernel",
     "vertex", "fragment", "visible", "stitchable", "half", "bfloat", "uint", "ushort", "uchar", "ulong",
     "sampler", "texture1d", "texture2d", "texture3d", "texturecube", "texture_buffer", "depth2d", "atomic_int",
     "atomic_uint", "atomic_float", "simdgroup_matrix", "metal"}
    | {f"{t}{n}" for t in _SCALARS for n in (2, 3, 4)}
    | {f"{t}{r}x{c}" for t in ("half", "float") for r in (2, 3, 4) for c in (2, 3, 4)}
)
_DECLS = ("VAR_DECL", "PARM_DECL", "FIELD_DECL", "FUNCTION_DECL", "TYPEDEF_DECL", "TYPE_ALIAS_DECL",
          "STRUCT_DECL", "CLASS_DECL", "ENUM_DECL", "ENUM_CONSTANT_DECL", "NAMESPACE", "FUNCTION_TEMPLATE",
          "TEMPLATE_NON_TYPE_PARAMETER", "TEMPLATE_TYPE_PARAMETER", "MACRO_DEFINITION")
_HEAD = re.compile(r"template <([^>]*)>\n\[\[kernel\]\] void (\w+)\(")


def available() -> bool:
    try:
        _index()
    except Exception:  # noqa: BLE001 - no wheel, or its library does not load here
        return False
    return True


@cache
def _index():
    import clang.cindex as ci

    return ci.Index.create()


def opencl_text(metal: str, template) -> str:
    """MLX's Metal text for one instantiation (template: its (name, value) pairs) as a plain OpenCL kernel."""
    m = _HEAD.search(metal)
    if m is None:
        raise ValueError("not an MLX kernel text: no `template <...> [[kernel]] void name(` header")
    start = metal.index(") {\n", m.end()) + len(") {\n")
    consts = "".join(f"  constexpr int {k} = {v};\n" for k, v in template)
    text = metal[: m.start()] + f"__kernel void {m.group(2)}(" + metal[m.end() : start] + consts + metal[start:]
    return re.sub(r"\ntemplate \[\[host_name\(.*\n", "\n", text)


def _parse(text: str):
    import clang.cindex as ci

    opts = ci.TranslationUnit.PARSE_DETAILED_PROCESSING_RECORD
    return _index().parse("kernel.cl", args=ARGS, unsaved_files=[("kernel.cl", text)], options=opts)


def _own(cursor) -> bool:
    loc = cursor.location
    return loc.file is not None and loc.file.name == "kernel.cl"


def problems(metal: str, template) -> list[str]:
    """What Metal would refuse in this instantiation's text: clang's errors, then reserved names declared."""
    tu = _parse(opencl_text(metal, template))
    out = [f"line {d.location.line}: {d.spelling}" for d in tu.diagnostics if d.severity >= 3]
    for c in tu.cursor.walk_preorder():
        if c.kind.name in _DECLS and c.spelling in RESERVED and _own(c):
            out.append(f"line {c.location.line}: {c.spelling!r} is a Metal keyword or type, declared here as a "
                       f"{c.kind.name.lower().replace('_', ' ')}")
    return out


def threadgroup_bytes(metal: str, template) -> int:
    """Bytes of threadgroup memory the instantiation declares (its __local variables' sizes)."""
    tu = _parse(opencl_text(metal, template))
    total = 0
    for c in tu.cursor.walk_preorder():
        if c.kind.name == "VAR_DECL" and _own(c) and "__local" in c.type.spelling:
            size = c.type.get_size()
            if size < 0:
                raise ValueError(f"line {c.location.line}: the size of {c.spelling} ({c.type.spelling}) is unknown")
            total += size
    return total
