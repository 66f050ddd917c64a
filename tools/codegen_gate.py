"""Codegen gate: no register transpose may feed a tensor-core product on Hopper (sm_90).

The rule. In the TTGIR that Triton builds for sm_90 (`compiled.asm["ttgir"]`), a launch fails
the gate when it holds a 2-D `tt.trans` (a transpose of a tensor in registers) such that

- its operand sits in a register layout other than `#ttg.blocked`: an MMA accumulator layout
  (`#ttg.nvidia_mma`), a `#ttg.linear` layout, a dot-operand or slice layout; or
- its result reaches an operand A or B of a dot (`tt.dot`, `ttng.warp_group_dot`,
  `ttng.tc_gen5_mma`; a `tt.dot` that Triton lowers to FMA, fp32 with ieee precision, counts
  too: the register shuffling into its operand layout is the same kind of conversion, and each
  finding says which kind of dot it reaches), directly or through any chain of layout
  conversions (`ttg.convert_layout`), casts (`arith.truncf` / `extf` / `bitcast`,
  `tt.fp_to_fp`, `tt.bitcast`), elementwise arithmetic (`arith.*`, `math.*`, the data operands
  of `arith.select`), ops that only move values (`tt.reshape`, `tt.broadcast`, `tt.join`, ...),
  a trip through shared memory (`ttg.local_alloc` / `ttg.local_store`, any `ttg.memdesc_*`
  view, `ttg.local_load`; tensor memory likewise), or the values carried by `scf.if` /
  `scf.for` results and loop arguments and by branches between blocks.

A transpose that stays on a shared-memory descriptor (`ttg.memdesc_trans`, what Triton makes of
`tl.trans` of a tile loaded from memory when it can) is fine, and so is a blocked-layout
transpose whose result goes to memory or to non-dot arithmetic.

Why. Triton 3.2 to 3.6 miscompile on sm_90 a tensor that is transposed in registers with
`tl.trans` and then fed to `tl.dot`: the wgmma operand gets the wrong elements, and gradients
come out wrong without any error (flash-linear-attention issue #640, fixed there by PR #826,
which loads the transposed operand from memory instead; triton issue #6124). The fix on the
kernel side is to load such operands from memory with transposed addressing, or to compute the
transposed product directly (S^T = K Q^T rather than trans(Q K^T)). Which `tl.trans` in the
source ends up as a register transpose depends on the dtype (16-bit operands can be transposed
by the wgmma shared-memory descriptor, tf32 ones cannot), the tiles and the flags, so the gate
looks at the compiled IR of every recorded launch rather than at the source, and it runs with
each Triton version the GPUs use (tests/test_codegen_gate.py; the full configuration matrix in
`python -m bench.compile_report`).

Each finding names the source line of the `tl.trans` (TTGIR `loc(#locN)` references resolved
through inlined call sites to the innermost file:line, with the call chain), the layouts, and the
dot it reaches; `aot_compile.measure_record` stores them in its rows (computed in the process
that compiled, so with that process's Triton) for the targets in GATE_TARGETS.

The IR is read as text: one operation per line, regions opened by a line ending in "{" and
closed by a line starting with "}", as MLIR prints it. Values are followed forwards from each
`tt.trans` result; the analysis over-approximates (a shared buffer written anywhere by a
transposed value counts for every dot that reads that buffer), which a gate may do.
"""

import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

#: The targets whose compiles the gate checks ("cuda:<capability>", aot_compile's target names).
GATE_TARGETS = ("cuda:90",)

#: Products on the tensor cores and the operand positions that are their A and B inputs
#: (None: every operand).
DOT_OPERANDS = {
    "tt.dot": (0, 1),
    "ttng.warp_group_dot": (0, 1),
    "ttng.tc_gen5_mma": (0, 1),
    "tt.dot_scaled": None,
}

