"""Ahead-of-time compile check of every Triton kernel for sm_80 (A100) and sm_90 (H100), on a
machine without a GPU.

    python -m llm_adapters.triton_kernels.aot --subset ci --out DIR     # CI: minutes
    python -m llm_adapters.triton_kernels.aot --full --jobs 2 --out DIR # the whole grid

What it does, in order:
1. Enumerates the launches our launchers make over a grid of shapes and options, by calling
   the launchers themselves (`lora_forward` / `lora_backward`, `lora_add_*`, `dora_*`,
   `series_forward` / `series_backward`, `dropout.keep_mask`) on meta tensors with every
   kernel replaced by a recorder (`aot_launches`): the constexprs, argument dtypes and
   integer specialisations are the launchers' own, not a copy of their logic. Launches that
   compile to the same kernel (same signature after Triton's integer/alignment
   specialisation, same constexprs) form one launch variant.
2. For each variant and target, asks the kernel's own `early_config_prune` (the function the
   autotuner calls) which configs it may launch there, and which single one
   LLM_ADAPTERS_TRITON_AUTOTUNE=0 takes.
3. Compiles each distinct (kernel, signature, constexprs, config, target) once with
   `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, reads registers and
   stack (spill) bytes from the cubin with `cuobjdump --dump-resource-usage`, shared memory from
   the kernel's metadata, and whether the PTX uses tensor cores (`wgmma` / `mma`). Results are
   cached on disk, keyed by the kernel's source hash, the compile key and the Triton version.
4. Writes aot.json (every variant and compile) and aot.md (a summary), and exits non-zero on a
   compile error, a launchable config over the target's shared memory, a variant with no config
   that fits, a variant whose AUTOTUNE=0 config does not fit, a compiled kernel needing more
   shared memory than the pruning model said (the model is what keeps configs launchable), or
   a launchable config spilling 1 KB or more per thread where a launchable config of the same
   variant and target spills nothing.

`--subset ci` compiles, per kernel, dtype and target, every config that some variant can launch
(and every AUTOTUNE=0 choice), each at the variant where the model puts its shared memory
highest; the fit checks then cover every variant through the model, which the compiles hold to
account. `--full` compiles every variant with every launchable config on both targets.

`--cached-only` compiles nothing: it reports on the results the cache holds (from runs of the
same plan, possibly interrupted: the cache makes a long `--full` resumable) and counts the
rest as pending. Its table is then partial, and says so; the fit checks of a pending compile
fall back on the model, as those of configs the subset does not compile do.

`--seed REPORT` first puts the results of an earlier report (its aot.json, gzipped or not)
into the cache, each under its job's hash (kernel source, compile key, Triton version), so a
`--full` grid that takes longer than one machine's time goes on from a committed report on
another machine, and the results of changed kernels are never reused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton

from . import lora, series
from .aot_launches import (  # noqa: F401  (GRIDS and the recorder: the module's API as before)
    GRIDS,
    KERNELS,
    TARGETS,
    _jit_fn,
    _jsonable,
    _Recorder,
    _recording,
    enumerate_launches,
)

# ---- 2. configs per variant and target -------------------------------------------------------


def _config_id(cfg) -> str:
    kw = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{kw},w={cfg.num_warps},s={cfg.num_stages}"


class _Plain:
    """The one 'config' of a kernel without an autotuner (launch defaults)."""

    def __init__(self, kwargs):
        self.kwargs = {}
        self.num_warps = kwargs.get("num_warps", 4)
        self.num_stages = kwargs.get("num_stages", 3)


def configs_for(variant: dict, cc: int, autotune: bool) -> list:
    """The configs the kernel's own prune function leaves for `variant` on target `cc`: all it
    may time (autotune=True), or the one AUTOTUNE=0 takes."""
    module, attr, configs_fn = KERNELS[variant["kernel"]]
    if configs_fn is None:
        return [_Plain(variant["kwargs"])]
    _, tuner = _jit_fn(variant["kernel"])
    prune = tuner.early_config_prune
    return list(
        prune(configs_fn(), variant["named_args"], target=(cc, TARGETS[cc]), autotune=autotune,
              **variant["kwargs"])
    )


def smem_model(variant: dict, cfg, cc: int) -> int | None:
    """The pruning model's shared-memory bytes for `variant` with `cfg` on `cc`."""
    module, attr, configs_fn = KERNELS[variant["kernel"]]
    if configs_fn is None:
        return None
    return module._smem_model(attr, cfg, {**variant["named_args"], **variant["kwargs"]}, cc)


