"""The paper's continual-learning protocols (issue 20): Split-MNIST even/odd pairs, Split-CIFAR-10
animal/vehicle tasks and labels, EWC's batch Fisher, the benchmarks' default settings, and the
percentile spread the tables report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.benchmark_loader import load_benchmark
from verifier.cl.baselines import EWC, batch_fisher, empirical_fisher
from verifier.cl.network import LinearHead
from verifier.cl.scenarios import (
    CIFAR_ANIMALS,
    CIFAR_VEHICLES,
    draw_animal_vehicle_pairs,
    draw_even_odd_pairs,
    split_pairs,
)
from verifier.cl.training import TrainingData, task_loss
from verifier.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(40)


def _ten_classes(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of each of the ten classes (random features; the labels are what counts)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(n)
    perm = torch.randperm(len(y), generator=gen)
    return torch.rand(len(y), dim, generator=gen), y[perm]


def _bench(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_benchmark(name, monkeypatch)


# ---- Split-MNIST: one even and one odd digit per task ------------------------------------


def test_even_odd_pairs_pair_an_even_with_an_odd_digit_and_vary_with_the_seed() -> None:
    draws = [draw_even_odd_pairs(torch.Generator().manual_seed(s)) for s in SEEDS]
    for pairs in draws:
        assert len(pairs) == 5
        assert sorted(d for p in pairs for d in p) == list(range(10))
        assert all(a < b and (a + b) % 2 == 1 for a, b in pairs)  # one even, one odd
    assert len({tuple(p) for p in draws}) >= len(draws) - 2  # (5!)^2 splits: few repeats
    assert len({p[0] for p in draws}) > 5  # the first task varies too
    # the paper's example is seed 0's draw
    assert draws[0] == [(7, 8), (0, 9), (1, 2), (3, 6), (4, 5)]
    # fewer tasks: the first ones of the same draw
    three = draw_even_odd_pairs(torch.Generator().manual_seed(3), 3)
    assert three == draws[3][:3]
    for bad in (0, 6):
        with pytest.raises(InputError, match="at most 5 tasks"):
            draw_even_odd_pairs(torch.Generator().manual_seed(0), bad)


@pytest.mark.parametrize("seed", range(5))
def test_every_domain_il_task_with_even_odd_pairs_has_both_parity_labels(seed: int) -> None:
    train, test = _ten_classes(6, 4, seed), _ten_classes(3, 4, seed + 100)
    pairs = draw_even_odd_pairs(torch.Generator().manual_seed(seed))
    tasks = split_pairs("domain", pairs, train, test)
    for task, pair in zip(tasks, pairs, strict=True):
        assert task.rows == (0, 1) and task.digits == pair
        for x, labels, classes in (
            (task.x_train, task.y_train, train),
            (task.x_test, task.y_test, test),
        ):
            assert set(labels.tolist()) == {0, 1}
            # the label is the digit's parity: recover each sample's digit from its row
            digit = {tuple(r.tolist()): int(c) for r, c in zip(*classes, strict=True)}
            assert [digit[tuple(r.tolist())] % 2 for r in x] == labels.tolist()


# ---- Split-CIFAR-10: animal / vehicle chunks ---------------------------------------------


def test_animal_vehicle_tasks_follow_the_papers_construction() -> None:
    animals, vehicles = set(CIFAR_ANIMALS), set(CIFAR_VEHICLES)
    assert animals | vehicles == set(range(10)) and not animals & vehicles
    draws = [draw_animal_vehicle_pairs(torch.Generator().manual_seed(s)) for s in SEEDS]
    two_animal_positions = set()
    for pairs in draws:
        assert len(pairs) == 5 and all(a < b for a, b in pairs)
        assert sorted(c for p in pairs for c in p) == list(range(10))  # every class once
        n_animals = [len(set(p) & animals) for p in pairs]
        assert all(n >= 1 for n in n_animals)  # every task holds an animal
        assert n_animals.count(2) == 1  # exactly one task holds two animals
        assert all(len(set(p) & vehicles) <= 1 for p in pairs)  # never two vehicles
        two_animal_positions.add(n_animals.index(2))
    assert two_animal_positions == set(range(5))  # the two-animal task moves with the seed
    assert len({tuple(p) for p in draws}) == len(draws)
    assert draw_animal_vehicle_pairs(torch.Generator().manual_seed(7), 2) == draws[7][:2]


def test_animal_vehicle_domain_labels_and_the_single_label_task() -> None:
    train, test = _ten_classes(5, 3, 0), _ten_classes(4, 3, 1)
    pairs = draw_animal_vehicle_pairs(torch.Generator().manual_seed(2))
    tasks = split_pairs("domain", pairs, train, test, domain_label="animal-vehicle")
    digit = {tuple(r.tolist()): int(c) for r, c in zip(*train, strict=True)}
    for task in tasks:
        classes = [digit[tuple(r.tolist())] for r in task.x_train]
        assert task.y_train.tolist() == [int(c in CIFAR_VEHICLES) for c in classes]
        if all(c in CIFAR_ANIMALS for c in task.digits):  # the two-animal task: one label
            assert set(task.y_train.tolist()) == {0} and set(task.y_test.tolist()) == {0}
        else:
            assert set(task.y_train.tolist()) == {0, 1} and set(task.y_test.tolist()) == {0, 1}
    # Task-IL and Class-IL are unaffected by the Domain-IL label
    task_il = split_pairs("task", pairs, train, test, domain_label="animal-vehicle")
    assert all(t.rows == p for t, p in zip(task_il, pairs, strict=True))
    assert set(task_il[0].y_train.tolist()) == {0, 1}
    with pytest.raises(InputError, match="Domain-IL label"):
        split_pairs("domain", pairs, train, test, domain_label="colour")  # type: ignore[arg-type]


# ---- EWC with the batch Fisher -----------------------------------------------------------


def test_batch_fisher_of_single_samples_is_the_empirical_fisher() -> None:
    model = LinearHead(6, torch.Generator().manual_seed(0))
    x, y = _ten_classes(3, 6, 0)
    data = TrainingData(x, (y == 3).long(), torch.tensor([[3, 7]]).expand(len(y), 2))
    per_sample = empirical_fisher(model, data)
    ones = batch_fisher(model, data, 1)
    for name, value in per_sample.items():
        torch.testing.assert_close(ones[name], value, rtol=1e-5, atol=1e-8)
    # one batch of everything: the square of the mean gradient
    whole = batch_fisher(model, data, len(data))
    grads = torch.autograd.grad(task_loss(model, data.x, data.y, data.rows), model.parameters())
    for (name, _), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(whole[name], g.pow(2))
        # averaging over samples cancels: the batch estimate is smaller than the per-sample one
        assert float(whole[name].sum()) < float(per_sample[name].sum())
    ewc = EWC(1e6, n_fisher=None, fisher_batch=64)
    assert ewc.fisher_batch == 64 and ewc.n_fisher is None


# ---- the benchmarks' defaults are the paper's protocols ----------------------------------


def test_split_mnist_defaults_are_the_papers_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench("split_mnist", monkeypatch)
    args = bench.build_parser().parse_args([])
    assert args.pairs == "even-odd" and len(args.seeds) >= 5
    settings = bench.with_pairs(bench.settings_for(args), args.pairs)
    assert settings.pairs == "even-odd" and settings.seeds == (0, 1, 2, 3, 4)
    assert settings.n_tasks == 5 and settings.train_limit is None
    for seed in settings.seeds:
        pairs = [t.digits for t in bench._tasks(settings, "domain", seed, _mnist_like())]
        assert all((a + b) % 2 == 1 for a, b in pairs)
    drawn = bench.with_pairs(settings, "drawn")
    assert [t.digits for t in bench._tasks(drawn, "task", 3, _mnist_like())] != [
        t.digits for t in bench._tasks(settings, "task", 3, _mnist_like())
    ]


def _mnist_like() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": _ten_classes(2, 4, 0), "test": _ten_classes(2, 4, 1)}


def test_split_cifar_defaults_are_the_papers_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench("split_cifar", monkeypatch)
    args = bench.build_parser().parse_args([])
    assert args.protocol == "paper"
    settings = bench.settings_for(args)
    assert (settings.train.lr, settings.train.batch_size, settings.train.epochs) == (0.02, 128, 5)
    assert settings.seeds == tuple(range(15))
    assert settings.seeds_of("task") == tuple(range(11))
    assert settings.seeds_of("domain") == settings.seeds_of("class") == tuple(range(15))
    assert len(settings.units()) == 11 + 15 + 15
    assert set(settings.ewc_strength.values()) == {1e6} and settings.ewc_fisher_batch == 64
    assert settings.lwf == (0.1, 2.0) and "LwF" in settings.baselines
    ewc = bench.make_strategy(settings, "EWC", "domain")
    assert (ewc.strength, ewc.fisher_batch, ewc.n_fisher) == (1e6, 64, None)
    lwf = bench.make_strategy(settings, "LwF", "class")
    assert (lwf.weight, lwf.temperature) == (0.1, 2.0)
    features = bench.synthetic_features(n_train=4, n_test=3, dim=5)
    tasks = bench._tasks(settings, "domain", 4, features)
    assert [t.digits for t in tasks] == draw_animal_vehicle_pairs(torch.Generator().manual_seed(4))
    for task in tasks:
        vehicle = [c in CIFAR_VEHICLES for c in task.digits]
        assert set(task.y_train.tolist()) == ({0} if not any(vehicle) else {0, 1})
    # the earlier variant stays selectable under its own name
    old = bench.settings_for(bench.build_parser().parse_args(["--protocol", "issue11"]))
    assert (old.train.lr, old.train.batch_size, old.seeds) == (1e-3, 64, (0, 1, 2))
    assert old.seeds_of("task") == old.seeds and old.ewc_fisher_batch is None
    old_task = bench._tasks(old, "domain", 4, features)[0]
    assert set(old_task.y_train.tolist()) == {0, 1}  # "position": which class of the pair
    assert (old_task.y_train == 1).tolist() == [
        bool(y == old_task.digits[1]) for y in _labels_of(old_task, features)
    ]
    seeds = bench.settings_for(bench.build_parser().parse_args(["--seeds", "3", "4"]))
    assert seeds.seeds == (3, 4) and seeds.seeds_of("task") == (3, 4)


def _labels_of(task: Any, features: Any) -> list[int]:
    """The CIFAR classes of a task's training samples, looked up by feature row."""
    x, y = features.train
    index = {tuple(r.tolist()): int(c) for r, c in zip(x, y, strict=True)}
    return [index[tuple(r.tolist())] for r in task.x_train]