#: Operations (besides arith.*, math.* and the ttg.memdesc_* views) whose results carry their
#: operands' values: layout conversions, casts, elementwise ops, ops that only move the values
#: (reshape, broadcast, join, ...), and the trips through shared or tensor memory.
_VALUE_PRESERVING = {
    "ttg.convert_layout",
    "tt.fp_to_fp",
    "tt.bitcast",
    "tt.clampf",
    "tt.precise_sqrt",
    "tt.precise_divf",
    "tt.mulhiui",
    "tt.extern_elementwise",
    "tt.elementwise_inline_asm",
    "tt.trans",
    "tt.reshape",
    "tt.broadcast",
    "tt.expand_dims",
    "tt.join",
    "tt.split",
    "tt.cat",
    "ttg.local_alloc",
    "ttg.local_load",
    "ttng.tmem_alloc",
    "ttng.tmem_load",
}

#: Operations that write their first operand into the buffer (view) given as their second.
_STORES = {"ttg.local_store", "ttng.tmem_store"}

#: Comparisons make masks, not data: their results do not carry a transposed operand's values.
_MASK_MAKING = {"arith.cmpf", "arith.cmpi"}

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VALUE = r"%[\w.$-]+(?:#\d+)?"
_OP_LINE = re.compile(
    r'^\s*(?:(?P<results>%[^=]+?)\s*=\s*)?(?P<name>"[\w.]+"|[a-z_]\w*\.[\w.]+)'
    r"(?P<rest>.*)$"
)
_BLOCK_LABEL = re.compile(r"^\s*\^(?P<name>[\w.$-]+)(?:\((?P<args>.*)\))?\s*:")
_ALIAS = re.compile(r"^#(?P<alias>[\w.$-]+)\s*=\s*#(?P<kind>[\w]+\.[\w]+)<")
_LOC_DEF = re.compile(r"^#(?P<name>loc\d*)\s*=\s*loc\((?P<body>.*)\)\s*$")
_FILE_LOC = re.compile(r'^"(?P<file>[^"]*)":(?P<line>\d+)(?::\d+)?')


@dataclass
class RegisterTranspose:
    """One `tt.trans` the gate rejects."""

    source: str  # file:line of the tl.trans (innermost frame), repository-relative
    called_from: list  # the call sites it was inlined through, innermost first
    operand_layout: str  # e.g. "linear", "nvidia_mma", "blocked"
    result_layout: str
    shape: list  # the operand's shape
    reasons: list  # why it fails (one or both rules)
    dots: list = field(default_factory=list)  # "ttng.warp_group_dot operand A at file:line"
    ttgir_line: int = 0  # 1-based line in the TTGIR text

    def describe(self) -> str:
        """One line: source, layouts, reasons."""
        via = f" (inlined at {', '.join(self.called_from)})" if self.called_from else ""
        shape = "x".join(map(str, self.shape))
        return (
            f"{self.source}{via}: tt.trans of a {shape} tensor, {self.operand_layout} -> "
            f"{self.result_layout} layout: {'; '.join(self.reasons)}"
        )


# --------------------------------------------------------------------------------------------
# Small text helpers
# --------------------------------------------------------------------------------------------

_OPEN, _CLOSE = "<([{", ">)]}"


def _split_top_level(text: str, separator: str) -> list:
    """`text` split at `separator` where no bracket (<([{) is open."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE and not (c == ">" and i > 0 and text[i - 1] == "-"):
            depth -= 1
        elif depth == 0 and text.startswith(separator, i):
            parts.append(text[start:i])
            i += len(separator)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _strip_location(text: str) -> tuple:
    """(text without its trailing ` loc(...)`, the loc body or None)."""
    index = text.rfind(" loc(")
    if index < 0 or not text.rstrip().endswith(")"):
        return text, None
    return text[:index], text[index + 5 : text.rstrip().rfind(")")]


def _types_of(rest: str) -> tuple:
    """(operand types, result types) of an op's `: T1, T2 -> T3` signature (strings)."""
    body, _ = _strip_location(rest)
    parts = _split_top_level(body, " : ")
    if len(parts) < 2:
        return [], []
    signature = parts[-1]
    sides = _split_top_level(signature, " -> ")
    operands = _split_top_level(sides[0].strip("()"), ", ") if sides[0] else []
    results = _split_top_level(sides[1].strip("()"), ", ") if len(sides) > 1 else []
    return operands, results


