"""`ppt-fast`: the command line (tune | generate | demo, plus dataset | eval when ppt_fast.eval provides them).

Exit codes: 0 success; 2 bad input or usage: one line `ppt-fast: error: ...` on stderr saying what to fix, no
traceback (`--debug` or `PPT_FAST_DEBUG=1` prints it too); 1 an unexpected failure (traceback printed, please
report it); 130 interrupted.

What counts as bad input and what as a bug: `ppt_fast._errors` (the app shares the rule).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence

from . import _env

# The rule for what is bad input (exit 2) and what is a bug (exit 1) lives in ppt_fast._errors, which the app shares;
# the names stay importable from here (ppt_fast.eval.cli and the tests use them).
from ._errors import UsageError, is_user_error, raised_in_ppt_fast  # noqa: F401
from ._io import UnwritablePathError, check_writable
from .recipes import DEFAULT, MODEL_DEFAULTS, RECIPES

EPILOG = """examples:
  ppt-fast demo --out out/demo
  ppt-fast tune reference.wav --identifier "<v1>" --out concept.ppt
  ppt-fast generate "<v1>, funky jazz" --concept concept.ppt --out out.wav
  ppt-fast pretrain            # re-make the embedded default model (resumable)
  ppt-fast app                 # the local web page: tune, listen, combine concepts (pip install 'ppt_fast[app]')
