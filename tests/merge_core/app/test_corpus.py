"""The synthetic corpus (``asr-merge make-corpus``) and LibriSpeech preparation.

One smoke corpus is built per module (seconds); a second, through the CLI, checks that
the same seed gives the same bytes. Needs espeak-ng, sox and Debian's fortunes
(``apt-get install espeak-ng sox fortunes``); skipped without them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from merge_core.app.corpus.audio import synthesize
from merge_core.app.cli import main
from merge_core.app.corpus import CorpusError, prepare_librispeech, prepare_synthetic_corpus
from merge_core.app.corpus.domains import DOMAINS
from merge_core.app.corpus.effects import read_wav
from merge_core.app.corpus.plan import plan_corpus
from merge_core.app.corpus.text import FORTUNES_DIR, fortune_sentences
from merge_core.app.corpus.voices import CLEAN_VARIANTS, HARD_VARIANTS, ORIGINAL_ACCENTS, TARGET_ACCENTS
from merge_core.evaluation.manifests import read_nemo_manifest, read_speechbrain_csv

soundfile = pytest.importorskip("soundfile")
pytestmark = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox") and FORTUNES_DIR.is_dir()),
    reason="needs espeak-ng, sox and fortunes (apt-get install espeak-ng sox fortunes)",
)

LIBRI_SPLITS = ["dev-clean", "test-clean", "test-other", "train-clean-100"]
TARGET_SPLITS = ["dev", "test", "train"]
UTTERANCE_FILE = re.compile(r"(\d+)-(\d+)-\d{4}\.flac")
TRANSCRIPT_LINE = re.compile(r"(\d+)-(\d+)-\d{4} [A-Z']+( [A-Z']+)*")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    prepare_synthetic_corpus(out, size="smoke", seed=0, jobs=2, progress=False)
    return out


@pytest.fixture(scope="module")
def utterances(corpus) -> list[dict]:
    return [json.loads(line) for line in (corpus / "utterances.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sentences():
    return fortune_sentences()


def select(utterances: list[dict], domain: str, split: str | None = None) -> list[dict]:
    return [u for u in utterances if u["domain"] == domain and split in (None, u["split"])]


def corpus_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def spectrum_share_above(path: Path, hz: float) -> float:
    """The share of a file's power above ``hz``."""
    audio, rate = soundfile.read(path)
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / rate)
    return float(power[freqs > hz].sum() / power.sum())


def seconds_per_word(u: dict) -> float:
    return u["duration"] / len(u["text"].split())


def test_layout_is_librispeech(corpus):
    assert sorted(p.name for p in (corpus / "LibriSpeech").iterdir()) == LIBRI_SPLITS
    for domain in DOMAINS[1:]:
        assert sorted(p.name for p in (corpus / domain.name).iterdir()) == TARGET_SPLITS
    flacs = sorted(corpus.rglob("*.flac"))
    assert len(flacs) == 150
    for flac in flacs:
        speaker, chapter = UTTERANCE_FILE.fullmatch(flac.name).groups()
        assert (flac.parent.name, flac.parent.parent.name) == (chapter, speaker)
        assert (flac.parent / f"{speaker}-{chapter}.trans.txt").is_file()
    for transcript in corpus.rglob("*.trans.txt"):
        lines = transcript.read_text().splitlines()
        assert lines == sorted(lines)
        for line in lines:
            assert TRANSCRIPT_LINE.fullmatch(line), line
            assert (transcript.parent / f"{line.split()[0]}.flac").is_file()
    assert not (corpus / ".staging").exists()
    assert sorted(p.name for p in corpus.iterdir() if p.is_file()) == [".build.json", "corpus.json", "utterances.jsonl"]


def test_audio_is_16k_mono_flac_with_the_recorded_durations(corpus, utterances):
    for u in utterances:
        info = soundfile.info(corpus / u["path"])
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert info.frames / 16000 == pytest.approx(u["duration"])


def test_corpus_json_counts_every_split(corpus, utterances):
    description = json.loads((corpus / "corpus.json").read_text())
    assert (description["size"], description["seed"], description["utterances"]) == ("smoke", 0, 150)
    for domain, info in description["domains"].items():
        for split, counts in info["splits"].items():
            members = select(utterances, domain, split)
            assert counts["utterances"] == len(members) > 0
            assert counts["hours"] == pytest.approx(sum(u["duration"] for u in members) / 3600, abs=1e-4)


