"""Scoring, forgetting reports and the evaluation cache, on hand-computed numbers."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys

import jiwer
import numpy as np
import pytest
from merge_core import MergeError
from merge_core.evaluation import (
    BootstrapSettings,
    EvalCache,
    EvaluationError,
    ModelSource,
    PairedBootstrap,
    TextNormalization,
    WerStats,
    average_wer,
    build_report,
    forgetting_pct,
    manifest_digest,
    pooled_stats,
    render_markdown,
    results_from_report,
    score,
    score_utterances,
    write_report,
)
from merge_core.evaluation.runner import EvalConfig, safe_names, transcript_paths

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


def test_per_utterance_counts_keep_order_mark_skipped_and_sum_to_jiwers_totals():
    refs = ["the cat sat on the mat", "", "a b c d", "hello world", "x"]
    hyps = ["the cat sat on mat", "noise", "a x c d e", "", "x y z"]
    with pytest.warns(UserWarning, match=r"skipped 1 utterance\(s\).*index 1"):
        per = score_utterances(refs, hyps, RAW)
    assert [(u.substitutions, u.deletions, u.insertions, u.words) for u in per] == [
        (0, 1, 0, 6), (0, 0, 0, 0), (1, 0, 1, 4), (0, 2, 0, 2), (0, 0, 2, 1)
    ]
    assert per[1] == WerStats(skipped_empty=1) and all(u.utterances == 1 for i, u in enumerate(per) if i != 1)
    kept = [i for i in range(len(refs)) if refs[i]]
    whole = jiwer.process_words([refs[i] for i in kept], [hyps[i] for i in kept])
    pooled = WerStats.total(per)
    assert (pooled.substitutions, pooled.deletions, pooled.insertions) == (
        whole.substitutions, whole.deletions, whole.insertions)
    with pytest.warns(UserWarning):
        assert pooled == score(refs, hyps, RAW) == sum(per, WerStats())


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
    assert set(loaded) == {"reference_model", "forgetting_sets", "sets", "bootstrap", "normalization", "note",
                           "utterance_words", "models"}
    assert loaded["reference_model"] == "generalist"
    assert loaded["forgetting_sets"] == ["test_clean", "test_other"]
    assert loaded["bootstrap"] == {"resamples": 1000, "confidence": 0.95, "seed": 0}
    assert loaded["normalization"] is None and loaded["note"] is None and loaded["utterance_words"] is None
    row = loaded["models"][1]
    assert set(row) == {"name", "checkpoint", "weights_digest", "wer", "wer_ci", "stats", "average_wer",
                        "average_wer_ci", "pooled_reference_wer", "forgetting_pct", "forgetting_ci", "delta",
                        "transcripts", "per_utterance"}
    # pooled counts: every difference to the reference, no interval (null, not absent)
    assert row["delta"]["wer"] == pytest.approx({"noise": -20.0, "test_clean": 8.0, "test_other": 0.0})
    assert row["delta"]["average_wer"] == pytest.approx(-4.0)
    assert row["wer_ci"] == row["delta"]["wer_ci"] == {"noise": None, "test_clean": None, "test_other": None}
    assert row["average_wer_ci"] is row["forgetting_ci"] is row["delta"]["average_wer_ci"] is None
    assert row["checkpoint"] is row["weights_digest"] is row["transcripts"] is row["per_utterance"] is None
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


# --- intervals ---------------------------------------------------------------------------

_RNG = np.random.default_rng(7)
# reference words per utterance (0: skipped as empty) and three models' errors on each
WORDS = {"noise": [5, 8, 0, 12, 6, 9, 4, 7], "test_clean": [10, 3, 7, 6, 11], "test_other": [9, 4, 6, 8, 2, 7]}
ERRORS = {
    "generalist": {s: [int(_RNG.integers(0, w + 1)) if w else 0 for w in ws] for s, ws in WORDS.items()},
    "merged": {s: [int(_RNG.integers(0, w + 3)) if w else 0 for w in ws] for s, ws in WORDS.items()},
}
ERRORS["copy"] = ERRORS["generalist"]  # a row identical to the reference


def utterances(errors: list[int], words: list[int]) -> list[WerStats]:
    """One WerStats per utterance: errors as substitutions up to the words, the rest insertions."""
    return [
        WerStats(substitutions=min(e, w), insertions=e - min(e, w), words=w, utterances=1) if w
        else WerStats(skipped_empty=1)
        for e, w in zip(errors, words)
    ]


PER_UTTERANCE = {m: {s: utterances(e, WORDS[s]) for s, e in per.items()} for m, per in ERRORS.items()}
SETTINGS = BootstrapSettings(resamples=300, confidence=0.9, seed=5)


@pytest.fixture
def paired():
    return build_report(PER_UTTERANCE, "generalist", bootstrap=SETTINGS, normalization=RAW, note="tiny: ignore")


def direct_intervals(model: str, reference: str, sets: list[str], forgetting: list[str]) -> dict:
    """The bootstrap written as loops: the same seeded index matrices (one per set, in column
    order), each resample's WER summed utterance by utterance."""
    rng = np.random.default_rng(SETTINGS.seed)
    scored = {s: [i for i, w in enumerate(WORDS[s]) if w] for s in sets}
    draws = {s: rng.integers(0, len(scored[s]), size=(SETTINGS.resamples, len(scored[s]))) for s in sets}
    values = {k: [] for k in ("wer", "delta", "average", "delta_average", "forgetting")}
    for b in range(SETTINGS.resamples):
        totals = {}
        for name in (model, reference):
            for s in sets:
                picked = [scored[s][j] for j in draws[s][b]]
                totals[name, s] = (sum(ERRORS[name][s][i] for i in picked), sum(WORDS[s][i] for i in picked))
        wer = {(n, s): 100 * e / w for (n, s), (e, w) in totals.items()}
        values["wer"].append([wer[model, s] for s in sets])
        values["delta"].append([wer[model, s] - wer[reference, s] for s in sets])
        values["average"].append(sum(wer[model, s] for s in sets) / len(sets))
        values["delta_average"].append(values["average"][-1] - sum(wer[reference, s] for s in sets) / len(sets))
        pooled = {n: 100 * sum(totals[n, s][0] for s in forgetting) / sum(totals[n, s][1] for s in forgetting)
                  for n in (model, reference)}
        values["forgetting"].append(100 * (pooled[model] - pooled[reference]) / pooled[reference])
    q = [(1 - SETTINGS.confidence) / 2, (1 + SETTINGS.confidence) / 2]
    return {k: np.quantile(np.array(v), q, axis=0).T.tolist() for k, v in values.items()}