@pytest.mark.timeout(120)
def test_tiny_split_cifar_paper_protocol_records_pairs_and_percentiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (paper) protocol in Domain-IL, then the issue-11 variant: each run's pairs
    in the raw results, the 10th-90th percentile column, the protocol kept by --from-raw."""
    bench = _bench("split_cifar", monkeypatch)
    out, plots, raw = tmp_path / "r.md", tmp_path / "plots", tmp_path / "raw.json"
    files = ["--out", str(out), "--plots", str(plots), "--raw", str(raw)]
    argv = ["--tiny", "--scenarios", "domain", "--methods", "LID", "EWC", "LwF", *files]
    assert bench.main(argv) == 0
    saved = json.loads(raw.read_text(encoding="utf-8"))
    assert saved["protocol"] == "paper"
    assert {r["method"] for r in saved["results"]} == {"LID", "EWC", "LwF"}
    expected = [list(p) for p in draw_animal_vehicle_pairs(torch.Generator().manual_seed(0), 2)]
    assert all(r["pairs"] == expected and r["seed"] == 0 for r in saved["results"])
    text = out.read_text(encoding="utf-8")
    assert "10th–90th pct." in text and "animal (0) vs vehicle (1)" in text
    assert "| EWC | " in text and "0.72 |" in text  # the paper's EWC Domain-IL figure beside
    assert bench.main([*argv, "--from-raw", "--protocol", "issue11"]) == 0  # the raw's wins
    assert out.read_text(encoding="utf-8") == text
    assert bench.main([*argv, "--protocol", "issue11"]) == 0
    saved = json.loads(raw.read_text(encoding="utf-8"))
    assert saved["protocol"] == "issue11"
    assert "Protocol `issue11`" in out.read_text(encoding="utf-8")


@pytest.mark.timeout(120)
def test_tiny_split_mnist_records_the_pair_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default even/odd pairs in every run's raw record; --merge refuses another rule."""
    bench = _bench("split_mnist", monkeypatch)
    out, plots, raw = tmp_path / "r.md", tmp_path / "plots", tmp_path / "raw.json"
    files = ["--out", str(out), "--plots", str(plots), "--raw", str(raw)]
    argv = ["--tiny", "--workers", "0", "--scenarios", "domain", "--methods", "fine-tune"]
    assert bench.main([*argv, *files]) == 0
    saved = json.loads(raw.read_text(encoding="utf-8"))
    assert saved["pairs_rule"] == "even-odd"
    (run,) = saved["results"]
    assert run["pairs"] == [[7, 8], [0, 9]] and run["seed"] == 0
    text = out.read_text(encoding="utf-8")
    assert "one even and one odd digit per task" in text and "10th–90th pct." in text
    assert bench.main([*argv, *files, "--merge", "--pairs", "drawn"]) == 2
    assert json.loads(raw.read_text(encoding="utf-8")) == saved  # untouched


