"""maskworks.em.unet: masked loss, leakage-free split, training/resume, sliding-window inference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from maskworks.demo import make_em_volume  # noqa: E402
from maskworks.em import unet  # noqa: E402
from maskworks.io import InputError, read_volume, write_volume  # noqa: E402

TINY = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1, "patch_size": 16, "batch_size": 2,
        "patches_per_epoch": 4, "val_patches": 2, "device": "cpu", "progress": False}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; more threads only spin against the other test processes
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def em():
    return make_em_volume((32, 48, 48), seed=5)


class Identity(torch.nn.Module):
    """Logits = the (normalised) input: every voxel's blended output must equal its own value."""

    def forward(self, x):
        return x.clone()


class Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


# ----------------------------------------------------------------------------- labels and loss


def test_loss_ignores_label_2_voxels():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g).float()
    logits = torch.randn(label.shape, generator=g)
    changed = logits.clone()
    ignored = label == 2
    changed[ignored] = torch.randn(int(ignored.sum()), generator=g) * 50
    a, b = unet.masked_dice_ce_loss(logits, label), unet.masked_dice_ce_loss(changed, label)
    assert float(a) == float(b)
    # relabelling ignored voxels as foreground does change it
    assert float(unet.masked_dice_ce_loss(logits, torch.where(ignored, 1.0, label))) != float(a)
    assert float(unet.masked_dice_ce_loss(logits, torch.full_like(label, 2.0))) == 0.0


def test_loss_without_ignored_voxels_is_monai_dicece():
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 2, (2, 1, 6, 6, 6), generator=g).float()
    logits = torch.randn(label.shape, generator=g)
    ref = DiceCELoss(sigmoid=True, batch=True)(logits, label)
    assert float(unet.masked_dice_ce_loss(logits, label)) == pytest.approx(float(ref), rel=1e-5)


def test_training_labels_accept_0_1_2_and_0_255_only():
    assert unet.training_labels(np.array([0, 1, 2, 1])).tolist() == [0, 1, 2, 1]
    out = unet.training_labels(np.array([0, 255, 255, 0], dtype=np.uint8))
    assert out.dtype == np.uint8 and out.tolist() == [0, 1, 1, 0]
    assert unet.training_labels(np.array([True, False])).tolist() == [1, 0]
    with pytest.raises(InputError, match="x.nrrd holds the values 0, 3"):
        unet.training_labels(np.array([0, 3]), what="x.nrrd")
    with pytest.raises(InputError, match="0, 1, 255"):
        unet.training_labels(np.array([0, 1, 255]))


# ----------------------------------------------------------------------------- split


def test_split_blocks_partition_volumes_and_patches_stay_in_their_split():
    shapes = [(40, 50, 60), (24, 30, 33)]
    blocks = unet.split_blocks(shapes, patch_size=12, split_block_shape=16, val_fraction=0.2,
                               test_fraction=0.2, seed=3)
    maps = []
    for shape, bl in zip(shapes, blocks):
        cover = np.zeros(shape, int)
        for sl, _ in bl:
            cover[sl] += 1
        assert (cover == 1).all()  # every voxel in exactly one block
        maps.append(unet.split_map(shape, bl))
    assert {split for bl in blocks for _, split in bl} == {"train", "val", "test"}
    rng = np.random.default_rng(0)
    labels = [np.zeros(s, np.uint8) for s in shapes]
    labels[0][20:30, 20:30, 20:30] = 1
    for code, split in enumerate(unet.SPLITS):
        sampler = unet.PatchSampler(shapes, blocks, split, 12, labels=labels)
        assert sampler.positions > 0
        for vol, start in sampler.draw(200, rng, foreground_fraction=0.5):
            region = maps[vol][tuple(slice(s, s + 12) for s in start)]
            assert region.shape == (12, 12, 12) and (region == code).all()
    # brute force: the sampler's positions are exactly the starts whose patch lies in one split
    for code, split in enumerate(unet.SPLITS):
        sampler = unet.PatchSampler(shapes[1:], blocks[1:], split, 12)
        m = maps[1] == code
        brute = sum(m[z:z + 12, y:y + 12, x:x + 12].all() for z in range(13) for y in range(19) for x in range(22))
        assert sampler.positions == brute


