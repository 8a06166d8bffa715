"""Registers, spill stack and shared memory of the chunk kernels, compiled for sm_90 (H100/H200)
on any machine (no GPU needed: Triton's bundled ptxas and cuobjdump). A spill stack of
kilobytes per thread is the first thing to look at when a kernel is slower than its FLOPs; a
shared-memory size above the GPU's per-block maximum (232,448 B on sm_90) is a launch that
fails with ``triton.runtime.errors.OutOfResources``, which the CPU tests (Triton interpreter)
cannot see.

    python benchmarks/kernel_resources.py --dim 128
    python benchmarks/kernel_resources.py --defaults --dims 64,128,256   # as select_config chooses
    python benchmarks/kernel_resources.py --defaults --override '{"warps_wy": 8}'   # one setting changed
    python benchmarks/kernel_resources.py --defaults --dtypes bf16,fp32 --check-limits   # exit 1 if over
    python benchmarks/kernel_resources.py --defaults --dtypes bf16,fp32 --check-limits --smem-only   # ~1 min cold

``--defaults`` takes the launches from chunk.py itself: ``chunk_fwd`` and then ``chunk_bwd``
(as the autograd op calls it, with the forward's ``ai`` and ``v_new``) run on meta tensors
with every kernel replaced by a recorder, so the launch table follows chunk.py's rules
(``select_config`` for the shape and ``--sms``, changed by ``--override``, passed as the
launchers' ``config``; ``PREC``, ``KNOWN_VNEW``, ``num_stages`` or Triton's default). Each
recorded launch is specialized by Triton's own launcher code (argument types,
``tt.divisibility`` of aligned pointers: it decides the vectorized, pipelined loads and so the
shared memory) and compiled for sm_90. Identical compiles are done once, ``--jobs`` at a time;
Triton's on-disk cache makes a second run fast. ``--smem-only`` stops each compile at LLVM IR,
where Triton fixes the shared memory (``metadata.shared``, the number the launcher checks):
no register / spill numbers, but no ptxas either, which takes minutes on the fp32 kernels.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton._C.libtriton import get_cache_invalidating_env_vars, ir
from triton.compiler import ASTSource, make_backend
from triton.runtime.cache import get_cache_key, get_cache_manager
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # sm_90 (H100 / H200): max dynamic shared memory per block (opt-in), bytes
REGS_PER_BLOCK = 65536  # 32-bit registers per block (and SM) on sm_90
DTYPES = ("bf16", "fp16", "fp32")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TOOLS = ("ptxas", "cuobjdump")
KERNEL_PACKAGE = "deltanet.ops.delta_rule.kernels"


@functools.lru_cache(maxsize=1)
def kernels() -> dict[str, JITFunction]:
    """Every ``*_kernel`` of the kernels package by short name (``wy_fwd``, ``h_fwd``, ...)."""
    pkg = importlib.import_module(KERNEL_PACKAGE)
    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        m = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for attr, fn in vars(m).items():
            if attr.endswith("_kernel") and isinstance(fn, JITFunction):
                out[attr[: -len("_kernel")]] = fn
    return out


class Launch(NamedTuple):
    """One kernel launch: ``(name, consts, warps, stages)`` and how Triton specializes it."""

    name: str
    consts: dict  # constexpr arguments by name (defaults filled in)
    warps: int
    stages: int  # num_stages (Triton's default where the launcher passes none)
    signature: tuple  # ((argument, type), ...) as the launcher infers them
    attrs: tuple  # ((argument index, attributes), ...): tt.divisibility of aligned pointers / ints

    def key(self) -> tuple:
        return (self.name, self.signature, tuple(sorted(self.consts.items())), self.attrs, self.warps, self.stages)


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name: str, fn: JITFunction, log: list):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(_specialize(self.name, self.fn, args, kwargs))


_BACKEND = None


def _specialize(name: str, fn: JITFunction, args, kwargs) -> Launch:
    """The launcher's own specialization of one call (``JITFunction.run``: binder, ``_pack_args``)."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, _BACKEND)
    bound, spec, options = binder(*args, **kwargs)
    opts, sig, constexprs, attrs = fn._pack_args(_BACKEND, kwargs, bound, spec, options)
    names = fn.arg_names
    consts = {names[path[0]]: v for path, v in constexprs.items()}
    return Launch(name, consts, opts.num_warps, opts.num_stages, tuple(sig.items()),
                  tuple(sorted((k[0], tuple(map(tuple, v))) for k, v in attrs.items() if v)))


