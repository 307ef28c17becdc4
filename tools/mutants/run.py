#!/usr/bin/env python3
"""Mutation suite runner: plants each bug of tools/mutants/<family>/<name>.toml in a scratch
copy of cuda/, runs the one emulator case the mutant names (tools/emu/run.sh <case>) and
reports whether the case caught it.

A mutant is *killed* when its case fails on the mutated copy, *survived* when the case still
passes, and an *error* when it cannot be judged: a `find` text that is not in the file exactly
once, a mutant that does not compile, or a case that already fails on the unmutated tree (the
runner checks every case it uses on the unmutated cuda/ first). The format of a mutant file is
described in tools/mutants/README.md.

Usage:
  tools/mutants/run.py                      every mutant
  tools/mutants/run.py NAME ...             the named ones (family/name, or name when unique)
  tools/mutants/run.py --sample N --seed S  a rotating sample of N (CI: S = day number)
  tools/mutants/run.py --list               list them, run nothing
  tools/mutants/run.py --check              check that every mutant applies, run nothing
  tools/mutants/run.py --cached             the table of cached verdicts, run nothing
Results are cached under target/mutants-cache, keyed by the bytes of everything the run reads
(the mutated cuda/, tools/emu/include, tools/emu/run.sh and the case's harness directory, the
case and the environment), so an unchanged mutant or
baseline is not rebuilt; --no-cache ignores the cache. Exit status 0 only when every mutant
run was killed. Standard library only (Python >= 3.11 for tomllib).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "tools" / "mutants"
RUN_SH = ROOT / "tools" / "emu" / "run.sh"
CACHE = ROOT / "target" / "mutants-cache"
KINDS = {
    "tolerance", "order", "large-shape", "memory-ordering", "cp-async", "range-limit", "race",
    "mask", "tail", "fragment", "warp-reduction", "softmax-rescale", "tie-break", "packing",
    "rounding", "bounds", "logic",
}
MODES = {"lazy", "eager"}
# The fixed shuffle behind --sample: the window of N mutants at offset S * N of this order
# rotates through the whole suite as S counts up (a day number in CI), every mutant once
# every ceil(total / N) values of S, and never depends on which mutants ran before.
SAMPLE_ORDER_SEED = 20261202


class MutantError(Exception):
    """A mutant file that cannot be used as written."""


@dataclass
class Mutant:
    name: str  # family/stem
    path: Path
    kind: str
    file: str
    case: str
    why: str
    edits: list[tuple[str, str]]
    env: dict[str, str] = field(default_factory=dict)
    modes: list[str] = field(default_factory=list)


def load(path: Path) -> Mutant:
    name = f"{path.parent.name}/{path.stem}"
    try:
        with path.open("rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise MutantError(f"{name}: {e}") from e
    for key in ("kind", "file", "case", "why", "edit"):
        if key not in d:
            raise MutantError(f"{name}: missing `{key}`")
    if d["kind"] not in KINDS:
        raise MutantError(f"{name}: unknown kind {d['kind']!r}")
    if not (d["file"].startswith("cuda/") and (ROOT / d["file"]).is_file()):
        raise MutantError(f"{name}: file {d['file']!r} is not a file under cuda/")
    edits = []
    for e in d["edit"]:
        if not isinstance(e, dict) or set(e) != {"find", "replace"} or not e["find"]:
            raise MutantError(f"{name}: each [[edit]] needs a non-empty find and a replace")
        edits.append((e["find"], e["replace"]))
    env = d.get("env", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise MutantError(f"{name}: env values must be strings")
    modes = d.get("modes", [])
    if not set(modes) <= MODES:
        raise MutantError(f"{name}: modes must be among {sorted(MODES)}")
    return Mutant(name, path, d["kind"], d["file"], d["case"], d["why"], edits, env, modes)


def discover() -> list[Mutant]:
    return [load(p) for p in sorted(SUITE.glob("*/*.toml"))]


def mutate(text: str, edits: list[tuple[str, str]]) -> str:
    for find, replace in edits:
        n = text.count(find)
        if n != 1:
            raise MutantError(f"find text occurs {n} times (must be once): {find[:60]!r}")
        text = text.replace(find, replace, 1)
    return text


def tree_digest(cuda: Path, m_case: str, env: dict[str, str]) -> str:
    """Hash of every input of one emulator run: the kernel tree, the shared runtime, run.sh and
    the case's own harness directory, the case and the environment."""
    h = hashlib.sha256()
    emu = ROOT / "tools" / "emu"
    family = m_case.split("=", 1)[0]
    files = [(cuda, p) for p in cuda.rglob("*")]
    files += [(emu, p) for d in (emu / "include", emu / family) for p in d.rglob("*")]
    files.append((emu, emu / "run.sh"))
    for base, p in sorted(files, key=lambda bp: (str(bp[0]), str(bp[1]))):
        if p.is_file():
            h.update(str(p.relative_to(base)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(json.dumps([m_case, sorted(env.items())]).encode())
    return h.hexdigest()[:32]


@dataclass
class Outcome:
    status: str  # killed / survived / error
    seconds: float
    detail: str = ""
    cached: bool = False


# A line of an emulator run that already decides the verdict: a failed check of any harness, or
# a sanitizer / emulator abort.
FAIL_MARKS = ("FAIL", "ERROR: AddressSanitizer", "runtime error:", "ThreadSanitizer", "emu: ")


def emulate(cuda: Path, case: str, env: dict[str, str], modes: list[str], scratch: Path,
            timeout: float, log: Path, stop_at_fail: bool) -> tuple[int | None, bool, bool]:
    """Runs tools/emu/run.sh CASE on kernel tree CUDA. Returns (exit status, or None on
    timeout; whether the harness was built; whether the run was cut short at its first
    failure, which stop_at_fail asks for: a mutant needs one failing check, not all of them)."""
    tmp = scratch / "tmp"
    tmp.mkdir(exist_ok=True)
    full = dict(os.environ)
    full.update(env)
    full.update(NTKV_EMU_CUDA_DIR=str(cuda), TMPDIR=str(tmp))
    if modes:
        # Honoured by run.sh where it supports a mode restriction; harmless otherwise.
        full["NTKV_EMU_MODES"] = " ".join(modes)
    family = case.split("=", 1)[0]
    timed_out = threading.Event()
    cut = False
    with log.open("wb") as out:
        p = subprocess.Popen(["bash", str(RUN_SH), case], env=full, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)

        def stop() -> None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def expire() -> None:
            timed_out.set()
            stop()

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            for line in p.stdout:
                out.write(line)
                text = line.decode(errors="replace")
                if stop_at_fail and not cut and (text.lstrip().startswith(FAIL_MARKS[0])
                                                 or any(m in text for m in FAIL_MARKS[1:])):
                    out.flush()
                    cut = True
                    stop()
            rc = p.wait()
        finally:
            timer.cancel()
            if p.poll() is None:
                stop()
                p.wait()
    # run.sh names the ThreadSanitizer build <family>-emu-tsan.
    built = any(tmp.glob(f"ntkv-emu-*/{family}-emu*"))
    if cut:
        return 1, built, True
    return (None if timed_out.is_set() else rc), built, False


def cached(key: str, use_cache: bool) -> Outcome | None:
    f = CACHE / f"{key}.json"
    if not use_cache or not f.is_file():
        return None
    d = json.loads(f.read_text())
    return Outcome(d["status"], d["seconds"], d.get("detail", ""), cached=True)


def store(key: str, o: Outcome, log: Path | None) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"{key}.json").write_text(json.dumps({"status": o.status, "seconds": o.seconds,
                                                   "detail": o.detail}))
    if log is not None and log.is_file():
        shutil.copyfile(log, CACHE / f"{key}.log")


def baseline(m: Mutant, timeout: float, use_cache: bool, seen: dict) -> Outcome:
    """The mutant's case on the unmutated tree (once per case and env per invocation)."""
    ident = (m.case, tuple(sorted(m.env.items())), tuple(m.modes))
    if ident in seen:
        return seen[ident]
    key = "base-" + tree_digest(ROOT / "cuda", m.case, m.env | {"modes": ",".join(m.modes)})
    o = cached(key, use_cache)
    if o is None:
        with tempfile.TemporaryDirectory(prefix="ntkv-mutant-") as d:
            scratch = Path(d)
            log = scratch / "log"
            t = time.monotonic()
            rc, _, _ = emulate(ROOT / "cuda", m.case, m.env, m.modes, scratch, timeout, log, False)
            ok = rc == 0
            if rc is not None and rc < 0 and -rc in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP):
                o = Outcome("error", time.monotonic() - t, f"the baseline run was stopped by signal {-rc}")
                seen[ident] = o
                return o
            o = Outcome("pass" if ok else "fail", time.monotonic() - t,
                        "" if ok else f"unmutated case fails (rc {rc}); log {CACHE / (key + '.log')}")
            store(key, o, log)
    seen[ident] = o
    return o


