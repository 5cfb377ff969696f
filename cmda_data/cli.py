"""The ``cmda`` command (also ``python -m cmda_data``).

Subcommands:

* ``cmda demo``: train a small aligner on built-in data, build a bank, mix samples and
  draw them (PNG + JSON summary);
* ``cmda bank build``: fit a bank (GMM, M by BIC) on embeddings stored as ``.npy`` files;
* ``cmda bank info``: describe a saved bank;
* ``cmda probe``: does the teacher matter on my data? Base, Mixup, CMDA and CMDA with a random
  teacher on an ``.npz`` of features and labels, paired over seeds (JSON + forest plot);
* ``cmda version``: versions of cmda_data, torch and Python.

Errors are reported as one line, ``cmda: error: <message> (hint: <fix>)``, with exit
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional, Sequence, TextIO

import numpy as np
import torch

from . import __version__
from .bank._bank import EmbeddingBank
from .bank._format import CONFIG_NAME as BANK_CONFIG
from .bank._format import TENSORS_NAME as BANK_TENSORS
from .core.mixture import GaussianMixture
from .demo._job import DemoConfig, run_demo
from .exceptions import CMDAError, CMDAWarning, DeviceError, MissingDependencyError, ValidationError
from .probe import DEFAULT_METHODS, probe
from .probe._probe import PRESETS

__all__ = ["build_parser", "main"]

PROG = "cmda"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
#: printed by 'bank build' and 'bank info' when the criterion chose M = 1 (bank.metadata["dca_inert"])
DCA_INERT_NOTE = ("M = 1 was chosen: one cluster, so the intra-modal (DCA, Eq. 11) weights are all equal and "
                  "do nothing; only the teacher weights (Eq. 10) act. Rebuild with --n-components 2 to force "
                  "two clusters (the paper's choice)")


def _defaults(func: Callable[..., Any]) -> dict:
    """The keyword defaults of ``func``: the options below take theirs from the code they call."""
    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}


_DEMO = DemoConfig()
_BANK = _defaults(EmbeddingBank.from_embeddings)
_GMM = _defaults(GaussianMixture)
_PROBE = _defaults(probe)


class CLIError(ValidationError):
    """A usage error found by the CLI itself (bad option value); a CMDAError that carries its own hint."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line with a hint, not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message, f"run '{self.prog} --help' to see the options")


def _default_text(action: argparse.Action) -> Optional[str]:
    """``(default: VALUE)`` with the value written in (no ``%(default)s`` left to expand); None: nothing to add."""
    if (not action.option_strings or action.required or "(default: " in (action.help or "")
            or action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._VersionAction)):
        return None
    if action.const is True and action.default is False:  # store_true flags
        return "(default: off)"
    value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else str(action.default)
    return f"(default: {value})"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the descriptions' line breaks; end every option's help with its real default."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:  # argparse expands %: escape the value's
        extra = _default_text(action)
        return (action.help or "") if extra is None else f"{action.help or ''} {extra.replace('%', '%%')}"


# -------------------------------------------------------------------------------- commands
def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    config = DemoConfig(out=Path(args.out), data=args.data, seed=args.seed, epochs=args.epochs, n=args.n,
                        device=args.device, rows=args.rows, top_k=args.top_k, pool_size=args.pool_size,
                        temperature=args.temperature, progress=not args.no_progress)
    run_demo(config, echo=lambda line: print(line, file=out, flush=True))
    return 0