def test_foreground_oversampling_draws_patches_with_foreground():
    shape = (32, 32, 32)
    label = np.zeros(shape, np.uint8)
    label[2:4, 2:4, 2:4] = 1
    blocks = unet.split_blocks([shape], patch_size=8, val_fraction=0, test_fraction=0)
    sampler = unet.PatchSampler([shape], blocks, "train", 8, labels=[label])
    rng = np.random.default_rng(1)
    hits = [label[tuple(slice(s, s + 8) for s in st)].any() for _, st in sampler.draw(50, rng, 1.0)]
    assert all(hits)
    plain = [label[tuple(slice(s, s + 8) for s in st)].any() for _, st in sampler.draw(50, rng, 0.0)]
    assert sum(plain) < 25


def test_split_needs_a_block_per_split():
    with pytest.raises(InputError, match="too few"):
        unet.split_blocks([(16, 16, 16)], patch_size=16)
    with pytest.raises(InputError, match="smaller than patch_size"):
        unet.split_blocks([(8, 40, 40)], patch_size=16)


def test_zoom_pads_labels_with_ignore_never_background():
    data = unet._PatchData([np.ones((16, 16, 16), np.float32)], [np.zeros((16, 16, 16), np.uint8)],
                           [(0, (0, 0, 0))], [0], (16, 16, 16),
                           unet.training_transforms(flip_prob=0, rotate_prob=0, zoom_prob=1.0, zoom_range=(0.75, 0.75),
                                                    noise_prob=0))
    image, label = data[0]
    assert image.shape == label.shape == (1, 16, 16, 16)
    assert set(torch.unique(label).tolist()) == {0.0, 2.0}
    assert (label[0, 0] == 2).all() and (label[0, 8, 8, 8] == 0)


# ----------------------------------------------------------------------------- training