def test_spread_is_the_10th_to_90th_percentile(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import cl_report

    values = [0.5, 0.1, 0.9, 0.3, 0.7]
    spread = cl_report.spread(values)
    assert spread.low == pytest.approx(float(np.percentile(values, 10)))
    assert spread.high == pytest.approx(float(np.percentile(values, 90)))
    assert 0.1 < spread.low < 0.3 and 0.7 < spread.high < 0.9
    assert spread.format() == f"{spread.low:.2f}–{spread.high:.2f}"
    one = cl_report.spread([0.42])
    assert one.low == one.high == 0.42
    results = [
        {"scenario": "task", "seed": s, "method": "m", "matrix": [[1.0, 0.0], [v, v]], "seconds": 0}
        for s, v in enumerate(values)
    ]
    summary = cl_report.summarise(results)[("task", "m")]
    assert summary["seeds"] == [0, 1, 2, 3, 4]
    assert summary["final_spread"] == cl_report.spread(values)
    table = "\n".join(
        cl_report.final_accuracy_table({("task", "m"): summary}, ["m"], ["task"], lambda *_: "–")
    )
    assert f"| m | 0.50 ± 0.32 | {spread.format()} | – |" in table


@pytest.mark.parametrize("name", ["split_mnist", "split_cifar"])
def test_an_unknown_method_name_is_one_error_line_and_exit_2(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench(name, monkeypatch)
    raw = tmp_path / "raw.json"
    argv = ["--tiny", "--workers", "0", "--methods", "fine-tune", "LID hed", "--raw", str(raw)]
    with pytest.raises(SystemExit) as info:
        bench.main([*argv, "--out", str(tmp_path / "r.md"), "--plots", str(tmp_path / "p")])
    assert info.value.code == 2 and not raw.exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: unknown method(s) 'LID hed'") and "'fine-tune'" in line