def test_intervals_equal_a_direct_resampling_loop(paired):
    sets, forgetting = paired["sets"], paired["forgetting_sets"]
    assert sets == ["noise", "test_clean", "test_other"]
    for row in paired["models"]:
        want = direct_intervals(row["name"], "generalist", sets, forgetting)
        close = functools.partial(np.testing.assert_allclose, rtol=1e-12, atol=1e-12)
        close([row["wer_ci"][s] for s in sets], want["wer"])
        close([row["delta"]["wer_ci"][s] for s in sets], want["delta"])
        close(row["average_wer_ci"], want["average"])
        close(row["delta"]["average_wer_ci"], want["delta_average"])
        close(row["forgetting_ci"], want["forgetting"])
        for s in sets:  # the point estimate lies inside its interval
            assert row["wer_ci"][s][0] <= row["wer"][s] <= row["wer_ci"][s][1]
    merged = paired["models"][1]
    assert merged["delta"]["wer_ci"]["noise"][1] > merged["delta"]["wer_ci"]["noise"][0]  # not degenerate


def test_a_model_paired_with_itself_has_exactly_zero_intervals(paired):
    rows = {m["name"]: m for m in paired["models"]}
    for name in ("generalist", "copy"):  # the reference itself, and a row identical to it
        row = rows[name]
        assert row["delta"]["wer"] == dict.fromkeys(paired["sets"], 0.0)
        assert row["delta"]["wer_ci"] == dict.fromkeys(paired["sets"], [0.0, 0.0])
        assert row["delta"]["average_wer_ci"] == [0.0, 0.0] and row["forgetting_ci"] == [0.0, 0.0]
        assert row["wer_ci"] == rows["generalist"]["wer_ci"]
    boot = PairedBootstrap.from_report(paired)
    assert np.array_equal(boot.wer("merged", "noise") - boot.wer("merged", "noise"), np.zeros(SETTINGS.resamples))
    assert boot.intervals({"self": boot.mean_wer("merged", paired["sets"]) - boot.mean_wer("merged", paired["sets"])}) \
        == {"self": [0.0, 0.0]}


def test_report_with_intervals_round_trips_through_json(paired, tmp_path):
    loaded = json.loads(write_report(paired, tmp_path)["json"].read_text())
    assert loaded == paired
    assert loaded["utterance_words"] == WORDS
    assert loaded["normalization"] == {"lowercase": False, "strip_punctuation": False, "english": False}
    merged = loaded["models"][1]
    assert merged["per_utterance"]["noise"]["substitutions"][:3] == [u.substitutions for u in PER_UTTERANCE["merged"]["noise"][:3]]
    assert merged["stats"]["noise"]["skipped_empty"] == 1 and merged["stats"]["noise"]["utterances"] == 7
    assert results_from_report(loaded) == PER_UTTERANCE
    again = build_report(results_from_report(loaded), "generalist", bootstrap=loaded["bootstrap"],
                         normalization=loaded["normalization"], note=loaded["note"])
    assert again == loaded
    boot = PairedBootstrap.from_report(loaded)  # the report's own resamples
    assert boot.intervals({"x": boot.wer("merged", "test_other")})["x"] == merged["wer_ci"]["test_other"]
    text = (tmp_path / "report.json").read_text()
    assert '"noise": [5, 8, 0, 12, 6, 9, 4, 7]' in text  # a column of counts stays on one line


