"""Images → latents once, and the augmentation drawn per step from the cached variants."""

from __future__ import annotations

import torch
from PIL import ImageOps

from classdiffusion.config import TrainConfig
from classdiffusion.run.data import LatentBank, draw_placement, scale_bins, to_pixels
from classdiffusion.model.losses import masked_mse
from classdiffusion.run.train import train

from helpers import dog, make_images, small_config


def test_scale_bins_cover_the_official_ranges():
    shrink, zoom = scale_bins(TrainConfig(resolution=512))
    assert shrink[0] >= 512 // 3 - 8 and shrink[-1] == 512
    assert all(s % 8 == 0 for s in shrink + zoom)
    assert all(1.2 * 512 - 8 <= z <= 1.4 * 512 + 8 for z in zoom) and len(zoom) == 2
    assert scale_bins(TrainConfig(resolution=512, augment=False)) == ([512], [])


def test_flip_variant_is_the_mirrored_image():
    image = make_images(1)[0]
    assert torch.equal(to_pixels(image, 64, flip=True), to_pixels(ImageOps.mirror(image.crop((0, 8, 72, 80))), 64))


def test_compose_pastes_the_shrunk_latent_and_masks_one_cell_of_margin(host):
    config = small_config(resolution=128)
    bank = LatentBank(host, make_images(2), [0, 0], config)
    size = bank.shrink[0]
    cells = size // 8
    mean, std, mask = bank.compose(1, True, size, 2, 3)
    variant_mean, variant_std = bank.variants[(1, True, size)]
    assert torch.equal(mean[:, 2:2 + cells, 3:3 + cells], variant_mean)
    assert torch.equal(std[:, 2:2 + cells, 3:3 + cells], variant_std)
    assert torch.equal(mean[:, 0, :], bank.canvas[0][:, 0, :])  # gray canvas outside
    assert mask.sum() == (cells - 2) ** 2
    assert mask[0, 3, 4] == 1 and mask[0, 2, 3] == 0
    zoom = bank.zoom[-1]
    mean, _, mask = bank.compose(0, False, zoom, 1, 2)
    assert torch.equal(mean, bank.variants[(0, False, zoom)][0][:, 1:17, 2:18])
    assert mask.min() == 1


def test_prompt_prefixes_follow_the_scale(host):
    bank = LatentBank(host, make_images(1), [0], small_config(resolution=128))
    seen = {}
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        place = draw_placement(bank, 0, generator)
        seen.setdefault(place.prefix, set()).add(place.size)
        cells = place.size // 8
        assert 0 <= place.top <= abs(cells - 16) and 0 <= place.left <= abs(cells - 16)
    assert all(s < 0.6 * 128 for s in seen["a far away "] | seen["very small "])
    assert all(s > 128 for s in seen["zoomed in "] | seen["close up "])
    assert all(0.6 * 128 <= s <= 128 for s in seen[""])


def test_images_are_encoded_once_not_every_step(host):
    calls = []
    original = host.encode_images

    def counting(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    host.encode_images = counting
    train(host, [dog()], small_config(steps=2), images=[make_images(3)])
    after_two = sum(calls)
    calls.clear()
    train(host, [dog(token="<sks2>")], small_config(steps=6), images=[make_images(3)])
    assert sum(calls) == after_two  # independent of the number of steps
    shrink, zoom = scale_bins(small_config())
    assert after_two == 3 * 2 * len(shrink + zoom) + 1  # images × flips × sizes + the canvas


def test_masked_mse_is_the_official_reduction_channel_sum_over_mask_cells():
    """Official: the squared error summed over the 4 channels, divided by the number of mask
    cells — 4× the per-element mean of the masked region."""
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:6, 2:6] = 1
    mask[1] = 1
    expected = torch.stack([
        ((pred[0] - target[0]) ** 2)[:, 2:6, 2:6].sum() / 16,
        ((pred[1] - target[1]) ** 2).sum() / 64,
    ]).mean()
    assert torch.allclose(masked_mse(pred, target, mask), expected, atol=1e-6)