def test_one_epoch_writes_checkpoints_and_resume_continues(em):
    image, truth = em
    saved = []
    best, history, metrics = unet.train_unet([(image, truth)], epochs=1, on_epoch=lambda *a: saved.append(a), **TINY)
    assert [r["epoch"] for r in history] == [1] and len(saved) == 1
    row, last, first_best = saved[0]
    assert first_best is not None and last["epoch"] == 1 and "optimizer" in last
    steps = -(-TINY["patches_per_epoch"] // TINY["batch_size"])
    assert int(last["optimizer"]["state"][0]["step"]) == steps
    assert 0 <= metrics["test"]["dice"] <= 1 and metrics["test"]["blocks"] == metrics["split"]["test"]["blocks"]
    assert all(0 <= b["dice"] <= 1 for b in metrics["test"]["per_block"])

    # a checkpoint survives torch.save / torch.load(weights_only=True)
    import io

    buf = io.BytesIO()
    torch.save(last, buf)
    buf.seek(0)
    last = torch.load(buf, weights_only=True)
    more = []
    _, history2, metrics2 = unet.train_unet([(image, truth)], epochs=2, resume=last,
                                            on_epoch=lambda *a: more.append(a), **TINY)
    assert [r["epoch"] for r in history2] == [1, 2] and metrics2["epochs_run"] == 2
    assert more[0][1]["epoch"] == 2
    assert int(more[0][1]["optimizer"]["state"][0]["step"]) == 2 * steps  # Adam state carried over
    model = unet.load_unet(best)
    assert isinstance(model, torch.nn.Module) and not model.training
    with pytest.raises(InputError, match="split"):  # another split would test on trained voxels
        unet.train_unet([(image, truth)], epochs=2, resume=last, **{**TINY, "seed": 1})


def test_training_is_deterministic_on_cpu(em):
    image, truth = em
    a, ha, _ = unet.train_unet([(image, truth)], epochs=1, seed=11, test_fraction=0, **TINY)
    b, hb, _ = unet.train_unet([(image, truth)], epochs=1, seed=11, test_fraction=0, **TINY)
    assert ha[0]["train_loss"] == hb[0]["train_loss"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    c, _, _ = unet.train_unet([(image, truth)], epochs=1, seed=12, test_fraction=0, **TINY)
    assert any(not torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])


def test_training_accepts_0_255_labels_and_rejects_other_values(em):
    image, truth = em
    _, history, _ = unet.train_unet([(image, truth * 255)], epochs=1, val_fraction=0, test_fraction=0,
                                    zoom_prob=0, **TINY)
    assert history[0]["val_dice"] is None and np.isfinite(history[0]["train_loss"])
    with pytest.raises(InputError, match="training label 0"):
        unet.train_unet([(image, truth * 3)], epochs=1, **TINY)
    with pytest.raises(InputError, match="multiple of 4"):
        unet.train_unet([(image, truth)], epochs=1, **{**TINY, "patch_size": 18})


def test_volume_normalization_is_recorded_and_checked(em):
    image, truth = em
    best, history, _ = unet.train_unet([(image, truth)], epochs=1, normalization="volume", test_fraction=0, **TINY)
    assert best["config"]["normalization"] == "volume" and np.isfinite(history[0]["train_loss"])
    with pytest.raises(InputError, match="normalization='global'"):
        unet.train_unet([(image, truth)], epochs=1, normalization="global", **TINY)


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("chunk_shape", [None, (12, 20, 16)])
def test_identity_and_constant_models_cover_every_voxel(chunk_shape):
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 10, (23, 37, 30)).astype(np.float32)  # not a multiple of the window
    mean, std = float(vol.mean()), float(vol.std())
    prob, mask, st = unet.predict_volume(Identity(), vol, roi_size=(8, 16, 8), overlap=(2, 4, 3), sw_batch_size=3,
                                         mean=mean, std=std, chunk_shape=chunk_shape, device="cpu")
    expected = 1 / (1 + np.exp(-(vol - mean) / std))
    assert prob.dtype == np.float16 and mask.dtype == np.uint8
    np.testing.assert_allclose(prob.astype(np.float32), expected, atol=1e-3)  # float16 rounding
    sure = np.abs(expected - 0.5) > 1e-5
    np.testing.assert_array_equal(mask[sure], (expected[sure] > 0.5).astype(np.uint8))
    prob, mask, st = unet.predict_volume(Constant(1.5), vol, roi_size=8, overlap=2, chunk_shape=chunk_shape,
                                         device="cpu")
    np.testing.assert_allclose(prob.astype(np.float32), 1 / (1 + np.exp(-1.5)), atol=5e-4)
    assert mask.all() and st["fraction_foreground"] == 1.0


