"""Averaging SpeechBrain checkpoints: asr-merge's streaming merge against SpeechBrain's ``average_checkpoints``.

What it measures
----------------
Four ``Checkpointer`` folders, as the last four epochs of a CTC Conformer run leave
them, are built once and cached in ``--workdir``. Tensor names and shapes come from
SpeechBrain's own lobes as the LibriSpeech CTC recipe wires them, built on the meta
device: ``model`` = ``ModuleList[ConvolutionFrontEnd, TransformerASR (conformer,
d_model 512, 8 heads, d_ffn 2048, --layers layers), Linear to 5000 tokens]`` (4 layers:
~120 MB). Each folder holds ``model.ckpt`` (a base plus N(0, 1e-3^2) deltas),
``optimizer.ckpt`` (AdamW state: ``exp_avg`` and ``exp_avg_sq`` per parameter, twice
the model), ``normalizer.ckpt``, ``scheduler.ckpt``, ``counter.ckpt``, ``brain.ckpt``,
``dataloader-TRAIN.ckpt`` and ``CKPT.yaml``. Then, each in a fresh child:

* ``ours``: :func:`merge_core.merge` of an ``average`` recipe of the four folders with
  the latest as base, output ``CKPT+ours``: the averaged ``model.ckpt``, the latest
  folder's other files, a new ``CKPT.yaml``. Once hashing the inputs with a cold
  digest cache (``ASR_MERGE_CACHE`` a fresh empty folder), once with ``hash_inputs: false``;
* ``legacy``: what a SpeechBrain recipe's ``on_evaluate_start`` does,
  ``Checkpointer.find_checkpoints(max_num_checkpoints=4)`` and
  ``average_checkpoints(checkpoints, "model")``, then the same output written the
  plain way: ``torch.save`` of the average beside copies of the latest folder's other
  files and a ``CKPT.yaml``.

Memory and time come from ``benchmarks/measure.py`` (see there): peak RssAnon (private memory)
and VmRSS sampled every ~5 ms by the parent, ``work s`` the merge alone, ``process s``
the child from start to exit. Inputs are read once beforehand, so every variant
reads them from the page cache. A last child compares the two ``model.ckpt`` files.

Usage: ``python -m benchmarks.sb_merge_bench [--layers 4] [--checkpoints 4]
[--workdir DIR] [--keep] [--quiet-wait 10] [--retries 1]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.synthetic import BASE_SCALE, DELTA_SCALE
from benchmarks.synthetic import child_ours as merge_recipe
from benchmarks.tables import print_report, ratio_table, variant_table
from merge_core.atomic import publish

MODULE = __spec__.name  # every variant's child: python -m MODULE --run SPEC
FORMAT_VERSION = 1  # bump when the built checkpoints change, to invalidate cached inputs

D_MODEL, HEADS, D_FFN, VOCAB, N_MELS = 512, 8, 2048, 5000, 80
OTHER_FILES = {  # the recoverables SpeechBrain saves as text
    "counter.ckpt": "{epoch}",
    "brain.ckpt": "avg_train_loss: 1.5\noptimizer_step: {steps}\nstep: 0\n",
    "dataloader-TRAIN.ckpt": "0",
}


# ------------------------------------------------------------------------ inputs


def checkpoint_folders(workdir: Path, layers: int, count: int) -> list[Path]:
    """The input folders, oldest first."""
    save = workdir / f"sb-merge-v{FORMAT_VERSION}-d{D_MODEL}-L{layers}" / "save"
    return [save / f"CKPT+epoch-{epoch:02d}" for epoch in range(1, count + 1)]


def model_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """The recipe's ``model`` recoverable, built on the meta device: names and shapes only."""
    import torch
    from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
    from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR
    from speechbrain.nnet.linear import Linear

    with torch.device("meta"):
        cnn = ConvolutionFrontEnd(
            input_shape=(8, 10, N_MELS),
            num_blocks=2,
            num_layers_per_block=1,
            out_channels=(64, 32),
            kernel_sizes=(3, 3),
            strides=(2, 2),
            residuals=(False, False),
        )
        transformer = TransformerASR(
            input_size=32 * N_MELS // 4,
            tgt_vocab=VOCAB,
            d_model=D_MODEL,
            nhead=HEADS,
            num_encoder_layers=layers,
            num_decoder_layers=0,
            d_ffn=D_FFN,
            activation=torch.nn.GELU,
            encoder_module="conformer",
            attention_type="RelPosMHAXL",
            normalize_before=True,
            causal=False,
        )
        model = torch.nn.ModuleList([cnn, transformer, Linear(input_size=D_MODEL, n_neurons=VOCAB)])
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def adamw_state(model: dict[str, Any], g: Any) -> dict[str, Any]:
    """An AdamW ``state_dict()`` for ``model``'s parameters, as after some steps."""
    import torch

    state = {
        i: {
            "step": torch.tensor(1000.0),
            "exp_avg": 1e-4 * torch.randn(t.shape, generator=g),
            "exp_avg_sq": 1e-8 * torch.rand(t.shape, generator=g),
        }
        for i, t in enumerate(model.values())
    }
    group = {
        "lr": 1e-3,
        "betas": (0.9, 0.98),
        "eps": 1e-9,
        "weight_decay": 5e-4,
        "amsgrad": False,
        "params": list(state),
    }
    return {"state": state, "param_groups": [group]}