def _chunk():
    chunk = importlib.import_module("deltanet.ops.delta_rule.chunk")
    if chunk.interpreted():
        sys.exit("kernel_resources: the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 "
                 "in the environment); run without it")
    return chunk


@contextlib.contextmanager
def recording(module, log: list):
    """Inside: every JIT kernel held at ``module``'s top level (``<name>_kernel``) is recorded into
    ``log`` (a :class:`Launch` per call, specialised as Triton's launcher would) instead of run, so
    that the module's own launchers can be called on meta tensors. Yields ``{name: JITFunction}``
    (for :func:`source`)."""
    patched = {attr: fn for attr, fn in vars(module).items() if isinstance(fn, JITFunction)}
    for attr, fn in patched.items():
        setattr(module, attr, _Recorder(attr[: -len("_kernel")], fn, log))
    try:
        yield {attr[: -len("_kernel")]: fn for attr, fn in patched.items()}
    finally:
        for attr, fn in patched.items():
            setattr(module, attr, fn)


@contextlib.contextmanager
def _recording(chunk, log: list):
    """Inside: every kernel chunk.py launches is recorded into ``log`` instead of run."""
    ks = kernels()
    # every kernel chunk.py can launch (one it launched unpatched would fail loudly: no GPU driver)
    patched = {attr: fn for attr, fn in vars(chunk).items() if isinstance(fn, JITFunction)}
    unknown = [a for a in patched if ks.get(a[: -len("_kernel")] if a.endswith("_kernel") else a) is not patched[a]]
    if unknown:
        raise LookupError(f"chunk.py launches kernels not found as {KERNEL_PACKAGE}.*.<name>_kernel: {unknown}")
    with recording(chunk, log):
        yield


def launches(D: int, T: int, override: dict | None = None, dtype: str = "bf16", *, H: int = 16,
             tokens: int = 32768, sms: int = 132, states: bool = False, gated: bool = False) -> list[Launch]:
    """Every kernel launch of one forward + backward of ``chunk_delta_rule`` (``chunk_fwd``, then
    ``chunk_bwd`` as the autograd op calls it: with the forward's ``ai`` and ``v_new``) for
    ``tokens`` tokens in sequences of length ``T``, ``H`` heads, K = V = ``D``, inputs (q, k, v,
    beta, do) in ``dtype``, on a GPU with ``sms`` SMs (H100 SXM / H200: 132), in launch order.
    ``override``: ChunkKernelConfig fields changed from ``select_config``'s choice (e.g.
    ``{"warps_wy": 8}``), as ``kernel_config=`` would pass them. ``states``: with an initial state
    and the final state in the loss (USE_H0, STORE_HT, USE_DHT, STORE_DH0); else none (training).
    ``gated``: the gated rule (a log decay ``g``: the ``USE_G`` variants).
    Nothing runs: the launchers get meta tensors and the kernels are recorded."""
    import torch

    from deltanet.ops import select_config

    chunk = _chunk()
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    B = max(1, tokens // T)
    meta = dict(device="meta")
    q, k, v, do = (torch.empty(B, T, H, D, dtype=tdtype, **meta) for _ in range(4))
    beta = torch.empty(B, T, H, dtype=tdtype, **meta)  # the layers cast beta to q's dtype
    h0 = torch.empty(B, H, D, D, dtype=torch.float32, **meta) if states else None
    dht = torch.empty(B, H, D, D, dtype=torch.float32, **meta) if states else None
    g = torch.empty(B, T, H, dtype=torch.float32, **meta) if gated else None
    scale = D ** -0.5
    config = dataclasses.replace(select_config(B, H, D, D, tdtype, num_sms=sms, gated=gated), **(override or {}))
    log: list[Launch] = []
    with _recording(chunk, log):
        _, _, ai, v_new, gc = chunk.chunk_fwd(q, k, v, beta, scale, h0, states, None, g, config=config)
        chunk.chunk_bwd(q, k, v, beta, scale, h0, None, do, dht, ai, v_new, gc, config=config)
    return log


# --- compiling -------------------------------------------------------------------------------------

def source(key: tuple, fn: JITFunction | None = None) -> tuple[ASTSource, dict]:
    """The compiler input of ``Launch.key()``: ``(ASTSource, launch options)``; ``fn``: the kernel
    (default: the chunk kernel of that name)."""
    name, sig, consts, attrs, warps, stages = key
    src = ASTSource(fn=fn if fn is not None else kernels()[name], signature=dict(sig), constexprs=dict(consts),
                    attrs={(i,): [list(a) for a in v] for i, v in attrs})
    return src, dict(num_warps=warps, num_stages=stages)


def shared_memory(key: tuple) -> int:
    """``metadata.shared`` of ``Launch.key()`` without PTX and ptxas: Triton's own stages up to
    LLVM IR, where the shared memory is allocated (the rest cannot change it). Several times
    faster than ``compile_launch`` on the large fp32 kernels; kept in Triton's cache dir."""
    src, opts = source(key)
    backend = make_backend(TARGET)
    options = backend.parse_options(opts)
    cache_key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    cache = get_cache_manager(hashlib.sha256(f"{cache_key}-shared-memory".encode()).hexdigest())
    path = cache.get_file("shared.json")
    if path is not None:
        with open(path) as f:
            return int(json.load(f)["shared"])
    stages = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    metadata = {"target": TARGET, **options.__dict__}
    for ext, step in stages.items():
        module = step(module, metadata)
        if ext == "llir":
            break
    shared = int(metadata["shared"])
    cache.put(json.dumps({"shared": shared}), "shared.json", binary=False)
    return shared


def compile_launch(key: tuple, smem_only: bool = False) -> tuple[int | None, int | None, int]:
    """Compile ``Launch.key()`` for sm_90: ``(registers per thread, stack bytes per thread,
    shared memory bytes)``; ``smem_only``: ``(None, None, shared memory)`` (``shared_memory``).
    The shared memory is ``metadata.shared``: what the launcher compares with the device's
    maximum before raising ``OutOfResources``."""
    if smem_only:
        return None, None, shared_memory(key)
    return resource_usage(*source(key))


def resource_usage(src: ASTSource, opts: dict) -> tuple[int, int, int]:
    """Compile any kernel source (``ASTSource`` + launch options such as ``num_warps``) for sm_90:
    ``(registers per thread, stack bytes per thread, shared memory bytes)``."""
    k = triton.compile(src, target=TARGET, options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2)), int(k.metadata.shared)