"""


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """`--debug`, or `PPT_FAST_DEBUG=1` (`ppt_fast._env.debug_tracebacks`): print tracebacks of user errors."""
    if args is not None and getattr(args, "debug", False):
        return True
    try:
        return _env.debug_tracebacks()
    except ValueError:  # main() refuses a bad value before any command runs
        return False


def report_user_error(e: BaseException, debug: bool) -> int:
    """Print `e` as one line `ppt-fast: error: ...` (after its traceback when `debug`); return the exit code, 2."""
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.strerror}: {e.filename!r}"
    text = " ".join(str(msg).split()) or type(e).__name__
    print(f"ppt-fast: error: {text}", file=sys.stderr)
    return 2


def check_output(path: str, flag: str = "--out", *, folder: bool = False) -> None:
    """Refuse, before any model loads or long work starts, an output that cannot be written
    (`ppt_fast._io.check_writable`: a folder, device, FIFO or socket where a file goes, a path under a file, a folder
    where no file can be created), naming the flag."""
    try:
        check_writable(path, folder=folder)
    except UnwritablePathError as e:
        raise UsageError(f"{flag}: {e}") from None


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="teach a model a concept from a reference recording; write a concept file",
        description="Teach MusicGen the concept in REF under an identifier (Pivotal Parameters Tuning) and write "
        "the concept file (pivot indices + values + identifier embeddings; apply it to the same base model).",
    )
    p.add_argument("reference", metavar="REF", help="reference audio (any format soundfile reads; ~2 min is best)")
    p.add_argument("--identifier", default="<v1>", help="the word that names the concept in prompts (default <v1>)")
    p.add_argument("--out", required=True, help="concept file to write, e.g. concept.ppt")
    p.add_argument("--model", default="tiny", help="tiny (default), an audiocraft or transformers checkpoint dir, a "
                   "cached hub id (e.g. facebook/musicgen-small; hf:ID forces transformers) or hf-tiny-random")
    p.add_argument("--preset", default=DEFAULT, choices=tuple(RECIPES),
                   help="what is trained (default %(default)s): "
                   + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))  # fmt: skip
    p.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="pivots as a fraction of the entries in scope (default 0.001 on tiny, 0.01 otherwise)",
    )
    p.add_argument("--count", type=int, default=None, help="a fixed number of pivots instead of --ratio")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 150 tiny, 500 otherwise)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the pivots (and of the weights a dense preset trains; default "
                   f"{MODEL_DEFAULTS['trained'].lr:g}, {MODEL_DEFAULTS['tiny-random'].lr:g} on the random-init test "
                   "models; the identifier tokens have their own)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=3, dest="n_tokens",
                   help="identifier token embeddings (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--prompt",
        action="append",
        dest="templates",
        metavar="TEMPLATE",
        help="training prompt template, {} marks the identifier (repeatable; default 'a piece of music, {}')",
    )
    p.add_argument(
        "--prior",
        type=float,
        default=None,
        help="prior-preservation weight: also fit the base model's own clips for the prompts without the identifier "
        "(default 0 = off; 1 is usual)",
    )
    p.add_argument(
        "--prior-prompt",
        action="append",
        dest="prior_prompts",
        metavar="PROMPT",
        help="prompt the prior clips are sampled for (repeatable; default: the templates without the identifier)",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="everything random (identifier token init, training batches, prior clips) derives from it; "
                   "on CPU the same seed gives the same concept file (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute activations in backward: lower peak memory, slower steps, same result",
    )
    p.add_argument(
        "--row-grads",
        choices=("auto", "on", "off"),
        default="auto",
        help="compute only the scored / trained rows of the attention projections' weight gradients: on, off, or "
        "auto (default: on for real MusicGen sizes, off for the tiny model)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_tune)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate music for a prompt, with concepts applied; write a WAV",
        description="Generate music for PROMPT (which may name identifiers: '<v1>, <v2>, electronic dance music').",
    )
    p.add_argument("prompt", help="text prompt; identifiers may appear anywhere")
    p.add_argument("--concept", action="append", default=[], help="concept file to apply (repeatable)")
    p.add_argument("--out", required=True, help="WAV file to write")
    p.add_argument("--model", default="tiny", help="the base model the concepts were tuned on (default tiny)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed: the same seed gives the same audio (default %(default)s)")  # fmt: skip
    p.add_argument("--cfg-coef", type=float, default=None,
                   help="classifier-free guidance (default: the model's; tiny 1 = off, MusicGen 3)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=None,
                   help="top-k sampling (default: the model's; tiny 64, MusicGen 250)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the model's; tiny 0.85, MusicGen 1)")  # fmt: skip
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling: sample from the smallest set of codes holding this much probability, in [0, 1] "
        "(default: the model's; 0 = off, --top-k is used)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="concept strength, in [-10, 10] (default 1)")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="apply concept files that hold no fingerprint of their base model (nothing then checks that they were "
        "tuned on --model)",
    )
    p.add_argument("--resample-silent", type=int, default=2, metavar="N",
                   help="sample a clip that came out silent, or with a silent stretch of 1 s or more, again, up "
                        "to N times with the next seeds (default 2; 0: keep it and warn)")  # fmt: skip
    p.set_defaults(func=_cmd_generate)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="end to end on the tiny model: reference -> concept -> generations + loss plot",
        description="Make a synthetic reference clip, tune the tiny built-in model on it, generate with and without "
        "the concept, and write the reference, the concept file, both generations and a loss-curve PNG.",
    )
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 150)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds of each generation (default 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="everything random (the reference clip, the tuning, the generations) derives from it "
                   "(default %(default)s)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)


def _add_concept(sub) -> None:
    p = sub.add_parser(
        "concept",
        help="inspect a concept file, or convert it between audiocraft and transformers",
        description="Concept files: what one holds (info), and the same concept for the same checkpoint loaded "
        "through the other library (convert: audiocraft <-> transformers MusicGen).",
    )
    csub = p.add_subparsers(dest="concept_command", metavar="ACTION", required=True)
    i = csub.add_parser("info", help="identifiers, base model, library, recipe, pivots and size of a concept file")
    i.add_argument("file", metavar="FILE", help="concept file (.ppt)")
    i.set_defaults(func=_cmd_concept_info)
    c = csub.add_parser(
        "convert",
        help="rewrite a concept for the same checkpoint loaded through the other library",
        description="Rewrite the concept(s) in FILE for --model, the same MusicGen checkpoint loaded through the other "
        "library (audiocraft <-> transformers: packed in_proj rows <-> q/k/v projections, renamed tensors). The "
        "concept's base fingerprint is checked against --model first: a concept is never converted onto another "
        "checkpoint. (Applying a concept to the other library's model converts it on the fly; this writes the file.)",
    )
    c.add_argument("file", metavar="FILE", help="concept file (.ppt) to convert")
    c.add_argument("--model", required=True, help="the target: a transformers checkpoint dir or cached hub id (hf:ID), "
                   "or an audiocraft checkpoint / name load_model accepts")  # fmt: skip
    c.add_argument("--out", required=True, help="concept file to write (not FILE itself)")
    c.add_argument("--force", action="store_true",
                   help="convert even when --model's tensors differ from the concept's base")  # fmt: skip
    c.set_defaults(func=_cmd_concept_convert)


def _describe_concept(c, path: str) -> list[str]:
    from .concept import describe_concept

    return describe_concept(c, path)


def _cmd_concept_info(args) -> int:
    from .concept import load_concepts

    if not os.path.isfile(args.file):
        raise UsageError(f"concept file {args.file!r} does not exist")
    concepts = load_concepts(args.file)
    for c in concepts:
        print("\n".join(_describe_concept(c, args.file)))
    print(f"{os.path.getsize(args.file):,} bytes")
    return 0


def _cmd_concept_convert(args) -> int:
    from .concept import load_concepts, save_concepts
    from .concept.portable import convert
    from .models import load_host

    if not os.path.isfile(args.file):
        raise UsageError(f"concept file {args.file!r} does not exist")
    if os.path.exists(args.out) and os.path.samefile(args.out, args.file):
        raise UsageError(f"--out {args.out!r} is FILE itself; write the converted concept to another file")
    check_output(args.out)
    concepts = load_concepts(args.file)  # read and checked before the model loads
    host = load_host(args.model)
    out = [convert(c, host.model, force=args.force) for c in concepts]
    same = [c for c, o in zip(concepts, out) if c is o]
    if same:
        raise UsageError(
            f"concept {same[0].identifiers} is already in --model's library ({host.library}); nothing to convert"
        )
    save_concepts(out, args.out)
    for o in out:
        how = f"{o.meta['converted_from']['host']} -> {o.meta['host']}"
        print(f"converted {', '.join(o.identifiers)} ({how}, fingerprint checked against --model): "
              f"{o.pivots.count:,} pivots, {len(o.dense)} dense tensor(s)")  # fmt: skip
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")
    return 0


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train the embedded default model (corpus -> codec -> LM; ~50 min on 2 CPU cores; resumable)",
        description="Render the pretraining corpus (16 instruments, seeded compositions, varied text descriptions; "
        "violin, marimba, trumpet and nylon guitar held out), fit the mel-RVQ codec, train the small MusicGen LM, and "
        "write the weights file model='tiny' loads. Interrupted runs resume from the last checkpoint in --workdir.",
    )
    p.add_argument("--out", default=None, help="weights file to write (default: ppt_fast/assets/tiny-v8.pt)")
    p.add_argument("--workdir", default=None, help="corpus cache + checkpoints (default: $PPT_FAST_CACHE/pretrain/...)")
    p.add_argument("--fresh", action="store_true", help="discard the workdir's corpus cache and checkpoint first")
    p.add_argument("--steps", type=int, default=None, help="LM training steps (default: the config's; changes it)")
    p.add_argument("--seed", type=int, default=0,
                   help="everything random (the corpus, the codec and LM initialisation, the batches) derives from it "
                   "(default %(default)s)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a seconds-long toy config (tests the pipeline, not a model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plot", default=None, help="also write the LM loss curve as a PNG here")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args) -> int:
    from dataclasses import replace

    from .tiny import pretrain as pt

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    cfg = pt.QUICK if args.quick else pt.PretrainConfig()
    cfg = replace(cfg, seed=args.seed, **({"steps": args.steps} if args.steps is not None else {}))
    out = args.out or pt.ASSET
    check_output(out)
    check_output(os.path.splitext(out)[0] + ".json")  # the provenance written beside the weights
    if args.plot:
        check_output(args.plot, "--plot")
    if args.workdir:
        check_output(args.workdir, "--workdir", folder=True)
    if not args.quiet:  # the pipeline's phase lines ("[pretrain] corpus: ...") go to stdout
        log = logging.getLogger(pt.__name__)
        if not any(getattr(h, "_ppt_fast_stdout", False) for h in log.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler._ppt_fast_stdout = True
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    prov = pt.pretrain(cfg, out=out, workdir=args.workdir, fresh=args.fresh, verbose=not args.quiet)
    t = prov["timings"]
    if args.plot:
        _plot_losses(prov["losses_every_10"], args.plot, title="ppt-fast pretrain: the default model's LM", every=10)
    print(f"wrote {out}: {prov['bytes'] / 2**20:.1f} MiB, final loss {prov['final_loss']:.3f}, LM {t['lm_s'] / 60:.1f} "
          f"min, this run {t['this_run_wall_s'] / 60:.1f} min")  # fmt: skip
    return 0


def _add_app(sub) -> None:
    p = sub.add_parser(
        "app",
        help="a local web page to tune a concept and listen to it (needs pip install 'ppt_fast[app]')",
        description="Start the app (Gradio) on this machine: pick or upload a reference, tune with live progress, "
        "listen with and without the concept, load and combine concept files. Offline: nothing is fetched from the "
        "network; the app reads and writes only its working folder.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 opens it to the "
                   "network, where anyone who reaches it can use it)")  # fmt: skip
    p.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    p.add_argument("--workdir", default="out/app",
                   help="working folder: uploads, tune runs, concept library, generations (default %(default)s)")
    p.add_argument("--max-file-size", type=float, default=50.0, metavar="MB",
                   help="largest upload accepted, in MB (default %(default)g)")  # fmt: skip
    p.add_argument("--model", action="append", default=[], dest="models", metavar="MODEL",
                   help="also offer this model in the page (repeatable): a checkpoint folder, a .pt weights file or a "
                   "hub id; the page itself may name only offered models and cached hub ids, never a path")
    p.set_defaults(func=_cmd_app)


def _cmd_app(args) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    if not args.max_file_size > 0:
        raise UsageError(f"--max-file-size must be a positive number of MB, got {args.max_file_size:g}")
    check_output(args.workdir, "--workdir", folder=True)
    from .app import launch

    t0 = time.perf_counter()
    try:
        page, url = launch(args.workdir, host=args.host, port=args.port, max_file_size_mb=args.max_file_size,
                           models=args.models, block=False)  # fmt: skip
    except OSError as e:
        if "port" not in str(e):
            raise
        raise UsageError(f"--port {args.port} on {args.host} cannot be opened (in use by another program?): choose "
                         "another with --port") from e  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ppt-fast app: listening on {args.host}: reachable from other machines", file=sys.stderr)
    print(f"ppt-fast app: {url} (started in {time.perf_counter() - t0:.1f} s; working folder "
          f"{os.path.abspath(args.workdir)}; Ctrl-C stops it)", flush=True)  # fmt: skip
    try:
        page.block_thread()
    finally:
        page.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppt-fast",
        description="Pivotal Parameters Tuning for MusicGen: teach a model a musical concept from a short "
        "recording by tuning only its most sensitive parameters, then generate with it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_tune(sub)
    _add_generate(sub)
    _add_demo(sub)
    _add_concept(sub)
    _add_pretrain(sub)
    _add_app(sub)
    try:
        import importlib

        importlib.import_module("ppt_fast.eval.cli").register(sub)
    except ModuleNotFoundError as e:
        if e.name not in ("ppt_fast.eval.cli", "ppt_fast.eval"):
            raise
    _add_debug_everywhere(sub)
    return parser


_DEBUG_HELP = "on an error, also print the traceback (same as PPT_FAST_DEBUG=1)"


def _add_debug_everywhere(sub: argparse._SubParsersAction) -> None:
    """`--debug` is global: accepted before the command and after it, in every (nested) subcommand."""
    for p in sub.choices.values():
        if not any("--debug" in a.option_strings for a in p._actions):
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                _add_debug_everywhere(a)


def _cmd_tune(args) -> int:
    from .tuning import TuneConfig, tune_to_files

    if not os.path.exists(args.reference):
        raise UsageError(f"reference {args.reference!r} does not exist")
    check_output(args.out)
    kwargs = dict(n_tokens=args.n_tokens, activation_checkpointing=args.activation_checkpointing,
                  row_grads={"auto": None, "on": True, "off": False}[args.row_grads])  # fmt: skip
    if args.count is not None:
        kwargs["count"] = args.count
    if args.lr is not None:
        kwargs["lr"] = args.lr
    if args.templates:
        kwargs["templates"] = args.templates
    if args.prior is not None:
        kwargs["prior"] = args.prior
    if args.prior_prompts:
        kwargs["prior_prompts"] = args.prior_prompts
    t0 = time.perf_counter()
    if args.count is not None:
        kwargs["ratio"] = None  # count wins, as in tune()
    else:
        kwargs["ratio"] = args.ratio
    config = TuneConfig(model=args.model, identifier=args.identifier, preset=args.preset, steps=args.steps,
                        seed=args.seed, verbose=not args.quiet, **kwargs)  # fmt: skip
    # Under torchrun (`torchrun --nproc_per_node N -m ppt_fast tune ...`): join its process group; every process
    # tunes its share of each batch, process 0 writes and prints.
    from . import distributed

    joined = not distributed.is_initialized() and distributed.init_from_env()
    try:
        result, _ = tune_to_files(args.reference, config, args.out)
        if distributed.rank() == 0:
            size = os.path.getsize(args.out)
            print(f"tuned {args.identifier}: {_tune_summary(result, args.identifier)}")
            if result.world_size > 1:
                print(f"{result.world_size} processes: {result.comm_bytes_per_step:,} bytes all-reduced per step "
                      f"(one packed fp32 buffer), {result.comm_seconds:.2f} s in all-reduces")  # fmt: skip
            print(f"wrote {args.out} ({size / 1024:.1f} KiB, identifier {args.identifier}) in "
                  f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    except distributed.DistributedError as e:  # another process failed (its error is in its output) or disagreed
        print(f"ppt-fast: error: {e}", file=sys.stderr)
        return 1
    finally:
        if joined:
            distributed.leave()
    return 0


def _loudness(*clips, sample_rate: int):
    """One loudness gain for `clips` written together (so they keep their relative levels): -14 LUFS integrated over
    all of them, true peak at most -1 dBTP (`audio.loudness_normalize`). Returns (clips, report)."""
    import torch

    from .audio import loudness_normalize

    _, report = loudness_normalize(torch.cat([c.reshape(c.shape[-2] if c.dim() > 1 else 1, -1) for c in clips], -1),
                                   sample_rate)  # fmt: skip
    return [c * report.gain for c in clips], report


def _level(report) -> str:
    if report.silent:
        return "silent: written as generated"
    return f"{report.output_lufs:.1f} LUFS, true peak {report.true_peak_dbtp:.1f} dBTP"


#: How many times the demo samples a clip with a silent stretch again (as `ppt-fast generate --resample-silent`).
DEMO_RESAMPLE_SILENT = 2


def _silence_note(a, b, sample_rate: int) -> str:
    """What the demo's pair holds of silence: "no silent stretch (>= 1 s)" or which clip is silent where."""
    from .audio import SILENT_STRETCH_SECONDS, silent_stretches

    parts = []
    for name, clip in (("with", a), ("without", b)):
        runs = silent_stretches(clip, sample_rate)[0]
        if runs:
            parts.append(f"{name} the concept silent at " + ", ".join(f"{x:.1f}-{y:.1f} s" for x, y in runs))
    if not parts:
        return f"no silent stretch of {SILENT_STRETCH_SECONDS:g} s or more"
    return "; ".join(parts) + f" (after {DEMO_RESAMPLE_SILENT} re-samples; try another --seed)"


