"""Step time of NeMo fine-tuning with and without asr-merge's training features.

What it measures
----------------
The tiny FastConformer-CTC-BPE of ``configs/nemo/fastconformer_ctc_bpe_tiny.yaml``
(the test suite's model, with a locally trained tokenizer) fine-tuned on espeak-ng
speech (the test suite's eight utterances, batches of 4) by a real Lightning
``Trainer.fit``, in one run, in three configurations:

* ``plain``: full fine-tuning as NeMo does it (AdamW, the config's CosineAnnealing),
  none of our callbacks;
* ``ours``: the same plus LLRD (``model.llrd.decay: 0.9``: one optimizer group per
  encoder layer plus one for the rest), the slanted triangular schedule, and the
  callbacks of ``configs/nemo/finetune_expert.yaml``: ``ExpertSetup``,
  ``ExportExpert``, ``ExportBestExpert`` and ``TrajectorySnapshots``;
* ``lora``: LoRA (``model.lora.r: 16``, alpha 2r, the default targets: attention and
  feed-forward linears, pointwise and depthwise convolutions) instead of full
  fine-tuning, otherwise as ``plain``.

Each step is timed on this process's CPU clock (one intra-op thread, ``--threads``, so
CPU time is the step's own work) and on the wall clock, in three phases cut by
Lightning's hooks: ``compute`` (``on_train_batch_start`` to
``on_before_optimizer_step``: forward and backward), ``update`` (to
``on_train_batch_end``: the optimizer and scheduler steps) and ``after`` (to the next
``on_train_batch_start``: the callbacks' per-batch work, logging, loading the next
batch). The first ``--warmup`` steps of each fit are dropped. Validation is off
(``limit_val_batches=0``), so ``ExportBestExpert`` stays idle, and ``ExportExpert``
writes at the end of training, outside the timed steps. Snapshots every
``--snapshot-every`` = 10 steps put one snapshot in each fit's 16 timed steps, 60 times
more often than the paper's every 1000 steps, so their cost shows.

Each of ``--rounds`` rounds fits ``plain, ours, ours, plain, lora`` (ABBA order).
Every fit draws the same batches in the same order (same seed; LLRD and STLR draw no
random numbers), so step i does the same forward and backward work in every fit.
Other jobs can only add time, so a phase's own cost is estimated by its fastest
repetition: the minimum over a configuration's fits of step i's phase time, averaged
over i.

The headline ratio is ``(compute + update_ours + after_ours) / (compute + update_plain
+ after_plain)`` with ``compute`` the plain fits' (the forward and backward work is the
same): it charges our features exactly the phases they touch. On a shared machine
other jobs inflate whole-step times by far more than 3 % from one fit to the next, so
the whole-step ratio is printed beside it together with an A/A line: the same
estimator on the first against the second ``plain`` (and ``ours``) fit of each round,
which do identical work; its distance from 1 is the noise of whole-step ratios.

Target: the headline ratio <= 1.03. For ``lora`` the table gives the trainable
parameter count and the whole-step time against full fine-tuning (no target).

Usage: ``python -m benchmarks.nemo_train_overhead [--steps 20] [--warmup 4] [--rounds 8]
[--snapshot-every 10] [--threads 1] [--workdir DIR]``. The data, tokenizer and base
model are cached in the work folder (default ``/tmp/asr-merge-train-bench``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import add_workdir_option, cpu_busy_s, own_cpu_s

TARGET_OVERHEAD = 1.03
ROUND_ORDER = ("plain", "ours", "ours", "plain", "lora")
CONFIGS = ("plain", "ours", "lora")
PHASES = ("compute", "update", "after")
HOOKS = ("start", "before_optimizer_step", "end")


@dataclass
class Run:
    """One fit of one configuration: parameter counts and, per clock (``cpu``/``wall``)
    and phase, the time of each step (s)."""

    config: str
    trainable: int
    total: int
    phases: dict[tuple[str, str], list[float]]

    def step(self, clock: str) -> list[float]:
        """Whole-step times on ``clock``."""
        return [sum(parts) for parts in zip(*(self.phases[clock, p] for p in PHASES))]


def build_inputs(workdir: Path) -> tuple[Path, Path]:
    """``(base.nemo, train.json)`` in ``workdir``, built once: espeak-ng audio of the test
    utterances, a SentencePiece tokenizer and the tiny model, initialized with seed 0."""
    from nemo_merge.models import build_model
    from nemo_merge.testing import TINY_CONFIG, UTTERANCES, ensure_tokenizer, save_nemo, write_speech_manifest

    base, manifest = workdir / "base.nemo", workdir / "train.json"
    if not manifest.is_file():
        write_speech_manifest(manifest, UTTERANCES)
    if not base.is_file():
        save_nemo(build_model(TINY_CONFIG, ensure_tokenizer(workdir), seed=0), base)
    return base, manifest


def phase_timer() -> Any:
    """A callback stamping both clocks at each step's start, before its optimizer step
    and at its end (listed first, so before the other callbacks' ``on_train_batch_end``)."""
    from lightning.pytorch.callbacks import Callback

    class PhaseTimer(Callback):
        def __init__(self) -> None:
            self.stamps: dict[str, list[tuple[float, float]]] = {hook: [] for hook in HOOKS}

        def _stamp(self, hook: str) -> None:
            self.stamps[hook].append((time.process_time(), time.perf_counter()))

        def on_train_batch_start(self, *args: Any) -> None:
            self._stamp("start")

        def on_before_optimizer_step(self, *args: Any) -> None:
            self._stamp("before_optimizer_step")

        def on_train_batch_end(self, *args: Any) -> None:
            self._stamp("end")

    return PhaseTimer()


def phase_times(stamps: dict[str, list[tuple[float, float]]]) -> dict[tuple[str, str], list[float]]:
    """Per clock and phase, the times of every step followed by another step."""
    starts, befores, ends = (stamps[hook] for hook in HOOKS)
    out = {}
    for k, clock in enumerate(("cpu", "wall")):
        out[clock, "compute"] = [b[k] - a[k] for a, b in zip(starts[:-1], befores)]
        out[clock, "update"] = [b[k] - a[k] for a, b in zip(befores[:-1], ends)]
        out[clock, "after"] = [b[k] - a[k] for a, b in zip(ends, starts[1:])]
    return out


def config_sections(config: str) -> dict[str, Any]:
    """Model config entries (dotted keys) of ``config``."""
    plain = {"optim.lr": 1e-3, "optim.sched.warmup_steps": 0}
    if config == "ours":
        stlr = {"name": "SlantedTriangular", "cut_frac": 0.1, "ratio": 32}
        return {"optim.lr": 1e-3, "llrd": {"decay": 0.9}, "optim.sched": stlr}
    if config == "lora":
        return {**plain, "lora": {"r": 16}}
    return plain


def our_callbacks(config: str, out: Path, snapshot_every: int) -> list[Any]:
    """The callbacks of ``configs/nemo/finetune_expert.yaml`` for ``ours``, only the
    LoRA/LLRD setup for ``lora``, none for ``plain``."""
    from nemo_merge.callbacks import ExpertSetup, ExportBestExpert, ExportExpert, TrajectorySnapshots

    if config == "plain":
        return []
    if config == "lora":
        return [ExpertSetup()]
    return [
        ExpertSetup(),
        ExportExpert(str(out / "expert.nemo")),
        ExportBestExpert(str(out / "expert_best.nemo")),
        TrajectorySnapshots(str(out / "snapshots"), every_n_train_steps=snapshot_every),
    ]


def fit_once(config: str, base: Path, manifest: Path, steps: int, snapshot_every: int, out: Path) -> Run:
    """Restore ``base``, configure it as ``config`` and fit ``steps`` steps; the same seed
    (data order, dither, SpecAugment, dropout) for every configuration."""
    import torch
    from nemo.collections.asr.models import ASRModel
    from omegaconf import OmegaConf, open_dict

    from nemo_merge.testing import cpu_trainer

    model = ASRModel.restore_from(str(base), map_location="cpu")
    timer = phase_timer()
    trainer = cpu_trainer(steps, out, callbacks=[timer, *our_callbacks(config, out, snapshot_every)])
    model.set_trainer(trainer)
    with open_dict(model.cfg):
        for key, value in config_sections(config).items():
            OmegaConf.update(model.cfg, key, value, merge=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.setup_training_data({**OmegaConf.to_container(model.cfg.train_ds), "manifest_filepath": str(manifest)})
        trainer.fit(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Run(config, trainable, total, phase_times(timer.stamps))


def run_round(base: Path, manifest: Path, args: argparse.Namespace, fits: Path, index: int) -> tuple[list[Run], float]:
    """The fits of one round, and the cores other processes kept busy meanwhile."""
    start_wall, start_busy, start_own = time.perf_counter(), cpu_busy_s(), own_cpu_s()
    runs = []
    for k, config in enumerate(ROUND_ORDER):
        runs.append(fit_once(config, base, manifest, args.steps, args.snapshot_every, fits / f"r{index}-{k}-{config}"))
    end_busy, end_own = cpu_busy_s(), own_cpu_s()
    others = ((end_busy - start_busy) - (end_own - start_own)) / (time.perf_counter() - start_wall)
    return runs, max(others, 0.0)


def fastest_ms(series: list[list[float]], warmup: int) -> float:
    """Step i's fastest time over the fits' ``series``, averaged over the steps i (ms)."""
    return 1000 * statistics.mean(min(times) for times in zip(*(s[warmup:] for s in series)))


def phase_ms(runs: list[Run], config: str, clock: str, phase: str, warmup: int) -> float:
    return fastest_ms([r.phases[clock, phase] for r in runs if r.config == config], warmup)


def step_ms(runs: list[Run], config: str, clock: str, warmup: int) -> float:
    return fastest_ms([r.step(clock) for r in runs if r.config == config], warmup)


def same_config_ratio(rounds: list[tuple[list[Run], float]], config: str, warmup: int) -> float:
    """Whole-step CPU time of ``config``'s second fit of each round over its first: 1 up to
    noise, since both do the same work."""
    nth = [[[r for r in runs if r.config == config][k] for runs, _ in rounds] for k in (0, 1)]
    return step_ms(nth[1], config, "cpu", warmup) / step_ms(nth[0], config, "cpu", warmup)


def headline_ratio(runs: list[Run], clock: str, warmup: int) -> float:
    """(compute_plain + update_ours + after_ours) / (compute_plain + update_plain + after_plain)."""
    compute = phase_ms(runs, "plain", clock, "compute", warmup)
    ours = compute + sum(phase_ms(runs, "ours", clock, p, warmup) for p in PHASES[1:])
    plain = compute + sum(phase_ms(runs, "plain", clock, p, warmup) for p in PHASES[1:])
    return ours / plain


def print_report(rounds: list[tuple[list[Run], float]], warmup: int) -> bool:
    """The phase table, the ratios and the target line; True when the target holds."""
    runs = [r for round_runs, _ in rounds for r in round_runs]
    params = {r.config: (r.trainable, r.total) for r in runs}
    print(f"other processes kept {statistics.mean(o for _, o in rounds):.2f} cores busy on average "
          f"(per round: {', '.join(f'{o:.2f}' for _, o in rounds)})")
    print(f"\n{'config':<7} {'trainable params':>17} {'of total':>9} {'fits':>5}  "
          + "  ".join(f"{p + ' ms':>10}" for p in PHASES) + f"  {'step ms':>8}  {'wall step ms':>12}")
    for config in CONFIGS:
        trainable, total = params[config]
        phases = "  ".join(f"{phase_ms(runs, config, 'cpu', p, warmup):>10.2f}" for p in PHASES)
        print(f"{config:<7} {trainable:>17,} {trainable / total:>8.1%} {sum(r.config == config for r in runs):>5}  "
              f"{phases}  {step_ms(runs, config, 'cpu', warmup):>8.2f}  {step_ms(runs, config, 'wall', warmup):>12.2f}")
    print("(CPU clock unless marked wall; each: fastest repetition of step i over the fits, averaged over i)")
    overhead = headline_ratio(runs, "cpu", warmup)
    whole = step_ms(runs, "ours", "cpu", warmup) / step_ms(runs, "plain", "cpu", warmup)
    print(f"\nwhole-step ratio ours/plain: {whole:.3f}x CPU, "
          f"{step_ms(runs, 'ours', 'wall', warmup) / step_ms(runs, 'plain', 'wall', warmup):.3f}x wall; "
          f"A/A noise of whole-step ratios here: plain {same_config_ratio(rounds, 'plain', warmup):.3f}x, "
          f"ours {same_config_ratio(rounds, 'ours', warmup):.3f}x")
    passed = overhead <= TARGET_OVERHEAD
    print(f"{'PASS' if passed else 'FAIL'}: LLRD + STLR + export/snapshot callbacks: step time {overhead:.3f}x "
          f"plain fine-tuning (CPU clock, phases they touch; {headline_ratio(runs, 'wall', warmup):.3f}x on the "
          f"wall clock; target <= {TARGET_OVERHEAD})")
    lora_trainable, total = params["lora"]
    print(f"INFO: LoRA r=16 (depthwise conv included) trains {lora_trainable:,} of {total:,} parameters "
          f"({lora_trainable / total:.1%}; full fine-tuning: {params['plain'][0]:,}); whole step "
          f"{step_ms(runs, 'lora', 'cpu', warmup) / step_ms(runs, 'plain', 'cpu', warmup):.3f}x full fine-tuning")
    return passed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # no --run: the fits run in this process
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=4, help="steps dropped at the start of each fit")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of plain, ours, ours, plain, lora")
    parser.add_argument("--snapshot-every", type=int, default=10, help="TrajectorySnapshots interval (steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_workdir_option(
        parser,
        default=Path(tempfile.gettempdir()) / "asr-merge-train-bench",
        about="the data, tokenizer and base model are built once and cached here (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import nemo_merge.optim  # noqa: F401  (registers SlantedTriangular)

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, manifest = build_inputs(args.workdir)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="fits-", dir=args.workdir) as fits:
        for index in range(args.rounds):
            rounds.append(run_round(base, manifest, args, Path(fits), index))
            print(f"round {index + 1}/{args.rounds} done", flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {os.cpu_count()} CPUs; "
          f"{args.steps} steps per fit, first {args.warmup} dropped; snapshots every {args.snapshot_every} steps")
    return 0 if print_report(rounds, args.warmup) else 1


if __name__ == "__main__":
    sys.exit(main())
