"""Collective traffic of a compiled program, read from its optimised HLO text.

``collectives(compiled.as_text(), num_devices)`` walks the module from its entry computation
through every call (fusions, async wrappers, conditionals) and every ``while`` loop, whose body
counts once per trip: the trip count is the loop's ``known_trip_count`` where XLA records it,
else the integer bound its condition compares the induction variable against (what
``lax.scan`` / ``fori_loop`` lower to). XLA's own ``cost_analysis()`` counts a loop body once,
which is why a scanned 80-layer model reports a 80th of its traffic there.

Each collective contributes the bytes one device sends over the interconnect for it, by the
usual ring algorithms over a group of n devices: all-gather (n-1)/n of its result,
reduce-scatter (n-1)/n of its operand, all-reduce 2(n-1)/n of its operand, all-to-all (n-1)/n,
collective-permute all of it. A collective that TPU's compiler splits into start / in-flight /
done pieces (each carrying the same ``channel_id``) counts once. An ``all-reduce`` inside a
computation named ``all-reduce-scatter*`` (TPU's reduce-scatter fusion) counts as reduce-scatter.
"""

import collections
import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
  "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(
  r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?([^}]*?)\}?(?:,\s|$)"
)
_NAMES = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass
class Collective:
  """One collective kind's traffic per device: how many run per step and the bytes each
  device sends (algorithm factor applied) and the bytes of the tensors themselves."""

  count: int = 0
  bytes_sent: float = 0.0
  tensor_bytes: float = 0.0


def _array_bytes(type_text: str) -> list[float]:
  """Bytes of each array in an HLO type (``bf16[1,512]{...}`` or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _DTYPE_BYTES:
      size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      out.append(size * _DTYPE_BYTES[dtype])
  return out


def _group_size(attrs: str, num_devices: int) -> int:
  """Devices per replica group of a collective (its ``replica_groups`` in any of XLA's three
  spellings); all devices when absent."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", attrs)
  if m:  # mesh['axis_0'=2,'axis_1'=1] ... {'axis_0'}: the named axes' sizes
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    named = re.findall(r"'([^']+)'", m.group(2))
    if named and all(n in sizes for n in named):
      return math.prod(int(sizes[n]) for n in named)
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)  # iota: [groups, size]<=[...]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)  # explicit: {{0,1},{2,3}}
  if m and m.group(1).strip():
    return len(m.group(1).split(","))
  m = re.search(r"source_target_pairs=\{", attrs)
  return 2 if m else num_devices