def test_same_seed_gives_the_same_bytes_through_the_cli(corpus, tmp_path, capsys):
    assert main(["make-corpus", str(tmp_path), "--size", "smoke", "--seed", "0", "--jobs", "2", "-q"]) == 0
    assert "150 utterances" in capsys.readouterr().out
    assert corpus_files(tmp_path) == corpus_files(corpus)


def test_another_seed_gives_other_sentences_and_voices(sentences):
    first, second = plan_corpus("smoke", 0, sentences), plan_corpus("smoke", 1, sentences)
    assert [u.text for u in first] != [u.text for u in second]
    assert [u.voice for u in first] != [u.voice for u in second]
    assert plan_corpus("smoke", 0, sentences) == first


@pytest.mark.parametrize("size", ["smoke", "default", "large"])
def test_splits_are_speaker_and_sentence_disjoint(size, sentences):
    planned = plan_corpus(size, 0, sentences)
    training = {u.text for u in planned if u.split.startswith("train")}
    by_split = defaultdict(list)
    for u in planned:
        by_split[u.domain, u.split].append(u)
    for domain in DOMAINS:
        seen_speakers, seen_voices, seen_texts = set(), set(), set()
        for split in domain.splits:
            members = by_split[domain.name, split.name]
            speakers, voices, texts = (
                {u.speaker for u in members},
                {u.voice for u in members},
                {u.text for u in members},
            )
            assert not speakers & seen_speakers and not voices & seen_voices, (domain.name, split.name)
            if domain.text != "phrases":  # JL Corpus repeats its phrases in every split on purpose
                assert not texts & seen_texts, (domain.name, split.name)
                if split.evaluation:
                    assert not texts & training, (domain.name, split.name)
                    assert len(texts) == len(members)  # no test sentence said twice
            seen_speakers |= speakers
            seen_voices |= voices
            seen_texts |= texts
    assert len({u.id for u in planned}) == len(planned)


def accent(u: dict) -> str:
    return u["voice"].split("+")[0]


def variant(u: dict) -> str:
    return u["voice"].split("+")[1]


def test_voices_differ_by_domain_as_designed(utterances):
    libri = select(utterances, "LibriSpeech")
    assert {accent(u) for u in libri} <= set(ORIGINAL_ACCENTS)
    assert {accent(u) for u in select(utterances, "accented")} <= set(TARGET_ACCENTS)
    assert all(variant(u) in CLEAN_VARIANTS for u in libri if u["split"] != "test-other")
    other = [u for u in libri if u["split"] == "test-other"]
    assert all(variant(u) in HARD_VARIANTS and u["effects"][0]["effect"] == "reverb" for u in other)


def test_telephone_domain_has_no_energy_above_4khz(corpus, utterances):
    phone = [spectrum_share_above(corpus / u["path"], 4000) for u in select(utterances, "telephone")]
    clean = [spectrum_share_above(corpus / u["path"], 4000) for u in select(utterances, "LibriSpeech", "test-clean")]
    assert max(phone) < 1e-5 and min(clean) > 1e-4
    assert {u["effects"][0]["codec"] for u in select(utterances, "telephone")} == {"ulaw", "gsm"}


def test_noisy_domain_has_the_recorded_snr(corpus, utterances, tmp_path):
    noisy = select(utterances, "noisy", "test") + select(utterances, "noisy", "train")[:4]
    for u in noisy:
        synthesize(u["spoken"], tmp_path / "clean.wav", voice=u["voice"], speed=u["speed"], pitch=u["pitch"])
        clean = read_wav(tmp_path / "clean.wav")
        mixed, _ = soundfile.read(corpus / u["path"])
        scale = np.dot(mixed, clean) / np.dot(clean, clean)  # the mix is scaled down if it would clip
        snr = 10 * np.log10(np.sum((scale * clean) ** 2) / np.sum((mixed - scale * clean) ** 2))
        assert snr == pytest.approx(u["effects"][0]["snr_db"], abs=0.5), u["id"]