def _tensor_type(type_text: str):
    """(shape, encoding text) of `tensor<AxBxT, #enc>`, or None for any other type."""
    m = re.match(r"^tensor<(?P<body>.*)>$", type_text.strip())
    if not m:
        return None
    parts = _split_top_level(m.group("body"), ", ")
    dims = parts[0].split("x")[:-1]
    if not all(d.isdigit() for d in dims):
        return None
    return [int(d) for d in dims], (parts[1] if len(parts) > 1 else "")


# --------------------------------------------------------------------------------------------
# The module: values, their flow, the transposes and the dots
# --------------------------------------------------------------------------------------------


@dataclass
class _Op:
    name: str
    line: int  # 1-based
    results: list
    operands: list
    rest: str
    location: str = None  # the loc body, e.g. "#loc12"
    iter_args: list = field(default_factory=list)  # scf.for region arguments
    successors: list = field(default_factory=list)  # (block, values passed) of a branch


class _Module:
    """The parts of a TTGIR module the gate needs: layout aliases, locations, ops, value flow."""

    def __init__(self, ttgir: str):
        self.layouts = {}  # alias ("mma2") -> kind ("nvidia_mma")
        self.layout_text = {}  # alias -> its definition line
        self.locations = {}  # "#loc12" -> loc body
        self.ops = []
        self.flows = defaultdict(set)  # value -> values that carry it
        self.dot_uses = defaultdict(list)  # value -> [(dot op, operand index)]
        self.block_args = {}  # block name -> [values]
        self._stores = []  # shared-memory views written by ttg.local_store
        self._defined = 0
        self._parse(ttgir.splitlines())

    # -- parsing ---------------------------------------------------------------------------
    # MLIR scopes value names by region (sibling regions reuse names), so every definition gets
    # a unique id ("%x@7"; result i of a multi-result op "%x@7#i") looked up innermost first.
    def _define(self, scopes, name: str) -> str:
        self._defined += 1
        scopes[-1][name] = f"{name}@{self._defined}"
        return scopes[-1][name]

    @staticmethod
    def _use(scopes, token: str) -> str:
        name, _, index = token.partition("#")
        for scope in reversed(scopes):
            if name in scope:
                return scope[name] + (f"#{index}" if index else "")
        return f"{token}@?"  # defined later in the text (a block argument) or outside

    def _parse(self, lines):
        region_owners = []  # the op whose region each open "{" belongs to
        scopes = [{}]
        branches = []  # (values, block name) of cf.br / cf.cond_br successors
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if m := _LOC_DEF.match(stripped):
                self.locations["#" + m.group("name")] = m.group("body")
                continue
            if m := _ALIAS.match(stripped):
                self.layouts[m.group("alias")] = m.group("kind").split(".", 1)[1]
                self.layout_text[m.group("alias")] = stripped
                continue
            op = None
            closes = stripped.startswith("}")
            if m := _BLOCK_LABEL.match(stripped):
                names = re.findall(rf"({_VALUE})\s*:", m.group("args") or "")
                self.block_args[m.group("name")] = [self._define(scopes, n) for n in names]
            elif not closes and (m := _OP_LINE.match(line)):
                op = self._parse_op(m, number, scopes)
                self.ops.append(op)
                self._add_flows(op, region_owners, branches)
            if closes and len(region_owners) > 0:
                owner = region_owners.pop()
                scopes.pop()
                if stripped.endswith("{"):  # "} else {", "} do {"
                    region_owners.append(owner)
                    scopes.append({})
            elif stripped.endswith("{"):
                region_owners.append(op)
                scopes.append({})
                if op is not None and op.name == "scf.for":  # region arguments
                    op.iter_args = [self._define(scopes, n) for n in op.iter_args]
                    for init, arg in zip(op.operands, op.iter_args):
                        self.flows[init].add(arg)
        for values, block in branches:
            for value, arg in zip(values, self.block_args.get(block, [])):
                self.flows[value].add(arg)

    def _parse_op(self, m, number, scopes) -> _Op:
        name = m.group("name").strip('"')
        rest = m.group("rest")
        body, location = _strip_location(rest)
        op = _Op(name, number, [], [], rest, location)
        if name == "scf.for":
            m_iter = re.search(r"iter_args\((.*?)\)\s*(?:->|:|\{)", body)
            pairs = re.findall(rf"({_VALUE})\s*=\s*({_VALUE})", m_iter.group(1)) if m_iter else []
            op.iter_args = [arg for arg, _ in pairs]  # defined when the body opens
            op.operands = [self._use(scopes, init) for _, init in pairs]
        else:
            # Operands are the %values before the type signature (types and attributes
            # hold none); the attribute and region text after them holds none either.
            tokens = re.findall(_VALUE, _split_top_level(body, " : ")[0])
            op.operands = [self._use(scopes, token) for token in tokens]
        for block, args in re.findall(r"\^([\w.$-]+)(?:\(([^)]*)\))?", body):
            tokens = re.findall(_VALUE, _split_top_level(args, " : ")[0]) if args else []
            op.successors.append((block, [self._use(scopes, token) for token in tokens]))
        for token in _split_top_level(m.group("results") or "", ","):
            if not token:
                continue
            base, _, count = token.partition(":")
            unique = self._define(scopes, base)
            count = int(count) if count.isdigit() else 1
            op.results += [unique] if count == 1 else [f"{unique}#{i}" for i in range(count)]
        return op

    def _add_flows(self, op: _Op, region_owners, branches):
        name = op.name
        if name in DOT_OPERANDS:
            positions = DOT_OPERANDS[name]
            for index, value in enumerate(op.operands):
                if positions is None or index in positions:
                    self.dot_uses[value].append((op, index))
        if name == "scf.yield" or name == "scf.condition":
            owner = region_owners[-1] if region_owners else None
            values = op.operands[1:] if name == "scf.condition" else op.operands
            if owner is not None:
                for index, value in enumerate(values):
                    targets = []
                    if index < len(owner.results):
                        targets.append(owner.results[index])
                    if index < len(owner.iter_args):
                        targets.append(owner.iter_args[index])
                    self.flows[value].update(targets)
        elif name in ("cf.br", "cf.cond_br"):
            branches += [(values, block) for block, values in op.successors]
        elif name in _STORES and len(op.operands) >= 2:
            self.flows[op.operands[0]].add(op.operands[1])
            self._stores.append(op.operands[1])
        elif name == "arith.select":
            for value in op.operands[1:]:
                self.flows[value].update(op.results)
        elif name not in _MASK_MAKING and (
            name.startswith(("arith.", "math.", "ttg.memdesc_")) or name in _VALUE_PRESERVING
        ):
            for value in op.operands:
                self.flows[value].update(op.results)

    # -- queries ---------------------------------------------------------------------------
    def layout_kind(self, encoding: str) -> str:
        """ "blocked", "linear", "nvidia_mma", "dot_op", "slice", ... of an encoding text."""
        if not encoding:
            return "none"
        if m := re.match(r"^#(\w+)\.(\w+)<", encoding):
            return m.group(2)
        return self.layouts.get(encoding.lstrip("#"), encoding.lstrip("#"))

    def dot_kind(self, op: _Op) -> str:
        """What runs a dot: "wgmma" (Hopper warpgroup MMA), "mma v2" (warp-level MMA), "MFMA",
        "tcgen05" (Blackwell), or "FMA" (no tensor cores: fp32 with ieee precision)."""
        if op.name == "ttng.warp_group_dot":
            return "wgmma"
        if op.name == "ttng.tc_gen5_mma":
            return "tcgen05"
        _, results = _types_of(op.rest)
        result = _tensor_type(results[0]) if results else None
        encoding = result[1] if result else ""
        kind = self.layout_kind(encoding)
        if kind == "nvidia_mma":
            text = self.layout_text.get(encoding.lstrip("#"), encoding)
            version = re.search(r"versionMajor = (\d+)", text)
            return "wgmma" if version and version.group(1) == "3" else "mma v2"
        return {"amd_mfma": "MFMA", "amd_wmma": "WMMA", "blocked": "FMA"}.get(kind, kind)

    def frames(self, location: str, depth: int = 0) -> list:
        """The file:line frames of a loc body, innermost first (inlined call sites after)."""
        if location is None or depth > 64:
            return []
        location = location.strip()
        if location.startswith("#"):
            return self.frames(self.locations.get(location), depth + 1)
        if m := _FILE_LOC.match(location):
            return [(m.group("file"), int(m.group("line")))]
        if m := re.match(r'^"[^"]*"\((?P<inner>.*)\)$', location):  # named location
            return self.frames(m.group("inner"), depth + 1)
        if m := re.match(r"^callsite\((?P<body>.*)\)$", location):
            callee, _, caller = m.group("body").partition(" at ")
            return self.frames(callee, depth + 1) + self.frames(caller, depth + 1)
        if m := re.match(r"^fused(?:<[^>]*>)?\[(?P<body>.*)\]$", location):
            for part in _split_top_level(m.group("body"), ","):
                if found := self.frames(part, depth + 1):
                    return found
        return []

    def where(self, op: _Op) -> list:
        """Repository-relative "file:line" frames of an op, innermost first."""
        return [f"{_relative(path)}:{line}" for path, line in self.frames(op.location)]

    def _buffer_roots(self, value, views) -> set:
        """The shared buffer(s) a memdesc value views (through ttg.memdesc_* ops)."""
        roots, stack, seen = set(), [value], set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            sources = views.get(v)
            if sources:
                stack.extend(sources)
            else:
                roots.add(v)
        return roots

    def dots_reached(self, start) -> list:
        """The (dot op, operand index) pairs that `start`'s value reaches."""
        views = {}
        for op in self.ops:
            if op.name.startswith("ttg.memdesc_") and op.operands:
                for result in op.results:
                    views[result] = [op.operands[0]]
        # A value stored into a view of a buffer reaches every reader of that buffer.
        store_roots = {view: self._buffer_roots(view, views) for view in self._stores}
        reached, seen, stack = [], set(), [start]
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            reached += self.dot_uses.get(value, [])
            stack.extend(self.flows.get(value, ()))
            stack.extend(store_roots.get(value, ()))
        return reached