def _tune_summary(result, ident: str) -> str:
    """What a tune run did, in one line: pivots of the scope and of the model, steps, loss, time."""
    piv = result.pivots[ident]
    losses = result.losses
    if piv.count and result.scope_entries:
        what = (f"{piv.count:,} pivots ({100 * piv.count / result.scope_entries:.2f} % of the "
                f"{result.scope_entries:,} entries in the recipe's scope, {100 * piv.count / result.lm_entries:.3f} % "
                f"of the model's {result.lm_entries / 1e6:.1f} M)")  # fmt: skip
        # A global top-k can pile the pivots into one tensor (on the default model: layer 0's self-attention V,
        # where the gradients are largest); say so, since it changes what the concept can touch.
        name, most = max(zip(piv.names, (int(c) for c in piv.counts())), key=lambda nc: nc[1])
        if len(piv.names) > 1 and most > piv.count / 2:
            what += f", {100 * most / piv.count:.0f} % of them in {name}"
    else:
        what = f"recipe {result.settings.get('preset')}"
    tail = losses[-10:]
    loss = f", loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} (mean of the last 10)" if losses else ""
    return f"{what}, {len(losses)} steps in {result.train_seconds:.1f} s{loss}"


def _load_concept_files(paths: Sequence[str], allow_unverified: bool) -> list:
    """Every concept in the files (one each, or bundles), read and checked before any model is loaded."""
    from .concept import load_concepts

    concepts = []
    for path in paths:
        if os.path.isdir(path):
            raise UsageError(f"concept file {path!r} is a folder; give a concept file (.ppt)")
        if not os.path.isfile(path):
            raise UsageError(f"concept file {path!r} does not exist")
        for c in load_concepts(path):
            missing = c.unverified_names()
            if missing and not allow_unverified:
                raise UsageError(
                    f"concept file {path!r} holds no fingerprint of its base model for {len(missing)} of the tensors "
                    f"it changes ({missing[0]!r}{', ...' if len(missing) > 1 else ''}), so nothing checks that it "
                    "was tuned on --model; pass --allow-unverified to apply it anyway, or tune it again"
                )
            concepts.append(c)
    return concepts


