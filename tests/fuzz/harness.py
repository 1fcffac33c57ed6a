"""The fuzz harness: finds every target, fuzzes each with atheris, replays corpora.

The convention every ``tests/fuzz/fuzz_<name>.py`` follows:

- ``ALLOWED: tuple[type[BaseException], ...]``: the module's own error types, the
  only exceptions allowed to leave ``one_input``. Anything else is a crash.
- ``def one_input(data: bytes) -> None``: deterministic, no I/O, no sleeping.
- a seed corpus in ``tests/fuzz/corpus/<name>/`` (a handful of real-looking inputs).
- optional ``MAX_LEN`` (bytes; default ``DEFAULT_MAX_LEN``) for the longest input, and
  ``DICTIONARY`` (a tuple of bytes: tokens of the format, such as JSON keys, that
  libFuzzer splices into inputs; byte flips alone rarely make valid JSON).

Usage (``make fuzz`` runs ``run`` over every target)::

    harness.py list
    harness.py replay [NAME ...] [--input FILE ...]   # corpus files (or FILEs), in-process
    harness.py run [NAME ...] [--seconds N] [--jobs J] [--crash-dir D] [--work-dir W]

``run`` starts one process per target, so a crash, a hang or an OOM in one
target cannot stop the others. In that process atheris instruments the
project's packages (and h2, hpack and hyperframe, which the HBONE core drives)
for coverage feedback and hands inputs to libFuzzer. A Python
exception outside ALLOWED is recorded (input and traceback, once per distinct
place it was raised from) and fuzzing carries on, so one run reports every
distinct crash it met; a hang, an OOM or a fatal signal ends that target's run
and libFuzzer saves the input. Every input that crashed lands in
``<crash-dir>/<name>/``; replay one with ``harness.py replay NAME --input FILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent.parent
DEFAULT_WORK_DIR = REPO / "build" / "fuzz"
DEFAULT_MAX_LEN = 8192
# Coverage feedback comes from these packages: ours, and the pure-Python HTTP/2 stack
# the HBONE core hands network bytes to (3x slower per input, but its state
# machine is where those inputs go). Not PyYAML: instrumented, its pure-Python
# composer turns a deeply nested document into a 10 s input.
INSTRUMENTED = ("identity", "policy", "tunnel", "nodeagent", "waypoint",
                "h2", "hpack", "hyperframe")
# Per input: a parser that takes seconds on a few KiB is a denial of service.
INPUT_TIMEOUT_S = 10
RSS_LIMIT_MB = 2048
# How a crash shows in a target's log: the callback's line for a Python exception
# (exception-<sha1>, with a .txt), libFuzzer's for a fatal signal, timeout or OOM.
_CRASH_LINE = re.compile(r"(?m)(?:: CRASH .* -> |Test unit written to )(.+)$")


@dataclass(frozen=True)
class Target:
    name: str  # fuzz_<name>.py
    path: Path
    corpus: Path  # the committed seed corpus

    def load(self) -> ModuleType:
        """Import the target module from its file, and check it follows the convention."""
        spec = importlib.util.spec_from_file_location(f"trellis_fuzz_{self.name}", self.path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return check_convention(module, self.path)


def check_convention(module: ModuleType, path: Path) -> ModuleType:
    allowed = getattr(module, "ALLOWED", None)
    if not isinstance(allowed, tuple) or not all(
            isinstance(e, type) and issubclass(e, BaseException) for e in allowed):
        raise TypeError(f"{path}: ALLOWED must be a tuple of exception types")
    if not callable(getattr(module, "one_input", None)):
        raise TypeError(f"{path}: no one_input(data: bytes) function")
    return module


def discover(targets_dir: Path = FUZZ_DIR) -> list[Target]:
    return [Target(p.stem.removeprefix("fuzz_"), p, targets_dir / "corpus" / p.stem[5:])
            for p in sorted(targets_dir.glob("fuzz_*.py"))]


def select(targets: Sequence[Target], names: Sequence[str]) -> list[Target]:
    known = {t.name: t for t in targets}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown fuzz target(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return [known[n] for n in names] if names else list(targets)


# ---- what counts as a crash, and where it is recorded -------------------------------

def crash_signature(exc: BaseException) -> str:
    """Where a crash comes from: its type, the innermost frame in our code and the
    innermost frame of all. Two inputs with one signature are one bug."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(REPO))
            and not f.filename.startswith(str(FUZZ_DIR))]
    where = [f"{Path(f.filename).name}:{f.lineno}" for f in (ours[-1:] + frames[-1:])]
    return f"{type(exc).__name__} at {' / '.join(where) or 'unknown'}"


