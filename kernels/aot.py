"""patchkit's Triton kernels compiled ahead of time for real GPUs, on a machine without one.

`record()` runs every op of the `triton` provider, forward and backward, on `meta` tensors at the shapes real
models give them, with a stand-in Triton driver active: each launch binds and specialises its arguments exactly
as on a GPU (dtypes, 16-byte divisibility, integer widths, constexprs, warps) and is recorded instead of being
compiled and run. So the kernels checked are the ones the ops launch, with the arguments they launch them with.
`compile_launch()` then compiles one for a `GPUTarget` (NVIDIA's with the triton wheel's `ptxas`) and reads its
registers and spills. Kernels must be compiled, not interpreted: run this where TRITON_INTERPRET is unset
(`python -m patchkit.kernels.aot` prints the table docs/kernels.md holds).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
TOKENS = 8192  # rows of a realistic training step (batch x sequence)


@dataclass
class Launch:
    kernel: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    device: int  # the device Triton launched on (the current one)
    cases: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        return self.name, *(repr(sorted(d.items(), key=repr)) for d in (self.signature, self.constexprs, self.attrs)),\
            self.options.get("num_warps")

    def describe(self) -> str:
        names = self.kernel.arg_names
        constants = {names[k[0]]: v for k, v in self.constexprs.items() if names[k[0]].isupper()}
        dtypes = sorted({v for v in self.signature.values() if v.startswith("*")})
        return f"{', '.join(f'{k}={v}' for k, v in constants.items())} warps={self.options['num_warps']} " \
               f"{'/'.join(d[1:] for d in dtypes)}"


@dataclass
class Usage:
    launch: Launch
    target: str
    registers: int | None = None  # per thread; VGPRs on AMD
    spilled: int = 0  # bytes spilled per thread (NVIDIA stores + loads), or VGPRs spilled (AMD)
    narrow_offsets: list[str] = field(default_factory=list)  # uses of a program id not widened to 64 bits first
    error: str | None = None


class _Driver:
    """Just enough of a Triton driver for a launch to bind and specialise its arguments."""

    def __init__(self, target, device):
        self.target, self.device = target, device

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")


class _Bodies(TorchDispatchMode):
    """Runs patchkit's custom ops' own bodies on meta tensors (their fake forms would launch nothing)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "patchkit":
            from torch._library.custom_ops import OPDEFS

            return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording(target: str = "sm_90") -> Iterator[list[Launch]]:
    """Inside, Triton launches are recorded (into the list yielded) for `target`, not compiled or run."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit
    from triton.runtime.driver import driver

    from . import _triton

    if _triton.INTERPRETED:
        raise RuntimeError("the kernels are interpreted here (TRITON_INTERPRET=1): record in a process without it")
    launches: list[Launch] = []
    # Triton caches each kernel's binder per device id, for the target it first saw there: one id per target
    fake = _Driver(GPUTarget(*TARGETS[target]), 16 + list(TARGETS).index(target))
    original = jit.JITFunction._do_compile

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        launches.append(Launch(self, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__), device))

    previous = driver._active  # None until something asked; `reset_active` would look for a GPU driver
    driver.set_active(fake)
    jit.JITFunction._do_compile = record
    try:
        with _Bodies():
            yield launches
    finally:
        jit.JITFunction._do_compile = original
        driver._active = previous


def _meta(*shape, dtype, grad=False):
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def _backward(outputs, *inputs):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.grad(outputs, inputs, [torch.empty_like(o) for o in outputs])


def _rms_norm(op, dt):
    for hidden, rows, cast in ((128, 32 * TOKENS, "llama"), (256, 16 * TOKENS, "gemma"), (2048, TOKENS, "llama"),
                               (4096, TOKENS, "llama"), (4096, TOKENS, "gemma"), (5120, TOKENS, "llama"),
                               (8192, TOKENS, "llama"), (16384, TOKENS, "llama")):
        x, w = _meta(rows, hidden, dtype=dt, grad=True), _meta(hidden, dtype=dt, grad=True)
        yield f"hidden {hidden} {cast}", lambda: _backward(op(x, w, 1e-6, offset=float(cast == "gemma"), cast=cast),
                                                           x, w)


def _rope(op, dt):
    for dim, rotary, heads, kv in ((64, 64, 32, 8), (128, 128, 32, 8), (128, 64, 24, 8), (256, 256, 16, 8),
                                   (128, 128, 128, 8)):
        b, s = 4, TOKENS // 4
        q = _meta(b, s, heads, dim, dtype=dt).transpose(1, 2).requires_grad_()  # as transformers makes them
        k = _meta(b, s, kv, dim, dtype=dt).transpose(1, 2).requires_grad_()
        cos, sin = _meta(b, 1, s, rotary, dtype=dt), _meta(b, 1, s, rotary, dtype=dt)
        yield f"head_dim {dim} rotary {rotary} heads {heads}/{kv}", lambda: _backward(op(q, k, cos, sin), q, k)


def _gated(op, dt):
    for rows in (TOKENS, 150_000):  # 150k tokens x 14336: past 2^31 elements
        g, u = _meta(rows, 14336, dtype=dt, grad=True), _meta(rows, 14336, dtype=dt, grad=True)
        yield f"{rows} x 14336", lambda: _backward(op(g, u), g, u)


def _cross_entropy(op, dt):
    for vocab, softcap in ((32000, None), (128256, None), (256000, 30.0)):
        h, w = _meta(TOKENS, 4096, dtype=dt, grad=True), _meta(vocab, 4096, dtype=dt, grad=True)
        labels = _meta(TOKENS, dtype=torch.int64)
        yield f"vocab {vocab}{' softcap' if softcap else ''}", lambda: _backward(op(h, w, labels, softcap=softcap),
                                                                                  h, w)
        yield f"vocab {vocab} per token", lambda: _backward(op(h, w, labels, softcap=softcap, reduction="none"), h)


def _log_probs(op, dt):
    for vocab, softcap in ((128256, None), (256000, 30.0)):
        h, w = _meta(TOKENS, 4096, dtype=dt, grad=True), _meta(vocab, 4096, dtype=dt, grad=True)
        targets = _meta(TOKENS, dtype=torch.int64)
        yield f"vocab {vocab}{' softcap' if softcap else ''}", lambda: _backward(
            op(h, w, targets, softcap=softcap, temperature=0.7, outputs=("log_probs", "entropy"))[:2], h, w)


def _quantized(out, n_in, dt):
    from .lora import Projection
    from .quantized import Quantized

    weight = Quantized(_meta(out * n_in // 2, 1, dtype=torch.uint8), _meta(out * n_in // 64, dtype=torch.float32),
                       (out, n_in), dt, 4, 64, "nf4")
    return Projection(weight, None, _meta(16, n_in, dtype=torch.float32, grad=True),
                      _meta(out, 16, dtype=torch.float32, grad=True), 2.0)


def _lora_linear(op, dt):  # over a 4-bit base (QLoRA): the base weight's dequantization launches
    x = _meta(TOKENS, 4096, dtype=dt, grad=True)
    yield "4-bit base 4096 -> 4096", lambda: _backward(op(x, _quantized(4096, 4096, dt)), x)


def _lora_mlp(op, dt):
    x = _meta(TOKENS, 4096, dtype=dt, grad=True)
    projections = _quantized(14336, 4096, dt), _quantized(14336, 4096, dt), _quantized(4096, 14336, dt)
    yield "4-bit bases 4096 -> 14336 -> 4096", lambda: _backward(op(x, *projections), x)


SHAPES: dict[str, Callable] = {"rms_norm": _rms_norm, "apply_rope": _rope, "swiglu": _gated, "geglu": _gated,
                               "fused_linear_cross_entropy": _cross_entropy, "linear_log_probs": _log_probs,
                               "lora_linear": _lora_linear, "lora_mlp": _lora_mlp}


def record(target: str = "sm_90", dtypes=(torch.bfloat16, torch.float32)) -> dict[str, list[Launch]]:
    """Each op's distinct launches under `backend="triton"` at the shapes of `SHAPES` (the LoRA ops, torch's
    compositions, which the triton backend runs too, launch only the dequantization of a quantized base)."""
    from ._dispatch import OPS
    from .providers import TORCH, TRITON

    found: dict[str, list[Launch]] = {}
    for op in OPS:
        fn = TRITON.ops.get(op, TORCH.ops[op])
        if op not in SHAPES:
            raise KeyError(f"no shapes to record the op {op!r} at: add them to SHAPES")
        distinct: dict[tuple, Launch] = {}
        for dt in dtypes:
            for case, run in SHAPES[op](fn, dt):
                with recording(target) as launches:
                    run()
                for launch in launches:
                    launch = distinct.setdefault(launch.key(), launch)
                    launch.cases.append(f"{case} {str(dt)[6:]}")
        found[op] = list(distinct.values())
    return found


def compile_launch(launch: Launch, target: str) -> Usage:
    """Compile a recorded launch for `target`; registers and spills from ptxas (NVIDIA) or the AMDGCN notes."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    usage = Usage(launch, target)
    source = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs,
                       attrs=launch.attrs)
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
            compiled = triton.compile(source, target=GPUTarget(*TARGETS[target]), options=launch.options)
    except Exception as error:  # noqa: BLE001 - reported per kernel and target
        usage.error = f"{type(error).__name__}: {error}"[:2000]
        return usage
    usage.narrow_offsets = narrow_program_ids(compiled.asm["ttir"])
    if TARGETS[target][0] == "cuda":
        registers = re.search(r"Used (\d+) registers", log.getvalue())
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        usage.registers = int(registers.group(1)) if registers else None
        usage.spilled = sum(map(int, spills.groups())) if spills else 0
    else:
        notes = compiled.asm["amdgcn"]
        vgprs, spilled = (re.search(rf"\.{key}:\s+(\d+)", notes) for key in ("vgpr_count", "vgpr_spill_count"))
        usage.registers = int(vgprs.group(1)) if vgprs else None
        usage.spilled = int(spilled.group(1)) if spilled else 0
    return usage