def write_checkpoint(folder: Path, model: dict[str, Any], epoch: int, g: Any) -> None:
    """One ``CKPT+`` folder with every recoverable a recipe's Checkpointer saves."""
    import torch

    from speechbrain_merge.checkpoint_io import write_meta

    tmp = folder.with_name(f".{folder.name}.tmp")  # hidden: no Checkpointer lists it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model, tmp / "model.ckpt")
    torch.save(adamw_state(model, g), tmp / "optimizer.ckpt")
    torch.save(
        {
            "count": 10**6,
            "glob_mean": torch.randn(N_MELS, generator=g),
            "glob_std": torch.rand(N_MELS, generator=g) + 1,
        },
        tmp / "normalizer.ckpt",
    )
    torch.save({"hyperparam_value": 1e-3, "metric_values": [1.5] * epoch}, tmp / "scheduler.ckpt")
    for name, text in OTHER_FILES.items():
        (tmp / name).write_text(text.format(epoch=epoch, steps=1000 * epoch))
    write_meta(tmp / "CKPT.yaml", {"unixtime": 1.7e9 + epoch, "end-of-epoch": True, "WER": 10.0 - epoch})
    publish(tmp, folder)


def build_inputs(folders: list[Path], layers: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    base = {name: BASE_SCALE * torch.randn(shape, generator=g) for name, shape in model_shapes(layers).items()}
    for epoch, folder in enumerate(folders, start=1):
        if not folder.is_dir():
            model = {name: t + DELTA_SCALE * torch.randn(t.shape, generator=g) for name, t in base.items()}
            write_checkpoint(folder, model, epoch, g)


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    import speechbrain.lobes.models.transformer.TransformerASR  # noqa: F401  (imported before the timer starts)

    return measure.timed(lambda: build_inputs([Path(p) for p in spec["folders"]], spec["layers"]))


def ensure_inputs(workdir: Path, layers: int, count: int) -> list[Path]:
    """Build the checkpoint folders in a child process unless they are cached already."""
    folders = checkpoint_folders(workdir, layers, count)
    if not all(f.is_dir() for f in folders):
        print(f"building {count} checkpoint folders in {folders[0].parent} ...", flush=True)
        built = measure.run_child(MODULE, "build", {"kind": "build", "folders": [str(f) for f in folders], "layers": layers})
        print(f"  built in {built.wall_s:.1f} s", flush=True)
    return folders


def input_files(folders: list[Path]) -> list[Path]:
    return [f for folder in folders for f in sorted(folder.iterdir())]


# ------------------------------------------------------------------ child variants


def child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """benchmarks.synthetic's ``ours`` (it finds the CKPT+ kind through speechbrain_merge's
    plugin, and imports no SpeechBrain) on a clean slate."""
    shutil.rmtree(spec["output"], ignore_errors=True)  # a rerun's, before the timer starts
    if spec.get("hash_inputs", True):  # a rerun would find the digests its first try cached: start cold
        shutil.rmtree(os.environ["ASR_MERGE_CACHE"], ignore_errors=True)
    return merge_recipe(spec)


def legacy_average(save: Path, count: int, output: Path) -> None:
    """A recipe's checkpoint averaging, then the average saved as a checkpoint folder."""
    import torch
    from speechbrain.utils.checkpoints import Checkpointer, average_checkpoints

    from speechbrain_merge.checkpoint_io import write_meta

    checkpoints = Checkpointer(save).find_checkpoints(max_num_checkpoints=count)
    averaged = average_checkpoints(checkpoints, recoverable_name="model")
    latest = checkpoints[0].path
    output.mkdir()
    torch.save(averaged, output / "model.ckpt")
    for entry in latest.iterdir():
        if entry.name not in ("model.ckpt", "CKPT.yaml"):
            shutil.copyfile(entry, output / entry.name)
    write_meta(output / "CKPT.yaml", {"unixtime": time.time(), "end-of-epoch": True})


def child_legacy(spec: dict[str, Any]) -> dict[str, Any]:
    import speechbrain.utils.checkpoints  # noqa: F401  (imported before the timer starts)

    shutil.rmtree(spec["output"], ignore_errors=True)  # a rerun's, before the timer starts
    return measure.timed(lambda: legacy_average(Path(spec["save"]), spec["count"], Path(spec["output"])))


def compare(ours: Path, legacy: Path) -> dict[str, Any]:
    """Max |ours - legacy| over the ``model.ckpt`` tensors, and whether the other files match."""
    import torch

    a, b = (torch.load(p / "model.ckpt", map_location="cpu", mmap=True, weights_only=True) for p in (ours, legacy))
    others = sorted(p.name for p in ours.iterdir() if p.name not in ("model.ckpt", "CKPT.yaml"))
    return {
        "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
        "tensors": len(a),
        "same_names": list(a) == list(b),
        "others_identical": all((ours / n).read_bytes() == (legacy / n).read_bytes() for n in others),
        "others": others,
    }


def child_check(spec: dict[str, Any]) -> dict[str, Any]:
    return measure.timed(lambda: compare(Path(spec["ours"]), Path(spec["legacy"])))


CHILDREN: dict[str, measure.ChildFn] = {"build": child_build, "ours": child_ours, "legacy": child_legacy, "check": child_check}


# ------------------------------------------------------------------------ driver


def run_variants(folders: list[Path], outdir: Path, quiet: measure.Quiet, caches: Path) -> tuple[list[measure.Result], dict[str, Any]]:
    """ours (cold digest cache), ours without hashing, legacy; then the outputs compared."""
    ours_out, legacy_out = outdir / "CKPT+ours", outdir / "CKPT+legacy"
    ours = {
        "kind": "ours",
        "method": "average",
        "parameters": {},
        "base": str(folders[-1]),
        "experts": [str(f) for f in folders],
        "output": str(ours_out),
    }
    legacy = {"kind": "legacy", "save": str(folders[0].parent), "count": len(folders), "output": str(legacy_out)}
    results = []
    for variant, spec, env in (
        ("ours", ours, {"ASR_MERGE_CACHE": tempfile.mkdtemp(prefix="cache-", dir=caches)}),
        ("ours, no hash", {**ours, "hash_inputs": False}, None),
        ("legacy (average_checkpoints)", legacy, None),
    ):
        print(f"running {variant} ...", flush=True)
        results.append(measure.run_quietly(MODULE, variant, spec, quiet, env))
    check = measure.run_child(MODULE, "check", {"kind": "check", "ours": str(ours_out), "legacy": str(legacy_out)})
    return results, check.extra


def header(folders: list[Path], layers: int, warm_s: float) -> list[str]:
    model = (folders[0] / "model.ckpt").stat().st_size
    folder = sum(f.stat().st_size for f in folders[0].iterdir())
    total = sum(f.stat().st_size for f in input_files(folders))
    return [
        (f"asr-merge vs SpeechBrain average_checkpoints: average of {len(folders)} CKPT+ folders, "
         f"{folder / measure.MB:.0f} MB each (model.ckpt {model / measure.MB:.0f} MB: CTC Conformer, float32, {layers} layers, "
         f"d={D_MODEL}; optimizer.ckpt twice that); {measure.machine_summary()}"),
        (f"inputs {folders[0].parent} ({total / measure.MB:.0f} MB) read once beforehand in {warm_s:.2f} s: "
         "every variant reads from the page cache"),
        ("each variant in a fresh process; work s = the merge and its output folder; process s = the child from start "
         "to exit (start-up and imports included); priv = RssAnon (private anonymous pages), sampled every 5 ms; "
         "idle priv = RssAnon after imports; other cpu = cores used by other processes meanwhile"),
    ]


def check_lines(check: dict[str, Any]) -> list[str]:
    return [
        (f"model.ckpt: max |ours - legacy| = {check['max_abs_diff']:.2e} over {check['tensors']} tensors "
         f"({'same names and order' if check['same_names'] else 'DIFFERENT names or order'})"),
        f"other files ({', '.join(check['others'])}): "
        + ("identical in both outputs" if check["others_identical"] else "DIFFER between the outputs"),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = measure.bench_parser(MODULE, __doc__)
    parser.add_argument("--layers", type=int, default=4, help="Conformer layers of the model (4: ~120 MB model.ckpt)")
    parser.add_argument("--checkpoints", type=int, default=4, help="number of checkpoint folders averaged")
    measure.add_workdir_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the two merged folders in WORKDIR/out")
    measure.add_quiet_options(parser, wait_s=10.0, retries=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if measure.ran_as_child(args, CHILDREN):
        return
    started = time.perf_counter()
    folders = ensure_inputs(args.workdir, args.layers, args.checkpoints)
    outdir = args.workdir / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    warm_s = measure.warm_page_cache(input_files(folders))
    caches = Path(tempfile.mkdtemp(prefix="digest-caches-", dir=args.workdir))
    try:
        results, check = run_variants(folders, outdir, measure.Quiet(args.quiet_wait, args.retries), caches)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
        if not args.keep:
            for name in ("CKPT+ours", "CKPT+legacy"):
                shutil.rmtree(outdir / name, ignore_errors=True)
    sections = [header(folders, args.layers, warm_s), variant_table(results), ratio_table(results), check_lines(check)]
    print_report(sections, started)


if __name__ == "__main__":
    main()