def save_crash(crash_dir: Path, data: bytes, exc: BaseException, signature: str) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"exception-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    text = "".join(traceback.format_exception(exc))
    path.with_suffix(".txt").write_text(f"{signature}\n\n{text}")
    return path


def guarded(module: ModuleType) -> Callable[[bytes], BaseException | None]:
    """``one_input`` with the target's own errors swallowed: returns a crash, or None."""
    allowed: tuple[type[BaseException], ...] = module.ALLOWED
    one_input: Callable[[bytes], None] = module.one_input

    def call(data: bytes) -> BaseException | None:
        try:
            one_input(data)
        except allowed:
            return None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # anything else, SystemExit included, is a crash
            return exc
        return None

    return call


# ---- replay: every corpus file through its target, in this process ------------------

@dataclass
class ReplayResult:
    target: str
    files: int = 0
    crashes: list[tuple[Path, str]] = field(default_factory=list)  # (input, traceback)


def replay(target: Target, inputs: Sequence[Path] | None = None) -> ReplayResult:
    call = guarded(target.load())
    files = list(inputs) if inputs is not None else sorted(
        p for p in target.corpus.glob("*") if p.is_file())
    result = ReplayResult(target.name, len(files))
    for path in files:
        exc = call(path.read_bytes())
        if exc is not None:
            result.crashes.append((path, "".join(traceback.format_exception(exc))))
    return result


# ---- run: atheris for a while, one process per target ------------------------------

@dataclass
class RunResult:
    target: str
    seconds: float = 0.0
    executions: int = 0
    corpus_size: int = 0
    crashes: list[Path] = field(default_factory=list)  # inputs saved during this run
    error: str = ""  # the run itself failed (no libFuzzer summary): not a crash count
    log: Path | None = None

    def line(self) -> str:
        status = self.error or ("ok" if not self.crashes else
                                f"CRASHES: {', '.join(str(p) for p in self.crashes)}")
        return (f"{self.target:<16} {self.seconds:7.1f} s {self.executions:>10} execs "
                f"{self.executions / max(self.seconds, 1e-9):>8.0f}/s "
                f"corpus {self.corpus_size:>5} crashes {len(self.crashes):>3}  {status}")


def run_target(target: Target, *, seconds: float, crash_dir: Path, work_dir: Path) -> RunResult:
    """Fuzz one target for ``seconds`` in a child process and summarise the run."""
    target_crashes = crash_dir / target.name
    target_crashes.mkdir(parents=True, exist_ok=True)
    corpus_out = work_dir / target.name / "corpus"
    corpus_out.mkdir(parents=True, exist_ok=True)
    log = work_dir / target.name / "fuzz.log"
    command = [sys.executable, str(Path(__file__).resolve()), "_child", target.name,
               "--targets-dir", str(target.path.parent), "--seconds", str(seconds),
               "--crash-dir", str(target_crashes), "--corpus-out", str(corpus_out)]
    started = time.monotonic()
    with log.open("wb") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                  timeout=seconds + 120, check=False).returncode
        except subprocess.TimeoutExpired:
            code = -1
    result = RunResult(target.name, time.monotonic() - started, log=log)
    text = log.read_text(errors="replace")
    # What this run met, from its log: an input saved by an earlier run (say, kept in
    # the work corpus) that crashes again is still a crash.
    result.crashes = sorted({Path(p) for p in _CRASH_LINE.findall(text)})
    executed = re.search(r"stat::number_of_executed_units: (\d+)", text)
    corpus = re.findall(r" corp: (\d+)/", text)
    result.executions = int(executed[1]) if executed else 0
    result.corpus_size = int(corpus[-1]) if corpus else 0
    if executed is None and not result.crashes:
        tail = " | ".join(text.strip().splitlines()[-3:])
        result.error = f"ERROR: no libFuzzer summary (exit {code}; {log}): {tail}"
    return result


