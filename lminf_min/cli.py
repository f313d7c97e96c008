"""What the command lines share: each common flag declared once, a model and a prompt loaded from
them with clear errors, and `run`, which turns a UserError into one line on stderr and exit code 2.
"""

import argparse
import errno
import json
import math
import os
import re
import resource
import signal
import sys
import tempfile
from pathlib import Path

import torch

from . import interrupted
from .config import UserError
from .tokenizer import Tokenizer


def numbers(text):
    """Whole numbers separated by commas (an argparse type)."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give whole numbers separated by commas, e.g. 4096,16384"
        ) from None


DEVICES, DTYPES = ["auto", "cpu", "cuda"], ["float32", "bfloat16", "float16"]
FLAGS = {  # flag -> argparse keywords, for every command that takes it
    "--ckpt": dict(help="checkpoint directory (default: SmolLM2-135M-Instruct, fetched once)"),
    "--device": dict(default="auto", choices=DEVICES, help="auto = cuda if available"),
    "--dtype": dict(default="float32", choices=DTYPES, help="weights and activations"),
    "--n-global": dict(type=int, default=10, help="G: starting tokens every later token sees"),
    "--n-local": dict(
        type=int,
        help="L: window of recent tokens, the query included (unset: the "
        "length the model was trained on)",
    ),
    "--d-max": dict(type=int, help="D: largest distance ever scored, >= L - 1 (unset: L)"),
    "--top-k-middle": dict(
        type=int,
        default=0,
        help="paper §4: each generated token also attends, per head, to the K middle tokens with "
        "the largest logits (for retrieval); keeps the whole cache (no eviction)",
    ),
    "--top-k-from-layer": dict(type=int, default=0, help="first layer using top-k middle tokens"),
    "--top-k-distance": dict(type=int, help="distance they are scored at (default: L // 2)"),
    "--json": dict(dest="json_out", help="write the result as JSON here"),
    # declared here once; a command says what they mean for it (help, default) in add_flags
    "--text": dict(help="UTF-8 text file"),
    "--tokens": dict(type=int, help="number of tokens"),
    "--lengths": dict(type=numbers, help="lengths in tokens, comma-separated"),
    "--seed": dict(type=int, default=0, help="random seed"),
    "--vanilla": dict(action="store_true", help="full causal attention instead of LM-Infinite"),
    "--bucket": dict(type=int, help="positions per bucket"),
    "--png": dict(help="draw the plot into this PNG file"),
    "--out": dict(help="where to write"),
}
MODEL = ("--ckpt", "--device", "--dtype")  # the flags load_model takes
LAMBDA = ("--n-global", "--n-local", "--d-max")  # LM-Infinite's knobs, LambdaConfig.for_model's
TOP_K = ("--top-k-middle", "--top-k-from-layer", "--top-k-distance")  # and its paper §4 option


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError: one line, like every other mistake."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def parser(doc):
    """An argument parser described by the first paragraph of a module's docstring, named as the
    command is typed (`python -m lminf_min.eval`, `generate.py`)."""
    script = Path(sys.argv[0])
    prog = f"python -m lminf_min.{script.stem}" if script.parent.name == "lminf_min" else None
    return Parser(prog, description=doc.split("\n\n")[0], formatter_class=HelpFormatter)


def subcommand(sub, name, what):
    return sub.add_parser(name, help=what, formatter_class=HelpFormatter)


def add_flags(parser, *common, **own):
    """The common flags named (FLAGS), then the command's own: name=dict(argparse keywords), added
    to FLAGS' where the flag is there (what a common flag means for this command: its help, its
    default, or required=True)."""
    for flag in common:
        parser.add_argument(flag, **FLAGS[flag])
    for name, keywords in own.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, **FLAGS.get(flag, {}) | keywords)
    return parser


# what a full disk, a read-only folder or a missing permission raises (stdout included)
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES)
LARGEST = 10**15  # no count, length or distance a command takes is larger (positions are int64)


def parse(parser, argv=None):
    """The command line's arguments as a dict, every number in it checked once: integers within
    ±LARGEST (a seed: 0..2^64 - 1, what torch takes), floats finite. Each command checks its own
    lower bounds."""
    args = vars(parser.parse_args(argv))
    for name, values in args.items():
        flag = "--" + name.removesuffix("_out").replace("_", "-")
        for value in values if isinstance(values, list) else [values]:
            if name == "seed" and not 0 <= value < 2**64:
                raise UserError(f"{flag} is {value}; it must be a whole number from 0 to 2^64 - 1")
            if name != "seed" and isinstance(value, int) and abs(value) > LARGEST:
                raise UserError(f"{flag} is {value}; it must be at most 10^15")
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{flag} is {value}; it must be a finite number")
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none (None): its help text says what
    happens."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        # a command that gave a common flag a default: what "unset" means no longer applies
        return re.sub(r" \(unset: [^)]*\)", "", super()._get_help_string(action))


def run(main):
    """Run a command-line entry point: a UserError or a full disk ends in one line on stderr and
    exit code 2, a Ctrl-C in "interrupted" and 130, never a traceback."""

    def run(*args, **kwargs):
        ours = signal.getsignal(signal.SIGINT) is interrupted  # not when Ctrl-C is ignored
        if sys.stdout is None:  # closed (`>&-`): what would be printed goes nowhere
            sys.stdout = open(os.devnull, "w")
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # the output was piped into e.g. `head`, which stopped reading
            sys.stderr.close()
            sys.exit(0)
        except OSError as e:
            if e.errno not in DISK_ERRORS:
                raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # drop what is left
            where = e.filename or "the output"
            print(
                f"error: cannot use {where} ({e.strerror}); check the disk and its permissions, "
                "or write elsewhere",
                file=sys.stderr,
            )
            sys.exit(2)
        finally:  # as during the imports: a Ctrl-C while Python shuts down
            if ours:
                signal.signal(signal.SIGINT, interrupted)

    return run


def read_prompt(path):
    """The prompt file's text; a clear error if it is missing, empty, binary or not UTF-8."""
    path = Path(path)
    error = lambda what, fix: UserError(f"prompt file {path} {what}; {fix}")
    if not path.is_file():
        raise error("not found", "pass the path of an existing text file")
    # its text and token ids take several times the file's size
    fits(
        4 * path.stat().st_size, "cpu", f"reading prompt file {path}", "split it into smaller files"
    )
    data = path.read_bytes()
    if b"\0" in data:
        raise error("looks binary (it contains NUL bytes)", "pass a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        fix = "convert it, e.g. with iconv -t utf-8"
        raise error(f"is not UTF-8 (byte {e.start})", fix) from None
    # line endings as Python's text mode reads them; a byte-order mark is not text
    text = text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")
    if not text.strip():
        raise error("is empty", "write some text in it")
    return text


def available_memory():
    """Bytes this process can still get: MemAvailable, or less under a container's (cgroup v2)
    limit; None if unknown."""
    try:
        free = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return None
    try:
        limit, used = (
            Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current")
        )
        return free if limit == "max" else min(free, int(limit) - int(used))
    except (OSError, ValueError):
        return free


def resolve_device(device):
    """The --device flag's device: auto is cuda if torch sees a GPU, else cpu; cuda without one is
    a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    return device


def load_model(ckpt, device, dtype):
    """(checkpoint dir, config, weights, device) for the --ckpt, --device and --dtype flags, with
    clear errors."""
    device = resolve_device(device)
    # private to torch: assume yes if gone
    has = lambda feature: getattr(torch.cpu, f"_is_{feature}_supported", lambda: True)()
    if device == "cpu" and dtype == "float16" and not has("amx_fp16"):
        print(
            "warning: this CPU has no float16 arithmetic, torch emulates it (several times slower "
            "than float32)",
            file=sys.stderr,
        )
    if device == "cpu" and dtype == "bfloat16" and not (has("avx512_bf16") or has("amx_tile")):
        raise UserError(
            "--dtype bfloat16: this CPU lacks bfloat16 instructions (AVX512-BF16 or AMX), so torch "
            "would emulate them slowly; use --dtype float32"
        )
    import weights as ckpts  # here, not above: weights.py's own command line uses this module

    ckpt = Path(ckpt) if ckpt else ckpts.default_checkpoint()
    cfg, weights = ckpts.load_checkpoint(ckpt, device=device, dtype=getattr(torch, dtype))
    return ckpt, cfg, weights, device


def load_text(ckpt, device, dtype, path, tokens=None):
    """load_model's (checkpoint dir, config, weights, device), then the checkpoint's tokenizer and
    the ids of the first `tokens` tokens of a text file (all of them if None). The file is read
    first: a bad one fails before the model loads."""
    text = read_prompt(path)
    ckpt, cfg, weights, device = load_model(ckpt, device, dtype)
    tok = Tokenizer(ckpt, cfg.vocab_size)
    return ckpt, cfg, weights, device, tok, tok.encode(text)[:tokens]


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # Linux reports KiB: the process's peak RSS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def writable(path, *reads):
    """Fail now, not after hours of work, if an output could not be written, or would replace a
    file this run reads or writes, or land in a checkpoint (reads: files, or checkpoint folders;
    the default model's folder always counts)."""
    if not path:
        return
    from weights import DEFAULT_OUT  # here: weights.py imports this module

    out = Path(path).resolve()
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise UserError(
            f"cannot write {path}: its folder {out.parent} does not exist, is a file or is not "
            "writable; pick another path"
        )
    taken = [Path(r).resolve() for r in (*reads, DEFAULT_OUT) if r]
    inside = [t for t in taken if t.is_dir() and out.is_relative_to(t)]
    if out.exists() and not out.is_file() or out in taken or inside:
        raise UserError(
            f"cannot write {path}: it is a folder, a device, a file of this run or inside a "
            "checkpoint; pick another"
        )


def write_json(path, data):
    """Write data as JSON through a temporary file of its own renamed into place: never half a
    file, and nothing else in the folder touched."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).resolve().parent, prefix=".json-")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a result is ordinary data
    os.replace(tmp, path)


def fits(need, device, what, fix):
    """A clear error now, not a crash later, if `need` bytes exceed the memory the device has free
    (what needs them, and the fix, for the message)."""
    free = available_memory() if str(device) == "cpu" else torch.cuda.mem_get_info()[0]
    if free is not None and need > free:
        raise UserError(
            f"{what} needs {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB available; "
            + fix
        )
