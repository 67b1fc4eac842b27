"""`ppt-fast dataset ...` and `ppt-fast eval ...`: added to the main CLI's subparsers by :func:`register`.

Self-contained: each command turns bad input (what :func:`ppt_fast.cli.is_user_error` calls so, and a KeyError
raised by ppt_fast naming what exists, e.g. an unknown concept) into one line ``ppt-fast: error: ...`` and exit
code 2 (with the traceback under ``--debug`` / ``PPT_FAST_DEBUG=1``); anything else propagates as a bug.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

DATASET_EPILOG = """examples:
  ppt-fast dataset build data/concepts                      # the 10 default concepts, 2-min references
  ppt-fast dataset build data/fluid --renderer fluidsynth   # FluidR3 (apt-get install fluidsynth fluid-soundfont-gm)
  ppt-fast dataset build /tmp/small --seconds 20 --heldout 2 --heldout-seconds 5 --concepts piano,violin
  ppt-fast dataset list
"""

EVAL_EPILOG = """modes (exactly one):
  --concept FILE    score concept file(s) against a reference (--reference WAV, or --dataset M --name CONCEPT)
  --protocol        run the methods side by side on a dataset (--dataset M): full, tokens, ppt 0.1/1/5 %,
                    dreamstyler, PEFT's LoRA (lora, lora-matched) and SHiRA (shira), and two concepts together
                    with 1 vs 3 identifier tokens
  --retrieval       check the embedder on a dataset: top-1 retrieval of held-out clips

examples:
  ppt-fast eval --model tiny --concept violin.ppt --dataset data/concepts --name violin --out out/eval_violin
  ppt-fast eval --protocol --dataset data/concepts --concepts violin,drums --out out/protocol
  ppt-fast eval --retrieval --dataset data/concepts
