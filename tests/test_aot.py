"""Every Triton kernel the ops launch, compiled ahead of time for sm_80, sm_90 and gfx942 at real models' shapes
(`patchkit.kernels.aot`): no compile errors, no spills, 64-bit offsets where sizes pass 2^31, launches on the
tensors' device. The kernels are compiled, not interpreted, so this runs in a process without TRITON_INTERPRET."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

from patchkit.kernels import _triton  # noqa: E402

SCRIPT = textwrap.dedent("""
    import contextlib, json, re, sys
    import torch
    from patchkit.kernels import _triton, aot

    out = {"usages": [], "guarded": []}
    for target in aot.TARGETS:
        for op, launches in aot.record(target).items():
            for launch in launches:
                usage = aot.compile_launch(launch, target)
                out["usages"].append(dict(op=op, kernel=launch.name, cases=launch.cases, target=target,
                                          registers=usage.registers, spilled=usage.spilled, error=usage.error,
                                          narrow_offsets=usage.narrow_offsets, large=any(
                                              v == "i64" for v in launch.signature.values())))

    @contextlib.contextmanager
    def guard(index, driver):
        before, driver.device = driver.device, index
        try:
            yield
        finally:
            driver.device = before

    # the device guard: with `on` standing for a tensor on cuda:1, every launch must run inside it
    real_on = _triton.on
    with aot.recording("sm_90") as launches:
        from triton.runtime.driver import driver
        _triton.on = lambda device: guard(1, driver.active)
        for op, fn in aot.SHAPES.items():
            from patchkit.kernels.providers import TORCH, TRITON
            for case, run in fn(TRITON.ops.get(op, TORCH.ops[op]), torch.bfloat16):
                run()
                break
    _triton.on = real_on
    out["guarded"] = [(launch.name, launch.device) for launch in launches]
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_every_target(compiled):
    usages = compiled["usages"]
    assert {u["target"] for u in usages} == {"sm_80", "sm_90", "gfx942"}
    ops = {u["op"] for u in usages}
    assert ops == {"rms_norm", "apply_rope", "swiglu", "geglu", "fused_linear_cross_entropy", "linear_log_probs",
                   "lora_linear", "lora_mlp"}
    errors = [(u["kernel"], u["target"], u["cases"][0], u["error"][:500]) for u in usages if u["error"]]
    assert not errors, errors


def test_no_kernel_spills(compiled):
    spills = [(u["kernel"], u["target"], u["cases"], u["registers"], u["spilled"]) for u in compiled["usages"]
              if u["spilled"]]
    assert not spills, spills
    assert all(u["registers"] for u in compiled["usages"] if not u["error"])


def test_offsets_are_64_bit(compiled):
    """Every pointer offset a kernel computes is 64-bit: a row index times a stride, or an element index past
    2^31 (150k tokens x 14336 in the MLP), must not wrap."""
    large = [u for u in compiled["usages"] if u["large"]]
    assert {u["kernel"] for u in large} >= {"_gated_fwd", "_gated_bwd"}
    narrow = [(u["kernel"], u["target"], u["cases"][0], u["narrow_offsets"]) for u in compiled["usages"]
              if u["narrow_offsets"]]
    assert not narrow, narrow


def test_every_launch_runs_on_its_tensors_device(compiled):
    assert compiled["guarded"] and all(device == 1 for _, device in compiled["guarded"]), compiled["guarded"]
    assert {name for name, _ in compiled["guarded"]} >= {"_fwd_kernel", "_bwd_kernel", "_rope_kernel", "_gated_fwd",
                                                          "_gated_bwd", "_rows_kernel", "_log_probs_kernel",
                                                          "_dequantize_4bit_kernel"}


def test_the_guard_is_the_tensors_cuda_device():
    guard = _triton.on(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with _triton.on(torch.device("cpu")):  # nothing to switch
        pass


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops run, with the dtypes of their tensor arguments."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((str(func), [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["fused_linear_cross_entropy", "linear_log_probs"])
def test_gpu_form_has_no_host_sync_and_a_half_precision_weight_gradient(op):
    """The form a GPU runs, on `meta` tensors (which have no values: any read on the host raises): forward and
    backward at a bf16 LM head with a trained weight read nothing, and the weight gradient is a bf16 product
    accumulated in float32 (`addmm.dtype_out`), never a float32 x float32 product of upcast copies."""
    from patchkit.kernels import TORCH, aot

    h = torch.empty(512, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(1000, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    labels = torch.empty(512, dtype=torch.int64, device="meta")
    fn = TORCH.ops[op]
    with _Ops() as ops, aot._Bodies():  # the bodies' own ops pass through the recorder
        if op == "fused_linear_cross_entropy":
            outputs = [fn(h, w, labels, num_items_in_batch=torch.tensor(300.0, device="meta"))]
        else:  # a weighted loss and an entropy bonus: the recompute path
            outputs = list(fn(h, w, labels, outputs=("log_probs", "entropy"))[:2])
        torch.autograd.grad(outputs, (h, w), [torch.empty_like(o) for o in outputs])
    products = [(name, dtypes) for name, dtypes in ops.seen if name.startswith(("aten.mm", "aten.addmm"))]
    assert any(name == "aten.addmm.dtype_out" for name, _ in products), products
    float32_products = [(name, dtypes) for name, dtypes in products if all(d == torch.float32 for d in dtypes)]
    assert not float32_products, float32_products


def test_rope_is_one_launch_and_narrow_norms_take_many_rows_a_program():
    script = textwrap.dedent("""
        import json, torch
        from patchkit.kernels import aot
        from patchkit.kernels.providers import TRITON
        q = aot._meta(2, 16, 32, 128, dtype=torch.bfloat16).transpose(1, 2)
        k = aot._meta(2, 16, 8, 128, dtype=torch.bfloat16).transpose(1, 2)
        cos = aot._meta(2, 1, 16, 128, dtype=torch.bfloat16)
        with aot.recording() as rope:
            TRITON.ops["apply_rope"](q, k, cos, cos)
        x, w = aot._meta(262144, 128, dtype=torch.bfloat16), aot._meta(128, dtype=torch.bfloat16)
        with aot.recording() as norm:
            TRITON.ops["rms_norm"](x, w, 1e-6)
        rows = [v for l in norm for k, v in l.constexprs.items() if l.kernel.arg_names[k[0]] == "ROWS"]
        print(json.dumps({"rope": len(rope), "rows": rows}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"rope": 1, "rows": [16]}, got