def _compile_or_error(key: tuple, smem_only: bool = False):
    try:
        return compile_launch(key, smem_only)
    except Exception as e:  # noqa: BLE001 - reported (and counted by --check-limits), not raised
        msg = str(e).strip()
        return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"


def compile_all(keys: list[tuple], jobs: int = 1, smem_only: bool = False):
    """``(pool or None, {key: future})`` for the distinct ``keys``, compiled ``jobs`` at a time."""
    keys = list(dict.fromkeys(keys))
    if jobs <= 1 or len(keys) <= 1:
        class Now:  # compiled when first asked for, in the order of the report
            def __init__(self, key):
                self.key, self.res = key, None

            def result(self):
                if self.res is None:
                    self.res = _compile_or_error(self.key, smem_only)
                return self.res

        return None, {k: Now(k) for k in keys}
    pool = concurrent.futures.ProcessPoolExecutor(min(jobs, len(keys)), mp_context=multiprocessing.get_context("fork"))
    # longest first (fp32 and large K compile slowest: wy_bwd in fp32 at K = 256 takes most of the time)
    return pool, {k: pool.submit(_compile_or_error, k, smem_only) for k in sorted(keys, key=_cost, reverse=True)}


def _cost(key: tuple) -> int:
    """A guess at the compile time, for the order: input width x K, the backward kernels x 2."""
    name, sig, consts, *_ = key
    width = 4 if dict(sig).get("k") == "*fp32" else 2
    return width * dict(consts).get("K", 0) * (2 if name.startswith(("wy_bwd", "dh_bwd", "dqkw")) else 1)


def describe(res) -> str:
    if isinstance(res, str):
        return f"compile failed: {res}"
    regs, stack, smem = res
    if regs is None:
        return f"smem {smem} B"
    return f"regs {regs}, spill/stack {stack} B/thread, smem {smem} B"