def _relative(path: str) -> str:
    """`path` relative to the repository root. A path under another checkout of the repository
    (Triton's cache keys a kernel by its source text, not its file, so a cached compile may
    name another worktree's copy) becomes the longest tail that names a file here."""
    absolute = os.path.abspath(path)
    if absolute.startswith(_REPO_ROOT + os.sep):
        return os.path.relpath(absolute, _REPO_ROOT)
    parts = absolute.split(os.sep)
    for start in range(1, len(parts)):
        tail = os.path.join(*parts[start:])
        if os.path.isfile(os.path.join(_REPO_ROOT, tail)):
            return tail
    return path


_OPERAND_NAMES = {0: "A", 1: "B"}


def analyse(ttgir: str) -> tuple:
    """(the `RegisterTranspose`s of a TTGIR module, the number of 2-D register `tt.trans` it
    holds, rejected or not); see the module docstring for the rule."""
    module = _Module(ttgir)
    findings, examined = [], 0
    for op in module.ops:
        if op.name != "tt.trans" or not op.operands or not op.results:
            continue
        operand_types, result_types = _types_of(op.rest)
        operand = _tensor_type(operand_types[0]) if operand_types else None
        if operand is None:  # a shared-memory descriptor (older Triton)
            continue
        shape, encoding = operand
        if len(shape) != 2:
            continue
        examined += 1
        result = _tensor_type(result_types[0]) if result_types else None
        operand_kind = module.layout_kind(encoding)
        result_kind = module.layout_kind(result[1]) if result else "unknown"
        reasons = []
        if operand_kind != "blocked":
            reasons.append(f"operand in a {operand_kind} register layout")
        if result_kind == "dot_op":
            reasons.append("result in a dot-operand register layout")
        dots = []
        for dot, index in module.dots_reached(op.results[0]):
            frames = module.where(dot)
            at = f" at {frames[0]}" if frames else ""
            dots.append(
                f"{dot.name} ({module.dot_kind(dot)}) operand "
                f"{_OPERAND_NAMES.get(index, index)}{at} (TTGIR line {dot.line})"
            )
        if dots:
            reasons.append("result reaches a dot operand")
        if not reasons:
            continue
        frames = module.where(op) or [f"<unknown location> (TTGIR line {op.line})"]
        findings.append(
            RegisterTranspose(
                source=frames[0],
                called_from=frames[1:],
                operand_layout=operand_kind,
                result_layout=result_kind,
                shape=shape,
                reasons=reasons,
                dots=sorted(set(dots)),
                ttgir_line=op.line,
            )
        )
    return findings, examined