def test_sources_are_recorded_per_row():
    sources = {"merged": ModelSource("merged.nemo", "ab" * 32, {"noise": "transcripts/merged/noise.json"})}
    report = build_report(RESULTS, "generalist", sources=sources)
    rows = {m["name"]: m for m in report["models"]}
    assert (rows["merged"]["checkpoint"], rows["merged"]["weights_digest"]) == ("merged.nemo", "ab" * 32)
    assert rows["merged"]["transcripts"] == {"noise": "transcripts/merged/noise.json"}
    assert rows["generalist"]["checkpoint"] is None


def test_markdown_shows_intervals_differences_note_and_normalisation(paired):
    md = render_markdown(paired)
    merged = paired["models"][1]
    half = (merged["wer_ci"]["noise"][1] - merged["wer_ci"]["noise"][0]) / 2
    assert f"| merged | {merged['wer']['noise']:.2f} ±{half:.1f} |" in md
    assert "| generalist | " in md and "+0.0 ±0.0 |" in md  # the reference's own Forgetting %
    assert "## Difference to `generalist`" in md and "| copy | +0.00 ±0.0 | +0.00 ±0.0 | +0.00 ±0.0 | +0.00 ±0.0 |" in md
    assert "**tiny: ignore**" in md
    assert "90% bootstrap interval (300 resamples of each set's utterances, seed 5" in md
    assert "Text normalisation of references and hypotheses: lowercase: false, strip_punctuation: false, english: false." in md


def test_per_utterance_counts_must_pair_up():
    other = {**PER_UTTERANCE, "merged": {**PER_UTTERANCE["merged"], "noise": utterances([1] * 8, [5] * 8)}}
    with pytest.raises(EvaluationError, match="model 'merged', set 'noise': its utterances' reference words differ"):
        build_report(other, "generalist")
    two = {**PER_UTTERANCE, "merged": {**PER_UTTERANCE["merged"], "noise": [WerStats(words=4, utterances=2)]}}
    with pytest.raises(EvaluationError, match="set 'noise', utterance 0: not the counts of one utterance"):
        build_report(two, "generalist")
    # one model given pooled counts: the report has no intervals, and says so with nulls
    mixed = {**PER_UTTERANCE, "merged": {s: WerStats.total(u) for s, u in PER_UTTERANCE["merged"].items()}}
    report = build_report(mixed, "generalist")
    assert report["utterance_words"] is None and all(m["forgetting_ci"] is None for m in report["models"])


def test_bootstrap_and_note_config_keys():
    base = {"models": ["a.nemo"], "manifests": {"test_clean": "c.json", "test_other": "o.json"}}
    config = EvalConfig.from_mapping({**base, "bootstrap": {"resamples": 200, "seed": 3}, "note": "draft"})
    assert config.bootstrap == BootstrapSettings(resamples=200, confidence=0.95, seed=3) and config.note == "draft"
    with pytest.raises(EvaluationError, match="unknown bootstrap key\\(s\\) 'samples'"):
        EvalConfig.from_mapping({**base, "bootstrap": {"samples": 10}})
    with pytest.raises(EvaluationError, match="'confidence' must be a number between 0 and 1, got 95"):
        EvalConfig.from_mapping({**base, "bootstrap": {"confidence": 95}})
    with pytest.raises(EvaluationError, match="evaluation key 'note' must be a string"):
        EvalConfig.from_mapping({**base, "note": 3})


def test_transcript_paths_are_distinct_folder_names():
    paths = transcript_paths(["AoDE x4", "AoDE_x4", "sequential a>b"], ["test_clean"], ".json")
    assert paths["AoDE x4"] == {"test_clean": "transcripts/AoDE_x4/test_clean.json"}
    assert paths["AoDE_x4"]["test_clean"] == "transcripts/AoDE_x4-2/test_clean.json"
    assert paths["sequential a>b"]["test_clean"] == "transcripts/sequential_a_b/test_clean.json"
    assert safe_names(["../x", "a/b"]) == {"../x": "_x", "a/b": "a_b"}


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


