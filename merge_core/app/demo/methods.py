"""The speech merging benchmark: every registered merge method over the demo's experts.

``asr-merge demo --methods`` trains (or reuses) the demo's single-domain experts, merges
them with every registered per-tensor method at its documented defaults and at a small
grid of its main parameter (:data:`GRIDS`), times each merge, evaluates every merge on
every test set with the cached evaluator (the same ``asr-merge eval`` code, so each number
comes with its paired bootstrap interval), and writes ``<out>/methods/``: ``report.*``
(the full forgetting report), ``methods.json`` / ``methods.md`` (one row per method and
setting: mean target-domain WER, Forgetting %, merge time) and ``methods.png`` (mean
target WER against forgetting, one point per method and setting).

With ``adapt_original`` the generalist is first fine-tuned on the original domain's
training set (``train-clean-100``) and that adapted model is the generalist every expert
starts from and forgetting is measured against: the in-house generalist a team would
have, and the only way a pretrained model such as Whisper tiny.en, which any fine-tune on
the synthetic corpus improves on its original domain, can show forgetting.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from merge_core.app.corpus.domains import ORIGINAL
from merge_core.app.experiment.plan import FORGETTING_SETS, TARGETS, DemoPlan, DemoToolkit, ExpertJob, slug
from merge_core.app.demo.runner import make_plan, prepare_data, size_note
from merge_core.app.experiment.graph import merge as run_merge
from merge_core.app.experiment.runner import train_experts
from merge_core.atomic import write_atomically, write_text_atomically
from merge_core.evaluation.bootstrap import PairedBootstrap
from merge_core.errors import MergeError
from merge_core.grams import gram_path
from merge_core.plugins import toolkit
from merge_core.registry import MergeMethod, available_methods, get_method

# each method's main parameter, the values tried beside its default, and parameters those grid
# points also set: methods that add the task vectors up (lambda 1: the sum of all five) are
# tried at lambda 0.2, which on five experts is the average's scale
Grid = tuple[str, tuple[Any, ...], dict[str, Any]]
GRIDS: dict[str, Grid] = {
    "task_arithmetic": ("lambda", (0.2, 0.4, 0.6), {}),
    "ties": ("density", (0.1, 0.5), {}),
    "dare_linear": ("density", (0.3, 0.5, 0.7), {"lambda": 0.2}),
    "dare_ties": ("density", (0.3, 0.7), {}),
    "extreme": ("mode", ("min",), {}),
    "breadcrumbs": ("density", (0.5, 0.7, 0.9), {"lambda": 0.2}),
    "della": ("density", (0.3, 0.7), {}),
    "tsv": ("alpha", (0.5, 1.5), {}),
    "iso_c": ("alpha", (0.5, 1.5), {}),
    "iso_cts": ("alpha", (0.5, 1.5), {}),
    "regmean": ("alpha", (0.5, 1.0), {}),
}
REFERENCE = "pretrained"
SILENT_WER = 99.5  # a merge whose target WER is this high outputs (almost) nothing: it is broken
AODE = "average"  # the plain average of the experts: AoDE, what every other method is compared with
GRAM_BATCHES = 16  # of 8 utterances: regmean's Gram matrices from each expert's own training set


@dataclass(frozen=True)
class Setting:
    """One merge of the benchmark: a method, its parameters and those its name shows."""

    method: str
    parameters: Mapping[str, Any]
    shown: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return " ".join([self.method, *(f"{k}={self.parameters[k]}" for k in self.shown)])


def method_settings(method: MergeMethod) -> list[Setting]:
    """The method at its defaults, then each grid value of its main parameter.

    >>> [s.name for s in method_settings(get_method("ties"))]
    ['ties density=0.2', 'ties density=0.1', 'ties density=0.5']
    """
    if method.name not in GRIDS:
        return [Setting(method.name, dict(method.defaults))]
    main, values, fixed = GRIDS[method.name]
    unknown = sorted({main, *fixed} - set(method.defaults))
    if unknown:
        raise ValueError(f"benchmark grid of {method.name!r} sets {unknown}, which it does not take")
    default = Setting(method.name, dict(method.defaults), (main,))
    grid = [Setting(method.name, {**method.defaults, **fixed, main: v}, (main, *fixed)) for v in values]
    return [default, *(g for g in grid if g.parameters != default.parameters)]


def skip_reason(method: MergeMethod, experts: int) -> str | None:
    """Why ``method`` cannot merge the benchmark's experts, or None."""
    if method.min_models > experts or (method.max_models is not None and method.max_models < experts):
        return f"merges {method.min_models}..{method.max_models or 'n'} experts; the benchmark has {experts}"
    return None