def mutated_copy(m: Mutant, cuda: Path):
    """Copies cuda/ to `cuda` with the mutant applied; an `error` outcome when it does not apply."""
    shutil.copytree(ROOT / "cuda", cuda)
    target = cuda / m.file.removeprefix("cuda/")
    try:
        target.write_text(mutate(target.read_text(), m.edits))
    except MutantError as e:
        return Outcome("error", 0.0, str(e))
    return None


def cached_one(m: Mutant) -> Outcome:
    """The cached verdict of a mutant on the current tree, or `not run`."""
    with tempfile.TemporaryDirectory(prefix="ntkv-mutant-") as d:
        cuda = Path(d) / "cuda"
        err = mutated_copy(m, cuda)
        if err is not None:
            return err
        o = cached("mut-" + tree_digest(cuda, m.case, m.env | {"modes": ",".join(m.modes)}), True)
        return o if o is not None else Outcome("not run", 0.0)


def run_one(m: Mutant, timeout: float, use_cache: bool, keep: bool, seen: dict) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="ntkv-mutant-") as d:
        scratch = Path(d)
        cuda = scratch / "cuda"
        err = mutated_copy(m, cuda)
        if err is not None:
            return err
        b = baseline(m, timeout, use_cache, seen)
        if b.status != "pass":
            return Outcome("error", 0.0, b.detail)
        key = "mut-" + tree_digest(cuda, m.case, m.env | {"modes": ",".join(m.modes)})
        o = cached(key, use_cache)
        if o is not None:
            return o
        log = scratch / "log"
        t = time.monotonic()
        rc, built, _ = emulate(cuda, m.case, m.env, m.modes, scratch, timeout, log, True)
        secs = time.monotonic() - t
        if rc is None:
            # A hang is a failure the harness would report (launches time out on deadlock).
            o = Outcome("killed", secs, f"timed out after {timeout:.0f} s")
        elif rc < 0 and -rc in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP):
            # run.sh itself was stopped from outside (a cancelled job, the OOM killer): no
            # verdict, and nothing is cached.
            return Outcome("error", secs, f"the emulator run was stopped by signal {-rc}")
        elif not built:
            o = Outcome("error", secs, "the mutated source does not compile")
        elif rc == 0:
            o = Outcome("survived", secs)
        else:
            fails = [ln for ln in log.read_text(errors="replace").splitlines()
                     if ln.startswith(("FAIL", "ERROR")) or "Sanitizer" in ln or "emu:" in ln]
            o = Outcome("killed", secs, fails[0][:100] if fails else f"rc {rc}")
        store(key, o, log)
        if keep:
            dst = CACHE / "logs" / (m.name.replace("/", "--") + ".log")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, dst)
        return o


