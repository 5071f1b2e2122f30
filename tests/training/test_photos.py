"""Real-photo tasks (scikit-image's images, no download) and the --img-size override."""

from __future__ import annotations

import numpy as np
import pytest
import timm

from training import data, photos


def pixels(item: tuple) -> np.ndarray:
    return np.asarray(item[0]())


def test_faces_splits_are_disjoint_and_balanced() -> None:
    splits = data.load_splits("faces:10")
    assert splits.labels == ["face", "non-face"]
    assert (len(splits.train), len(splits.val), len(splits.test or [])) == (20, 20, 160)
    seen = {pixels(it).tobytes() for it in splits.train + splits.val}
    assert not any(pixels(it).tobytes() in seen for it in splits.test or [])
    assert {y for _, y in splits.train} == {0, 1}
    with pytest.raises(data.DataError, match="at most 80 can train"):
        data.load_splits("faces:81")


def test_patches_test_pixels_come_from_the_unseen_part_of_each_photo() -> None:
    splits = data.load_splits("patches:5")
    assert len(splits.labels) == 10 and len(splits.train) == 50 and len(splits.test or []) == 400
    img = pixels(splits.train[0])
    assert img.ndim == 3 and img.shape[2] == 3 and (img[..., 0] == img[..., 1]).all()  # grey as RGB
    for label, name in enumerate(photos.PATCH_PHOTOS):
        h, w = photos._grey_photo(name).shape
        for i in range(60):
            x0, y0, side, _ = photos.patch_box(label, "train", i)
            assert x0 >= 0 and x0 + side <= int(0.55 * w) and y0 >= 0 and y0 + side <= h
            x0, y0, side, _ = photos.patch_box(label, "test", i)
            assert int(0.55 * w) <= x0 and x0 + side <= w and y0 + side <= h
    first = np.asarray(splits.test[0][0]().convert("L"))  # type: ignore[index]
    x0, y0, side, mirrored = photos.patch_box(0, "test", 0)
    photo = photos._grey_photo(photos.PATCH_PHOTOS[0])[y0 : y0 + side, x0 : x0 + side]
    assert (first == (photo[:, ::-1] if mirrored else photo)).all()


def test_img_size_overrides_the_models_input_size() -> None:
    model = timm.create_model("test_efficientnet", num_classes=3)
    img = data.load_splits("faces:2").train[0][0]()
    train, evaluate = data.transforms(model, "vtab", img_size=72)
    assert tuple(train(img).shape) == (3, 72, 72) == tuple(evaluate(img).shape)
    assert data.data_config(model, 72)["input_size"] == [3, 72, 72]