def synthetic_report(rows: int, sets: int, intervals: bool = True) -> dict:
    """``rows`` models over ``sets`` sets, the last two the forgetting sets. With ``intervals``,
    every bootstrap field, and forgetting undefined (null) for every third model; the
    difference to the reference excludes 0 where it is at least 5 points."""
    names = [f"domain_{j}" for j in range(sets - 2)] + ["test_clean", "test_other"]
    reference = {s: 20.0 + j for j, s in enumerate(names)}
    models = []
    for i in range(rows):
        wer = {s: reference[s] + (7 * i + 3 * j) % 23 - 8 if i else reference[s] for j, s in enumerate(names)}
        average = sum(wer.values()) / sets
        forgetting = 0.0 if i == 0 else (None if intervals and i % 3 == 2 else 1.5 * i - 9)
        model = {"name": "generalist" if i == 0 else f"merge {i} " + "with a long name " * (i % 4),
                 "wer": wer, "average_wer": average, "pooled_reference_wer": 20.0, "forgetting_pct": forgetting}
        if intervals:
            delta = {s: wer[s] - reference[s] for s in names}
            model |= {
                "wer_ci": {s: [w - 2.0, w + 2.0] for s, w in wer.items()},
                "average_wer_ci": [average - 1.0, average + 1.0],
                "forgetting_ci": None if forgetting is None else [forgetting - 2.0, forgetting + 3.0],
                "delta": {"wer": delta, "wer_ci": {s: [d - 4.9, d + 4.9] for s, d in delta.items()},
                          "average_wer": 0.0, "average_wer_ci": None},
            }
        models.append(model)
    return {"reference_model": "generalist", "forgetting_sets": names[-2:], "sets": names,
            "bootstrap": {"resamples": 1000, "confidence": 0.95, "seed": 0} if intervals else None,
            "note": "smoke run: numbers only check the pipeline" if intervals else None, "models": models}


def interval_count(ax) -> int:
    from matplotlib.container import ErrorbarContainer

    return sum(len(c.lines[2][0].get_segments()) for c in ax.containers if isinstance(c, ErrorbarContainer))


@pytest.mark.parametrize("rows, sets, intervals", [(1, 2, True), (30, 8, True), (4, 3, False)])
def test_report_figure_has_its_three_panels(rows, sets, intervals):
    from merge_core.evaluation.plot import _report_figure

    report = synthetic_report(rows, sets, intervals)
    fig = _report_figure(report)
    heat, bars, scatter = fig.axes
    assert len(fig.axes) == 3
    models, columns = report["models"], [*report["sets"], "Average"]
    # every cell holds its WER, coloured by the difference to the reference's
    wers = [[*(m["wer"][s] for s in report["sets"]), m["average_wer"]] for m in models]
    assert [t.get_text() for t in heat.texts] == [f"{w:.1f}" for row in wers for w in row]
    colours = heat.images[0].get_array()
    assert colours.shape == (rows, len(columns))
    assert colours.ravel().tolist() == pytest.approx([w - ref for row in wers for w, ref in zip(row, wers[0])])
    bold = [t.get_text() for t in heat.texts if t.get_fontweight() == "bold"]
    assert bold == [f"{w:.1f}" for row in wers for w, ref in zip(row[:-1], wers[0]) if intervals and abs(w - ref) >= 5]
    assert [t.get_text() for t in heat.get_yticklabels()] == [f"{i}  {m['name']}" for i, m in enumerate(models, 1)]
    # forgetting: an interval per defined value, the reference labelled, n/a where undefined
    defined = [m for m in models if m["forgetting_pct"] is not None]
    assert interval_count(bars) == interval_count(scatter) == (len(defined) if intervals else 0)
    labels = [t.get_text() for t in bars.texts]
    assert labels[0] == "reference" and labels.count("n/a") == rows - len(defined)
    # the scatter numbers its points as the heat map's rows, and no two numbers overlap
    numbers = [t for t in scatter.texts if t.get_text().isdigit()]
    assert [t.get_text() for t in numbers] == [str(i) for i, m in enumerate(models, 1) if m["forgetting_pct"] is not None]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in numbers]
    assert not [(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1 :] if a.overlaps(b)]
    assert (fig._suptitle is not None) == intervals


def test_report_png_grows_with_its_rows(tmp_path):
    from matplotlib.image import imread

    from merge_core.evaluation.plot import plot_report

    sizes = []
    for rows, sets in ((1, 2), (30, 8)):
        png = tmp_path / f"{rows}.png"
        plot_report(synthetic_report(rows, sets), png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        sizes.append(imread(png).shape[:2])
    (small_h, small_w), (big_h, big_w) = sizes
    assert big_h > 2.5 * small_h and big_w > small_w


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