def _child(args: argparse.Namespace) -> None:
    """The fuzzing process: instrument, load one target, hand it to libFuzzer."""
    import atheris

    # Refusals are logged by the code under test (the CA logs every one): at a
    # few thousand inputs a second that is noise, and the log is not under test.
    logging.disable(logging.CRITICAL)
    target = select(discover(Path(args.targets_dir)), [args.name])[0]
    # Imported by name, so that atheris instruments the target module itself too
    # (its own comparisons guide the search). This process fuzzes only this one.
    sys.path.insert(0, str(target.path.parent))
    with atheris.instrument_imports(include=[*INSTRUMENTED, target.path.stem]):
        module = check_convention(importlib.import_module(target.path.stem), target.path)
    call = guarded(module)
    crash_dir = Path(args.crash_dir)
    seen: set[str] = set()

    def test_one_input(data: bytes) -> None:
        exc = call(data)
        if exc is None:
            return
        signature = crash_signature(exc)
        if signature not in seen:  # one saved input per distinct crash
            seen.add(signature)
            path = save_crash(crash_dir, data, exc, signature)
            print(f"fuzz {target.name}: CRASH {signature} -> {path}", file=sys.stderr,
                  flush=True)

    max_len = int(getattr(module, "MAX_LEN", DEFAULT_MAX_LEN))
    corpora = [args.corpus_out] + ([str(target.corpus)] if target.corpus.is_dir() else [])
    options = [f"-max_total_time={max(1, round(args.seconds))}", f"-max_len={max_len}",
               f"-timeout={INPUT_TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}",
               "-print_final_stats=1", f"-artifact_prefix={crash_dir}/"]
    tokens: tuple[bytes, ...] = getattr(module, "DICTIONARY", ())
    if tokens:
        dictionary = Path(args.corpus_out).parent / "dictionary"
        dictionary.write_text("".join(
            '"' + "".join(f"\\x{b:02x}" for b in token) + '"\n' for token in tokens))
        options.append(f"-dict={dictionary}")
    atheris.Setup([sys.argv[0], *corpora, *options], test_one_input)
    atheris.Fuzz()


# ---- command line ---------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list")
    rep = commands.add_parser("replay")
    rep.add_argument("names", nargs="*")
    rep.add_argument("--input", type=Path, action="append",
                     help="replay these files instead of the corpus (one target)")
    run = commands.add_parser("run")
    run.add_argument("names", nargs="*")
    run.add_argument("--seconds", type=float, default=60.0)
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("--crash-dir", type=Path, default=DEFAULT_WORK_DIR / "crashes")
    run.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    for sub in (listing, rep, run):
        sub.add_argument("--targets-dir", type=Path, default=FUZZ_DIR)
    child = commands.add_parser("_child")
    child.add_argument("name")
    for option in ("--targets-dir", "--crash-dir", "--corpus-out"):
        child.add_argument(option, required=True)
    child.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)

    if args.command == "_child":
        _child(args)
        return 0  # not reached: libFuzzer exits the process
    logging.disable(logging.CRITICAL)  # as in _child: refusal logs are not the output here
    targets = discover(args.targets_dir)
    if args.command == "list":
        for target in targets:
            print(f"{target.name:<16} {target.path}")
        return 0
    chosen = select(targets, args.names)
    if args.command == "replay":
        if args.input and len(chosen) != 1:
            raise SystemExit("--input needs exactly one target name")
        failed = False
        for target in chosen:
            result = replay(target, args.input)
            print(f"{target.name:<16} {result.files:>4} inputs  "
                  f"{len(result.crashes)} crashes")
            for path, text in result.crashes:
                print(f"--- {path}\n{text}")
            failed |= bool(result.crashes) or result.files == 0
        return 1 if failed else 0
    print(f"fuzzing {len(chosen)} targets for {args.seconds:g} s each; crashes go to "
          f"{args.crash_dir}/<target>/", flush=True)
    failed = False
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for outcome in pool.map(lambda t: run_target(
                t, seconds=args.seconds, crash_dir=args.crash_dir, work_dir=args.work_dir),
                chosen):
            print(outcome.line(), flush=True)
            failed |= bool(outcome.crashes or outcome.error)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