_GENERATE_FLAGS = ("duration", "seed", "cfg_coef", "top_k", "top_p", "temperature", "scale", "resample_silent")


def _cmd_generate(args) -> int:
    from .audio import write_wav
    from .generation import GenerateError, check_generate_args, generate
    from .models import load_host

    settings = dict(duration=args.duration, seed=args.seed, cfg_coef=args.cfg_coef, top_k=args.top_k,
                    top_p=args.top_p, temperature=args.temperature, scale=args.scale,
                    resample_silent=args.resample_silent)  # fmt: skip
    try:
        check_generate_args([args.prompt], **settings)
    except GenerateError as e:  # "duration=-1.0 must be ..." -> "--duration -1.0 must be ...": the flag typed
        name, eq, rest = str(e).partition("=")
        raise UsageError(f"--{name.replace('_', '-')} {rest}" if eq and name in _GENERATE_FLAGS else str(e)) from None
    check_output(args.out)
    concepts = _load_concept_files(args.concept, args.allow_unverified)
    host = load_host(args.model)
    audio = generate([args.prompt], model=host.model, concepts=concepts, allow_unverified=args.allow_unverified,
                     **settings)  # fmt: skip
    rate = host.sample_rate
    (clip,), report = _loudness(audio[0], sample_rate=rate)
    write_wav(args.out, clip, rate, normalize=None)
    print(f"wrote {args.out} ({audio.shape[-1] / rate:.1f} s at {rate} Hz, {_level(report)})")
    return 0