def _load_npy(path: str, option: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{option}: expected an existing .npy file, got {path!r} (no such file)")
    try:
        array = np.load(file, allow_pickle=False)
    except ValueError as error:  # pickled object arrays, or not a .npy file
        raise CLIError(f"{option}: expected a numeric .npy array (saved with numpy.save), got {path!r}: {error}",
                       "save the embeddings with numpy.save(path, array.astype('float32'))") from error
    if not isinstance(array, np.ndarray) or array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        shape = getattr(array, "shape", None)
        raise CLIError(f"{option}: expected a 2-D numeric [N, d] array, got shape {shape} in {path!r}",
                       "store one embedding per row: numpy.save(path, z) with z of shape [N, d]")
    if np.iscomplexobj(array):  # casting would drop the imaginary part without a word
        raise CLIError(f"{option}: expected real-valued embeddings, got complex dtype {array.dtype} in {path!r}",
                       "store real features, e.g. numpy.save(path, np.concatenate([z.real, z.imag], axis=1))")
    with np.errstate(over="ignore"):
        values = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(values).all() and np.isfinite(array).all():  # finite float64 beyond float32's range
        raise CLIError(f"{option}: expected values within float32's range (|x| < 3.4e38), got a maximum "
                       f"|x| of {float(np.abs(array).max()):.4g} in {path!r}", "scale the embeddings before saving")
    return torch.from_numpy(values)


def _candidates_text(values: Sequence[int]) -> str:
    """``1-6`` for a run of consecutive values, ``2,4,8`` otherwise (what --candidates parses)."""
    values = list(values)
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def _check_out(out: str, force: bool) -> None:
    """Refuse to write over a saved bank unless ``--force``."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"--out: expected a folder for the bank, got {out!r} (an existing file)",
                       "choose another --out")
    held = [name for name in (BANK_CONFIG, BANK_TENSORS) if (folder / name).exists()]
    if held and not force:
        raise CLIError(f"--out: expected a folder without a saved bank, got {out!r} (it holds {', '.join(held)})",
                       "pass --force to replace that bank, or choose another --out")


def _parse_candidates(text: str) -> List[int]:
    try:
        if "-" in text and "," not in text:
            low, high = (int(part) for part in text.split("-"))
            values = list(range(low, high + 1))
        else:
            values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise CLIError(f"--candidates: expected a range such as 1-6 or a list such as 2,4,8, got {text!r}",
                       "write the candidate numbers of components as LOW-HIGH or A,B,C (all >= 1)")
    return values


def _cmd_bank_build(args: argparse.Namespace, out: TextIO) -> int:
    if args.student_name == args.teacher_name:
        raise CLIError(f"--student-name and --teacher-name: expected two different names, got {args.student_name!r} "
                       "twice", "name the modalities differently, e.g. --student-name image --teacher-name text")
    _check_out(args.out, args.force)
    student = _load_npy(args.student, "--student")
    teacher = _load_npy(args.teacher, "--teacher")
    candidates = _parse_candidates(args.candidates)
    with warnings.catch_warnings():  # said once, in the report below (the note), not twice
        warnings.filterwarnings("ignore", r"(BIC|AIC) chose M = 1", CMDAWarning)  # only that one
        bank = EmbeddingBank.from_embeddings(
            {args.student_name: student, args.teacher_name: teacher}, student=args.student_name,
            teachers=[args.teacher_name], fit_on=args.fit_on, n_components=args.n_components, candidates=candidates,
            reduce_dim=args.reduce_dim, random_state=args.seed, covariance_type=args.covariance_type)
    folder = bank.save(args.out)
    print(f"built EmbeddingBank: {len(bank)} rows, dim {bank.dim}, student {bank.student!r}, "
          f"teacher {bank.teachers[0]!r}", file=out)
    scores = bank.metadata.get("n_components_scores")
    how = "given" if not scores else "by BIC: " + ", ".join(f"M={m}: {s:.1f}" for m, s in scores.items())
    print(f"GMM on {bank.fit_on!r} embeddings: M = {bank.n_components} ({how})", file=out)
    if bank.metadata.get("dca_inert"):
        print(f"note: {DCA_INERT_NOTE}", file=out)
    print(f"saved to {folder}", file=out)
    return 0


def _cmd_bank_info(args: argparse.Namespace, out: TextIO) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"DIR: expected a bank folder, got {args.dir!r} (no such folder)")
    bank = EmbeddingBank.load(folder)
    meta = bank.metadata
    facts = {
        "path": str(folder), "rows": len(bank), "dim": bank.dim, "modalities": list(bank.modalities),
        "student": bank.student, "teachers": list(bank.teachers), "n_components": bank.n_components,
        "fit_on": bank.fit_on, "criterion": meta.get("criterion"), "scores": meta.get("n_components_scores"),
        "reduce_dim": meta.get("reduce_dim"), "gmm_converged": meta.get("gmm_converged"),
        "subset_of_indices": bank.indices is not None, "dca_inert": meta.get("dca_inert"),
        "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
    }
    if args.json:
        print(json.dumps(facts, indent=2), file=out)
        return 0
    print(f"EmbeddingBank at {folder}", file=out)
    print(f"  rows        {facts['rows']}" + (" (a subset of dataset indices)" if facts["subset_of_indices"] else ""),
          file=out)
    print(f"  dim         {facts['dim']}", file=out)
    print(f"  student     {bank.student!r}; teachers {', '.join(map(repr, bank.teachers))}", file=out)
    if bank.n_components is None:
        print("  GMM         none (only intra=None plans)", file=out)
    else:
        print(f"  GMM         M = {bank.n_components} on {bank.fit_on!r} embeddings"
              + (f" (PCA to {facts['reduce_dim']} dims)" if facts["reduce_dim"] else "")
              + ("" if facts["gmm_converged"] in (None, True) else ", did NOT converge"), file=out)
    if facts["scores"]:
        best = min(facts["scores"].items(), key=lambda kv: kv[1])[0]
        table = ", ".join(f"M={m}: {s:.1f}{' *' if m == best else ''}" for m, s in facts["scores"].items())
        print(f"  {facts['criterion'] or 'score'} table   {table}", file=out)
    if facts["dca_inert"]:
        print(f"  note        {DCA_INERT_NOTE}", file=out)
    print(f"  size        {facts['bytes'] / 1024:.1f} KiB", file=out)
    return 0


def _cmd_probe(args: argparse.Namespace, out: TextIO) -> int:
    probe(args.data, student=args.student, teacher=args.teacher, label=args.label, train_size=args.train_size,
          train_frac=args.train_frac, seeds=args.seeds, epochs=args.epochs, aligner_epochs=args.aligner_epochs,
          quick=args.quick, methods=args.methods, loss_form=args.loss_form, batch_size=args.batch_size,
          threads=args.threads or None, out=args.out, progress=not args.no_progress,
          echo=lambda line: print(line, file=out, flush=True))
    folder = Path(args.out)
    written = [str(folder / name) for name in ("probe.json", "probe.png") if (folder / name).is_file()]
    print("wrote " + ", ".join(written), file=out)
    return 0


def _cmd_version(args: argparse.Namespace, out: TextIO) -> int:
    print(_version_line(), file=out)
    return 0


# -------------------------------------------------------------------------------- parser
def _add_debug(parser: argparse.ArgumentParser, top: bool) -> None:
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="on error, show the full traceback instead of one line (default: off)")


def build_parser() -> argparse.ArgumentParser:
    """The ``cmda`` argument parser (every subcommand with its options and defaults)."""
    parser = _Parser(
        prog=PROG, formatter_class=_Formatter,
        description="cmda_data: Cross-modal Data Augmentation (CMDA) for PyTorch.\n\n"
                    "New samples of a student modality (e.g. images) are convex combinations of real\n"
                    "student samples, weighted by a teacher modality (e.g. captions) in a shared latent space.",
        epilog="examples:\n"
               "  cmda demo                         # the main job: built-in shapes, under two minutes on CPU\n"
               "  cmda demo --data wikipedia        # the same on ../shared/data (or $CMDA_DATA_DIR)\n"
               "  cmda bank build --student z_img.npy --teacher z_txt.npy --out bank/\n"
               "  cmda bank info bank/\n"
               "  cmda probe data.npz --student image --teacher text --label label --quick\n\n"
               "run 'cmda COMMAND --help' for the options of a command.")
    _add_debug(parser, top=True)
    parser.add_argument("--version", action="version", version=_version_line(),
                        help="print the versions of cmda-data, torch and Python and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo", formatter_class=_Formatter, help="train, build a bank, mix samples and draw them",
        description="Run the main job end to end and write what it made to --out:\n"
                    "  1. train a small ContrastiveAligner (Eq. 7) on the train split, report held-out retrieval;\n"
                    "  2. build an EmbeddingBank (GMM, M chosen by BIC) and save it;\n"
                    "  3. generate mixed samples with CrossModalAugmentedDataset;\n"
                    "  4. write a PNG grid (generated sample, guiding caption, top partners with weights)\n"
                    "     and a JSON summary of the numbers.\n"
                    "--data shapes needs no download; wikipedia/webnews read ../shared/data or $CMDA_DATA_DIR.")
    demo.add_argument("--out", default=str(_DEMO.out), metavar="DIR",
                      help="folder for the PNG, the JSON summary and the saved bank")
    demo.add_argument("--data", default=_DEMO.data, choices=("shapes", "wikipedia", "webnews"),
                      help="built-in shapes (no download), or a real data set")
    demo.add_argument("--seed", type=int, default=_DEMO.seed,
                      help="seed of the data, the training and the mixing draws")
    demo.add_argument("--epochs", type=int, default=None,
                      help="aligner training epochs (default: 10 for shapes, 30 for wikipedia and webnews)")
    demo.add_argument("--n", type=int, default=None,
                      help="number of samples (default: 2000 for shapes, the whole train split for real data)")
    demo.add_argument("--device", default=_DEMO.device, help="torch device for training and embedding, e.g. cuda:0")
    demo.add_argument("--rows", type=int, default=_DEMO.rows, help="generated samples drawn in the figure (<= 16)")
    demo.add_argument("--top-k", type=int, default=_DEMO.top_k, dest="top_k",
                      help="partners kept per generated sample (<= 8)")
    demo.add_argument("--pool-size", type=int, default=_DEMO.pool_size, dest="pool_size",
                      help="candidate partners drawn per generated sample (m')")
    demo.add_argument("--temperature", type=float, default=_DEMO.temperature,
                      help="softmax temperature of the weights (default: none, the paper's Eq. 10 ratio of |cos|, "
                           "nearly uniform among close partners; e.g. 0.05 sharpens them)")
    demo.add_argument("--no-progress", action="store_true", dest="no_progress", help="hide the progress bars")
    _add_debug(demo, top=False)
    demo.set_defaults(func=_cmd_demo)

    bank = commands.add_parser("bank", formatter_class=_Formatter, help="build or inspect an EmbeddingBank",
                               description="Build an EmbeddingBank from embedding files, or describe a saved one.")
    _add_debug(bank, top=False)
    bank_commands = bank.add_subparsers(dest="bank_command", metavar="ACTION", parser_class=_Parser)
    bank.set_defaults(func=None, subparser=bank)

    build = bank_commands.add_parser(
        "build", formatter_class=_Formatter, help="fit the GMM on .npy embeddings and save the bank",
        description="Build an EmbeddingBank from two .npy files of [N, d] embeddings in one latent space\n"
                    "(row r of both = sample r), fit the Gaussian mixture (M by BIC unless --n-components)\n"
                    "and save it as a folder (bank.safetensors + bank.json) that EmbeddingBank.load reads.")
    build.add_argument("--student", required=True, metavar="FILE",
                       help="[N, d] .npy embeddings of the student modality (the one that is mixed); required")
    build.add_argument("--teacher", required=True, metavar="FILE",
                       help="[N, d] .npy embeddings of the teacher modality (the one that guides); required")
    build.add_argument("--out", required=True, metavar="DIR",
                       help="folder to write the bank to (an existing bank there is refused without --force); "
                            "required")
    build.add_argument("--force", action="store_true", help="replace a bank already saved in --out")
    build.add_argument("--student-name", default="image", dest="student_name", help="name of the student modality")
    build.add_argument("--teacher-name", default="text", dest="teacher_name", help="name of the teacher modality")
    build.add_argument("--fit-on", default=_BANK["fit_on"], choices=("teacher", "student"), dest="fit_on",
                       help="whose embeddings the GMM is fitted on")
    build.add_argument("--n-components", type=int, default=None, dest="n_components",
                       help="number M of GMM components (default: chosen by BIC over --candidates)")
    build.add_argument("--candidates", default=_candidates_text(_BANK["candidates"]),
                       help="values of M tried by BIC: LOW-HIGH or A,B,C")
    build.add_argument("--covariance-type", default=_GMM["covariance_type"], dest="covariance_type",
                       choices=("full", "diag", "tied", "spherical"), help="GMM covariance type")
    build.add_argument("--reduce-dim", type=int, default=None, dest="reduce_dim",
                       help="fit the GMM on the first R principal components (default: no reduction)")
    build.add_argument("--seed", type=int, default=_BANK["random_state"], help="seed of the GMM initialisation")
    _add_debug(build, top=False)
    build.set_defaults(func=_cmd_bank_build)

    info = bank_commands.add_parser("info", formatter_class=_Formatter, help="describe a saved bank",
                                    description="Describe a bank folder written by EmbeddingBank.save or "
                                                "'cmda bank build': rows, modalities, GMM and its BIC table.")
    info.add_argument("dir", metavar="DIR", help="the bank folder")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    _add_debug(info, top=False)
    info.set_defaults(func=_cmd_bank_info)

    probe = commands.add_parser(
        "probe", formatter_class=_Formatter,
        help="does the teacher help on my data? (Base, Mixup, CMDA, uninformative-teacher controls)",
        description="Does the teacher matter on your data? On one stratified split (seed 0) of DATA, train the same\n"
                    "MLP classifier on the student features with each method, on every seed:\n"
                    "  base, base_matched (= base under --loss-form sum), mixup, cmda (aligner + bank + CMDACollate)\n"
                    "  random_teacher and shuffled_teacher (cmda with random / permuted teacher latents).\n"
                    "The result is the held-out accuracy after the last epoch. Writes DIR/probe.json (per-seed\n"
                    "results, paired differences with Base, the teacher effect cmda - random_teacher, Holm's\n"
                    "correction) and DIR/probe.png (forest plot), and prints the table.",
        epilog="example:\n  cmda probe data.npz --student image --teacher text --label label --quick\n\n"
               "DATA.npz: numpy.savez(path, image=X, text=T, label=y), X [N, d] and T [N, t] float, y [N] int.")
    probe.add_argument("data", metavar="DATA.npz", help="the arrays, saved with numpy.savez (never unpickled)")
    probe.add_argument("--student", required=True, metavar="KEY",
                       help="key of the [N, d] student features (mixed and classified); required")
    probe.add_argument("--teacher", required=True, metavar="KEY",
                       help="key of the [N, t] teacher features (guide the mixing); required")
    probe.add_argument("--label", required=True, metavar="KEY", help="key of the [N] integer labels; required")
    probe.add_argument("--train-size", type=int, default=None, dest="train_size", metavar="N",
                       help="train rows; the rest is held out (default: --train-frac)")
    probe.add_argument("--train-frac", type=float, default=None, dest="train_frac", metavar="F",
                       help="share of train rows (default: 0.8)")
    full, quick = PRESETS[False], PRESETS[True]
    probe.add_argument("--seeds", type=int, default=None, metavar="N",
                       help=f"training seeds (default: {full['seeds']}; --quick {quick['seeds']})")
    probe.add_argument("--epochs", type=int, default=None, metavar="E",
                       help=f"classifier epochs (default: {full['epochs']}; --quick {quick['epochs']})")
    probe.add_argument("--aligner-epochs", type=int, default=None, dest="aligner_epochs", metavar="E",
                       help=f"contrastive aligner epochs (default: {full['aligner_epochs']}; "
                            f"--quick {quick['aligner_epochs']})")
    probe.add_argument("--quick", action="store_true", help=f"{quick['seeds']} seeds, {quick['epochs']} epochs, "
                                                            f"aligner {quick['aligner_epochs']} epochs")
    probe.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                       help=f"methods to run, base included (default: all of {' '.join(DEFAULT_METHODS)})")
    probe.add_argument("--loss-form", default=_PROBE["loss_form"], dest="loss_form", metavar="{sum,mean}",
                       help="sum: CE(real) + CE(generated), the real rows weigh 1 in every method; "
                            "mean: one mean over all rows (base_matched then weighs Base's loss by 1/2)")
    probe.add_argument("--batch-size", type=int, default=_PROBE["batch_size"], dest="batch_size", metavar="B",
                       help="real rows per step")
    probe.add_argument("--threads", type=int, default=_PROBE["threads"], metavar="T",
                       help="torch CPU threads (0: torch's default); the models are small, one is usually fastest")
    probe.add_argument("--out", default="cmda_probe_out", metavar="DIR", help="folder for probe.json and probe.png")
    probe.add_argument("--no-progress", action="store_true", dest="no_progress", help="hide the progress bar")
    _add_debug(probe, top=False)
    probe.set_defaults(func=_cmd_probe)

    version = commands.add_parser("version", formatter_class=_Formatter, help="print the versions",
                                  description="Print the versions of cmda-data, torch and Python.")
    _add_debug(version, top=False)
    version.set_defaults(func=_cmd_version)
    return parser


def _version_line() -> str:
    """What ``cmda --version`` and ``cmda version`` print."""
    return f"cmda-data {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


# -------------------------------------------------------------------------------- errors
def _hint(error: BaseException, command: str) -> str:
    """The fix to suggest for ``error``."""
    help_line = f"run '{command} --help' to see the options"
    if isinstance(error, CLIError):
        return error.hint
    if isinstance(error, MissingDependencyError):
        named = re.search(r"pip install (?:-e )?[^\s),;]+", str(error))
        return named.group(0) if named else "pip install -e '.[bench]'"
    name = type(error).__name__
    if name == "DataNotFoundError":
        return "set CMDA_DATA_DIR to the folder that holds wikipedia/ and webnews/, or run 'cmda demo' (shapes)"
    if isinstance(error, FileNotFoundError):
        return "check the path"
    if isinstance(error, DeviceError):
        return "use --device cpu"
    if isinstance(error, MemoryError):
        return "use a smaller --n"
    if isinstance(error, (ValueError, TypeError, KeyError)):
        return help_line
    return "rerun with --debug to see the traceback, and report it if it looks like a bug"


def _message(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (CMDAError, CLIError, FileNotFoundError, ValueError)):
        text = f"{type(error).__name__}: {text}"
    return text


def _command_name(args: Optional[argparse.Namespace]) -> str:
    if args is None or not getattr(args, "command", None):
        return PROG
    sub = getattr(args, "bank_command", None)
    return " ".join(filter(None, [PROG, args.command, sub]))


def main(argv: Optional[Sequence[str]] = None, *, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None) -> int:
    """Run the ``cmda`` command line; return the exit status (0 ok, 2 error).

    Examples:
        >>> import io
        >>> out = io.StringIO()
        >>> main(["version"], stdout=out), out.getvalue().startswith("cmda-data ")
        (0, True)
        >>> err = io.StringIO()
        >>> main(["demo", "--data", "mnist"], stderr=err)
        2
        >>> err.getvalue().startswith("cmda: error: argument --data: invalid choice: 'mnist'")
        True
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args: Optional[argparse.Namespace] = None
    try:
        parser = build_parser()
        try:  # --help and --version print (to stdout) and exit 0
            with contextlib.redirect_stdout(out):
                args = parser.parse_args(argv)
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 0
        debug = debug or bool(getattr(args, "debug", False))
        func: Optional[Callable[[argparse.Namespace, TextIO], int]] = getattr(args, "func", None)
        if func is None:  # 'cmda' or 'cmda bank' alone: show what can be run
            (getattr(args, "subparser", None) or parser).print_help(file=out)
            return 0
        return func(args, out)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return EXIT_INTERRUPTED
    except Exception as error:  # one line for people, the traceback with --debug
        if debug:
            traceback.print_exc(file=err)
        else:
            print(f"{PROG}: error: {_message(error)} (hint: {_hint(error, _command_name(args))})", file=err)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