"""


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from ..cli import debug_requested, is_user_error, raised_in_ppt_fast, report_user_error

        try:
            return fn(args)
        except Exception as e:
            if is_user_error(e) or isinstance(e, KeyError) and raised_in_ppt_fast(e):
                return report_user_error(e, debug_requested(args))
            raise

    return run


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``dataset`` and ``eval`` commands to the ``ppt-fast`` argparse subparsers."""
    from ..synth import CONCEPTS, RENDERERS

    d = subparsers.add_parser(
        "dataset",
        help="render the offline concept dataset (reference + held-out clips per concept)",
        description="Render concept clips deterministically from seeds (MIDI compositions through a GM soundfont).",
        epilog=DATASET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = d.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    b = dsub.add_parser("build", help="render into OUT and write OUT/manifest.json")
    b.add_argument("out", metavar="OUT", help="output directory")
    b.add_argument("--renderer", default="tinysoundfont", choices=RENDERERS, help="default tinysoundfont (pip only)")
    b.add_argument("--soundfont", default=None, help="an .sf2 file instead of the renderer's default")
    b.add_argument("--concepts", default=None,
                   help=f"comma-separated subset of: {', '.join(CONCEPTS)} (default: the 10 marked * in "
                   "`ppt-fast dataset list`)")  # fmt: skip
    b.add_argument("--seconds", type=float, default=120.0, help="reference clip length (default 120)")
    b.add_argument("--heldout", type=int, default=4, help="held-out clips per concept (default 4)")
    b.add_argument("--heldout-seconds", type=float, default=30.0, help="held-out clip length (default 30)")
    b.add_argument("--sample-rate", type=int, default=32000, help="default 32000 (MusicGen's)")
    b.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    b.set_defaults(func=_guard(_cmd_dataset_build))
    lst = dsub.add_parser("list", help="list the concepts")
    lst.set_defaults(func=_guard(_cmd_dataset_list))

    e = subparsers.add_parser(
        "eval",
        help="score concepts: audio/text alignment, diversity, copying (offline)",
        description="Offline evaluation with the musicnn embedder (PyTorch port; no TensorFlow, no network).",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = e.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concept", action="append", metavar="FILE", help="concept file to score (repeatable)")
    mode.add_argument("--protocol", action="store_true", help="run the methods side by side on --dataset")
    mode.add_argument("--retrieval", action="store_true", help="embedder check: top-1 retrieval on --dataset")
    e.add_argument("--model", default="tiny", help="base model (default tiny; a checkpoint dir for real runs)")
    e.add_argument("--dataset", default=None, help="manifest.json (or its directory) from `ppt-fast dataset build`")
    e.add_argument("--name", default=None, help="--concept mode: the dataset concept whose reference to score against")
    e.add_argument("--reference", default=None, help="--concept mode: reference audio file instead of --dataset/--name")
    e.add_argument("--identifier", action="append", default=None, help="identifier(s) in the prompts (default <v1>)")
    e.add_argument("--concepts", default=None, help="--protocol: comma-separated concepts (default: first two)")
    e.add_argument("--methods", default=None, help="--protocol: comma-separated subset of the methods (default: all)")
    e.add_argument("--pair", default=None, help="--protocol: the two concepts tuned together (default: first two)")
    e.add_argument("--steps", type=int, default=None, help="--protocol: tuning steps (default: tune's default)")
    e.add_argument("--prompts", action="append", default=None,
                   help="prompt template, {} = identifiers (repeatable; default: four prompts, 'a piece of music, {}' "
                   "first)")  # fmt: skip
    e.add_argument("--clips", type=int, default=2, help="clips generated per prompt (default 2)")
    e.add_argument("--duration", type=float, default=5.0, help="seconds per generated clip (default 5; >= 3)")
    e.add_argument("--top-k", type=int, default=None, help="default: the model's (tiny: 64; MusicGen: 250)")
    e.add_argument("--held-in-clips", type=int, default=2,
                   help="--protocol: held-in clips per prompt for the held-in cost (default 2; 0: off)")  # fmt: skip
    e.add_argument("--seed", type=int, default=0,
                   help="everything random (tuning, generation) derives from it (default %(default)s)")  # fmt: skip
    e.add_argument("--embedder", default="musicnn", choices=("musicnn", "mfcc"),
                   help="the audio metrics' clip embedder: musicnn (the tagger's penultimate layer) or mfcc "
                   "(weight-free) (default %(default)s)")  # fmt: skip
    e.add_argument("--pad", default="error", choices=("error", "repeat"),
                   help="clips shorter than 3 s: error|repeat (default %(default)s)")  # fmt: skip
    e.add_argument("--clap-checkpoint", default=None, help="local LAION-CLAP .pt (needs pip install laion-clap)")
    e.add_argument(
        "--allow-unverified",
        action="store_true",
        help="--concept mode: apply concept files that hold no fingerprint of their base model (nothing then checks "
        "that they were tuned on --model)",
    )
    e.add_argument(
        "--out", default="out/eval", help="output folder for results.json and report.md (default %(default)s)"
    )
    e.set_defaults(func=_guard(_cmd_eval))


def _check_outputs(folder: str, names: tuple[str, ...], flag: str) -> None:
    """UsageError naming `flag` when the output folder or a file `names` in it cannot be written (before any work)."""
    from ..cli import check_output

    check_output(folder, flag, folder=True)
    for name in names:
        check_output(os.path.join(folder, name), f"{flag} ({name})")


def _cmd_dataset_build(args: argparse.Namespace) -> int:
    from .dataset import build, load_manifest

    _check_outputs(args.out, ("manifest.json",), "OUT")
    path = build(
        args.out, concepts=_csv(args.concepts), seconds=args.seconds, heldout=args.heldout,
        heldout_seconds=args.heldout_seconds, sample_rate=args.sample_rate, renderer=args.renderer,
        soundfont=args.soundfont, seed=args.seed,
    )  # fmt: skip
    m = load_manifest(path)
    sf = m.data["soundfont"]
    print(f"wrote {len(m.concepts)} concepts ({', '.join(m.concepts)}) to {path}")
    print(f"renderer {m.data['renderer']}, soundfont {sf['name']} ({sf['licence']})")
    return 0


def _cmd_dataset_list(args: argparse.Namespace) -> int:
    from ..synth import CONCEPTS
    from .dataset import EVAL_CONCEPTS

    print(f"{len(CONCEPTS)} concepts; * = rendered by `ppt-fast dataset build` without --concepts "
          f"({len(EVAL_CONCEPTS)})")  # fmt: skip
    for c in CONCEPTS.values():
        print(f"{'*' if c.name in EVAL_CONCEPTS else ' '} {c.name:16s} {c.description}")
    return 0


def _settings(args: argparse.Namespace):
    from .protocol import DEFAULT_PROMPTS, Settings

    if args.clips < 1 or args.duration <= 0 or args.held_in_clips < 0:
        raise ValueError("--clips must be >= 1, --duration > 0 and --held-in-clips >= 0")
    return Settings(
        model=args.model, steps=args.steps, duration=args.duration, clips_per_prompt=args.clips,
        prompts=tuple(args.prompts) if args.prompts else DEFAULT_PROMPTS, seed=args.seed, embedder=args.embedder,
        pad=args.pad, clap_checkpoint=args.clap_checkpoint, top_k=args.top_k, allow_unverified=args.allow_unverified,
        held_in_clips=args.held_in_clips,
    )  # fmt: skip


def _summary(report: dict) -> None:
    from .protocol import _caveats, _fmt

    for r in report["results"]:
        keys = [k for k in r if k.startswith(("audio_alignment", "copying"))
                and not k.endswith(("_clips", "_se", "_n"))]  # fmt: skip
        keys += ["text_alignment", "diversity", "held_in_loss_rise"]
        vals = ", ".join(f"{k} {_fmt(r.get(k))}" + (f" ± {r[k + '_se']:.3f}" if r.get(k + "_se") is not None else "")
                         for k in keys)  # fmt: skip
        print(f"{r['method']:12s} {'+'.join(r['concepts']):24s} {vals}")
    for note in _caveats(report):
        print("note: " + note.replace("**", ""))


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .metrics import retrieval
    from .protocol import PROTOCOL_FILES, REPORT_FILES, write_json

    names = ("retrieval.json",) if args.retrieval else PROTOCOL_FILES if args.protocol else REPORT_FILES
    _check_outputs(args.out, names, "--out")
    if args.retrieval:
        if not args.dataset:
            raise ValueError("--retrieval needs --dataset MANIFEST")
        r = retrieval(args.dataset, embedder=args.embedder, concepts=_csv(args.concepts))
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "retrieval.json")
        write_json(path, r)
        print(f"{args.embedder}: top-1 retrieval {r['top1']:.3f} over {r['n']} held-out clips; cosine to own "
              f"concept {r['same_mean']:.3f}, to others {r['different_mean']:.3f}")  # fmt: skip
        for clip, true, pred in r["confusions"]:
            print(f"  confused: {clip} ({true}) -> {pred}")
        print(f"wrote {path}")
        return 0
    settings = _settings(args)
    if args.protocol:
        from .protocol import run_protocol

        if not args.dataset:
            raise ValueError("--protocol needs --dataset MANIFEST (build one with `ppt-fast dataset build`)")
        report = run_protocol(
            args.dataset, args.out, concepts=_csv(args.concepts), methods=_csv(args.methods), pair=_csv(args.pair),
            settings=settings,
        )  # fmt: skip
    else:
        from .protocol import evaluate_concept_file

        for c in args.concept:
            if not os.path.isfile(c):
                raise FileNotFoundError(f"concept file {c!r} does not exist")
        if args.reference:
            reference = _read_audio(args.reference)
            name = os.path.splitext(os.path.basename(args.reference))[0]
        elif args.dataset and args.name:
            from ..synth import read_wav
            from .dataset import load_manifest

            audio, sr = read_wav(load_manifest(args.dataset).reference_path(args.name))
            reference, name = (torch.from_numpy(audio), sr), args.name
        else:
            raise ValueError("--concept needs a reference: --reference WAV, or --dataset MANIFEST --name CONCEPT")
        report = evaluate_concept_file(
            args.concept, reference, args.out, identifiers=args.identifier or ["<v1>"], settings=settings,
            reference_name=name,
        )  # fmt: skip
    _summary(report)
    listening = f", and the listening page {os.path.join(args.out, 'report.html')}" if args.protocol else ""
    print(f"wrote {os.path.join(args.out, 'results.json')} and {os.path.join(args.out, 'report.md')}{listening}")
    return 0


def _read_audio(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference {path!r} does not exist")
    try:
        from ppt_fast.audio import read_audio  # soundfile: any format it reads
    except ImportError:
        import torch

        from ..synth import read_wav

        audio, sr = read_wav(path)
        return torch.from_numpy(audio), sr
    return read_audio(path)
