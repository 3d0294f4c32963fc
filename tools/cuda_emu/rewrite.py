"""Source rewriter: a CUDA .cu file -> host C++20 over tools/cuda_emu/cuda_emu.h.

What g++ cannot take as it is, and what the emulator needs to see:

* ``kernel<<<grid, block[, shmem[, stream]]>>>(args)``
  -> ``::emu::launch(kernel, __FILE__, __LINE__, grid, block[, shmem[, stream]])(args)``
* ``__global__ [__launch_bounds__(B)] void name(...) {``
  -> ``void name(...) { EMU_KERNEL_ENTRY(B);`` (the entry records the kernel and checks the block
  size against the launch bounds)
* ``__shared__ T a[n], b[m];`` (in a function) -> one heap allocation per variable and block:
  ``static ::emu::SharedSite s_a; ::emu::id<T[n]>& a = ::emu::shared_var<::emu::id<T[n]>>(s_a, "a");``
* ``extern __shared__ [__align__(k)] T buf[];`` -> ``T* buf = ::emu::dynamic_shared<T>();``
* ``TORCH_LIBRARY_IMPL(ns, CUDA, m) { m.impl(...) }`` -> ``TORCH_LIBRARY_FRAGMENT(<op namespace>,
  m) { m.def(...) }``: the host functions become CPU-tensor ops of their own namespace, their
  schema inferred from the C++ signature.
* includes of CUDA runtime headers (``ATen/cuda/*``, ``c10/cuda/*``, ``cuda_runtime*.h``) are
  commented out: tools/cuda_emu/emu_host.h stands in for them.

Everything else (execution-space keywords, intrinsics) is handled by macros and functions of
cuda_emu.h. Comments and string literals are never rewritten, and every rewrite keeps the line
count, so that compiler diagnostics and sanitizer reports point at the original lines (the
translation unit carries a ``#line 1 "<original path>"``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


class RewriteError(ValueError):
    pass


def code_mask(src: str) -> list[bool]:
    """True for characters of code, False inside comments and string / character literals."""
    mask = [True] * len(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                mask[k] = False
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                mask[k] = False
            i = j
        elif c in "\"'":
            # a digit separator (1'000) is not a literal
            if c == "'" and i > 0 and src[i - 1].isalnum():
                i += 1
                continue
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            for k in range(i, j):
                mask[k] = False
            i = j
        else:
            i += 1
    return mask


@dataclass
class _Edit:
    start: int
    end: int
    text: str


@dataclass
class Rewritten:
    text: str
    kernels: list[str] = field(default_factory=list)     # __global__ functions, in order
    launches: int = 0                                     # <<<...>>> sites
    shared: list[str] = field(default_factory=list)      # __shared__ variables
    ops: list[str] = field(default_factory=list)         # m.impl names registered
    includes: list[str] = field(default_factory=list)    # hoisted #include lines


def _match_close(src: str, mask, i: int, open_c: str, close_c: str) -> int:
    """Index just past the bracket closing the one at src[i] (code characters only)."""
    depth = 0
    for j in range(i, len(src)):
        if not mask[j]:
            continue
        if src[j] == open_c:
            depth += 1
        elif src[j] == close_c:
            depth -= 1
            if depth == 0:
                return j + 1
    raise RewriteError(f"unbalanced {open_c!r} at offset {i}")


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _keep_lines(old: str, new: str) -> str:
    """`new` padded with the newlines of `old` it lacks (rewrites never add lines)."""
    missing = old.count("\n") - new.count("\n")
    if missing < 0:
        raise RewriteError("rewrite would add lines")
    return new + "\n" * missing


def _in_code(mask, m: re.Match) -> bool:
    return all(mask[m.start():m.end()])


def _namespace_depths(src: str, mask) -> list[int]:
    """For each '{' position: whether it opens a namespace / extern "C" block (the rest are
    functions, classes or statements). Returned as the set of such offsets."""
    opens = set()
    for m in re.finditer(r'\b(namespace(\s+[\w:]+)?|extern\s+"C")\s*\{', src):
        brace = m.end() - 1
        if mask[brace]:
            opens.add(brace)
    return opens


def _scope_is_namespace(src: str, mask, pos: int, ns_braces: set) -> bool:
    stack = []
    for j in range(pos):
        if not mask[j]:
            continue
        if src[j] == "{":
            stack.append(j in ns_braces)
        elif src[j] == "}" and stack:
            stack.pop()
    return all(stack)


_INCLUDE_DROP = re.compile(
    r'^[ \t]*#[ \t]*include[ \t]*[<"](ATen/cuda/[^>"]*|c10/cuda/[^>"]*|cuda_runtime[^>"]*|cuda\.h)[>"]',
    re.M)


def rewrite(src: str, op_namespace: str = "fusedattn_emu", hoist_includes: bool = False
            ) -> Rewritten:
    """`hoist_includes`: comment out every #include and return them in `includes` (the caller
    puts them at global scope, so that the rewritten text can be wrapped in a namespace)."""
    mask = code_mask(src)
    edits: list[_Edit] = []
    out = Rewritten(text="")

    # -- includes of the CUDA runtime: commented out (emu_host.h provides what they declare)
    dropped = set()
    for m in _INCLUDE_DROP.finditer(src):
        if mask[m.start() + m.group(0).index("#")]:
            edits.append(_Edit(m.start(), m.start(), "// (cuda_emu) "))
            dropped.add(m.start())
    if hoist_includes:
        for m in re.finditer(r"^[ \t]*#[ \t]*include[^\n]*", src, re.M):
            if m.start() in dropped or not mask[m.start() + m.group(0).index("#")]:
                continue
            out.includes.append(m.group(0).strip())
            edits.append(_Edit(m.start(), m.start(), "// (cuda_emu: hoisted) "))

    # -- __global__ functions
    for m in re.finditer(r"\b__global__\b", src):
        if not _in_code(mask, m):
            continue
        i = m.end()
        bounds = "0"
        head_edits = [_Edit(m.start(), m.end(), "")]
        name = None
        while True:
            ws = re.compile(r"\s*").match(src, i)
            i = ws.end()
            lb = re.compile(r"__launch_bounds__\s*\(").match(src, i)
            if lb:
                close = _match_close(src, mask, lb.end() - 1, "(", ")")
                bounds = _split_top(src[lb.end():close - 1])[0].strip() or "0"
                head_edits.append(_Edit(i, close, _keep_lines(src[i:close], "")))
                i = close
                continue
            ident = re.compile(r"[A-Za-z_]\w*").match(src, i)
            if not ident:
                raise RewriteError(f"cannot parse the __global__ function at offset {m.start()}")
            j = re.compile(r"\s*").match(src, ident.end()).end()
            if j < len(src) and src[j] == "(":
                name = ident.group(0)
                paren = j
                break
            i = ident.end()
        close = _match_close(src, mask, paren, "(", ")")
        k = re.compile(r"\s*").match(src, close).end()
        edits.extend(head_edits)
        out.kernels.append(name)
        if src[k] == "{":
            edits.append(_Edit(k + 1, k + 1, f" EMU_KERNEL_ENTRY({bounds});"))
        elif src[k] != ";":
            raise RewriteError(f"__global__ {name}: expected a body or ';'")

    # -- __shared__ declarations
    ns_braces = _namespace_depths(src, mask)
    for m in re.finditer(r"\b__shared__\b", src):
        if not _in_code(mask, m):
            continue
        ext = re.compile(r"extern\s+$").search(src, 0, m.start())
        start = ext.start() if ext and all(mask[ext.start():m.start()]) else m.start()
        semi = start
        depth = 0
        for semi in range(m.end(), len(src)):
            if not mask[semi]:
                continue
            ch = src[semi]
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            elif ch == ";" and depth == 0:
                break
        decl = src[m.end():semi]
        if _scope_is_namespace(src, mask, start, ns_braces):
            raise RewriteError(f"__shared__ at namespace scope is not supported: {decl.strip()!r}")
        align = "0"
        am = re.search(r"__align__\s*\(([^)]*)\)", decl)
        if am:
            align = am.group(1).strip()
            decl = decl[:am.start()] + decl[am.end():]
        line = src.count("\n", 0, m.start()) + 1
        parts = [p.strip() for p in _split_top(" ".join(decl.split()))]
        first = re.match(r"(.*?)([A-Za-z_]\w*)\s*((\[[^\]]*\]\s*)*)$", parts[0])
        if not first:
            raise RewriteError(f"cannot parse __shared__ declaration {decl.strip()!r}")
        base = first.group(1).strip()
        if not base:
            raise RewriteError(f"__shared__ declaration without a type: {decl.strip()!r}")
        decls = [(first.group(2), first.group(3).strip())]
        for p in parts[1:]:
            d = re.match(r"(\**)\s*([A-Za-z_]\w*)\s*((\[[^\]]*\]\s*)*)$", p)
            if not d:
                raise RewriteError(f"cannot parse __shared__ declarator {p!r}")
            decls.append((d.group(1) + d.group(2), d.group(3).strip()))
        texts = []
        for name, dims in decls:
            stars = len(name) - len(name.lstrip("*"))
            name = name.lstrip("*")
            typ = base + "*" * stars
            out.shared.append(name)
            if ext and start != m.start():
                if dims.replace(" ", "") != "[]":
                    raise RewriteError(f"extern __shared__ {name}: expected an unsized array")
                texts.append(f"{typ}* {name} = ::emu::dynamic_shared<{typ}>();")
            else:
                t = f"::emu::id<{typ} {dims}>" if dims else f"::emu::id<{typ}>"
                site = f"emu_site_{name}_{line}"
                texts.append(f"static ::emu::SharedSite {site}; {t}& {name} = "
                             f"::emu::shared_var<{t}>({site}, \"{name}\");")
        edits.append(_Edit(start, semi + 1, _keep_lines(src[start:semi + 1], " ".join(texts))))

    # -- launches
    for m in re.finditer(r"<<<", src):
        if not _in_code(mask, m):
            continue
        close = src.find(">>>", m.end())
        while close >= 0 and not mask[close]:
            close = src.find(">>>", close + 3)
        if close < 0:
            raise RewriteError(f"unterminated <<< at offset {m.start()}")
        cfg = src[m.end():close]
        if len(_split_top(cfg)) not in (2, 3, 4):
            raise RewriteError(f"launch configuration {cfg!r}: expected 2 to 4 arguments")
        # the kernel expression: identifiers, ::, and template argument lists, read backwards
        k = m.start()
        while True:
            while k > 0 and src[k - 1].isspace():
                k -= 1
            if k > 0 and src[k - 1] == ">":
                depth, j = 0, k - 1
                while j >= 0:
                    if mask[j] and src[j] == ">":
                        depth += 1
                    elif mask[j] and src[j] == "<":
                        depth -= 1
                        if depth == 0:
                            break
                    j -= 1
                k = j
                continue
            ident = re.search(r"[A-Za-z_]\w*$", src[:k])
            if not ident:
                break
            k = ident.start()
            if src[:k].endswith("::"):
                k -= 2
                continue
            break
        kernel = src[k:m.start()]
        if not kernel.strip():
            raise RewriteError(f"launch without a kernel at offset {m.start()}")
        new = f"::emu::launch({kernel.strip()}, __FILE__, __LINE__, {cfg})"
        edits.append(_Edit(k, close + 3, _keep_lines(src[k:close + 3], new)))
        out.launches += 1

    # -- op registration: the CUDA impls become ops of their own namespace on CPU tensors
    for m in re.finditer(r"TORCH_LIBRARY_IMPL\s*\(\s*(\w+)\s*,\s*CUDA\s*,\s*(\w+)\s*\)\s*\{", src):
        if not _in_code(mask, m):
            continue
        var = m.group(2)
        body_end = _match_close(src, mask, m.end() - 1, "{", "}")
        edits.append(_Edit(m.start(), m.end(), f"TORCH_LIBRARY_FRAGMENT({op_namespace}, {var}) {{"))
        for im in re.finditer(rf"\b{var}\s*\.\s*impl\s*\(", src[m.end():body_end]):
            s = m.end() + im.start()
            if mask[s]:
                edits.append(_Edit(s, m.end() + im.end(), f"{var}.def("))
                name = re.match(r'\s*"(\w+)"', src[m.end() + im.end():])
                if name:
                    out.ops.append(name.group(1))

    edits.sort(key=lambda e: (e.start, e.end))
    for a, b in zip(edits, edits[1:]):
        if b.start < a.end:
            raise RewriteError(f"overlapping rewrites at offsets {a.start}, {b.start}")
    pieces, pos = [], 0
    for e in edits:
        pieces.append(src[pos:e.start])
        pieces.append(e.text)
        pos = e.end
    pieces.append(src[pos:])
    out.text = "".join(pieces)
    if out.text.count("\n") != src.count("\n"):
        raise RewriteError("internal: the rewrite changed the line count")
    return out


def global_functions(src: str) -> list[str]:
    """The names of the __global__ functions defined in a CUDA source (comments excluded)."""
    return rewrite(src).kernels
