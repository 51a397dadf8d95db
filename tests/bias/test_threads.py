"""The study's threads, random state, typed run specs and progress-bar weighting (issues #24 and #25)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import pytest
import torch
from helpers import TINY_SCHEDULE

from dml_bias.bias import RunSpec, StudyConfig, run_study
from dml_bias.bias import study as study_module
from dml_bias.bias.data import StudyData
from dml_bias.bias.evaluation import attribution_subset, evaluate_attribution, evaluate_retrieval
from dml_bias.bias.study import ATTRIBUTION_WEIGHT, TRAIN_WEIGHT, RunWork, run_work
from dml_bias.bias.training import train_model

TINY: dict[str, Any] = {**TINY_SCHEDULE, "progress": False, "attribution_images": 2}
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------------- threads


def test_resolved_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("dml_bias.bias.config.usable_cpus", lambda: 7)
    assert StudyConfig().resolved_threads() == 1  # synthetic: tiny operations, one thread
    assert StudyConfig.quick().resolved_threads() == 1
    assert StudyConfig(dataset="cub", root="x").resolved_threads() == 7  # ResNet-50: every usable CPU
    assert StudyConfig(num_threads=3).resolved_threads() == 3
    assert StudyConfig(dataset="cub", root="x", num_threads=2).resolved_threads() == 2
    assert StudyConfig().to_dict()["num_threads_resolved"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert StudyConfig().resolved_threads() is None  # torch already follows the environment
    assert StudyConfig(num_threads=4).resolved_threads() == 4  # an explicit setting still wins


def test_run_study_sets_threads_and_restores_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen: list[int] = []
    real_train = study_module.train_model

    def recording_train(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(study_module, "train_model", recording_train)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = StudyConfig(**TINY, losses=("proxy_anchor",), modes=("none",), variants=("original",))
        run_study(cfg)
        assert seen == [1]
        assert torch.get_num_threads() == 2
        run_study(dataclasses.replace(cfg, num_threads=2))
        assert seen == [1, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_evaluation_does_not_depend_on_the_thread_count() -> None:
    """The same trained model, evaluated with 1, 2 and 4 threads: every retrieval and attribution number equal."""
    cfg = StudyConfig(**TINY, variants=("original", "mixed_rand", "only_bg_t"))
    data = StudyData(cfg)
    subset = attribution_subset(cfg, data)
    assert subset is not None
    variants = ["original", "mixed_rand", "only_bg_t"]
    before = torch.get_num_threads()
    try:
        for spec in (RunSpec("proxy_anchor", "none"), RunSpec("multi_similarity", "soft", 0.2)):
            torch.set_num_threads(1)
            model, _, _ = train_model(cfg, data, spec, CPU, "test")
            results = []
            for threads in (1, 2, 4):
                torch.set_num_threads(threads)
                retrieval, kept = evaluate_retrieval(cfg, data, model, spec, variants, CPU)
                attribution, maps = evaluate_attribution(
                    model, spec, data, subset, kept["original"], CPU, keep_maps=True
                )
                assert maps is not None
                results.append((retrieval, attribution, maps["query_maps"]))
            (r1, a1, m1), *others = results
            for r2, a2, m2 in others:
                assert r1 == r2, spec
                # NaN (an undefined sensitivity) compares unequal to itself: compare the printed values instead.
                assert repr(a1) == repr(a2), spec
                assert torch.equal(m1, m2), spec
            assert 0.0 < r1["metrics"]["original"]["recall@1"] <= 1.0
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------- random state


def test_run_study_leaves_the_global_random_state_alone() -> None:
    cfg = StudyConfig(**TINY, losses=("proxy_anchor",), modes=("none", "bg_augment"), variants=("original",))
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = run_study(cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    # the study's numbers do not depend on the caller's random state either
    torch.manual_seed(99)
    torch.rand(17)
    second = run_study(cfg)
    for a, b in zip(first.runs, second.runs, strict=True):
        assert a["loss_history"] == b["loss_history"]
        assert a["metrics"] == b["metrics"]


@pytest.mark.cuda
def test_run_study_on_cuda_leaves_the_cpu_and_cuda_random_states_alone() -> None:
    cfg = StudyConfig(**TINY, losses=("proxy_anchor",), modes=("bg_augment",), variants=("original",), device="cuda")
    torch.manual_seed(77)
    cpu_state, cuda_state = torch.random.get_rng_state(), torch.cuda.get_rng_state()
    result = run_study(cfg)
    assert torch.equal(torch.random.get_rng_state(), cpu_state)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert len(result.runs[0]["loss_history"]) == 1


def test_train_model_is_seeded_by_the_config() -> None:
    cfg = StudyConfig(**{**TINY, "attribution_images": 0})
    data = StudyData(cfg)
    spec = RunSpec("proxy_anchor", "none")
    torch.manual_seed(5)
    model_a, history_a, _ = train_model(cfg, data, spec, CPU, "a")
    torch.rand(3)
    model_b, history_b, _ = train_model(cfg, data, spec, CPU, "b")
    assert history_a == history_b
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    model_c, _, _ = train_model(dataclasses.replace(cfg, seed=1), data, spec, CPU, "c")
    assert not torch.equal(model_a.state_dict()["head.linear.weight"], model_c.state_dict()["head.linear.weight"])


# ------------------------------------------------------------------------------------------------------ run specs


def test_run_spec_fields_name_and_dict() -> None:
    spec = RunSpec("multi_similarity", "soft", 1 / 4)
    assert (spec.loss, spec.mode, spec.sigma, spec.name) == ("multi_similarity", "soft", 0.25, "soft σ=0.25")
    assert spec.to_dict() == {"loss": "multi_similarity", "mode": "soft", "sigma": 0.25}
    assert RunSpec("proxy_anchor", "channel").to_dict() == {"loss": "proxy_anchor", "mode": "channel", "sigma": None}
    assert RunSpec("proxy_anchor", "hard") == RunSpec("proxy_anchor", "hard")  # a value: equal fields, equal specs
    assert len({RunSpec("proxy_anchor", "soft", 0.5), RunSpec("proxy_anchor", "soft", 0.5)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.mode = "hard"  # type: ignore[misc]
    with pytest.raises(ValueError, match="sigma must be a number in"):
        RunSpec("proxy_anchor", "soft", 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("triplet", "none"), "loss must be one of"),
        (("proxy_anchor", "blur"), "mode must be one of"),
        (("proxy_anchor", "soft"), "sigma must be a number in \\(0, 1\\) when mode='soft', got None"),
        (("proxy_anchor", "soft", 0.0), "sigma must be"),
        (("proxy_anchor", "hard", 0.2), "sigma must be None unless mode='soft', got 0.2 with mode='hard'"),
    ],
)
def test_run_spec_rejects_bad_fields(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunSpec(*args)


def test_run_specs_and_results_keep_the_plain_fields() -> None:
    cfg = StudyConfig(**TINY, losses=("multi_similarity",), modes=("soft", "hard"), soft_sigmas=(0.3,))
    specs = cfg.run_specs()
    assert specs == [RunSpec("multi_similarity", "soft", 0.3), RunSpec("multi_similarity", "hard")]
    result = run_study(dataclasses.replace(cfg, variants=("original",), attribution_images=0))
    assert [(r["loss"], r["mode"], r["sigma"], r["name"]) for r in result.runs] == [
        ("multi_similarity", "soft", 0.3, "soft σ=0.3"),
        ("multi_similarity", "hard", None, "hard"),
    ]
    import json

    json.dumps(result.to_dict())  # the runs stay JSON-ready: no RunSpec object inside


# ----------------------------------------------------------------------------------------------------- progress


def test_run_work_hand_computed() -> None:
    cfg = StudyConfig.quick()  # 4 epochs, 7 variants
    n_train, n_test, n_attr = 384, 384, 64
    none = run_work(cfg, RunSpec("proxy_anchor", "none"), n_train, n_test, 7, n_attr)
    assert none == RunWork(
        train_epoch=TRAIN_WEIGHT * 384, epochs=4, evaluation=7 * 384.0, attribution=ATTRIBUTION_WEIGHT * 1.5 * 64
    )
    assert none.total == pytest.approx(2 * 384 * 4 + 7 * 384 + 5 * 1.5 * 64)
    # a masked mode is evaluated twice (own mode and raw images); bg_augment trains twice as slowly
    hard = run_work(cfg, RunSpec("proxy_anchor", "hard"), n_train, n_test, 7, n_attr)
    assert hard.evaluation == 2 * none.evaluation
    augment = run_work(cfg, RunSpec("proxy_anchor", "bg_augment"), n_train, n_test, 7, n_attr)
    assert augment.train_epoch == 2 * none.train_epoch
    assert augment.evaluation == none.evaluation
    # every model's neighbour maps are kept for the figure: the second loss has the same attribution work
    ms = run_work(cfg, RunSpec("multi_similarity", "none"), n_train, n_test, 7, n_attr)
    assert ms.attribution == ATTRIBUTION_WEIGHT * 1.5 * 64
    # swap="queries" embeds the original gallery once more per evaluation
    queries = run_work(dataclasses.replace(cfg, swap="queries"), RunSpec("proxy_anchor", "hard"), 10, 20, 3, 0)
    assert queries.evaluation == 2 * (3 + 1) * 20
    assert queries.attribution == 0.0
    long = run_work(dataclasses.replace(cfg, epochs=60), RunSpec("proxy_anchor", "none"), 10, 20, 3, 0)
    assert long.total == pytest.approx(60 * 2 * 10 + 3 * 20)


def test_first_run_is_a_small_share_of_the_quick_study() -> None:
    """The old bar counted models: after the first (one evaluation) it predicted 11 × its time for the rest.

    With work weights the rest is predicted from the work still to come; for the quick study the first model
    carries less than its 1/12 share (it has no raw evaluation), so the ETA after it is longer than 11 × its time.
    """
    cfg = StudyConfig.quick()
    works = [run_work(cfg, s, 384, 384, 7, 64) for s in cfg.run_specs()]
    total = sum(w.total for w in works)
    remaining_per_first = (total - works[0].total) / works[0].total
    assert len(works) == 12
    assert remaining_per_first > 11 * 1.2
    # the masked runs (soft ×2, hard, channel per loss) weigh more than the unmasked ones of the same loss
    by_name = {(s.loss, s.name): w.total for s, w in zip(cfg.run_specs(), works, strict=True)}
    assert by_name[("proxy_anchor", "hard")] > by_name[("proxy_anchor", "none")]


class _RecordingBar:
    """A stand-in for tqdm that records the total and every update of the study's bars."""

    bars: ClassVar[list[_RecordingBar]] = []

    def __init__(self, iterable: Any = None, total: float | None = None, **kwargs: Any) -> None:
        self.iterable, self.total, self.kwargs = iterable, total, kwargs
        self.updates: list[float] = []
        _RecordingBar.bars.append(self)

    def __iter__(self) -> Any:
        return iter(self.iterable)

    def update(self, n: float) -> None:
        self.updates.append(n)

    def set_postfix_str(self, text: str) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_outer_bar_advances_by_the_work_of_each_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.auto

    _RecordingBar.bars = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    cfg = StudyConfig(**{**TINY, "epochs": 2}, losses=("proxy_anchor",), modes=("none", "hard"), variants=("original",))
    run_study(cfg)
    outer = next(b for b in _RecordingBar.bars if b.kwargs.get("desc") == "study")
    data = StudyData(cfg)
    n_train, n_test = data.num_train_images, int(data.test.labels.numel())
    # variants: original plus the report variant (mixed_rand); attribution: 2 images × 6 classes
    works = [run_work(cfg, s, n_train, n_test, 2, 12) for s in cfg.run_specs()]
    expected: list[float] = []
    for w in works:
        expected += [w.train_epoch] * w.epochs + [w.evaluation, w.attribution]
    assert outer.updates == pytest.approx(expected)
    assert sum(outer.updates) == pytest.approx(outer.total)
    assert outer.kwargs["smoothing"] == 0.0  # the ETA uses the average rate of the whole run so far
    assert works[1].evaluation == 2 * works[0].evaluation
    assert math.isclose(works[0].train_epoch, TRAIN_WEIGHT * n_train)
