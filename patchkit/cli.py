"""`patchkit verify | list | plugins | bench`."""

from __future__ import annotations

import argparse
import sys


def _verify(args) -> int:
    import patchkit

    failed = False
    for target in args.arch or [None]:
        for result in patchkit.verify(target, backend=args.backend, dtype=args.dtype,
                                      attn_implementation=args.attn):
            print(result.table(), end="\n\n")
            failed |= not result.ok
    print("patchkit verify:", "MISMATCH" if failed else "all architectures match")
    return 1 if failed else 0


def _list(args) -> int:
    import patchkit
    from patchkit.plugins import manager

    for name, arch in manager().architectures.items():
        parent = arch.parent()
        line = f"{name}{f' (from {parent})' if parent else ''}: model types {', '.join(arch.model_types)}; " \
               f"module {arch.module}; ops {', '.join(arch.ops())}"
        if parent:
            changes = [f"{k}()" if callable(v) else f"{k}={v!r}" for k, v in arch.differences().items()]
            line += f"; changes {', '.join(changes) if changes else f'nothing in the ops of {parent}'}"
        print(line)
    print("backends:")
    backends = patchkit.backends()
    every = backends["torch"]["ops"]
    for name, info in backends.items():
        lacks = [op for op in every if op not in info["ops"]]  # a backend runs torch's for an op it lacks
        print(f"  {name}: devices {', '.join(info['devices'])}; ops {', '.join(info['ops'])}"
              + (f"; runs torch's {', '.join(lacks)}" if lacks else ""))
    return 0


def _plugins(args) -> int:
    from patchkit.plugins import manager

    registry = manager()
    for info in registry.info.values():
        print(f"{info.name}  {info.distribution} {info.version}  hooks: {', '.join(info.hooks) or '-'}")
    for err in registry.errors:
        print(f"FAILED {err.plugin}  {err.distribution}  {err.error}")
    for line in registry.skipped:
        print(f"SKIPPED {line}")
    return 0


def _bench(args) -> int:
    from patchkit.bench import run

    return run.run(args, sys.argv[2:] if args.argv is None else args.argv[1:])


class _Version(argparse.Action):
    """`--version`: the version and the distribution's name (imported only when asked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import patchkit
        from patchkit.plugins import DISTRIBUTION

        print(f"patchkit {patchkit.__version__} ({DISTRIBUTION})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchkit", description=__doc__)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="parity of patched vs unpatched tiny models; exit 1 on a mismatch")
    v.add_argument("arch", nargs="*", help="architecture names or model types (default: all)")
    v.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "liger"],
                   help="kernel backend of the patched model (default: auto; triton on a CPU needs TRITON_INTERPRET=1)")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of both models (default: float32)")
    v.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="reference attention implementation")
    v.set_defaults(func=_verify)
    sub.add_parser("list", help="architectures, their ops, and kernel backends").set_defaults(func=_list)
    sub.add_parser("plugins", help="loaded plugins and load errors").set_defaults(func=_plugins)
    from patchkit.bench import options

    b = sub.add_parser("bench", help="benchmarks, patched vs unpatched side by side (default: all)",
                       description=options.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_arguments(b)
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except Exception as err:  # patchkit's errors for bad input: one line; anything else (a bug): its traceback
        from patchkit import BackendError, PatchError, UsageError

        if isinstance(err, (PatchError, BackendError, UsageError)):
            print(f"patchkit: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
