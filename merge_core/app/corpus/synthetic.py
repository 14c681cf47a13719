"""``prepare_synthetic_corpus``: render a planned corpus to disk in LibriSpeech's layout.

Output, under ``out_dir``::

    LibriSpeech/{train-clean-100,dev-clean,test-clean,test-other}/<spk>/<chapter>/
        <spk>-<chapter>-<utt>.flac             16 kHz mono 16-bit FLAC
        <spk>-<chapter>.trans.txt              "<utt id> <TRANSCRIPT>" lines
    <domain>/{train,dev,test}/...              the same layout, per target domain
    utterances.jsonl                           every utterance: text, voice, style, effects, duration
    corpus.json                                domains, splits, counts, hours, seed and size

Each audio file is rendered in a hidden scratch folder (a temporary of
:mod:`merge_core.atomic`, swept by the next build if the process dies) and renamed into
place, so a file that exists is whole: an interrupted build resumes where it stopped and
a finished one is not redone. Transcripts, ``utterances.jsonl`` and ``corpus.json`` are
written (atomically) once all audio exists, ``corpus.json`` last: its presence marks a
complete corpus.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from merge_core.app.corpus.audio import synthesize
from merge_core.atomic import discard, publish, sweep_stale, temp_path
from merge_core.app.corpus.domains import DOMAINS
from merge_core.app.corpus.effects import EFFECTS, encode_flac
from merge_core.errors import CorpusError
from merge_core.app.corpus.files import flac_duration
from merge_core.atomic import write_text_atomically
from merge_core.app.corpus.plan import PlannedUtterance, plan_corpus, utterance_seed
from merge_core.app.corpus.text import FORTUNES_DIR, fortune_sentences

FORMAT_VERSION = 1
SCRATCH = "render"  # utterances are rendered in hidden temporaries of out_dir/render
BUILD_MARK = ".build.json"


def render(utterance: PlannedUtterance, out_dir: Path, seed: int) -> None:
    """Speak ``utterance``, apply its effects and move the FLAC into place (skipped if there)."""
    dest = out_dir / utterance.path
    if dest.is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = temp_path(out_dir / SCRATCH)
    scratch.mkdir()
    try:
        wav = scratch / "0.wav"
        synthesize(utterance.spoken, wav, voice=utterance.voice, speed=utterance.speed, pitch=utterance.pitch)
        for step, effect in enumerate(utterance.effects, start=1):
            applied = scratch / f"{step}.wav"
            EFFECTS[effect["effect"]](wav, applied, effect, utterance_seed(seed, utterance.id))
            wav = applied
        flac = scratch / "out.flac"
        encode_flac(wav, flac)
        publish(flac, dest)
    finally:
        discard(scratch)


def _render_job(job: tuple[PlannedUtterance, Path, int]) -> None:
    """``render`` for a worker process (one picklable argument)."""
    render(*job)


def _process_context() -> multiprocessing.context.BaseContext:
    """Fork where the platform has it: a spawned worker would re-import torch (through
    ``merge_core``'s package imports) before rendering anything, seconds per worker."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def render_all(planned: Sequence[PlannedUtterance], out_dir: Path, seed: int, jobs: int, progress: bool) -> None:
    """Render the utterances whose audio is missing, in ``jobs`` processes."""
    # scratch folders of a killed build, swept here too: with nothing left to render
    # (killed between publishing a FLAC and removing its scratch) no render sweeps them
    sweep_stale(out_dir / SCRATCH)
    todo = [(u, out_dir, seed) for u in planned if not (out_dir / u.path).is_file()]
    bar = tqdm(total=len(todo), unit="utt", desc="synthesising", disable=not progress)
    if jobs <= 1:
        for job in todo:
            _render_job(job)
            bar.update()
    else:
        with _process_context().Pool(jobs) as pool:
            for _ in pool.imap_unordered(_render_job, todo, chunksize=4):
                bar.update()
    bar.close()


def write_transcripts(planned: Sequence[PlannedUtterance], out_dir: Path) -> None:
    """One ``<speaker>-<chapter>.trans.txt`` per chapter, lines sorted by utterance ID."""
    chapters: dict[Path, list[str]] = defaultdict(list)
    for u in planned:
        folder = (out_dir / u.path).parent
        chapters[folder / f"{u.speaker}-{u.chapter}.trans.txt"].append(f"{u.id} {u.text}\n")
    for path, lines in chapters.items():
        write_text_atomically(path, "".join(sorted(lines)))


def tool_versions() -> dict[str, str]:
    """espeak-ng's and sox's version numbers: the same seed gives the same bytes only with the same tools."""
    versions = {}
    for tool in ("espeak-ng", "sox"):
        done = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        found = re.search(r"\d+(?:\.\d+)+", done.stdout + done.stderr)
        versions[tool] = found[0] if found else "unknown"
    return versions


def describe(planned: Sequence[PlannedUtterance], durations: dict[str, float], size: str, seed: int) -> dict[str, Any]:
    """``corpus.json``: per domain what it imitates and, per split, counts and hours."""
    domains: dict[str, Any] = {}
    for domain in DOMAINS:
        splits = {}
        for split in domain.splits:
            members = [u for u in planned if u.domain == domain.name and u.split == split.name]
            splits[split.name] = {
                "path": f"{domain.name}/{split.name}",
                "utterances": len(members),
                "speakers": len({u.speaker for u in members}),
                "distinct_sentences": len({u.text for u in members}),
                "hours": round(sum(durations[u.id] for u in members) / 3600, 4),
            }
        domains[domain.name] = {
            "imitates": domain.imitates,
            "shift": domain.shift,
            "text": domain.text,
            "splits": splits,
        }
    return {
        "format": FORMAT_VERSION,
        "seed": seed,
        "size": size,
        "sample_rate": 16000,
        "tools": tool_versions(),
        "utterances": len(planned),
        "hours": round(sum(durations.values()) / 3600, 4),
        "domains": domains,
    }


def claim_folder(out_dir: Path, size: str, seed: int) -> None:
    """Mark ``out_dir`` as holding the (``size``, ``seed``) corpus, refusing one that holds another.

    Marked before any audio is made: utterance IDs do not depend on the seed, so resuming
    a half-built corpus with another seed would otherwise keep the first seed's audio.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise CorpusError(f"{out_dir}: exists and is not a folder; give the corpus a folder")
    path = out_dir / BUILD_MARK
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CorpusError(f"{path}: unreadable ({e}); remove the folder or choose another") from None
        if (earlier.get("size"), earlier.get("seed")) != (size, seed):
            raise CorpusError(
                f"{out_dir}: holds the size={earlier.get('size')!r} seed={earlier.get('seed')!r} corpus; "
                f"choose another folder for size={size!r} seed={seed!r}"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps({"size": size, "seed": seed}) + "\n")


def check_tools() -> None:
    """espeak-ng and sox must be installed; say how to install them."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise CorpusError(f"{' and '.join(missing)} not installed (on Debian/Ubuntu: apt-get install espeak-ng sox)")


def write_json_lines(path: Path, records: Sequence[dict]) -> None:
    """Write ``records`` as JSON lines, atomically."""
    write_text_atomically(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def prepare_synthetic_corpus(
    out_dir: str | Path,
    size: str = "default",
    seed: int = 0,
    jobs: int = 2,
    progress: bool = True,
    fortunes_dir: str | Path = FORTUNES_DIR,
) -> dict[str, Any]:
    """Build the synthetic corpus in ``out_dir`` (layout in the module docstring).

    Parameters
    ----------
    out_dir : str or Path
        Where the corpus goes; created if missing. A folder holds one (size, seed) corpus.
    size : str
        ``smoke`` (seconds, for CI), ``default`` (for 2 CPU cores) or ``large`` (for a GPU);
        see :data:`merge_core.app.corpus.domains.SIZES`.
    seed : int
        Sentences, voices and conditions are drawn from it; the same seed, espeak-ng and
        sox give the same bytes.
    jobs : int
        Processes rendering audio.
    progress : bool
        Show a progress bar.
    fortunes_dir : str or Path
        Debian's fortunes folder, the source of the prose.

    Returns
    -------
    dict
        What ``corpus.json`` holds, plus ``build_seconds``. Rerunning finishes an
        interrupted build and leaves a finished one as it is.
    """
    out_dir = Path(out_dir)
    check_tools()
    claim_folder(out_dir, size, seed)
    started = time.monotonic()
    planned = plan_corpus(size, seed, fortune_sentences(Path(fortunes_dir)))
    render_all(planned, out_dir, seed, jobs, progress)
    durations = {u.id: flac_duration(out_dir / u.path) for u in planned}
    write_transcripts(planned, out_dir)
    write_json_lines(out_dir / "utterances.jsonl", [{**u.record(), "duration": durations[u.id]} for u in planned])
    description = describe(planned, durations, size, seed)
    write_text_atomically(out_dir / "corpus.json", json.dumps(description, indent=2) + "\n")
    description["build_seconds"] = round(time.monotonic() - started, 1)
    return description