def over_limits(res, warps: int, smem_limit: int = SMEM_LIMIT) -> list[str]:
    """Why this launch would fail on an sm_90 GPU (empty: it fits)."""
    if isinstance(res, str):
        return [f"compile failed ({res})"]
    regs, _, smem = res
    why = []
    if smem > smem_limit:
        why.append(f"{smem} B of shared memory > {smem_limit} B")
    # (the launcher's "threads" check; ptxas keeps to Triton's .reqntid, so this is a cross-check)
    if regs is not None and -(-regs // 8) * 8 * 32 * warps > REGS_PER_BLOCK:  # per warp in units of 256
        why.append(f"{regs} registers x {32 * warps} threads > {REGS_PER_BLOCK}")
    return why


def _label(launch: Launch) -> str:
    c = launch.consts
    out = launch.name
    if launch.name in ("h_fwd", "dh_bwd"):
        out += f" BV {c['BV']} addr64 {c['ADDR64']:d}"
    out += " (from v_new)" if c.get("KNOWN_VNEW") else ""
    if any(c.get(f) for f in ("USE_H0", "STORE_HT", "USE_DHT", "STORE_DH0")):
        out += " (states)"
    out += " (gated)" if c.get("USE_G") else ""
    return out


def report_defaults(dims, lengths, override, dtypes=("bf16",), sms=132, states=False, jobs=1,
                    smem_limit=SMEM_LIMIT, H=16, tokens=32768, smem_only=False, gated=False) -> list[str]:
    """Print each kernel as chunk.py launches it at ``tokens`` tokens x ``H`` heads on ``sms`` SMs
    (H200: 132). Returns the launches that would not fit on an sm_90 GPU, one line each
    (``smem_only``: shared memory only, no ptxas; see ``shared_memory``)."""
    rows = []  # (D, T, dtype, launch): each distinct launch once per (D, T, dtype)
    for dtype in dtypes:
        for D in dims:
            for T in lengths:
                here = {}
                for with_states in ([False, True] if states else [False]):
                    for with_g in ([False, True] if gated else [False]):
                        for ln in launches(D, T, override, dtype, H=H, tokens=tokens, sms=sms, states=with_states,
                                           gated=with_g):
                            here.setdefault(ln.key(), ln)
                rows += [(D, T, dtype, ln) for ln in here.values()]
    pool, futures = compile_all([ln.key() for *_, ln in rows], jobs, smem_only)
    if override:
        print(f"override: {json.dumps(override)}", flush=True)
    print(f"{len(rows)} launches, {len(futures)} distinct compiles for sm_90{' (to LLVM IR)' if smem_only else ''}, "
          f"shared memory limit {smem_limit} B", flush=True)
    failures = []
    try:
        for D, T, dtype, ln in rows:
            res = futures[ln.key()].result()
            why = over_limits(res, ln.warps, smem_limit)
            mark = "  <-- " + "; ".join(why) if why else ""
            print(f"D={D} T={T} {dtype} {_label(ln)} warps {ln.warps} stages {ln.stages}: {describe(res)}{mark}",
                  flush=True)
            if why:
                bv = f", BV {ln.consts['BV']}" if "BV" in ln.consts else ""
                states = (", with states" if "(states)" in _label(ln) else "") + (
                    ", gated" if "(gated)" in _label(ln) else "")
                failures.append(f"{ln.name}_kernel (D={D}, T={T}, {dtype}, warps {ln.warps}, stages {ln.stages}{bv}"
                                f"{states}): " + "; ".join(why))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return failures


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _single(D: int, name: str, override: dict, warps: int, stages: int) -> Launch:
    """The first launch of kernel ``name`` in a bf16 forward + backward at D with ``override``,
    compiled for ``warps`` / ``stages`` instead of its own."""
    for ln in launches(D, 1024, override, "bf16"):
        if ln.name == name:
            return ln._replace(warps=warps, stages=stages)
    raise LookupError(f"{name} is not launched with {override}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128, help="without --defaults: head dim K = V")
    p.add_argument("--warps", default="4,8", help="without --defaults: comma-separated num_warps to compile for")
    p.add_argument("--stages", type=int, default=2, help="without --defaults: num_stages to compile for")
    p.add_argument("--defaults", action="store_true", help="every kernel as chunk.py launches it")
    p.add_argument("--dims", default="64,128,256", help="with --defaults: head dims K = V")
    p.add_argument("--lengths", default="1024,16384", help="with --defaults: sequence lengths (32K tokens in all; "
                                                          "the state V-block depends on them)")
    p.add_argument("--dtypes", default="bf16", help="with --defaults: input dtypes, of " + ", ".join(DTYPES))
    p.add_argument("--override", default="{}",
                   help="with --defaults: JSON of ChunkKernelConfig fields to change, e.g. '{\"warps_wy\": 8}'")
    p.add_argument("--gated", action="store_true",
                   help="with --defaults: also the gated rule's launches (a log decay g: the USE_G variants)")
    p.add_argument("--states", action="store_true",
                   help="with --defaults: also the launches with an initial state and the final state in the loss")
    p.add_argument("--heads", type=int, default=16, help="with --defaults")
    p.add_argument("--sms", type=int, default=132, help="with --defaults: SMs of the GPU (H200: 132)")
    p.add_argument("--check-limits", action="store_true",
                   help="with --defaults: exit 1, listing them, if any launch needs more than --smem-limit bytes of "
                        "shared memory (or more registers than a block can have), or does not compile")
    p.add_argument("--smem-only", action="store_true",
                   help="shared memory only: stop each compile at LLVM IR (no PTX / ptxas: no register and spill "
                        "numbers; the large fp32 kernels compile several times faster)")
    p.add_argument("--smem-limit", type=int, default=SMEM_LIMIT, help="bytes per block (sm_90: 232448)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = p.parse_args()
    # ptxas: also for its version (the PTX version of the LLVM IR stage); cuobjdump: registers
    needed = ("ptxas",) if args.smem_only else TOOLS
    missing = [t for t in needed if not os.access(os.path.join(BIN, t), os.X_OK)]
    if missing:
        sys.exit(f"kernel_resources: Triton's bundled {', '.join(missing)} not found in {BIN}")
    if args.check_limits and not args.defaults:
        p.error("--check-limits needs --defaults")
    if args.defaults:
        dtypes = [d for d in args.dtypes.split(",") if d]
        if set(dtypes) - set(DTYPES):
            p.error(f"unknown dtype(s) {sorted(set(dtypes) - set(DTYPES))}; choose from {', '.join(DTYPES)}")
        override = json.loads(args.override)
        from deltanet.ops import ChunkKernelConfig
        unknown = set(override) - {f.name for f in dataclasses.fields(ChunkKernelConfig)}
        if unknown:
            p.error(f"--override: unknown ChunkKernelConfig field(s) {sorted(unknown)}")
        failures = report_defaults(_ints(args.dims), _ints(args.lengths), override, dtypes,
                                   sms=args.sms, states=args.states, jobs=args.jobs, smem_limit=args.smem_limit,
                                   H=args.heads, smem_only=args.smem_only, gated=args.gated)
        if failures:
            print(f"\n{len(failures)} launch(es) would fail on an sm_90 GPU (OutOfResources at launch):", flush=True)
            for f in failures:
                print("  " + f, flush=True)
            if args.check_limits:
                sys.exit(1)
        elif args.check_limits:
            print("\nevery launch fits the sm_90 limits", flush=True)
        return

    # One kernel at a time at D = --dim, for each of --warps (bf16, --stages).
    D = args.dim
    unfused = dict(grads_fused=False)
    todo = []  # (label, kernel, config fields that launch it so, warps)
    for w in _ints(args.warps):
        todo += [(f"wy_fwd   warps {w}:", "wy_fwd", {}, w),
                 (f"wy_bwd   warps {w}:", "wy_bwd", unfused, w)]
        todo.append((f"dqkw_bwd warps {w}:", "dqkw_bwd", unfused, w))
        for bv in (16, 64):
            todo += [(f"h_fwd BV {bv} warps {w}:", "h_fwd", dict(bv_state=bv), w),
                     (f"dh_bwd BV {bv} warps {w}:", "dh_bwd", dict(bv_state=bv), w)]
        todo.append((f"o_fwd    warps {w}:", "o_fwd", {}, w))
    lns = [(label, _single(D, name, override, w, args.stages)) for label, name, override, w in todo]
    pool, futures = compile_all([ln.key() for _, ln in lns], args.jobs, args.smem_only)
    try:
        for label, ln in lns:
            print(label, describe(futures[ln.key()].result()), flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


if __name__ == "__main__":
    main()
