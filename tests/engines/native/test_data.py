"""Dataset, buckets and the content-keyed caches: a second run encodes nothing; an edit re-encodes only itself."""

from __future__ import annotations

import torch

from flux_lora.buckets import bucket_sizes, nearest_bucket
from flux_lora.engines.native.data import build_train_items, epoch_batches
from flux_lora.engines.native.models import build_tiny_flux
from tests.engines.native.native_tiny_run import make_dataset, tiny_config


def test_buckets_are_sd_scripts_buckets_with_flux_sides():
    sizes = bucket_sizes(512, 64, 256, 1024)
    assert (512, 512) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert nearest_bucket(1200, 800, sizes)[0] > nearest_bucket(1200, 800, sizes)[1]
    assert nearest_bucket(800, 1200, sizes)[0] < nearest_bucket(800, 1200, sizes)[1]


def test_epoch_batches_repeat_items_and_never_mix_buckets(tmp_path):
    config = tiny_config(tmp_path, make_dataset(tmp_path / "ds", count=4), resolution=96, num_repeats=3)
    items, _ = build_train_items(config, build_tiny_flux())
    assert [item.bucket for item in items] == [(128, 64), (96, 96), (128, 64), (96, 96)]
    assert [item.repeats for item in items] == [3, 3, 3, 3]
    batches = epoch_batches(items, num_repeats=1, batch_size=2, generator=torch.Generator().manual_seed(0))
    flat = sorted(i for batch in batches for i in batch)
    assert flat == sorted(list(range(4)) * 3)
    assert all(len({items[i].bucket for i in batch}) == 1 for batch in batches)


def test_second_run_hits_every_cache_entry_and_an_edited_caption_is_re_encoded(tmp_path):
    dataset = make_dataset(tmp_path / "ds", count=3)
    config = tiny_config(tmp_path, dataset)
    parts = build_tiny_flux()
    first, stats = build_train_items(config, parts)
    assert (stats.latent_misses, stats.text_misses, stats.latent_hits, stats.text_hits) == (3, 3, 0, 0)

    # Another run (new parts object, same model identity) sharing the cache encodes nothing.
    second, stats = build_train_items(config, build_tiny_flux())
    assert (stats.latent_misses, stats.text_misses, stats.latent_hits, stats.text_hits) == (0, 0, 3, 3)
    for a, b in zip(first, second):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.t5, b.t5) and torch.equal(a.pooled, b.pooled)

    (dataset / "img1.txt").write_text("TOK woman, an edited caption", encoding="utf-8")
    edited, stats = build_train_items(config, parts)
    assert (stats.latent_misses, stats.text_misses, stats.latent_hits, stats.text_hits) == (0, 1, 3, 2)
    assert not torch.equal(edited[1].t5, first[1].t5)

    # Another VAE / text-encoder identity or T5 length is a different key, never a stale hit.
    _, stats = build_train_items(config, build_tiny_flux(init_seed=1))
    assert stats.latent_hits == 0 and stats.text_hits == 0
    _, stats = build_train_items(config, build_tiny_flux(t5_max_length=32))
    assert stats.latent_hits == 3 and stats.text_hits == 0


def test_missing_caption_falls_back_to_class_tokens(tmp_path):
    dataset = make_dataset(tmp_path / "ds", count=2)
    (dataset / "img0.txt").unlink()
    config = tiny_config(tmp_path, dataset, class_tokens="woman")
    parts = build_tiny_flux()
    items, _ = build_train_items(config, parts)
    from flux_lora.engines.native.models import encode_prompts

    _, t5 = encode_prompts(parts, ["woman"])
    assert torch.equal(items[0].t5, t5[0])