def test_out_of_core_equals_in_memory(tmp_path):
    import zarr

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = unet.build_unet(channels=(4, 8), strides=(2,), num_res_units=1)
    rng = np.random.default_rng(1)
    vol = (rng.random((40, 66, 70)) * 200).astype(np.uint8)
    src = write_volume(tmp_path / "in.zarr", vol, 1.0)
    lazy = read_volume(src, lazy=True).data
    assert isinstance(lazy._array, zarr.Array)  # behind the checked reader
    kw = {"roi_size": 16, "overlap": 4, "sw_batch_size": 2, "device": "cpu"}
    p_mem, m_mem, st_mem = unet.predict_volume(model, vol, **kw)
    out_p = zarr.open_array(str(tmp_path / "p"), mode="w", shape=vol.shape, chunks=(12, 12, 12), dtype=np.float16)
    out_m = zarr.zeros(vol.shape, chunks=(12, 12, 12), dtype=np.uint8)
    p, m, st = unet.predict_volume(model, lazy, chunk_shape=24, out_prob=out_p, out_mask=out_m, **kw)
    assert p is out_p and st["blocks"] == 2 * 3 * 3 and st["chunk_shape"] == [24, 24, 24]
    assert st_mem["windows"] == 3 * 6 * 6 == st["windows"]  # each window evaluated once, in its own block
    assert st["mean"] == pytest.approx(st_mem["mean"]) and st["std"] == pytest.approx(st_mem["std"])
    np.testing.assert_array_equal(out_p[...], p_mem)  # to the bit, not within a tolerance
    np.testing.assert_array_equal(out_m[...], m_mem)
    assert st["foreground_voxels"] == st_mem["foreground_voxels"]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("shape, roi, overlap, chunks", [
    ((40, 66, 70), 16, 4, [None, 24, (12, 36, 24)]),
    ((23, 37, 30), (8, 16, 8), (2, 4, 3), [None, (12, 20, 16)]),  # windows reaching over up to three blocks
    ((10, 40, 41), 16, 5, [None, (16, 22, 11)]),  # z shorter than the window: MONAI pads it
])
def test_every_chunking_gives_monai_whole_volume_result_to_the_bit(blend, shape, roi, overlap, chunks):
    from monai.inferers import sliding_window_inference

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = unet.build_unet(channels=(4, 8), strides=(2,), num_res_units=1).eval()
    vol = (np.random.default_rng(1).random(shape) * 200).astype(np.float32)
    mean, std = float(vol.mean()), float(vol.std())
    roi3, ov3 = unet._triple_int(roi, "roi"), unet._triple_int(overlap, "overlap")
    x = (vol - np.float32(mean)) / np.float32(std)
    with torch.inference_mode():  # MONAI as it is, on the whole volume; its batches hold >= 2 windows here
        ref = sliding_window_inference(torch.from_numpy(x)[None, None], roi3, 2, model, mode=blend,
                                       overlap=[(o - 0.5) / r for o, r in zip(ov3, roi3)])
        ref = torch.sigmoid(ref[0, 0]).numpy()
    for chunk_shape in chunks:
        prob, mask, st = unet.predict_volume(model, vol, roi_size=roi, overlap=overlap, sw_batch_size=2, mean=mean,
                                             std=std, chunk_shape=chunk_shape, blend=blend, device="cpu",
                                             progress=False)
        assert st["blocks"] > 1 or chunk_shape is None
        np.testing.assert_array_equal(prob, ref.astype(np.float16), err_msg=f"chunk_shape={chunk_shape}")
        np.testing.assert_array_equal(mask, (ref > 0.5).astype(np.uint8), err_msg=f"chunk_shape={chunk_shape}")