def find_register_transposes(ttgir: str) -> list:
    """The `RegisterTranspose`s of a TTGIR module: what the gate rejects."""
    return analyse(ttgir)[0]


def check_ttgir(ttgir: str) -> tuple:
    """(the gate's findings as JSON-ready dicts, the number of 2-D register transposes looked
    at) for the TTGIR of a compile (`compiled.asm["ttgir"]`, aot_compile.compile_to_ttgir)."""
    findings, examined = analyse(ttgir)
    return [asdict(f) for f in findings], examined


# --------------------------------------------------------------------------------------------
# Over rows of tools.aot_compile.measure_record
# --------------------------------------------------------------------------------------------

#: One paragraph for reports.
RULE_SUMMARY = (
    "Triton 3.2-3.6 miscompile on sm_90 a tensor transposed in registers (`tl.trans`) and fed "
    "to `tl.dot` (wrong wgmma operands, silently wrong gradients: flash-linear-attention #640 / "
    "PR #826, triton #6124). The gate (tools/codegen_gate.py) rejects every launch whose sm_90 "
    "TTGIR holds a 2-D `tt.trans` whose operand is in a non-blocked register layout (MMA, "
    "linear, ...) or whose result reaches operand A or B of a dot (wgmma, mma v2, or FMA for "
    "fp32 at ieee precision: each finding says which) through "
    "layout conversions, casts, elementwise ops, shared memory or control flow; "
    "`ttg.memdesc_trans` (a transposed shared-memory descriptor) is fine."
)