def collect_expert_grams(plan: DemoPlan, experts: Mapping[str, str]) -> None:
    """Each expert's Gram file (for ``regmean``), from :data:`GRAM_BATCHES` batches of its own
    domain's training set through the toolkit's ``asr-merge grams``; kept ones are reused
    (an expert's path hashes all that shapes it)."""
    plugin = toolkit(plan.toolkit.name)
    collect = plugin.load(plugin.collect_grams, f"Gram collection for {plugin.name} models")
    for domain, expert in experts.items():
        if not gram_path(expert).exists():
            collect({"toolkit": plan.toolkit.name, "model": expert, "manifest": str(plan.manifest(domain, "train")),
                     "batches": GRAM_BATCHES, **plan.toolkit.dev_options(plan)}, progress=False)


def adapted_plan(plan: DemoPlan, workers: int) -> DemoPlan:
    """The plan whose generalist is ``plan``'s fine-tuned on the original domain's training set."""
    job = ExpertJob((ORIGINAL,))
    train_experts(plan, [job], workers)
    # the same folder: experts are keyed by their generalist's digest, so none collide
    return replace(plan, generalist=plan.expert_path(job))


def merge_timed(plan: DemoPlan, setting: Setting, experts: list[str], out: Path) -> tuple[Path, float]:
    """Merge ``experts`` by ``setting`` into ``out``; the merge's wall time in seconds."""
    recipe = {
        "method": setting.method,
        "base_model": str(plan.generalist),
        "models": experts,
        "parameters": dict(setting.parameters),
        "output": str(out / f"{plan.toolkit.prefix}{slug(setting.name.replace('=', '-'))}{plan.toolkit.suffix}"),
    }
    if plan.toolkit.merge_exclude:
        recipe["exclude"] = list(plan.toolkit.merge_exclude)
    start = time.perf_counter()
    run_merge(recipe)
    return Path(recipe["output"]), time.perf_counter() - start


def _paired_versus(boot: PairedBootstrap, model: str, other: str, reference: str, targets: list[str],
                   forgetting_sets: list[str]) -> dict[str, Any]:
    """``model`` minus ``other`` on the same resamples: mean target WER (points) and Forgetting %
    (points), each a paired percentile interval."""
    target = boot.mean_wer(model, targets) - boot.mean_wer(other, targets)
    ours, theirs = (boot.forgetting(m, reference, forgetting_sets) for m in (model, other))
    forgetting = None if ours is None or theirs is None else ours - theirs
    return boot.intervals({"target_wer": target, "forgetting_pct": forgetting})


def verdict(interval: list[float] | None) -> str:
    """``lower`` / ``higher`` when a paired interval of a difference excludes 0, else ``within noise``.

    >>> verdict([-3.0, -0.5]), verdict([-1.0, 2.0]), verdict([0.2, 4.0])
    ('lower', 'within noise', 'higher')
    """
    if interval is None or interval[0] <= 0 <= interval[1]:
        return "within noise"
    return "lower" if interval[1] < 0 else "higher"