def narrow_program_ids(ttir: str) -> list[str]:
    """The TTIR lines that compute with a program id in 32 bits. Row and element offsets derive from program
    ids: widened first (`.to(tl.int64)`), they cannot wrap past 2^31 elements."""
    ids = re.findall(r"(%[\w.]+) = tt\.get_program_id", ttir)
    return [line.strip() for pid in ids for line in ttir.splitlines()
            if re.search(rf"{re.escape(pid)}\b", line) and "get_program_id" not in line and "arith.extsi" not in line]


def table(usages: list[Usage]) -> str:
    """A markdown table: per kernel and specialisation (warps differ by target), registers per thread, with any
    spill, per target."""
    targets = list(dict.fromkeys(u.target for u in usages))
    rows: dict[tuple, dict[str, Usage]] = {}
    for u in usages:
        rows.setdefault((u.launch.name, u.launch.describe().replace(f" warps={u.launch.options['num_warps']}", "")),
                        {})[u.target] = u

    def cell(u: Usage | None) -> str:
        if u is None:
            return ""
        if u.error:
            return "error"
        return f"{u.registers} ({u.launch.options['num_warps']} warps)" + (f", spills {u.spilled}" if u.spilled else "")

    lines = [f"| kernel | specialisation | {' | '.join(targets)} |", "|---|---|" + "---|" * len(targets)]
    for (name, spec), per in rows.items():
        lines.append(f"| `{name}` | {spec} | {' | '.join(cell(per.get(t)) for t in targets)} |")
    return "\n".join(lines)


def main() -> None:
    usages = []
    for target in TARGETS:
        for launches in record(target).values():
            usages += [compile_launch(launch, target) for launch in launches]
    print(table(usages))


if __name__ == "__main__":
    main()
