import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.errors import DataError
from mmfusion.modalities.image import (
    ImageEncoder,
    decode_image,
    preprocess_image,
    preprocess_images,
    to_rgb_array,
    to_uint8_image,
)


def test_modes_convert_to_rgb_uint8():
    grey = Image.fromarray(np.array([[0, 255], [128, 64]], dtype=np.uint8), mode="L")
    assert to_rgb_array(grey)[1, 0].tolist() == [128, 128, 128]
    rgba = Image.fromarray(np.array([[[200, 100, 50, 255], [200, 100, 50, 0]]], dtype=np.uint8), mode="RGBA")
    assert to_rgb_array(rgba).tolist() == [[[200, 100, 50], [0, 0, 0]]]  # transparent -> black
    pal = grey.convert("P")
    assert to_rgb_array(pal).shape == (2, 2, 3)
    assert to_rgb_array(np.zeros((3, 5), np.uint8)).shape == (3, 5, 3)
    assert to_rgb_array(np.ones((2, 2, 3), np.float32))[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(DataError, match=r"shape \(2, 2, 5\)"):
        to_rgb_array(np.zeros((2, 2, 5), np.uint8))


def test_preprocess_range_resize_and_inverse():
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[..., 0] = 255
    t = preprocess_image(arr, 4)
    assert t.shape == (3, 4, 4)
    assert t[0].eq(1).all() and t[1].eq(-1).all()
    assert np.array_equal(to_uint8_image(t), arr)
    big = preprocess_image(Image.fromarray(arr).resize((37, 21)), 8)
    assert big.shape == (3, 8, 8)
    batch = preprocess_images([arr, Image.fromarray(arr)], 4)
    assert torch.equal(batch[0], batch[1])


def test_vit_shapes_and_size_check():
    torch.manual_seed(0)
    enc = ImageEncoder(image_size=16, patch_size=4, width=16, depth=1, heads=2, embed_dim=8)
    assert enc(torch.zeros(2, 3, 16, 16)).shape == (2, 8)
    assert enc.forward_tokens(torch.zeros(1, 3, 16, 16)).shape == (1, 17, 16)
    with pytest.raises(DataError, match="expects 16x16"):
        enc(torch.zeros(1, 3, 32, 32))


def test_conv_stem_keeps_the_token_grid():
    from mmfusion.modalities.image import conv_stem

    torch.manual_seed(0)
    enc = ImageEncoder(image_size=32, patch_size=8, width=32, depth=1, heads=2, embed_dim=8, stem="conv")
    assert enc.forward_tokens(torch.zeros(2, 3, 32, 32)).shape == (2, 17, 32)
    assert [m.stride for m in conv_stem(32, 8) if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3 + [(1, 1)]
    with pytest.raises(ValueError, match="power-of-two patch_size, got 6"):
        conv_stem(32, 6)


def test_decode_image_applies_exif_orientation_and_keeps_plain_rgb_pixels():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # (H=2, W=3, 3)
    plain, rotated = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(plain, format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored image must be rotated 90 degrees clockwise to display
    Image.fromarray(pixels).save(rotated, format="PNG", exif=exif.tobytes())
    assert np.array_equal(decode_image(plain.getvalue()), pixels)
    out = decode_image(rotated.getvalue())
    assert out.shape == (3, 2, 3) and np.array_equal(out, np.rot90(pixels, k=-1))