def summarise(report: Mapping[str, Any], settings: dict[str, Setting], seconds: dict[str, float]) -> list[dict[str, Any]]:
    """One row per evaluated model: the mean of its target-domain WERs and its Forgetting %, each
    with the report's paired bootstrap interval (the same resamples as the report's), both as
    differences to AoDE (:data:`AODE`, the plain average) with paired intervals, and the merge's time."""
    targets = [s for s in report["sets"] if s not in report["forgetting_sets"]]
    forgetting_sets = list(report["forgetting_sets"])
    boot = PairedBootstrap.from_report(report)
    rows = []
    for m in report["models"]:
        setting = settings.get(m["name"])
        mean = sum(m["wer"][s] for s in targets) / len(targets)
        row = {
            "name": m["name"],
            "method": setting.method if setting else None,
            "parameters": dict(setting.parameters) if setting else None,
            "target_wer": mean,
            "target_wer_ci": boot.intervals({"mean": boot.mean_wer(m["name"], targets)})["mean"] if boot else None,
            "forgetting_pct": m["forgetting_pct"],
            "forgetting_ci": m.get("forgetting_ci"),
            "merge_seconds": seconds.get(m["name"]),
        }
        if boot and AODE in settings:
            ci = _paired_versus(boot, m["name"], AODE, report["reference_model"], targets, forgetting_sets)
            aode = next(r for r in report["models"] if r["name"] == AODE)
            aode_forgetting = aode["forgetting_pct"]
            row["versus_aode"] = {
                "target_wer": mean - sum(aode["wer"][s] for s in targets) / len(targets),
                "target_wer_ci": ci["target_wer"],
                "target_wer_verdict": verdict(ci["target_wer"]),
                "forgetting_pct": None if m["forgetting_pct"] is None or aode_forgetting is None
                else m["forgetting_pct"] - aode_forgetting,
                "forgetting_pct_ci": ci["forgetting_pct"],
                "forgetting_pct_verdict": verdict(ci["forgetting_pct"]),
            }
        rows.append(row)
    return rows


def _with_ci(value: float | None, ci: list[float] | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.1f}" if signed else f"{value:.2f}"
    return text + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if signed else f" ±{(ci[1] - ci[0]) / 2:.1f}") if ci else text


def _versus(row: dict[str, Any], key: str) -> str:
    versus = row.get("versus_aode")
    if versus is None or row["name"] == AODE:
        return "-"
    text = _with_ci(versus[key], versus[f"{key}_ci"], signed=True)
    return f"**{text}**" if versus[f"{key}_verdict"] != "within noise" else text