def _plot_losses(
    losses: Sequence[float], path: str, title: str = "ppt-fast demo: tuning on the reference", every: int = 1
) -> None:
    """A loss-curve PNG (`report_html.loss_curves_png`); `every`: steps per loss value (means over `every` steps)."""
    from .report_html import loss_curves_png

    loss_curves_png({"loss per step" if every == 1 else f"mean of {every} steps": losses}, path, title=title,
                    every=every)  # fmt: skip


_DEMO_FILES = ("reference.wav", "loss.png", "concept.ppt", "with_concept.wav", "without_concept.wav", "report.html",
               "reference.png", "with_concept.png", "without_concept.png")  # fmt: skip


def _demo_scores(clips, reference, sample_rate: int) -> tuple[list[str], str]:
    """Each clip's audio alignment to the reference and copying score as table cells, and a note on what they are;
    "n/a" cells (and the reason) where the musicnn tagger is not installed."""
    try:
        from .eval import metrics, musicnn

        if not musicnn.is_available():
            raise ImportError("musicnn's checkpoints are not installed: pip install --no-deps musicnn==0.1.0")
        cells, short = [], ""
        for c in clips:
            aa = metrics.audio_alignment(c[None], reference, sample_rate, pad="repeat")
            cells.append(f"{aa:.3f}" if aa == aa else "n/a (silent)")
            try:
                cells.append(f"{metrics.copying(c[None], reference, sample_rate):.3f}")
            except ValueError as e:  # a clip shorter than copying's 2-s window (--duration)
                cells.append("n/a")
                short = f" Copying: {e}."
        return cells, ("One clip each, so no standard error: single clips of this small model vary a lot. "
                       "`ppt-fast eval --protocol` compares methods over many clips and prompts, with ± one standard "
                       "error." + short)  # fmt: skip
    except ImportError as e:
        return ["n/a"] * (2 * len(clips)), f"Not measured: {e}."


