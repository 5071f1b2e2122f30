"""The offline datasets are deterministic, balanced and leak-free; list files and recipes behave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm

from training import data, procedural


@pytest.mark.parametrize("task", sorted(procedural.TASKS))
def test_procedural_is_deterministic_and_labelled(task: str) -> None:
    k = len(procedural.TASKS[task])
    a, label = procedural.render(task, 5, seed=1)
    b, _ = procedural.render(task, 5, seed=1)
    c, _ = procedural.render(task, 5, seed=2)
    assert a.size == (64, 64) and a.mode == "RGB" and 0 <= label < k
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_procedural_splits_are_balanced() -> None:
    splits = data.load_splits("procedural:shape:4")
    counts = np.bincount([y for _, y in splits.train])
    assert splits.labels == list(procedural.SHAPES) and counts.tolist() == [4] * 6
    assert splits.test is not None and len(splits.test) == 20 * 6


def test_digits_splits_are_disjoint_real_images() -> None:
    splits = data.load_splits("digits:5")
    assert len(splits.train) == 50 and len(splits.val) == 200 and splits.test is not None
    ids = [id(item[0]) for item in splits.train + splits.val + splits.test]
    assert len(ids) == len(set(ids)) == 1797  # every scan in exactly one split: the rest is test
    assert len(splits.test) == 1797 - 250
    img = data.ImageList(splits.train).image(0)
    assert img.size == (64, 64) and np.asarray(img).std() > 10


def test_vtab_list_files(tmp_path: Path) -> None:
    from tests.helpers.images import make_folder

    make_folder(tmp_path, {"images": 5})
    lines = [f"images/{c}/{j}.png {i}" for i, c in enumerate(("ant", "bee", "cat")) for j in range(5)]
    (tmp_path / "train800val200.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[:3]) + "\n")
    splits = data.load_splits(f"vtab:{tmp_path}")
    assert splits.labels == ["0", "1", "2"] and len(splits.train) + len(splits.val) == 15
    assert {y for _, y in splits.val} == {0, 1, 2}
    (tmp_path / "train800val200.txt").write_text("images/ant/0.png\n")
    with pytest.raises(data.DataError, match="path label"):
        data.load_splits(f"vtab:{tmp_path}")


def test_recipes_follow_the_backbone_config() -> None:
    model = timm.create_model("ssf_demo_vit", num_classes=3)
    img = procedural.render("shape", 0, 0)[0].resize((100, 80))
    for recipe in data.RECIPES:
        train, evaluate = data.transforms(model, recipe)
        assert tuple(train(img).shape) == (3, 64, 64) == tuple(evaluate(img).shape)
    with pytest.raises(data.DataError):
        data.transforms(model, "fancy")