def render_table(rows: list[dict[str, Any]], skipped: Mapping[str, str]) -> str:
    """``methods.md``: one row per method and setting; differences to AoDE in bold where their
    paired interval excludes 0."""
    lines = [
        "| Model | Mean target WER | Forgetting % | vs AoDE: target WER | vs AoDE: forgetting | Merge s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        secs = "-" if r["merge_seconds"] is None else f"{r['merge_seconds']:.1f}"
        lines.append(f"| {r['name']} | {_with_ci(r['target_wer'], r['target_wer_ci'])} | "
                     f"{_with_ci(r['forgetting_pct'], r['forgetting_ci'], signed=True)} | "
                     f"{_versus(r, 'target_wer')} | {_versus(r, 'forgetting_pct')} | {secs} |")
    notes = [f"- `{name}` not run: {why}." for name, why in skipped.items()]
    legend = ("Mean target WER: the mean of the target domains' test WERs (%), ± half its paired 95 % bootstrap "
              "interval. Forgetting %: relative pooled WER increase on test_clean + test_other over the generalist. "
              f"vs AoDE: this row minus `{AODE}` (AoDE), in points, paired 95 % interval; bold where it excludes 0.")
    return "\n".join(["# Merge methods on the demo's experts", "", *lines, "", legend, "", *notes, ""])


def plot_methods(rows: list[dict[str, Any]], dest: Path, title: str) -> None:
    """Mean target WER against Forgetting %, one point per method and setting (a colour and
    marker per method, the grid value beside each point, forgetting's interval as error bars);
    the generalist and its experts in grey. Rows whose merge transcribes nothing (target WER
    >= :data:`SILENT_WER`) would squash the chart: they are named under it instead."""
    from matplotlib import colormaps

    from merge_core.evaluation.plot import DPI, agg_figure

    silent = [r["name"] for r in rows if r["target_wer"] >= SILENT_WER]
    shown = [r for r in rows if r["target_wer"] < SILENT_WER and r["forgetting_pct"] is not None]
    methods = list(dict.fromkeys(r["method"] for r in shown if r["method"]))
    fig = agg_figure(10.0, 7.0)
    ax = fig.subplots()
    palette = colormaps["tab20"]
    for i, method in enumerate([None, *methods]):
        points = [r for r in shown if r["method"] == method]
        xerr = [[r["forgetting_pct"] - r["forgetting_ci"][0] if r["forgetting_ci"] else 0.0 for r in points],
                [r["forgetting_ci"][1] - r["forgetting_pct"] if r["forgetting_ci"] else 0.0 for r in points]]
        style = {"color": "0.55", "fmt": "o"} if method is None else {"color": palette(i - 1), "fmt": "osD^vP*Xh<>p"[i % 11]}
        ax.errorbar([r["forgetting_pct"] for r in points], [r["target_wer"] for r in points], xerr=xerr,
                    label=method or "generalist and experts", markersize=7, capsize=2, elinewidth=0.8, **style)
        for r in points:
            label = r["name"] if method is None else r["name"].removeprefix(method).strip()
            if label:
                ax.annotate(label, (r["forgetting_pct"], r["target_wer"]), fontsize=6.5, xytext=(4, 3),
                            textcoords="offset points", color="0.25")
    ax.axvline(0.0, color="black", linewidth=0.8)
    xlabel = "% forgetting on test_clean + test_other (relative pooled WER increase, 95 % interval)"
    if silent:  # in the label, where the layout makes room for it
        xlabel += "\n\n" + textwrap.fill("not shown (transcribe nothing): " + ", ".join(silent), 110)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean target-domain test WER (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    fig.savefig(dest, format="png", dpi=DPI)


def run_method_benchmark(
    toolkit: DemoToolkit,
    size: str = "default",
    out: str | Path | None = None,
    corpus: str | Path | None = None,
    generalist: str | Path | None = None,
    jobs: int | None = None,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    adapt_original: bool = False,
) -> dict[str, Any]:
    """Run the benchmark (module docstring) of ``methods`` (default: every registered
    per-tensor method); returns ``methods.json``'s content."""
    start = time.perf_counter()
    chosen = [get_method(name) for name in methods or available_methods()]  # unknown names fail before any work
    workers = jobs or max(1, os.cpu_count() or 1)
    plan = make_plan(toolkit, size, out, corpus, generalist, seed, TARGETS[0])
    prepare_data(plan)
    if adapt_original:
        plan = adapted_plan(plan, workers)
    expert_jobs = [ExpertJob((d,)) for d in TARGETS]
    train_experts(plan, expert_jobs, workers)
    experts = [str(plan.expert_path(j)) for j in expert_jobs]
    bench = plan.out / "methods"
    settings: dict[str, Setting] = {}
    seconds: dict[str, float] = {}
    skipped: dict[str, str] = {}
    models = [{"name": REFERENCE, "model": str(plan.generalist)}]
    models += [{"name": f"FT {d}", "model": e} for d, e in zip(TARGETS, experts)]
    for method in chosen:
        why = skip_reason(method, len(experts))
        if why is None and method.needs_grams:
            try:
                collect_expert_grams(plan, dict(zip(TARGETS, experts)))
            except MergeError as e:  # e.g. a model whose forward the toolkit's Gram collection does not run
                why = f"no Gram files: {e}"
        if why:
            skipped[method.name] = why
            continue
        for setting in method_settings(method):
            print(f"merging: {setting.name}")
            path, seconds[setting.name] = merge_timed(plan, setting, experts, bench / "merged")
            settings[setting.name] = setting
            models.append({"name": setting.name, "model": str(path)})
    manifests = {s.replace("-", "_"): plan.manifest(ORIGINAL, s) for s in ("test-clean", "test-other")}
    manifests.update({d: plan.manifest(d, "test") for d in TARGETS})
    report, files = toolkit.evaluate(plan, {
        "models": models,
        "reference_model": REFERENCE,
        "manifests": {k: str(v) for k, v in manifests.items()},
        "forgetting_sets": list(FORGETTING_SETS),
        "output_dir": str(bench / "report"),
        "note": size_note(size),
    })
    rows = summarise(report, settings, seconds)
    title = f"{toolkit.label or toolkit.name} ({size}): merge methods over {len(experts)} domain experts"
    summary = {
        "toolkit": toolkit.name,
        "generalist": str(plan.generalist),
        "adapted_original": adapt_original,
        "size": size,
        "seconds": round(time.perf_counter() - start, 1),
        "cpus": os.cpu_count(),
        "rows": rows,
        "skipped": skipped,
        "report": {kind: str(path) for kind, path in files.items()},
    }
    write_text_atomically(bench / "methods.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    table = render_table(rows, skipped)
    write_text_atomically(bench / "methods.md", table)
    write_atomically(bench / "methods.png", lambda tmp: plot_methods(rows, tmp, title))
    print(table)
    print(f"method benchmark ({size}) finished in {summary['seconds']:.0f} s; results in {bench}")
    return summary