def _parse(text: str) -> tuple[dict, str | None]:
  """{computation: [(name, type, op, rest)]} and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append(m.groups())
  return comps, entry


def _trip_count(rest: str, comps: dict) -> int:
  """Trips of a ``while`` (``known_trip_count``, else its condition's integer bound)."""
  m = re.search(r'known_trip_count"?\s*[:=]\s*\{?\s*"?n"?\s*[:=]\s*"?(\d+)', rest)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", rest)
  bounds = []
  for _, type_text, op, args in comps.get(cond.group(1), []) if cond else []:
    if op == "constant" and re.match(r"s(32|64)\[\]", type_text.strip()):
      bounds.append(int(re.match(r"\s*(-?\d+)", args).group(1)))
  return max(bounds) if len(bounds) == 1 and bounds[0] > 0 else 1


def loop_trips(text: str) -> list[int]:
  """The trip count of every ``while`` loop of the module (1 where it is only known at run
  time, e.g. the decode loop's)."""
  comps, _ = _parse(text)
  return [
    _trip_count(rest, comps)
    for instrs in comps.values()
    for _, _, op, rest in instrs
    if op == "while"
  ]


def collectives(text: str, num_devices: int) -> dict[str, Collective]:
  """Per-device collective traffic of one run of the module (see the module docstring).

  Args:
    text: the optimised HLO module (``compiled.as_text()``).
    num_devices: devices of the program (a collective without replica groups spans them).
  Returns:
    {kind: Collective} for each kind of ``KINDS`` (zero counts included).
  """
  comps, entry = _parse(text)
  out = {k: Collective() for k in KINDS}
  seen_channels: set[str] = set()
  multiplier: dict[str, int] = collections.defaultdict(int)

  def visit(comp: str, mult: int, depth: int = 0):
    if comp not in comps or depth > 64:
      return
    multiplier[comp] = max(multiplier[comp], mult)
    for _, type_text, op, rest in comps[comp]:
      base = op.removesuffix("-start").removesuffix("-done")
      if base in KINDS and not op.endswith("-done"):
        channel = re.search(r"channel_id=(\d+)", rest)
        key = f"{channel.group(1)}" if channel else None
        if key is None or key not in seen_channels:
          if key is not None:
            seen_channels.add(key)
          kind = (
            "reduce-scatter"
            if base == "all-reduce" and comp.startswith("all-reduce-scatter")
            else base
          )
          _add(out[kind], kind, type_text, rest, comps, comp, num_devices, mult)
      trips = _trip_count(rest, comps) if op == "while" else 1
      for group in _CALLS.findall(rest):
        for callee in _NAMES.findall(group) or [group.strip()]:
          if op == "while" and re.search(rf"condition=%?{re.escape(callee)}\b", rest):
            continue  # the condition holds no collectives
          visit(callee, mult * trips, depth + 1)

  if entry is not None:
    visit(entry, 1)
  return out


def _add(c: Collective, kind: str, type_text: str, rest: str, comps, comp, n_all, mult) -> None:
  """Adds one collective: its tensor's bytes and the bytes one device sends for it."""
  sizes = _array_bytes(type_text)
  if not sizes:
    return
  n = max(1, _group_size(rest, n_all))
  if kind == "reduce-scatter" and not comp.startswith("all-reduce-scatter"):
    size = max(sizes) * n  # its result is 1/n of the operand it reduces
  else:
    size = max(sizes)  # an async start's tuple holds operand and result: the larger
  factor = {
    "all-gather": (n - 1) / n,
    "reduce-scatter": (n - 1) / n,
    "all-reduce": 2 * (n - 1) / n,
    "all-to-all": (n - 1) / n,
    "collective-permute": 1.0,
  }[kind]
  c.count += mult
  c.tensor_bytes += mult * size
  c.bytes_sent += mult * size * factor


# Ops that move no HBM bytes of their own (bookkeeping, control flow whose bodies are
# counted where they are called, and fusions' parameters).
_FREE = {
  "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
  "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
}  # fmt: skip


def hbm_bytes(text: str) -> float:
  """Bytes one device moves between HBM and the cores in one run of the module: for every
  instruction of the computations it runs (loop bodies once per trip; a fusion is one kernel:
  its operands read, its result written), the bytes of its result and operands. A slice reads
  only its slice: a ``dynamic-slice`` counts its result twice, a ``dynamic-update-slice`` its
  update twice (the buffer is updated in place), and a fusion parameter that the fusion only
  slices counts its slices. An estimate of what XLA's "bytes accessed" counts, without its
  loop flaw; the roofline's HBM term.
  """
  comps, entry = _parse(text)
  types = {c: {name: t for name, t, _, _ in instrs} for c, instrs in comps.items()}
  total = 0.0

  def visit(comp: str, mult: float, depth: int = 0):
    nonlocal total
    if comp not in comps or depth > 64:
      return
    for name, type_text, op, rest in comps[comp]:
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest)
        if body:
          visit(body.group(1), mult * _trip_count(rest, comps), depth + 1)
        continue
      if op in ("call", "conditional"):
        for group in _CALLS.findall(rest):
          for callee in _NAMES.findall(group):
            visit(callee, mult, depth + 1)
        continue
      if op in _FREE or op.endswith("-done"):
        continue
      total += mult * _instr_bytes(comp, type_text, op, rest, types, comps)

  if entry is not None:
    visit(entry, 1.0)
  return total


def _operands(rest: str) -> list[str]:
  """The operand names of an instruction (the ``%names`` before its closing parenthesis)."""
  return _NAMES.findall(rest.split(")", 1)[0])


def _instr_bytes(comp, type_text, op, rest, types, comps) -> float:
  out = sum(_array_bytes(type_text))
  operands = _operands(rest)
  sizes = [sum(_array_bytes(types[comp].get(o, ""))) for o in operands]
  if op == "dynamic-slice":
    return 2 * out
  if op == "dynamic-update-slice":
    return 2 * (sizes[1] if len(sizes) > 1 else out)
  if op != "fusion":
    return out + sum(sizes)
  called = re.search(r"calls=%?([\w.\-]+)", rest)
  body = comps.get(called.group(1), []) if called else []
  params = {}  # parameter index -> name inside the fusion
  for name, _, fop, fargs in body:
    if fop == "parameter":
      params[int(re.match(r"\s*(\d+)", fargs).group(1))] = name
  read = 0.0
  for i, size in enumerate(sizes):
    pname = params.get(i)
    users = [(fop, fargs) for _, _, fop, fargs in body if pname and pname in _operands(fargs)]
    sliced = users and all(fop == "dynamic-slice" for fop, _ in users)
    in_place = any(
      fop == "dynamic-update-slice" and _operands(a)[:1] == [pname] for fop, a in users
    )
    if sliced:
      read += sum(
        sum(_array_bytes(t))
        for n, t, fop, a in body
        if fop == "dynamic-slice" and pname in _operands(a)
      )
    elif not in_place:
      read += size
  root_dus = [a for _, _, fop, a in body if fop == "dynamic-update-slice"]
  if root_dus and out >= max(sizes, default=0):  # an in-place update: only the update is written
    names = {n: t for n, t, _, _ in body}
    out = sum(
      sum(_array_bytes(names.get(_operands(a)[1], ""))) for a in root_dus if len(_operands(a)) > 1
    )
  return out + read