# ---- 3. compiles -----------------------------------------------------------------------------


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for cand in (bundled, Path("/usr/local/cuda/bin/cuobjdump")):
        if cand.exists():
            return str(cand)
    return shutil.which("cuobjdump")


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _job(variant: dict, cfg, cc: int) -> dict:
    fn, _ = _jit_fn(variant["kernel"])
    consts = dict(variant["constexprs"])
    consts.update(cfg.kwargs)
    return {
        "kernel": variant["kernel"],
        "signature": [list(x) for x in variant["signature"]],
        "constexprs": sorted([k, _jsonable(v)] for k, v in consts.items()),
        "divisible": list(variant["divisible"]),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "cc": cc,
        "config": _config_id(cfg),
        "source": fn.cache_key,
        "triton": triton.__version__,
    }


def _job_hash(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:32]


def compile_job(job: dict) -> dict:
    """Compile one job for its target; returns its resource usage (or the error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, _ = _jit_fn(job["kernel"])
    names = fn.arg_names
    consts = dict(job["constexprs"])
    signature, constexprs, attrs = {}, {}, {}
    sig = dict(job["signature"])
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        else:
            signature[name] = sig[name]
            if name in job["divisible"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    out = {"error": None}
    try:
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", job["cc"], 32),
            options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
        )
    except Exception as exc:  # the check reports any compile failure, whatever its type
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    md = kernel.metadata
    out["shared"] = int(md.shared if not isinstance(md, dict) else md["shared"])
    ptx = kernel.asm["ptx"]
    out["wgmma"] = "wgmma.mma_async" in ptx
    out["mma"] = bool(re.search(r"\bmma\.sync", ptx))
    out["regs"] = out["stack"] = out["local"] = None
    tool = _cuobjdump()
    if tool is None:
        out["error"] = "cuobjdump not found (CUDA toolkit or triton's bundled copy)"
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
    found = _RESOURCE.search(text)
    if found is None:
        out["error"] = f"cuobjdump gave no resource usage: {text[-200:]!r}"
        return out
    out["regs"], out["stack"], _, out["local"] = (int(g) for g in found.groups())
    return out


def _default_cache() -> Path:
    base = os.environ.get("LLM_ADAPTERS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llm_adapters"
    )
    return Path(base) / "aot"


def seed_cache(reports: list[Path], cache: Path) -> int:
    """Put the compile results of earlier reports (aot.json, or aot.json.gz) into the cache;
    returns how many were new. A result is keyed by its job's hash, which covers the kernel's
    source, the compile key and the Triton version, so a result of changed source or another
    Triton version is never matched: it only takes room. This carries a --full run that one
    machine does not finish over to the next machine."""
    added = 0
    cache.mkdir(parents=True, exist_ok=True)
    for report in reports:
        opener = gzip.open if report.suffix == ".gz" else open
        with opener(report, "rt") as f:
            compiles = json.load(f).get("compiles", [])
        for entry in compiles:
            key = entry.get("job")
            if not key or entry.get("pending") or entry.get("error") is not None:
                continue
            path = cache / f"{key}.json"
            if path.exists():
                continue
            res = {k: v for k, v in entry.items()
                   if k not in ("variant", "cc", "config", "cached", "job")}
            path.write_text(json.dumps(res))
            added += 1
    return added


def _compile_unless_cached(job: dict, cache: Path | None) -> dict:
    """compile_job, unless another process (say a `--kernel` run beside a `--full` one) has
    cached the result since this run looked."""
    path = cache / f"{_job_hash(job)}.json" if cache else None
    if path is not None and path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    return compile_job(job)


def run_jobs(
    jobs: list[dict], n_jobs: int, cache: Path | None, log=print, cached_only: bool = False
) -> list[dict]:
    """Compile every job (cached results are reused); returns results in job order. With
    `cached_only`, compile nothing: a job the cache lacks gets {"pending": True}."""
    results: list[dict | None] = [None] * len(jobs)
    keys = [_job_hash(job) for job in jobs]
    todo = []
    for i, key in enumerate(keys):
        path = cache / f"{key}.json" if cache else None
        if path is not None and path.exists():
            results[i] = {**json.loads(path.read_text()), "cached": True}
        else:
            todo.append(i)
    # in the order of the jobs' hashes: a run stopped part-way (the full grid) has compiled an
    # even sample of every kernel, dtype and target rather than the first kernels in full
    todo.sort(key=keys.__getitem__)
    log(f"aot: {len(jobs)} compiles, {len(jobs) - len(todo)} cached, {len(todo)} to run "
        f"on {n_jobs} process(es)" + (" (cached only: left pending)" if cached_only else ""))
    if cached_only:
        for i in todo:
            results[i] = {"error": None, "pending": True, "cached": False}
        return results  # type: ignore[return-value]

    def done(i, res):
        results[i] = {"cached": False, **res}
        if cache is not None and res.get("error") is None and not res.get("cached"):
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{keys[i]}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(res))
            tmp.replace(cache / f"{keys[i]}.json")

    t0 = time.perf_counter()
    if n_jobs <= 1:
        for n, i in enumerate(todo, 1):
            done(i, _compile_unless_cached(jobs[i], cache))
            if n % 20 == 0:
                log(f"aot: {n}/{len(todo)} compiled, {time.perf_counter() - t0:.0f} s")
    else:
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=ctx) as pool:
            futs = {pool.submit(_compile_unless_cached, jobs[i], cache): i for i in todo}
            for n, fut in enumerate(concurrent.futures.as_completed(futs), 1):
                done(futs[fut], fut.result())
                if n % 20 == 0:
                    log(f"aot: {n}/{len(todo)} compiled, {time.perf_counter() - t0:.0f} s")
    return results  # type: ignore[return-value]


# ---- 4. plan, checks, report -----------------------------------------------------------------


def _dtype_of(variant: dict) -> str:
    for _, kind in variant["signature"]:
        if kind.startswith("*"):
            return kind[1:]
    return "?"


def _uses_dot(kernel_id: str) -> bool:
    return kernel_id != "dropout._keep_mask_kernel"


def _ieee(variant: dict) -> bool:
    c = dict(variant["constexprs"])
    return bool(c.get("IEEE")) or c.get("PREC") == "ieee"


def plan(variants: list[dict], subset: str) -> tuple[list[dict], list[tuple[int, int, str, dict]]]:
    """Per variant and target: the launchable and the AUTOTUNE=0 configs (with the model's
    bytes). Returns (rows, compile list [(variant index, cc, config id, job)])."""
    rows = []
    for vi, v in enumerate(variants):
        for cc in TARGETS:
            launch = configs_for(v, cc, True)
            untuned = configs_for(v, cc, False)[0]
            cfgs = {_config_id(c): c for c in [*launch, untuned]}
            rows.append({
                "variant": vi, "cc": cc,
                "launchable": [_config_id(c) for c in launch],
                "untuned": _config_id(untuned),
                "model": {cid: smem_model(v, c, cc) for cid, c in cfgs.items()},
                "_cfgs": cfgs,
            })
    wanted: dict[tuple[int, int, str], dict] = {}
    if subset == "full":
        for row in rows:
            vi, cc = row["variant"], row["cc"]
            for cid, c in row["_cfgs"].items():
                wanted[(vi, cc, cid)] = _job(variants[vi], c, cc)
    else:
        # per (kernel, dtype, cc, config, DoRA epilogue): the variant with the highest
        # modelled bytes (the column-scale / saved-T epilogues compiled in their own right)
        best: dict[tuple, tuple] = {}
        for row in rows:
            v = variants[row["variant"]]
            dora_epi = tuple(kv for kv in v["constexprs"] if kv[0] in ("COL_SCALE", "SAVE_T"))
            for cid, c in row["_cfgs"].items():
                group = (v["kernel"], _dtype_of(v), row["cc"], cid, dora_epi)
                score = row["model"][cid] or 0
                if group not in best or score > best[group][0]:
                    best[group] = (score, row["variant"], c)
        for (_, _, cc, cid, _), (_, vi, c) in best.items():
            wanted[(vi, cc, cid)] = _job(variants[vi], c, cc)
    compiles = [(vi, cc, cid, job) for (vi, cc, cid), job in wanted.items()]
    return rows, compiles


def check(variants, rows, compiles, results) -> tuple[dict, list[str]]:
    """Apply the pass/fail rules; returns (figures, failure lines)."""
    by_key = {(vi, cc, cid): res for (vi, cc, cid, _), res in zip(compiles, results)}
    fails: list[str] = []
    fig = defaultdict(int)
    fig["variants"] = len(variants)
    fig["compiles"] = len(compiles)
    for (vi, cc, cid, _), res in zip(compiles, results):
        v = variants[vi]
        name = f"{v['kernel']} sm_{cc} [{cid}] {v['example']}"
        if res.get("pending"):
            fig["pending"] += 1
            continue
        if res.get("error"):
            fails.append(f"compile error: {name}: {res['error']}")
            fig["compile_errors"] += 1
            continue
        if res["shared"] > TARGETS[cc]:
            fig["over_smem"] += 1
        if (res.get("stack") or 0) > 0:
            fig["spilling"] += 1
        row = next(r for r in rows if r["variant"] == vi and r["cc"] == cc)
        model = row["model"].get(cid)
        if model is not None and res["shared"] > model:
            fails.append(
                f"smem model too low: {name}: compiled {res['shared']} B > model {model} B"
            )
            fig["model_under"] += 1
        if _uses_dot(v["kernel"]) and not (res["mma"] or res["wgmma"]):
            if _ieee(v):
                fig["fma_ieee"] += 1  # fp32 with IEEE products: plain FMA by choice
            else:
                fails.append(f"no tensor-core instruction in a 16-bit dot kernel: {name}")
    for row in rows:
        v = variants[row["variant"]]
        cc = row["cc"]
        limit = TARGETS[cc]
        name = f"{v['kernel']} sm_{cc} {v['example']}"

        def bytes_of(cid, row=row, cc=cc):
            res = by_key.get((row["variant"], cc, cid))
            if res is not None and not res.get("error") and not res.get("pending"):
                return res["shared"], "compiled"
            return row["model"].get(cid), "model"

        fitting = 0
        for cid in row["launchable"]:
            b, how = bytes_of(cid)
            if b is not None and b > limit:
                fails.append(f"launchable config over shared memory ({how}): {name} [{cid}] "
                             f"{b} B > {limit} B")
                fig["launchable_over"] += 1
            else:
                fitting += 1
        if fitting == 0:
            fails.append(f"no config fits: {name}")
            fig["no_fit"] += 1
        b, how = bytes_of(row["untuned"])
        if b is not None and b > limit:
            fails.append(f"AUTOTUNE=0 config over shared memory ({how}): {name} "
                         f"[{row['untuned']}] {b} B > {limit} B")
            fig["untuned_over"] += 1
    # heavy spills where the same variant has a non-spilling launchable config: the pruning
    # should not let the autotuner time (or AUTOTUNE=0 take) a config that spills KBs per
    # thread when one that does not is there
    for row in rows:
        v = variants[row["variant"]]
        res = {cid: by_key.get((row["variant"], row["cc"], cid)) for cid in row["launchable"]}
        res = {k: r for k, r in res.items() if r and not r.get("error") and not r.get("pending")}
        clean = [k for k, r in res.items() if not r.get("stack")]
        for cid, r in res.items():
            if (r.get("stack") or 0) >= _HEAVY_SPILL and clean:
                fig["heavy_spill_avoidable"] += 1
                fails.append(
                    f"heavy spill with a non-spilling config launchable: {v['kernel']} "
                    f"sm_{row['cc']} [{cid}] {r['stack']} B per thread (none with {clean[0]}) "
                    f"{v['example']}"
                )
    return dict(fig), fails


# Stack bytes per thread above which a config counts as spilling heavily.
_HEAVY_SPILL = 1024


def _summary_md(meta, variants, rows, compiles, results, fig, fails) -> str:
    pending = fig.get("pending", 0)
    lines = [
        f"# Ahead-of-time compile check ({meta['subset']})",
        "",
        *([f"Partial: {fig['compiles'] - pending:,} of {fig['compiles']:,} compiles done, "
           f"{pending:,} pending (not compiled yet; their fit checks use the model).", ""]
          if pending else []),
        f"triton {meta['triton']}, torch {meta['torch']}; targets "
        + ", ".join(f"sm_{cc} ({lim:,} B shared per block)" for cc, lim in TARGETS.items())
        + f"; {meta['wall_s']:.0f} s wall, {meta['jobs']} process(es), {meta['compiled']} compiled "
        f"now, {meta['cached']} from cache.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for k in ("variants", "compiles", "pending", "compile_errors", "launchable_over", "no_fit",
              "untuned_over", "model_under", "over_smem", "spilling", "heavy_spill_avoidable",
              "fma_ieee"):
        lines.append(f"| {k} | {fig.get(k, 0)} |")
    lines += [
        "",
        "`over_smem` counts compiled configs over the limit that the pruning never launches "
        "(none are compiled unless launchable or AUTOTUNE=0). `fma_ieee`: fp32 kernels with "
        "IEEE products (torch's default allow_tf32=False) compile to FMA, not tensor cores — "
        "a choice (`_numerics.fp32_ieee`), not an accident.",
        "",
        "## Per kernel and target",
        "",
        "| kernel | target | dtype | configs compiled | max shared B (limit) | model/compiled "
        "(max) | max regs | max stack B | tensor cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    agg = defaultdict(list)
    row_of = {(r["variant"], r["cc"]): r for r in rows}
    for (vi, cc, cid, _), res in zip(compiles, results):
        if res.get("error") or res.get("pending"):
            continue
        v = variants[vi]
        model = row_of[(vi, cc)]["model"].get(cid)
        agg[(v["kernel"], cc, _dtype_of(v))].append((res, model))
    for (kernel, cc, dt), items in sorted(agg.items()):
        shared = max(r["shared"] for r, _ in items)
        ratio = max((m / r["shared"]) for r, m in items if m and r["shared"]) if any(
            m and r["shared"] for r, m in items) else float("nan")
        regs = max(r["regs"] or 0 for r, _ in items)
        stack = max(r["stack"] or 0 for r, _ in items)
        no_dot = "none (no dot)" if not _uses_dot(kernel) else "fma"
        tc = sorted({"wgmma" if r["wgmma"] else "mma" if r["mma"] else no_dot for r, _ in items})
        lines.append(
            f"| {kernel} | sm_{cc} | {dt} | {len(items)} | {shared:,} ({TARGETS[cc]:,}) | "
            f"{ratio:.2f} | {regs} | {stack:,} | {'/'.join(tc)} |"
        )
    lines += ["", "## Failures", ""]
    lines += [f"- {f}" for f in fails] or ["none"]
    spills = [
        (res["stack"], variants[vi]["kernel"], cc, cid)
        for (vi, cc, cid, _), res in zip(compiles, results)
        if not res.get("error") and not res.get("pending") and (res.get("stack") or 0) > 0
    ]
    lines += ["", "## Spilling compiles (stack bytes per thread)", ""]
    seen = set()
    for stack, kernel, cc, cid in sorted(spills, reverse=True):
        if (kernel, cc, cid) in seen:
            continue
        seen.add((kernel, cc, cid))
        lines.append(f"- {stack:,} B: {kernel} sm_{cc} [{cid}]")
    if not spills:
        lines.append("none")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status (0: every rule holds)."""
    parser = argparse.ArgumentParser(
        prog="python -m llm_adapters.triton_kernels.aot", description=__doc__.splitlines()[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--subset", choices=("ci",), default="ci",
                      help="compile a representative subset (default)")
    mode.add_argument("--full", action="store_true", help="compile the whole grid")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("aot-report"),
                        help="folder for aot.json and aot.md")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"result cache (default {_default_cache()}; 'none' disables)")
    parser.add_argument("--cached-only", action="store_true",
                        help="compile nothing: report on what the cache holds, the rest pending")
    parser.add_argument("--seed", action="append", type=Path, default=[],
                        help="add the compile results of an earlier aot.json[.gz] to the cache "
                             "first (repeatable); results of other sources never match")
    parser.add_argument("--kernel", action="append", default=None,
                        help="only this kernel id (repeatable), e.g. lora._main_kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or lora._INTERPRET or series._INTERPRET:
        print("aot: TRITON_INTERPRET=1 selects the interpreter's configs; run without it",
              file=sys.stderr)
        return 2
    subset = "full" if args.full else args.subset
    cache = None if str(args.cache) == "none" else (args.cache or _default_cache())
    t0 = time.perf_counter()
    variants = enumerate_launches(jobs=max(1, args.jobs))
    if args.kernel:
        unknown = set(args.kernel) - set(KERNELS)
        if unknown:
            parser.error(f"unknown kernel(s) {sorted(unknown)}; known: {sorted(KERNELS)}")
        variants = [v for v in variants if v["kernel"] in args.kernel]
    rows, compiles = plan(variants, subset)
    print(f"aot: {len(variants)} launch variants, {len(compiles)} distinct compiles ({subset}), "
          f"enumerated in {time.perf_counter() - t0:.1f} s")
    if args.cached_only and cache is None:
        parser.error("--cached-only reads the cache: do not pass --cache none")
    if args.seed:
        if cache is None:
            parser.error("--seed fills the cache: do not pass --cache none")
        print(f"aot: {seed_cache(args.seed, cache)} results seeded into {cache}")
    results = run_jobs([job for *_, job in compiles], max(1, args.jobs), cache,
                       cached_only=args.cached_only)
    fig, fails = check(variants, rows, compiles, results)
    meta = {
        "subset": subset, "triton": triton.__version__, "torch": torch.__version__,
        "wall_s": time.perf_counter() - t0, "jobs": args.jobs,
        "cached": sum(1 for r in results if r.get("cached")),
        "compiled": sum(1 for r in results if not r.get("cached") and not r.get("pending")),
        "pending": sum(1 for r in results if r.get("pending")),
        "compile_s": round(sum(r.get("compile_s", 0) for r in results if not r.get("cached")), 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    config_ids = sorted({c for r in rows for c in [*r["launchable"], r["untuned"]]})
    config_index = {c: i for i, c in enumerate(config_ids)}
    compiled_variants = {vi for vi, *_ in compiles}
    report = {
        "meta": meta,
        "targets": {f"sm_{cc}": lim for cc, lim in TARGETS.items()},
        "figures": fig,
        "failures": fails,
        # signatures only for the compiled variants (the others differ in constexprs)
        "variants": [
            {"kernel": v["kernel"], "constexprs": v["constexprs"], "count": v["count"],
             "example": v["example"],
             **({"signature": v["signature"], "divisible": v["divisible"]}
                if i in compiled_variants else {})}
            for i, v in enumerate(variants)
        ],
        # per variant and target: [variant, cc, launchable config indices, AUTOTUNE=0 config
        # index, modelled bytes per launchable config] (indices into "configs")
        "configs": config_ids,
        "per_target": [
            [r["variant"], r["cc"], [config_index[c] for c in r["launchable"]],
             config_index[r["untuned"]], [r["model"][c] for c in r["launchable"]]]
            for r in rows
        ],
        "compiles": [
            {"variant": vi, "cc": cc, "config": cid, "job": _job_hash(job), **res}
            for (vi, cc, cid, job), res in zip(compiles, results)
        ],
    }
    (args.out / "aot.json").write_text(
        json.dumps(report, separators=(",", ":"), default=_jsonable)
    )
    md = _summary_md(meta, variants, rows, compiles, results, fig, fails)
    (args.out / "aot.md").write_text(md)
    print(md)
    print(f"aot: wrote {args.out / 'aot.json'} and {args.out / 'aot.md'}; "
          f"{'FAIL' if fails else 'ok'} ({len(fails)} failure(s))")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