def checked_rows(rows) -> list:
    """The rows the gate looked at (compiled for a GATE_TARGETS target)."""
    return [r for r in rows if r.get("codegen_findings") is not None]


def flagged_rows(rows) -> list:
    """The rows with at least one finding."""
    return [r for r in rows if r.get("codegen_findings")]


def source_lines(rows) -> list:
    """The distinct source lines (file:line) of every finding in `rows`, sorted."""
    return sorted(
        {f["source"] for r in flagged_rows(rows) for f in r["codegen_findings"]},
        key=lambda s: (
            s.rsplit(":", 1)[0],
            int(s.rsplit(":", 1)[1]) if s.rsplit(":", 1)[-1].isdigit() else 0,
        ),
    )


def _versions(rows) -> str:
    return ", ".join(sorted({r["triton"] for r in rows})) or "-"


def summary_line(rows) -> str:
    """ "**Codegen gate PASS** ..." or "**Codegen gate FAIL** ..." for `rows`."""
    checked = checked_rows(rows)
    if not checked:
        return "Codegen gate: no launch was compiled for " + ", ".join(GATE_TARGETS) + "."
    flagged = flagged_rows(checked)
    targets = ", ".join(sorted({r["arch"] for r in checked}))
    if not flagged:
        return (
            f"**Codegen gate PASS**: none of the {len(checked)} launches compiled for "
            f"{targets} (Triton {_versions(checked)}) transposes a register tensor into a "
            "tensor-core product."
        )
    lines = source_lines(flagged)
    by_dtype = {}
    for r in checked:
        dtype = _element_type(r)
        by_dtype.setdefault(dtype, [0, 0])
        by_dtype[dtype][0] += bool(r["codegen_findings"])
        by_dtype[dtype][1] += 1
    split = ", ".join(f"{dtype}: {n} of {total}" for dtype, (n, total) in sorted(by_dtype.items()))
    return (
        f"**Codegen gate FAIL**: {len(flagged)} of {len(checked)} launches compiled for "
        f"{targets} (Triton {_versions(checked)}) transpose a register tensor into a "
        f"tensor-core product ({split}), at {len(lines)} source line(s): "
        + ", ".join(f"`{s}`" for s in lines)
        + "."
    )