def sample(mutants: list[Mutant], n: int, seed: int) -> list[Mutant]:
    order = sorted(mutants, key=lambda m: m.name)
    random.Random(SAMPLE_ORDER_SEED).shuffle(order)
    if n >= len(order):
        return order
    start = (seed * n) % len(order)
    return [order[(start + i) % len(order)] for i in range(n)]


def select(mutants: list[Mutant], names: list[str]) -> list[Mutant]:
    out = []
    for want in names:
        hit = [m for m in mutants if m.name == want or m.name.split("/", 1)[1] == want]
        if len(hit) != 1:
            raise MutantError(f"{want!r} names {len(hit)} mutants")
        out.append(hit[0])
    return out


def table(rows: list[tuple[Mutant, Outcome]]) -> str:
    head = ("mutant", "kind", "file", "case", "result", "s")
    body = [(m.name, m.kind, m.file, m.case, o.status + (" (cached)" if o.cached else ""),
             f"{o.seconds:.0f}") for m, o in rows]
    w = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, body)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutants to run (family/name or a unique name)")
    ap.add_argument("--sample", type=int, metavar="N", help="run a rotating sample of N mutants")
    ap.add_argument("--seed", type=int, default=0, metavar="S", help="which sample (CI: the day number)")
    ap.add_argument("--list", action="store_true", help="list the selected mutants and stop")
    ap.add_argument("--check", action="store_true",
                    help="only check that every selected mutant parses and its edits apply")
    ap.add_argument("--no-cache", action="store_true", help="ignore cached results")
    ap.add_argument("--cached", action="store_true",
                    help="report the cached verdicts on the current tree; run nothing")
    ap.add_argument("--keep-logs", action="store_true", help="copy each run's log to target/mutants-cache/logs")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per emulator run (default 1200)")
    ap.add_argument("--suite", type=Path, help="read mutants from this directory instead (held-out sets)")
    ap.add_argument("--skip-large", action="store_true",
                    help="leave out the mutants whose case is a production-scale `-large` run "
                         "(minutes each: CI's sample skips them, the full run does not)")
    args = ap.parse_args()
    global SUITE
    if args.suite:
        SUITE = args.suite.resolve()
    try:
        mutants = discover()
        chosen = select(mutants, args.names) if args.names else mutants
    except MutantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.skip_large:
        chosen = [m for m in chosen if not m.case.split("=", 1)[0].endswith("-large")]
    if args.sample is not None:
        chosen = sample(chosen, args.sample, args.seed)
    if args.check:
        bad = 0
        for m in chosen:
            try:
                mutate((ROOT / m.file).read_text(), m.edits)
            except MutantError as e:
                print(f"ERROR: {m.name}: {e}")
                bad += 1
        print(f"{len(chosen) - bad} of {len(chosen)} mutants apply")
        return 1 if bad else 0
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.kind:15} {m.file:28} {m.case:18} {m.why}")
        return 0
    rows, seen = [], {}
    t0 = time.monotonic()
    for m in chosen:
        o = cached_one(m) if args.cached else run_one(m, args.timeout, not args.no_cache, args.keep_logs, seen)
        rows.append((m, o))
        note = f"  [{o.detail}]" if o.detail else ""
        print(f"{o.status:8} {m.name} ({o.seconds:.0f} s{', cached' if o.cached else ''}){note}", flush=True)
    print()
    print(table(rows))
    killed = sum(o.status == "killed" for _, o in rows)
    survived = [m.name for m, o in rows if o.status == "survived"]
    errors = [m.name for m, o in rows if o.status in ("error", "not run")]
    print(f"\n{killed} of {len(rows)} killed, {len(survived)} survived, {len(errors)} errors "
          f"({time.monotonic() - t0:.0f} s)")
    for m in survived:
        print(f"SURVIVED: {m}")
    for m in errors:
        print(f"ERROR: {m}")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