def test_the_network_always_gets_full_batches():
    """A block's last batch is filled with repeats (on the CPU one window alone gives other float
    noise than two), so that no window's logits depend on the chunking."""

    class Recording(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.batches = net, []

        def forward(self, x):
            self.batches.append(int(x.shape[0]))
            return self.net(x)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Recording(unet.build_unet(channels=(4, 8), strides=(2,), num_res_units=1))
    vol = np.random.default_rng(2).normal(size=(28, 40, 40)).astype(np.float32)
    kw = {"roi_size": 16, "overlap": 4, "sw_batch_size": 4, "mean": 0.0, "std": 1.0, "device": "cpu"}
    p_mem, m_mem, st_mem = unet.predict_volume(model, vol, **kw)  # 2 x 3 x 3 = 18 windows
    assert st_mem["windows"] == 18 and st_mem["evaluations"] == 20 and set(model.batches) == {4}
    model.batches.clear()
    p, m, st = unet.predict_volume(model, vol, chunk_shape=(12, 24, 24), **kw)
    assert st["blocks"] == 3 * 2 * 2 and st["windows"] == 18 and st["evaluations"] > 18
    assert set(model.batches) == {4}
    np.testing.assert_array_equal(p, p_mem)
    np.testing.assert_array_equal(m, m_mem)


def test_tta_averages_flips():
    rng = np.random.default_rng(2)
    vol = rng.normal(0, 1, (20, 24, 28)).astype(np.float32)
    plain, _, _ = unet.predict_volume(Identity(), vol, roi_size=16, overlap=4, mean=0, std=1, device="cpu")
    tta, mask, st = unet.predict_volume(Identity(), vol, roi_size=16, overlap=4, mean=0, std=1, tta=True,
                                        device="cpu")
    assert st["tta"] and tta.shape == vol.shape and mask.shape == vol.shape
    np.testing.assert_array_equal(tta, plain)  # a flip-equivariant model: TTA changes nothing
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = unet.build_unet(channels=(4, 8), strides=(2,), num_res_units=0)
    tta, _, _ = unet.predict_volume(model, vol, roi_size=16, overlap=4, tta=True, device="cpu")
    assert tta.shape == vol.shape and np.all((tta >= 0) & (tta <= 1)) and np.isfinite(tta).all()


def test_predict_volume_checks_its_settings():
    vol = np.zeros((16, 16, 16), np.float32)
    model = unet.build_unet(channels=(4, 8), strides=(2,), num_res_units=0)
    with pytest.raises(InputError, match="overlap"):
        unet.predict_volume(model, vol, roi_size=8, overlap=8, device="cpu")
    with pytest.raises(InputError, match="multiple of 2"):
        unet.predict_volume(model, vol, roi_size=9, overlap=2, device="cpu")
    with pytest.raises(InputError, match="device='gpu'"):
        unet.predict_volume(model, vol, roi_size=8, overlap=2, device="gpu")
    with pytest.raises(InputError, match="not a maskworks U-Net checkpoint"):
        unet.load_unet({"state_dict": {}})


def test_intensity_stats_subsample_and_slabs(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.normal(50, 7, (30, 40, 50)).astype(np.float32)
    mean, std = unet.intensity_stats(vol)
    assert mean == pytest.approx(float(vol.mean(dtype=np.float64)), rel=1e-9)
    assert std == pytest.approx(float(vol.std(dtype=np.float64)), rel=1e-9)
    lazy = read_volume(write_volume(tmp_path / "v.zarr", vol, 1.0, chunks=(8, 8, 8)), lazy=True).data
    m2, s2 = unet.intensity_stats(lazy, max_voxels=5000)
    sub = vol[::3, ::3, ::3].astype(np.float64)
    assert m2 == pytest.approx(sub.mean(), rel=1e-9) and s2 == pytest.approx(sub.std(), rel=1e-9)
    assert unet.intensity_stats(np.full((4, 4, 4), 3.0)) == (3.0, 1.0)


def test_inference_chunk_shape_rounds_to_window_steps():
    assert unet.inference_chunk_shape((500, 500, 500), (100, 130, 20), 64, 16) == (96, 96, 48)
    assert unet.inference_chunk_shape((30, 500, 500), 256, 64, 16) == (30, 240, 240)
    assert unet.inference_chunk_shape((30, 30, 30), None) is None


def test_automatic_patches_per_epoch_covers_the_train_blocks_once():
    blocks = unet.split_blocks([(32, 64, 64)], patch_size=16, split_block_shape=16, val_fraction=0.25,
                               test_fraction=0.25, seed=0)
    train = sum(1 for _, split in blocks[0] if split == "train")
    assert unet.auto_patches_per_epoch(blocks, (16, 16, 16)) == train  # one 16³ block = one 16³ patch
    assert unet.auto_patches_per_epoch(blocks, (16, 16, 16), batch_size=64) == 64  # at least one batch
    big = unet.split_blocks([(1024, 1024, 1024)], patch_size=16, split_block_shape=256, seed=0)
    assert unet.auto_patches_per_epoch(big, (16, 16, 16)) == unet.MAX_AUTO_PATCHES


def test_training_without_patches_per_epoch_draws_the_automatic_number(em):
    image, truth = em
    tiny = {k: v for k, v in TINY.items() if k != "patches_per_epoch"}
    _, history, metrics = unet.train_unet([(image, truth)], epochs=1, **tiny)
    assert history and np.isfinite(history[0]["train_loss"])