def _write_demo_report(out: str, *, what: str, prompt: str, result, ident: str, a, b, sample_rate: int,
                       level: str, concept_written: bool, png_written: bool) -> str:  # fmt: skip
    """`out/report.html` (ppt_fast.report_html): the reference, both generations with their spectrograms, their
    scores, what the run did and the loss curve, every file referenced beside it."""
    from .audio import read_audio
    from .report_html import Clip, Figure, Link, Section, Table, spectrogram_png, write_report

    ref, ref_sr = read_audio(os.path.join(out, "reference.wav"))
    spectrogram_png(ref, ref_sr, os.path.join(out, "reference.png"), title="reference")
    spectrogram_png(a[0], sample_rate, os.path.join(out, "with_concept.png"), title=f"with {ident}: {prompt}")
    spectrogram_png(b[0], sample_rate, os.path.join(out, "without_concept.png"), title="without: a piece of music")
    cells, note = _demo_scores([a[0], b[0]], ref, sample_rate)
    losses = result.losses
    tail = losses[-10:]
    sections = [
        Section("The reference", [Clip("reference.wav", "reference.wav", "reference.png", what)]),
        Section("The same seed with the concept and without it", [
            [Clip(f"with the concept: '{prompt}'", "with_concept.wav", "with_concept.png"),
             Clip("without it: 'a piece of music' (the base model)", "without_concept.wav", "without_concept.png")],
            f"Both written at one loudness gain ({level} over the pair), so their levels compare.",
        ]),
        Section("Scores", [Table(["", "with the concept", "without it"], [
            ["audio alignment to the reference (musicnn cosine) ↑", cells[0], cells[2]],
            ["copying (≈ 1: a verbatim copy of the reference) ↓", cells[1], cells[3]],
        ], caption=note)]),
        Section("What the run did", [Table([], [
            ["model", "tiny (the embedded default)"],
            ["identifier", ident],
            ["tuning", _tune_summary(result, ident)],
            ["loss", f"{losses[0]:.3f} at the first step, {sum(tail) / len(tail):.3f} over the last {len(tail)}"
             if losses else "n/a"],
        ])]),
    ]  # fmt: skip
    if png_written:
        sections.append(Section("Training", [Figure("loss.png", "training loss per step (the MusicGen cross-entropy "
                                                    "on the reference's codes)")]))  # fmt: skip
    if concept_written:
        sections.append(Section("Files", [Link("concept.ppt", "concept.ppt", "the concept file: `ppt-fast generate "
                                               "'<v1>, ...' --concept concept.ppt`")]))  # fmt: skip
    return write_report(out, "ppt-fast demo: a concept learned from one clip", sections,
                        intro="Everything on this page was made on this machine by `ppt-fast demo`; the files sit "
                        "beside it, so the folder can be zipped and shared.")  # fmt: skip