def test_emotional_domain_changes_the_speaking_rate(utterances):
    rate = defaultdict(list)
    for u in select(utterances, "emotional"):
        rate[u["style"]].append(seconds_per_word(u))
    mean = {style: np.mean(values) for style, values in rate.items()}
    assert set(mean) == {"neutral", "happy", "sad", "angry", "excited"}
    assert mean["sad"] > 1.2 * mean["neutral"]
    assert mean["excited"] < 0.85 * mean["neutral"]
    assert len({u["text"] for u in select(utterances, "emotional")}) < len(select(utterances, "emotional"))


def test_finance_domain_has_its_own_vocabulary(utterances):
    finance_words = {w for u in select(utterances, "finance") for w in u["text"].split()}
    libri_words = {w for u in select(utterances, "LibriSpeech") for w in u["text"].split()}
    assert len(finance_words - libri_words) > 0.5 * len(finance_words)
    assert {"PERCENT", "DOLLARS"} & finance_words
    assert not any(c.isdigit() for u in select(utterances, "finance") for c in u["text"])


def test_an_interrupted_build_resumes_to_the_same_corpus_and_no_other(corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    next(copy.rglob("*.flac")).unlink()
    (copy / "corpus.json").unlink()
    with pytest.raises(CorpusError, match="holds the size='smoke' seed=0 corpus; choose another folder"):
        prepare_synthetic_corpus(copy, size="smoke", seed=1, progress=False)
    prepare_synthetic_corpus(copy, size="smoke", seed=0, jobs=1, progress=False)
    assert corpus_files(copy) == corpus_files(corpus)


def test_prepared_manifests_read_back_with_both_readers(corpus, utterances, tmp_path, capsys):
    assert main(["prepare-librispeech", str(corpus / "LibriSpeech"), str(tmp_path)]) == 0
    assert "train-clean-100" in capsys.readouterr().out
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {f"{s.replace('-', '_')}.json" for s in LIBRI_SPLITS} | {f"{s}.csv" for s in LIBRI_SPLITS}
    expected = {str((corpus / u["path"]).absolute()): u for u in select(utterances, "LibriSpeech", "test-other")}
    nemo = read_nemo_manifest(tmp_path / "test_other.json")
    assert {str(u.audio): (u.text, u.duration) for u in nemo} == {
        path: (u["text"].lower(), pytest.approx(u["duration"])) for path, u in expected.items()
    }
    speechbrain = read_speechbrain_csv(tmp_path / "test-other.csv")
    assert {str(u.audio): u.text for u in speechbrain} == {path: u["text"] for path, u in expected.items()}
    header, first = (tmp_path / "test-other.csv").read_text().splitlines()[:2]
    assert header == "ID,duration,wav,spk_id,wrd"
    assert first.split(",")[3] == "-".join(first.split(",")[0].split("-")[:2])


def test_a_target_domain_prepares_like_librispeech(corpus, tmp_path):
    written = prepare_librispeech(corpus / "noisy", tmp_path, toolkit="nemo")
    assert {split: paths["nemo"].name for split, paths in written.items()} == {s: f"{s}.json" for s in TARGET_SPLITS}
    assert len(read_nemo_manifest(tmp_path / "train.json")) == 12


def test_real_librispeech_extras_are_ignored_and_missing_audio_is_named(corpus, tmp_path):
    root = tmp_path / "LibriSpeech"
    shutil.copytree(corpus / "LibriSpeech" / "dev-clean", root / "dev-clean")
    (root / "SPEAKERS.TXT").write_text(";ID  |SEX| SUBSET |MINUTES| NAME\n")
    transcript = next(root.rglob("*.trans.txt"))
    (transcript.parent / ".stray.flac.tmp").write_bytes(b"")
    written = prepare_librispeech(root, tmp_path / "out", toolkit="speechbrain")
    assert len(read_speechbrain_csv(written["dev-clean"]["speechbrain"])) == 6
    missing = transcript.read_text().splitlines()[1].split()[0]
    (transcript.parent / f"{missing}.flac").unlink()
    with pytest.raises(CorpusError, match=rf"{re.escape(str(transcript))}:2: audio .*{missing}\.flac"):
        prepare_librispeech(root, tmp_path / "out")
    with pytest.raises(CorpusError, match="toolkit must be"):
        prepare_librispeech(root, tmp_path / "out", toolkit="kaldi")
    with pytest.raises(CorpusError, match="no split folder"):
        prepare_librispeech(tmp_path, tmp_path / "out")
