"""The speech merging benchmark for three generalists: every registered merge method over
the demo's five single-domain experts (``asr-merge demo --methods``).

For each generalist, :func:`merge_core.app.demo.methods.run_method_benchmark` trains (or
reuses) the demo's experts, merges them with every method at its defaults and at a small
grid of its main parameter, times each merge, evaluates every merge on every test set
(cached transcripts, paired bootstrap intervals), and writes ``<out>/methods/``
(``methods.md``, ``methods.json``, ``methods.png``, the full report). Generalists:

* ``nemo``: the shipped tiny FastConformer CTC-BPE (``outputs/demo/nemo-<size>``);
* ``speechbrain``: the shipped tiny Conformer CTC (``outputs/demo/speechbrain-<size>``);
* ``whisper``: Whisper tiny.en (``asr-merge get-model``), first adapted to the synthetic
  original domain (its ``train-clean-100``): any fine-tune on the synthetic corpus lowers
  the pretrained model's WER there, so forgetting is only measurable against the adapted
  model, as against a team's in-house generalist
  (``outputs/demo/speechbrain-whisper-tiny.en-<size>``).

The outputs share the demo's folders, so experts the demo trained are reused (and the
other way round). Wall time per generalist is printed and stored in ``methods.json``.

Usage: ``python -m benchmarks.method_bench [--generalists nemo speechbrain whisper]
[--size default] [--jobs N]``.
"""

from __future__ import annotations

import argparse

from merge_core.app.demo.methods import run_method_benchmark
from merge_core.plugins import toolkit

# generalist -> (toolkit plugin, its demo, adapt to the original domain first)
GENERALISTS = {
    "nemo": ("nemo", "default", False),
    "speechbrain": ("speechbrain", "default", False),
    "whisper": ("speechbrain", "whisper-tiny.en", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generalists", nargs="+", default=list(GENERALISTS), choices=list(GENERALISTS))
    parser.add_argument("--size", default="default", choices=["smoke", "default", "large"])
    parser.add_argument("--jobs", type=int, help="experts trained in parallel (default: one per CPU core)")
    args = parser.parse_args()
    walls = {}
    for name in args.generalists:
        plugin_name, demo_name, adapt = GENERALISTS[name]
        plugin = toolkit(plugin_name)
        demo = plugin.load(plugin.demos[demo_name], f"the {demo_name} demo")
        walls[name] = run_method_benchmark(demo, size=args.size, jobs=args.jobs, adapt_original=adapt)["seconds"]
    print("wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items()))


if __name__ == "__main__":
    main()