def _cmd_demo(args) -> int:
    from .audio import synth_reference, write_wav
    from .generation import generate
    from .models import load_model
    from .tuning import _capture, tune_model

    t0 = time.perf_counter()
    out = args.out
    check_output(out, folder=True)
    for name in _DEMO_FILES:
        check_output(os.path.join(out, name), f"--out ({name})")
    os.makedirs(out, exist_ok=True)
    sr = 16000
    ref_path = os.path.join(out, "reference.wav")
    try:  # a violin: an instrument the default model never heard (held out of its pretraining corpus)
        from .tiny.pretrain import clip_seed, render_clip

        clip = render_clip("violin", clip_seed("violin", args.seed, 400_000), 30.0, sr)
        write_wav(ref_path, clip.view(1, -1), sr, normalize=None)  # as rendered: what the tune reads
        what = "30 s violin melody rendered from a seeded composition (violin is held out of the model's pretraining)"
    except (ImportError, RuntimeError, FileNotFoundError) as e:  # no soundfont renderer: a synthetic timbre
        write_wav(ref_path, synth_reference(12.0, sr, seed=args.seed, timbre="pluck"), sr, normalize=None)
        what = f"12 s synthetic plucked-string melody (soundfont renderer unavailable: {e})"
    print(f"[1/4] wrote the reference clip, a {what}: {ref_path}")

    ident = "<v1>"
    result = tune_model(ref_path, model="tiny", identifier=ident, steps=args.steps, seed=args.seed,
                        verbose=not args.quiet)  # fmt: skip
    losses = result.losses
    print(f"[2/4] tuned the tiny model on it: {_tune_summary(result, ident)}")
    png = os.path.join(out, "loss.png")
    try:
        _plot_losses(losses, png)
    except ImportError:
        png = "(not written: matplotlib is not installed; pip install matplotlib)"
    concept_path = os.path.join(out, "concept.ppt")
    concept = None
    try:
        concept = _capture(result)[0]
        concept.save(concept_path)
        print(f"[3/4] wrote the concept file {concept_path} ({os.path.getsize(concept_path) / 1024:.1f} KiB) "
              f"and the loss curve {png}")  # fmt: skip
    except ImportError as e:
        print(f"[3/4] wrote the loss curve {png}; concept file skipped ({e})")

    prompt = f"a piece of music, {ident}"
    base = load_model("tiny", seed=args.seed)
    with_path = os.path.join(out, "with_concept.wav")
    without_path = os.path.join(out, "without_concept.wav")
    # resample_silent: a clip holding a silent stretch of 1 s or more is sampled again (next seeds), as `ppt-fast
    # generate` does; the small model can fall into its codec's silence code (docs/default_model.md, "Limits").
    if concept is not None:
        a = generate([prompt], model=base, concepts=[concept_path], duration=args.duration, seed=args.seed,
                     resample_silent=DEMO_RESAMPLE_SILENT)  # fmt: skip
    else:
        a = generate([prompt], model=result.model, duration=args.duration, seed=args.seed,
                     resample_silent=DEMO_RESAMPLE_SILENT)  # fmt: skip
    b = generate(["a piece of music"], model=base, duration=args.duration, seed=args.seed,
                 resample_silent=DEMO_RESAMPLE_SILENT)  # fmt: skip
    (wa, wb), report = _loudness(a[0], b[0], sample_rate=base.sample_rate)  # one gain: their levels compare
    write_wav(with_path, wa, base.sample_rate, normalize=None)
    write_wav(without_path, wb, base.sample_rate, normalize=None)
    diff = float((a - b).abs().mean())
    print(f"[4/4] generated {args.duration:g} s with the concept ('{prompt}'): {with_path}")
    print(f"      and without it ('a piece of music'): {without_path} (mean |difference| {diff:.4f})")
    print(f"      both written at one gain: {_level(report)} over the pair; {_silence_note(a, b, base.sample_rate)}")
    page = _write_demo_report(out, what=what, prompt=prompt, result=result, ident=ident, a=wa[None], b=wb[None],
                              sample_rate=base.sample_rate, level=_level(report),
                              concept_written=os.path.isfile(concept_path),
                              png_written=png == os.path.join(out, "loss.png"))  # fmt: skip
    print(f"      a listening page with spectrograms and scores: {page}")
    print(f"done in {time.perf_counter() - t0:.1f} s; everything is in {os.path.abspath(out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ppt-fast`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        _env.debug_tracebacks()
    except ValueError as e:
        return report_user_error(e, debug=False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ppt-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if is_user_error(e):
            return report_user_error(e, debug_requested(args))
        traceback.print_exc()
        print(f"ppt-fast: unexpected error ({type(e).__name__}); this is a bug: please report it with the traceback "
              "above", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