def _element_type(row) -> str:
    """The first floating-point pointer element type of a row's launch ("bf16", "fp32")."""
    for ty in row["record"]["signature"].values():
        if ty.startswith("*") and ty[1:] in ("fp16", "bf16", "fp32", "fp64"):
            return ty[1:]
    return "-"


def findings_table(rows) -> list:
    """Markdown lines: one row per source line found, with the kernels, layouts, the dots it
    reaches, the number of launches and the configs (row["configs"], when the rows carry them)."""
    flagged = flagged_rows(rows)
    if not flagged:
        return []
    by_source = {}
    for r in flagged:
        for f in r["codegen_findings"]:
            entry = by_source.setdefault(
                f["source"], dict(kernels=set(), layouts=set(), dots=set(), rows={}, configs=set())
            )
            entry["kernels"].add(r["record"]["kernel_name"])
            entry["layouts"].add(f"{f['operand_layout']} -> {f['result_layout']}")
            entry["dots"].update(d.split(" (TTGIR")[0] for d in f["dots"])
            entry["rows"][id(r)] = r
            entry["configs"].update(r.get("configs", []))
    lines = [
        ("| source line (tl.trans) | kernel | layouts | reaches | launches (dtypes) | configs |"),
        "|---|---|---|---|---|---|",
    ]
    for source in source_lines(flagged):
        e = by_source[source]
        dtypes = sorted({_element_type(r) for r in e["rows"].values()})
        configs = sorted(e["configs"])
        shown = "; ".join(configs[:6]) + (
            f"; ... ({len(configs)} in all)" if len(configs) > 6 else ""
        )
        lines.append(
            f"| `{source}` | {', '.join(f'`{k}`' for k in sorted(e['kernels']))} | "
            f"{', '.join(sorted(e['layouts']))} | "
            f"{'<br>'.join(sorted(e['dots'])) or '-'} | "
            f"{len(e['rows'])} ({', '.join(dtypes)}) | {shown or '-'} |"
        )
    return lines + [""]


def describe_findings(rows, limit: int = 40) -> str:
    """Plain text, one block per flagged launch (kernel, target, Triton, constexprs, configs,
    each finding with the dots it reaches): what a failing test prints."""
    from tools.aot_compile import constexpr_label

    blocks = []
    for r in flagged_rows(rows)[:limit]:
        head = (
            f"{r['record']['kernel_name']} on {r['arch']}, Triton {r['triton']}, "
            f"{_element_type(r)} [{constexpr_label(r['record']['constexprs'])}]"
        )
        if r.get("configs"):
            head += f"\n  configs: {'; '.join(r['configs'])}"
        for f in r["codegen_findings"]:
            finding = RegisterTranspose(**f)
            head += f"\n  {finding.describe()}"
            head += "".join(f"\n    -> {d}" for d in finding.dots)
        blocks.append(head)
    more = len(flagged_rows(rows)) - limit
    return "\n".join(blocks) + (f"\n... and {more} more flagged launches" if more > 0 else "")
