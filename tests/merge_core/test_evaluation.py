"""Scoring, forgetting reports and the evaluation cache, on hand-computed numbers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from merge_core import MergeError
from merge_core.evaluation import (
    EvalCache,
    EvaluationError,
    TextNormalization,
    WerStats,
    average_wer,
    build_report,
    forgetting_pct,
    manifest_digest,
    pooled_stats,
    results_from_report,
    score,
    write_report,
)

RAW = TextNormalization(lowercase=False, strip_punctuation=False)


def stats(errors: int, words: int, utterances: int = 1) -> WerStats:
    return WerStats(substitutions=errors, words=words, utterances=utterances)


# --- scoring ---------------------------------------------------------------------------


def test_substitution_and_deletion_are_counted():
    s = score(["a b c d"], ["a x c"], RAW)
    assert (s.substitutions, s.deletions, s.insertions, s.words, s.hits) == (1, 1, 0, 4, 2)
    assert s.errors == 2 and s.wer == 0.5 and s.utterances == 1


def test_insertion_is_counted():
    s = score(["the cat"], ["the big cat"], RAW)
    assert (s.substitutions, s.deletions, s.insertions, s.words) == (0, 0, 1, 2)
    assert s.wer == 0.5


def test_utterances_pool_errors_over_words():
    # 1 error in 1 word and 0 errors in 9 words: pooled 1/10, not mean(1.0, 0.0) = 0.5.
    nine = "one two three four five six seven eight nine"
    s = score(["yes", nine], ["no", nine], RAW)
    assert (s.errors, s.words, s.utterances) == (1, 10, 2)
    assert s.wer == pytest.approx(0.1)


def test_empty_hypothesis_is_all_deletions():
    s = score(["a b c"], [""], RAW)
    assert (s.deletions, s.words, s.wer) == (3, 3, 1.0)


def test_sets_pool_by_summing_counts_not_averaging_rates():
    a, b = stats(1, 10), stats(9, 30)  # 10% and 30%
    pooled = a + b
    assert (pooled.errors, pooled.words, pooled.utterances) == (10, 40, 2)
    assert pooled.wer == pytest.approx(0.25)  # the mean of the rates would be 0.2
    assert sum([a, b]) == pooled
    assert pooled_stats({"a": a, "b": b, "c": stats(40, 40)}, ["a", "b"]) == pooled


def test_empty_reference_is_skipped_counted_and_warned():
    with pytest.warns(UserWarning, match=r"dev: skipped 2 utterance\(s\).*index 1, 3"):
        s = score(["a b", "", "c", " ?! "], ["a b", "lots of inserted words", "c", "more"], name="dev")
    # The skipped hypotheses' words are not charged as insertions.
    assert (s.errors, s.words, s.utterances, s.skipped_empty) == (0, 3, 2, 2)


def test_all_references_empty_gives_no_words_and_nan_wer():
    with pytest.warns(UserWarning):
        s = score(["", "..."], ["x", "y"])
    assert (s.words, s.utterances, s.skipped_empty) == (0, 0, 2)
    assert s.wer != s.wer  # NaN


def test_mismatched_lengths_are_an_error_naming_the_set():
    with pytest.raises(EvaluationError, match="test_other: 2 references but 1 hypotheses"):
        score(["a", "b"], ["a"], name="test_other")


def test_non_string_transcript_is_an_error():
    with pytest.raises(EvaluationError, match="hypothesis 1 is NoneType"):
        score(["a", "b"], ["a", None])


def test_werstats_rejects_impossible_counts():
    with pytest.raises(EvaluationError, match="exceed the reference word count"):
        WerStats(substitutions=3, deletions=1, words=3)
    with pytest.raises(EvaluationError, match="insertions"):
        WerStats(insertions=-1)


# --- normalisation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello,  World!", "hello world"),
        ("Don't STOP.", "don't stop"),
        ("don\u2019t", "don't"),  # typographic apostrophe is the same word
        ("'Quoted' students' work", "quoted students work"),
        ("well-known", "well known"),
        ("snake_case\ttab\nnewline", "snake case tab newline"),
    ],
)
def test_default_normalization(text, expected):
    assert TextNormalization()(text) == expected


def test_punctuation_and_case_are_not_errors_by_default():
    assert score(["Hello, world."], ["hello world"]).errors == 0
    assert score(["Hello, world."], ["hello world"], RAW).errors == 2


def test_switches_keep_case_or_punctuation():
    assert TextNormalization(lowercase=False)("Hello, World!") == "Hello World"
    assert TextNormalization(strip_punctuation=False)("Hello,  World!") == "hello, world!"


def test_whisper_english_normalization():
    english = TextNormalization(english=True)
    assert english("Mr. Smith paid twenty five dollars.") == "mister smith paid $25"
    assert english("The COLOUR of it, isn't it?") == "the color of it is not it"
    assert english("Hmm, I won't go there.") == "i will not go there"
    # Spelled-out and written numbers score as the same word only with it.
    assert score(["twenty five"], ["25"], english).errors == 0
    assert score(["twenty five"], ["25"]).errors == 2


def test_normalization_from_mapping():
    assert TextNormalization.from_mapping({"english": True}) == TextNormalization(english=True)
    assert TextNormalization.from_mapping(None) == TextNormalization()
    assert score(["A"], ["a"], {"lowercase": False}).errors == 1
    with pytest.raises(EvaluationError, match=r"unknown normalization key\(s\) 'lower', 'xx'"):
        TextNormalization.from_mapping({"lower": True, "xx": 1})
    with pytest.raises(EvaluationError, match="'lowercase' must be true or false"):
        TextNormalization.from_mapping({"lowercase": "no"})


def test_english_refuses_to_keep_case():
    with pytest.raises(EvaluationError, match="lowercase: false"):
        TextNormalization(english=True, lowercase=False)


def test_missing_whisper_normalizer_is_a_clear_error(monkeypatch):
    from merge_core.evaluation import text

    text._english_normalizer.cache_clear()
    monkeypatch.setitem(sys.modules, "whisper_normalizer.english", None)  # makes the import fail
    try:
        with pytest.raises(EvaluationError, match="needs the whisper-normalizer package"):
            TextNormalization(english=True)
    finally:
        text._english_normalizer.cache_clear()


def test_evaluation_errors_are_merge_errors():
    assert issubclass(EvaluationError, MergeError)


# --- report -----------------------------------------------------------------------------

# test_other has 3x the words of test_clean, so pooling and averaging disagree:
# generalist pooled (4 + 36) / 400 = 10%, merged (12 + 36) / 400 = 12% -> +20.0%
# (the mean of the two rates would give 8% -> 12%, +50%).
RESULTS = {
    "generalist": {"test_clean": stats(4, 100), "test_other": stats(36, 300), "noise": stats(50, 100)},
    "merged": {"test_clean": stats(12, 100), "test_other": stats(36, 300), "noise": stats(30, 100)},
    "better": {"test_clean": stats(3, 100), "test_other": stats(33, 300), "noise": stats(40, 100)},
}


@pytest.fixture
def report():
    return build_report(RESULTS, "generalist")


def test_forgetting_is_the_relative_increase_of_the_pooled_wer(report):
    rows = {m["name"]: m for m in report["models"]}
    assert rows["generalist"]["pooled_reference_wer"] == pytest.approx(10.0)
    assert rows["merged"]["pooled_reference_wer"] == pytest.approx(12.0)
    assert rows["merged"]["forgetting_pct"] == pytest.approx(20.0)
    assert rows["better"]["forgetting_pct"] == pytest.approx(-10.0)  # 9% vs 10%
    assert rows["generalist"]["forgetting_pct"] == 0.0
    assert forgetting_pct(12.0, 10.0) == pytest.approx(20.0)


def test_average_is_the_mean_of_per_set_wers(report):
    merged = next(m for m in report["models"] if m["name"] == "merged")
    assert merged["wer"] == pytest.approx({"noise": 30.0, "test_clean": 12.0, "test_other": 12.0})
    assert merged["average_wer"] == pytest.approx(18.0)
    assert average_wer({"a": 10.0, "b": 20.0, "c": 60.0}) == pytest.approx(30.0)


def test_columns_put_domains_first_then_forgetting_sets(report):
    assert report["sets"] == ["noise", "test_clean", "test_other"]
    assert [m["name"] for m in report["models"]] == ["generalist", "merged", "better"]
    explicit = build_report(RESULTS, "generalist", sets=["test_other", "test_clean", "noise"])
    assert explicit["sets"] == ["test_other", "test_clean", "noise"]


def test_custom_forgetting_sets():
    rep = build_report(RESULTS, "generalist", forgetting_sets=["noise"])
    merged = next(m for m in rep["models"] if m["name"] == "merged")
    assert merged["forgetting_pct"] == pytest.approx(-40.0)  # 30% vs 50%
    assert rep["sets"] == ["test_clean", "test_other", "noise"]


def test_zero_reference_wer_gives_no_forgetting_number(tmp_path):
    perfect = {
        "ref": {"test_clean": stats(0, 10), "test_other": stats(0, 10)},
        "m": {"test_clean": stats(1, 10), "test_other": stats(0, 10)},
    }
    rep = build_report(perfect, "ref")
    assert [m["forgetting_pct"] for m in rep["models"]] == [None, None]
    paths = write_report(rep, tmp_path)
    assert "| m | 10.00 | 0.00 | 5.00 | n/a |" in paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["models"][1]["forgetting_pct"] is None


def test_missing_set_for_a_model_is_named():
    bad = {**RESULTS, "partial": {"test_clean": stats(1, 100), "test_other": stats(1, 300)}}
    with pytest.raises(EvaluationError, match="model 'partial' has no results for set\\(s\\) 'noise'"):
        build_report(bad, "generalist")


def test_absent_forgetting_set_is_named():
    with pytest.raises(EvaluationError, match="forgetting set 'dev_clean' is absent"):
        build_report(RESULTS, "generalist", forgetting_sets=["test_clean", "dev_clean"])


def test_unknown_reference_model_is_named():
    with pytest.raises(EvaluationError, match="reference model 'base'"):
        build_report(RESULTS, "base")


def test_set_without_words_is_named():
    bad = {"generalist": {**RESULTS["generalist"], "noise": WerStats(skipped_empty=3)}}
    with pytest.raises(EvaluationError, match="model 'generalist', set 'noise': no reference words"):
        build_report(bad, "generalist")


def test_report_json_schema_round_trip(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    assert loaded == report
    assert set(loaded) == {"reference_model", "forgetting_sets", "sets", "models"}
    assert loaded["reference_model"] == "generalist"
    assert loaded["forgetting_sets"] == ["test_clean", "test_other"]
    row = loaded["models"][1]
    assert set(row) == {"name", "wer", "stats", "average_wer", "pooled_reference_wer", "forgetting_pct"}
    assert row["stats"]["test_other"] == {
        "substitutions": 36,
        "deletions": 0,
        "insertions": 0,
        "words": 300,
        "utterances": 1,
        "skipped_empty": 0,
        "wer": pytest.approx(12.0),
    }
    assert results_from_report(loaded) == {m: {s: RESULTS[m][s] for s in report["sets"]} for m in RESULTS}
    # Counts given as dicts (e.g. from a cache) build the same report.
    as_dicts = {m: {s: v.as_dict() for s, v in per.items()} for m, per in RESULTS.items()}
    assert build_report(as_dicts, "generalist") == report


def test_report_markdown_has_table_vii_rows(report, tmp_path):
    md = write_report(report, tmp_path)["md"].read_text()
    assert "| Procedure | noise | test_clean | test_other | Average | % Forgetting |" in md
    assert "| generalist | 50.00 | 4.00 | 12.00 | 22.00 | +0.0 |" in md
    assert "| merged | 30.00 | 12.00 | 12.00 | 18.00 | +20.0 |" in md
    assert "| better | 40.00 | 3.00 | 11.00 | 18.00 | -10.0 |" in md


def test_report_png_is_a_real_image(report, tmp_path):
    from matplotlib.image import imread

    png = write_report(report, tmp_path)["png"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    height, width = imread(png).shape[:2]
    assert width > 800 and height > 400


def test_report_files_are_replaced_whole(report, tmp_path):
    write_report(report, tmp_path)
    rep2 = build_report({k: RESULTS[k] for k in ("generalist", "merged")}, "generalist")
    write_report(rep2, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]
    assert "better" not in (tmp_path / "report.md").read_text()


# --- cache ------------------------------------------------------------------------------

PARTS = ("a" * 64, "b" * 64, {"strategy": "greedy", "beam_size": 1, "toolkit": "nemo 3.0.0"})


def test_cache_miss_then_hit(tmp_path):
    cache = EvalCache(tmp_path)
    assert cache.get(PARTS) is None
    path = cache.put(PARTS, {"hypotheses": ["a b", "c"]})
    assert path.parent == tmp_path and path.suffix == ".json"
    assert cache.get(PARTS) == {"hypotheses": ["a b", "c"]}
    assert EvalCache(tmp_path).get(PARTS) == {"hypotheses": ["a b", "c"]}  # survives a new instance
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


@pytest.mark.parametrize(
    "changed",
    [
        ("c" * 64, PARTS[1], PARTS[2]),
        (PARTS[0], "c" * 64, PARTS[2]),
        (PARTS[0], PARTS[1], {**PARTS[2], "beam_size": 4}),
        (PARTS[0], PARTS[1], {**PARTS[2], "lm": None}),
    ],
    ids=["weights", "manifest", "decoding-value", "decoding-key"],
)
def test_cache_key_depends_on_every_part(tmp_path, changed):
    cache = EvalCache(tmp_path)
    cache.put(PARTS, {"v": 1})
    assert cache.path(changed) != cache.path(PARTS)
    assert cache.get(changed) is None


def test_cache_key_ignores_dict_order(tmp_path):
    cache = EvalCache(tmp_path)
    cache.put(PARTS, {"v": 1})
    reordered = (PARTS[0], PARTS[1], dict(reversed(list(PARTS[2].items()))))
    assert cache.get(reordered) == {"v": 1}


def test_cache_default_folder_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ASR_MERGE_CACHE", str(tmp_path))
    assert EvalCache().folder == tmp_path / "eval"


def test_corrupt_cache_entry_is_a_miss(tmp_path):
    cache = EvalCache(tmp_path)
    cache.path(PARTS).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable eval cache entry"):
        assert cache.get(PARTS) is None
    cache.put(PARTS, {"v": 2})
    assert cache.get(PARTS) == {"v": 2}


def test_cache_refuses_bad_keys_and_values(tmp_path):
    cache = EvalCache(tmp_path)
    with pytest.raises(EvaluationError, match="not plain JSON"):
        cache.put((PARTS[0], PARTS[1], {"path": object()}), {"v": 1})
    with pytest.raises(EvaluationError, match="weights digest, manifest digest, decoding settings"):
        cache.get(("a", "b"))
    with pytest.raises(EvaluationError, match="must be a mapping"):
        cache.put(PARTS, ["not", "a", "dict"])


def test_manifest_digest_is_sha256_of_the_bytes(tmp_path):
    manifest = tmp_path / "test_clean.json"
    manifest.write_text('{"audio_filepath": "a.wav", "duration": 1.0, "text": "hi"}\n')
    first = manifest_digest(manifest)
    assert first == hashlib.sha256(manifest.read_bytes()).hexdigest()
    manifest.write_text('{"audio_filepath": "a.wav", "duration": 1.0, "text": "hello"}\n')
    assert manifest_digest(manifest) != first
    with pytest.raises(EvaluationError, match="nope.json: cannot read manifest"):
        manifest_digest(tmp_path / "nope.json")


# --- toolkit-free ------------------------------------------------------------------------


def test_evaluation_imports_no_toolkit_and_plots_lazily():
    code = (
        "import sys, merge_core.evaluation, merge_core.evaluation.text, merge_core.evaluation.wer,"
        " merge_core.evaluation.report, merge_core.evaluation.cache;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('nemo', 'speechbrain', 'lightning', 'pytorch_lightning', 'matplotlib', 'whisper_normalizer'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
