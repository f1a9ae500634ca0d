"""CI checks of the recipe's code paths (no real training).

    models/train/.venv/bin/python -m pytest models/train/tests -q

The end-to-end test runs `run.py --quick` (a handful of base images, one optimisation step per
stage) and needs the image collection (env SGPS_DATA, default ../shared/data); it is skipped
with a message when the data is absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from sgps_train import data, lite0, synth  # noqa: E402


def data_dir() -> Path:
    return Path(os.environ.get("SGPS_DATA", HERE.parent.parent.parent / "shared" / "data"))


def need_data() -> Path:
    """The image collection, or a skip that says why (a failure under CI=true: a green CI must
    mean the tests ran)."""
    d = data_dir()
    if not (d / "manifest.csv").exists():
        msg = f"data not found at {d} (set SGPS_DATA)"
        if os.environ.get("CI") in ("true", "1"):
            pytest.fail(msg + "; CI=true: a missing requirement fails instead of skipping")
        pytest.skip(msg)
    return d


def test_untrained_synthesizer_is_exact_imprinting():
    torch.manual_seed(0)
    g = synth.Synthesizer(dim=32, text_dim=8).eval()
    sup = torch.randn(3, 4, 32)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    text = torch.randn(3, 8)
    w, b, s = g(sup, mask, text, torch.ones(3))
    proto = (sup * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    proto = proto / proto.norm(dim=-1, keepdim=True)
    assert torch.allclose(w, proto, atol=1e-5)
    assert torch.all(b == 0)
    assert s.shape == (1,)


def test_domain_reading_places_the_two_domains_apart_and_untrained_g_stays_imprinting():
    from sgps_train import conditions, meta

    rng = np.random.default_rng(0)
    axis = np.zeros(32, np.float32)
    axis[0] = 1.0
    emb = {}
    for i in range(6):  # dermoscopic classes lean one way along axis 0, clinical photos the other
        emb[f"isic/d{i}" if i < 3 else f"derm7pt/d{i}"] = (rng.normal(size=(5, 32)) + 3 * axis).astype(np.float32)
        emb[f"dermnet/c{i}"] = (rng.normal(size=(5, 32)) - 3 * axis).astype(np.float32)
    g = synth.Synthesizer(dim=32, text_dim=8, domain=True).eval()
    conditions.set_domain(g, emb)
    means = meta.class_means(emb)
    read = {c: float(torch.from_numpy(m) @ g.domain_w + g.domain_b) for c, m in means.items()}
    derm = [v for c, v in read.items() if conditions.is_dermoscopic(c)]
    clin = [v for c, v in read.items() if not conditions.is_dermoscopic(c)]
    assert abs(np.mean(derm) - 0.5) < 1e-5 and abs(np.mean(clin) + 0.5) < 1e-5
    assert min(derm) > max(clin)
    # the ninth feature enters G, yet with its zero-initialised outputs G is still imprinting
    sup = torch.from_numpy(np.stack([emb["isic/d0"][:2], emb["dermnet/c3"][:2]]))
    w, b, _ = g(sup, torch.ones(2, 2), torch.randn(2, 8), torch.ones(2))
    assert g.inp.in_features == synth.Synthesizer.N_FEATS + 1
    assert torch.allclose(w, synth.l2n(sup.mean(1)), atol=1e-5) and torch.all(b == 0)
    # the domain reading is fitted on training classes only
    with pytest.raises(RuntimeError, match="novel"):
        conditions.set_domain(g, emb | {"isic/dermatofibroma": emb["isic/d0"]})


def test_dermoscopic_task_pool_is_a_training_switch_of_its_own(monkeypatch):
    """`+derm_pool`: G's dermoscopic meta-training tasks draw from every dermoscopic class (ISIC base and
    derm7pt), without the domain feature: same exported graph as the shipped form."""
    from sgps_train import conditions, meta

    g = conditions.make_g(conditions.CONFIGS["text_and_image_delta+derm_pool"], 32, 8)
    assert g.derm_pool and not g.domain and g.inp.in_features == synth.Synthesizer.N_FEATS
    assert conditions.make_g(conditions.CONFIGS["text_and_image_delta+domain"], 32, 8).derm_pool
    assert not conditions.make_g(conditions.CONFIGS["text_and_image_delta"], 32, 8).derm_pool
    rng = np.random.default_rng(2)
    emb = {k: rng.normal(size=(6, 32)).astype(np.float32)
           for k in ["isic/a", "isic/b", "derm7pt/c", "derm7pt/d", "dermnet/e", "dermnet/f", "sd198/g"]}
    texts = {k: rng.normal(size=(3, 8)).astype(np.float32) for k in emb}
    tw = {k: rng.normal(size=32).astype(np.float32) for k in emb}
    pools = {flag: meta.TaskSampler(emb, tw, texts, np.random.default_rng(0), derm_pool=flag).isic for flag in (False, True)}
    assert sorted(pools[False]) == ["isic/a", "isic/b"]
    assert sorted(pools[True]) == ["derm7pt/c", "derm7pt/d", "isic/a", "isic/b"]
    # meta-training hands the switch to its sampler
    seen = []
    orig = meta.TaskSampler

    def spy(*a, **kw):
        seen.append(kw["derm_pool"])
        return orig(*a, **kw)

    monkeypatch.setattr(meta, "TaskSampler", spy)
    tr, va = conditions.split_images(emb, 0.8, 0)
    meta.meta_train(g, tr, va, texts, quick=True, seed=0, steps=4)
    assert seen == [True]


def test_calibrating_g_pulls_prototypes_toward_near_base_means_and_hides_an_episodes_own_classes():
    from sgps_train import conditions, episodes

    rng = np.random.default_rng(1)
    emb = {f"dermnet/c{i}": rng.normal(size=(4, 32)).astype(np.float32) for i in range(5)}
    emb["blood_cells/x"] = rng.normal(size=(4, 32)).astype(np.float32)
    g = synth.Synthesizer(dim=32, text_dim=8, calib=True, calib_kappa=1.0).eval()
    conditions.set_memory(g, emb)
    assert g.memory_keys == [f"dermnet/c{i}" for i in range(5)]  # skin classes only
    mem = g.memory.numpy()
    # one shot sitting on class c2's mean: the prototype moves toward it (softmax at calib_temp picks it)
    shot = torch.from_numpy(mem[2] + 0.3 * rng.normal(size=32).astype(np.float32))[None, None]
    other = torch.from_numpy(rng.normal(size=(1, 1, 32)).astype(np.float32))
    sup = torch.cat([shot, other])
    w, b, _ = g(sup, torch.ones(2, 1), torch.zeros(2, 8), torch.zeros(2))
    proto = synth.l2n(sup[:, 0])
    assert torch.allclose(w, synth.l2n(proto + g.neighbours(proto)), atol=1e-5) and torch.all(b == 0)
    # a prior worth kappa shots: with 4 shots the same mean moves a quarter as far
    w4s, _, _ = g(sup.expand(2, 4, 32), torch.ones(2, 4), torch.zeros(2, 8), torch.zeros(2))
    assert torch.allclose(w4s, synth.l2n(proto + 0.25 * g.neighbours(proto)), atol=1e-5)
    cos = lambda a, v: float(synth.l2n(a.detach()) @ torch.from_numpy(v))
    assert cos(w[0], mem[2]) > cos(proto[0], mem[2]) + 0.05
    # an episode on base class c2 must not see c2's own mean: hidden, the pull toward it is gone
    ex = g.memory_exclude(["dermnet/c2", "dermnet/zz"])
    assert ex.tolist() == [0, 0, 1, 0, 0]
    w2, _, _ = g(sup, torch.ones(2, 1), torch.zeros(2, 8), torch.zeros(2), memory_exclude=ex)
    assert cos(w2[0], mem[2]) < cos(w[0], mem[2]) - 0.05
    # run_g hides the episode's classes by itself
    w3, _, _ = episodes.run_g(g, sup.numpy(), np.zeros((2, 8), np.float32), np.zeros(2, np.float32), None, ["dermnet/c2"])
    assert torch.allclose(w3, w2, atol=1e-6)
    # a class without shots (text only) is left as the projected text
    text = torch.randn(2, 8)
    w4, _, _ = g(torch.zeros(2, 1, 32), torch.zeros(2, 1), text, torch.ones(2))
    assert torch.allclose(w4, synth.l2n(g.text_proj(text)), atol=1e-6)
    # the memory holds training classes only
    with pytest.raises(RuntimeError, match="novel"):
        conditions.set_memory(g, emb | {"isic/vascular_lesion": emb["dermnet/c0"]})


def test_calibrating_g_exports_with_its_memory_and_matches_onnxruntime(tmp_path):
    from sgps_train import conditions, export

    rng = np.random.default_rng(2)
    g = synth.Synthesizer(dim=32, text_dim=8, calib=True)
    conditions.set_memory(g, {f"sd198/c{i}": rng.normal(size=(3, 32)).astype(np.float32) for i in range(7)})
    with torch.no_grad():  # every part exercised (the heads start at zero)
        for lin in (g.coef, g.bias_head, g.scale_head):
            lin.weight.normal_(0, 0.1)
    g.eval()
    (tmp_path / "ref").mkdir()
    # raises if onnxruntime and PyTorch disagree; the memory is a constant of the graph, no new input
    export.export_synth_checked(g, tmp_path / "synthesizer.onnx", tmp_path / "ref", rng.normal(size=(3, 8)).astype(np.float32))
    import onnx

    m = onnx.load(str(tmp_path / "synthesizer.onnx"))
    assert [i.name for i in m.graph.input] == ["support", "support_mask", "text", "text_mask"]


def test_dermoscopic_only_calibration_leaves_clinical_prototypes_and_exports(tmp_path):
    from sgps_train import conditions, export

    rng = np.random.default_rng(3)
    # two imaging domains: dermoscopic classes around +u, clinical photos around -u
    u = rng.normal(size=32).astype(np.float32)
    emb = {f"derm7pt/d{i}": (2 * u + rng.normal(size=(4, 32))).astype(np.float32) for i in range(3)}
    emb |= {f"dermnet/c{i}": (-2 * u + rng.normal(size=(4, 32))).astype(np.float32) for i in range(3)}
    g = conditions.make_g(conditions.CONFIGS["text_and_image_delta+calib_derm"], 32, 8)
    conditions.set_domain(g, emb)
    conditions.set_memory(g, emb)
    g.eval()
    sup = torch.from_numpy(np.stack([emb["derm7pt/d0"][:1] + 0.1, emb["dermnet/c0"][:1] + 0.1]))
    w, _, _ = g(sup, torch.ones(2, 1), torch.zeros(2, 8), torch.zeros(2))
    proto = synth.l2n(sup[:, 0])
    # the dermoscopic class is calibrated, the clinical one keeps its prototype
    assert torch.allclose(w[0], synth.l2n(proto[:1] + g.calib_kappa * g.neighbours(proto[:1]))[0], atol=1e-5)
    assert torch.allclose(w[1], proto[1], atol=1e-6)
    (tmp_path / "ref").mkdir()
    export.export_synth_checked(g, tmp_path / "synthesizer.onnx", tmp_path / "ref", rng.normal(size=(3, 8)).astype(np.float32))
    # the domain reading, like the memory, is fitted on training classes only
    with pytest.raises(RuntimeError, match="novel"):
        conditions.set_domain(g, emb | {"isic/dermatofibroma": emb["derm7pt/d0"]})


def test_text_only_class_falls_back_to_projected_text():
    g = synth.Synthesizer(dim=32, text_dim=8).eval()
    sup = torch.zeros(2, 1, 32)
    mask = torch.zeros(2, 1)
    text = torch.randn(2, 8)
    w, _, _ = g(sup, mask, text, torch.ones(2))
    tw = synth.l2n(g.text_proj(text))
    assert torch.allclose(w, tw, atol=1e-5)
    assert torch.isfinite(w).all()


def test_lite0_same_padding_shapes():
    m = lite0.Lite0().eval()
    with torch.no_grad():
        f = m.features(torch.zeros(1, 3, 224, 224))
    assert f.shape == (1, lite0.FEATURE_DIM)


def test_preprocess_shape_and_range():
    from PIL import Image

    im = Image.fromarray((np.random.default_rng(0).random((28, 40, 3)) * 255).astype(np.uint8))
    x = data.to_tensor(data.resize_center_crop(im), lite0.MEAN, lite0.STD)
    assert x.shape == (3, 224, 224)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_split_never_contains_novel_classes():
    d = need_data()
    items = data.read_manifest(d)
    base = data.base_items(items)
    assert base
    assert not any((it.dataset, it.cls) in data.NOVEL for it in base)
    assert not any(it.dataset == "isic_unlabelled" for it in base)


def test_quick_recipe_end_to_end(tmp_path):
    d = need_data()
    import run

    out = tmp_path / "models"
    run.main(["--data", str(d), "--out", str(out), "--work", str(tmp_path / "work"), "--quick"])
    m = json.loads((out / "manifest.json").read_text())
    # one file of each encoder (int8 image only on request, int8 text no longer); the text file also
    # runs in float16 arithmetic for the boards with float16 hardware (`precision: f16`)
    assert list(m["image_encoder"]["variants"]) == ["fp32"]
    te = m["text_encoder"]
    assert sorted(te["variants"]) == ["f16", "f16w"] and te["default_variant"] == "f16w"
    assert te["variants"]["f16"]["file"] == te["variants"]["f16w"]["file"]
    assert te["variants"]["f16"]["precision"] == "f16" and "precision" not in te["variants"]["f16w"]
    texts_ref = json.loads((out / "reference" / "texts.json").read_text())
    assert texts_ref and all(t["variant"] == "f16w" and t["single"] for t in texts_ref)
    for entry in (m["image_encoder"]["variants"]["fp32"], m["text_encoder"]["variants"]["f16w"], m["synthesizer"]):
        p = out / entry["file"]
        assert p.exists()
        from sgps_train.export import sha256

        assert sha256(p) == entry["sha256"]
    assert (out / "tokenizer.json").exists()
    refs = json.loads((out / "reference" / "images.json").read_text())
    assert refs and all((out / "reference" / r["input"]).exists() for r in refs)
    assert 0.0 < m["head"]["refer_threshold"] < 1.0
    # the conditions stage ran after the encoder stage and recorded its fold check
    cond = m["provenance"]["conditions"]
    from sgps_train import conditions

    assert cond["chosen"] in conditions.CONFIGS
    assert cond["fold_check"]["folds"] and cond["base_classes"] > 16
    # every candidate was scored on the folds, the domain-aware and the calibrating G included
    assert all(set(conditions.CONFIGS) <= set(f) for f in cond["fold_check"]["folds"])
    assert m["synthesizer"]["enabled"]["domain"] == (cond["chosen"] == "text_and_image_delta+domain")
    assert m["synthesizer"]["enabled"]["dermoscopic_task_pool"] == (
        cond["chosen"] in ("text_and_image_delta+derm_pool", "text_and_image_delta+domain"))
    assert bool(m["synthesizer"]["enabled"]["calib"]) == (cond["chosen"] == "text_and_image_delta+calib")
    # the supervised stage ran between them, checked a fold, and the conditions stage used its encoder
    sup = m["provenance"]["supervised_encoder"]
    assert sup["fold_check"]["folds"] and sup["fold_check"]["chosen"] in ("start", "finetuned", "finetuned_anchor")
    assert ("finetuned_anchor" in sup["fold_check"]["folds"][0]) == (supervise_anchor() is not None)
    assert sup["output_sha256"] == m["image_encoder"]["variants"]["fp32"]["sha256"] == cond["image_encoder_sha256"]
    # an encoder trained on the base labels never scores the conditions folds it was trained on
    trained_on_labels = sup["fold_check"]["chosen"] != "start"
    assert ("trained without it" in cond["fold_check"]["embeddings"]) == trained_on_labels
    assert m["head"]["calibration"]["embeddings"] == cond["fold_check"]["embeddings"]


def test_ssl_trains_every_layer_from_augmented_views_and_needs_two_images():
    from sgps_train import ssl

    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    pool = torch.from_numpy((rng.random((4, 3, 40, 40)) * 255).astype(np.uint8))
    v1, v2 = ssl.augment(pool, 32, gen), ssl.augment(pool, 32, gen)
    assert v1.shape == (4, 3, 32, 32) and torch.isfinite(v1).all()
    assert not torch.equal(v1, v2), "two views of the same images must differ"
    # the NT-Xent loss is lower when each view's partner is its own other view
    z = torch.randn(4, 8)
    assert ssl.nt_xent(z, z + 0.01 * torch.randn(4, 8)) < ssl.nt_xent(z, torch.randn(4, 8))
    m = lite0.Lite0().eval()
    with pytest.raises(ValueError, match="at least 2 images"):
        ssl.train(m, pool[:1], epochs=1)
    t = ssl.train(m, pool, epochs=1, max_steps=1)
    before, after = dict(m.named_parameters()), dict(t.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for first_and_last in ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_conv_head.weight"):
        assert first_and_last in changed, first_and_last
    assert not any(n.startswith("_fc.") for n in changed), "the ImageNet classifier is not part of the encoder"


def test_ssl_resumes_a_cut_run_exactly_from_its_checkpoint(tmp_path):
    from sgps_train import ssl

    rng = np.random.default_rng(1)
    pool = torch.from_numpy((rng.random((4, 3, 40, 40)) * 255).astype(np.uint8))
    m = lite0.Lite0().eval()
    ck = tmp_path / "resume.pt"
    uncut = ssl.train(m, pool, epochs=2, seed=3, checkpoint=ck)
    # the checkpoint holds the state after epoch 1 of 2 (none is written after the last); a run that
    # finds it does only epoch 2 and must end where the uncut run ended
    assert ck.exists() and torch.load(ck, weights_only=True)["epoch"] == 0
    resumed = ssl.train(m, pool, epochs=2, seed=3, checkpoint=ck)
    a, b = uncut.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and it did not start from the ImageNet weights again: one epoch from scratch ends elsewhere
    one = ssl.train(m, pool, epochs=1, seed=3)
    assert not torch.equal(one.state_dict()["_conv_stem.weight"], a["_conv_stem.weight"])


def test_supervised_finetune_resumes_a_cut_run_exactly_from_its_checkpoint(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sgps_train import export, supervise

    rng = np.random.default_rng(4)
    pool = torch.from_numpy((rng.random((6, 3, 40, 40)) * 255).astype(np.uint8))
    items = [SimpleNamespace(key=k) for k in ("isic/nevus", "isic/nevus", "dermnet/a", "dermnet/a", "sd198/b", "sd198/b")]
    idx = np.arange(6)
    monkeypatch.setattr(supervise, "BATCH", 4)
    monkeypatch.setattr(supervise, "SIZE", 48)
    monkeypatch.setattr(supervise, "CENTRE_IMAGES", 6)

    def run(**kw):
        torch.manual_seed(0)
        enc = export.ImageEncoder(lite0.Lite0().eval(), torch.full((lite0.FEATURE_DIM,), 0.1), power=True)
        supervise.finetune(enc, items, pool, idx, seed=3, quick=True, **kw)
        return enc.state_dict()

    steps = []  # one augmented batch per training step
    augment = supervise.ssl.augment
    monkeypatch.setattr(supervise.ssl, "augment", lambda *a: steps.append(1) or augment(*a))
    uncut = run()
    assert len(steps) == 2  # quick: 2 steps
    ck = tmp_path / "sup.resume.pt"
    # a checkpoint after step 1 (none after the last); a run that finds it does only step 2 and must
    # end exactly where the uncut run ended
    cut = run(checkpoint=ck, checkpoint_every=1)
    assert ck.exists() and torch.load(ck, weights_only=False)["step"] == 1
    steps.clear()
    resumed = run(checkpoint=ck, checkpoint_every=1)
    assert len(steps) == 1
    for a in (cut, resumed):
        assert all(torch.equal(uncut[k], a[k]) for k in uncut)
    assert not torch.equal(uncut["backbone._conv_stem.weight"], lite0.Lite0().state_dict()["_conv_stem.weight"])


def test_ssl_low_memory_recomputation_trains_exactly_like_the_plain_run():
    from sgps_train import ssl

    rng = np.random.default_rng(2)
    pool = torch.from_numpy((rng.random((6, 3, 40, 40)) * 255).astype(np.uint8))
    m = lite0.Lite0().eval()
    plain = ssl.train(m, pool, epochs=2, seed=5)
    low = ssl.train(m, pool, epochs=2, seed=5, low_memory=True)
    a, b = plain.state_dict(), low.state_dict()
    # weights and the batch-norm running statistics (updated once per step, not twice)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    assert torch.equal(a["_bn0.num_batches_tracked"], b["_bn0.num_batches_tracked"])
    assert not torch.equal(a["_bn0.running_mean"], m.state_dict()["_bn0.running_mean"])


def test_larger_lite_variants_load_their_imagenet_weights_and_round_trip_through_onnx(tmp_path):
    from sgps_train import export, supervise

    # every variant's convolution shapes name it and no other
    for v in lite0.WIDTH_DEPTH:
        shapes = [tuple(c.weight.shape) for c in lite0.Lite0(variant=v).modules() if isinstance(c, torch.nn.Conv2d)]
        assert lite0.variant_of(shapes) == v
    with pytest.raises(RuntimeError, match="match no EfficientNet-Lite variant"):
        lite0.variant_of([(32, 3, 3, 3)])
    # Lite1 (in requirements.txt): the packaged weights load strictly; 21 blocks, the last one is the top
    m = lite0.load_imagenet(lite0.pth_path("lite1"), "lite1")
    assert len(m._blocks) == 21 and m._conv_head.in_channels == 320
    from sgps_train import adapt

    assert adapt.split_block(m) == 20 and adapt.split_block(lite0.Lite0()) == 15
    # an export of it is rebuilt as Lite1 by the supervised stage, equal to onnxruntime
    enc = export.ImageEncoder(m, torch.rand(lite0.FEATURE_DIM) * 0.1, power=True).eval()
    path = tmp_path / "lite1.onnx"
    export.export_image_encoder(enc, path)
    back = supervise.rebuild(path)
    assert back.backbone.variant == "lite1"
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        a = back(torch.from_numpy(x)).numpy()
    assert np.abs(a - export.ort_session(path).run(["embedding"], {"image": x})[0]).max() < 1e-4
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        lite0.pth_path("lite9")


def test_ssl_views_honour_the_crop_area():
    from sgps_train import ssl

    # a crop of the whole image of a flat image, without jitter, is that image
    flat = torch.full((1, 3, 40, 40), 128, dtype=torch.uint8)
    keep = ssl.JITTER
    try:
        ssl.JITTER = 0.0
        v = ssl.augment(flat, 16, torch.Generator().manual_seed(0), (1.0, 1.0))
    finally:
        ssl.JITTER = keep
    assert torch.allclose(v, ssl.normalise(torch.full((1, 3, 16, 16), 128 / 255)), atol=1e-5)


def test_ssl_byol_option_trains_with_a_moving_average_target_and_leaves_the_default_alone(monkeypatch):
    from sgps_train import ssl

    rng = np.random.default_rng(3)
    pool = torch.from_numpy((rng.random((4, 3, 40, 40)) * 255).astype(np.uint8))
    m = lite0.Lite0().eval()
    # off (the recipe): SimCLR, and the settings (cache keys) do not mention the option
    assert ssl.OBJECTIVE == "simclr" and "objective" not in ssl.settings()
    off = ssl.train(m, pool, epochs=1, max_steps=1)
    # the target is the moving average of the online network: tau = BYOL_TAU at the start, 1 at the end
    byol = ssl.BYOL(m, torch.device("cpu"))
    t0 = byol.target["proj"][0].weight.clone()
    with torch.no_grad():
        byol.proj[0].weight.add_(1.0)
    byol.update(m, 1.0)
    assert torch.equal(byol.target["proj"][0].weight, t0)
    byol.update(m, 0.0)
    assert torch.allclose(byol.target["proj"][0].weight, t0 + (1 - ssl.BYOL_TAU), atol=1e-6)
    # on: trains every layer to a different result, and the key says so
    monkeypatch.setattr(ssl, "OBJECTIVE", "byol")
    assert ssl.settings()["objective"] == "byol"
    on = ssl.train(m, pool, epochs=1, max_steps=1)
    w = "_conv_head.weight"
    assert torch.isfinite(dict(on.named_parameters())[w]).all()
    assert not torch.equal(dict(on.named_parameters())[w], dict(m.named_parameters())[w])
    assert not torch.equal(dict(on.named_parameters())[w], dict(off.named_parameters())[w])
    # a misspelt objective is refused rather than silently trained as SimCLR
    monkeypatch.setattr(ssl, "OBJECTIVE", "BYOL")
    with pytest.raises(ValueError, match="'simclr' or 'byol'"):
        ssl.train(m, pool, epochs=1, max_steps=1)


def test_nt_xent_uses_the_temperature_set_when_called(monkeypatch):
    from sgps_train import ssl

    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    monkeypatch.setattr(ssl, "TEMPERATURE", 0.1)
    cold = ssl.nt_xent(z1, z2)
    monkeypatch.setattr(ssl, "TEMPERATURE", 1.0)
    assert torch.allclose(ssl.nt_xent(z1, z2), ssl.nt_xent(z1, z2, temperature=1.0))
    assert not torch.allclose(ssl.nt_xent(z1, z2), cold)
    assert ssl.settings()["temperature"] == 1.0


def test_finetune_trains_every_layer_keeps_the_best_validated_epoch_and_needs_two_classes(monkeypatch):
    from sgps_train import adapt, finetune

    rng = np.random.default_rng(0)
    items = [data.Item(f"x/{c}/{i}.png", "isic" if c < 2 else "other", f"c{c}") for c in range(5) for i in range(2)]
    pool = torch.from_numpy((rng.random((len(items), 3, 40, 40)) * 255).astype(np.uint8))
    m = lite0.Lite0().eval()
    start = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="at least 2 base classes"):
        finetune.finetune(m, pool[:2], items[:2], pool, items, quick=True)
    # validation improves after the step: the trained weights are returned
    scores = iter([(0.3, 0.3), (0.6, 0.6)])
    monkeypatch.setattr(adapt, "proto_score", lambda *a, **k: next(scores))
    t, report = finetune.finetune(m, pool, items, pool, items, quick=True)
    assert report["classes"] == 5 and report["selected_epoch"] == 1
    changed = {n for n, p in t.named_parameters() if not torch.equal(start[n], p)}
    for first_and_last in ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_blocks.15._project_conv.weight", "_conv_head.weight"):
        assert first_and_last in changed, first_and_last
    assert not any(n.startswith("_fc.") for n in changed), "the ImageNet classifier is not part of the encoder"
    assert all(torch.equal(start[n], p) for n, p in m.named_parameters()), "the input model is left alone"
    # validation gets worse: the starting weights are kept
    scores = iter([(0.6, 0.6), (0.3, 0.3)])
    t, report = finetune.finetune(m, pool, items, pool, items, quick=True)
    assert report["selected_epoch"] == 0
    assert all(torch.equal(start[n], p) for n, p in t.named_parameters())


def test_finetune_trains_the_epoch_count_its_cache_key_records(monkeypatch):
    # finetune_cached keys the weights by settings(); the training must use the same EPOCHS, read
    # when called (a default bound at import time trained 6 epochs under a key saying 2)
    from sgps_train import adapt, finetune

    rng = np.random.default_rng(1)
    items = [data.Item(f"x/{c}/{i}.png", "isic", f"c{c}") for c in range(2) for i in range(2)]
    pool = torch.from_numpy((rng.random((len(items), 3, 40, 40)) * 255).astype(np.uint8))
    monkeypatch.setattr(finetune, "EPOCHS", 2)
    monkeypatch.setattr(adapt, "proto_score", lambda *a, **k: (0.5, 0.5))
    _, report = finetune.finetune(lite0.Lite0().eval(), pool, items, pool, items)
    assert finetune.settings()["epochs"] == report["epochs"] == 2
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]


# ---------------------------------------------------------------- conditions stage (251 base classes)

NOVEL_DESCRIPTIONS_SHA256 = "f9b24e05d0d4de2224c43c0eb1e44a7cf2b01d4085b16a9418f93568db4067de"


def test_descriptions_cover_every_base_condition_and_the_novel_ones_are_untouched():
    import hashlib

    desc = json.loads((HERE / "descriptions.json").read_text())
    # written before any text result; never edited after seeing a figure
    novel = json.dumps(desc["novel"], sort_keys=True, ensure_ascii=False).encode()
    assert hashlib.sha256(novel).hexdigest() == NOVEL_DESCRIPTIONS_SHA256
    assert not set(desc["base"]) & set(desc["novel"])
    assert all(len(v) >= 3 and all(len(t) >= 40 for t in v) for v in desc["base"].values())
    d = need_data()
    keys = {it.key for it in data.all_base_items(data.read_manifest(d))}
    assert len(keys) == 251
    assert keys <= set(desc["base"]), sorted(keys - set(desc["base"]))[:5]


def test_conditions_never_read_novel_classes_and_folds_partition_the_classes():
    from sgps_train import conditions

    d = need_data()
    base = data.all_base_items(data.read_manifest(d))
    keys = sorted({it.key for it in base})
    assert not any((it.dataset, it.cls) in data.NOVEL for it in base)
    assert {k.split("/")[0] for k in keys} >= {"dermnet", "sd198", "derm7pt", "isic", "chest_xray"}
    with pytest.raises(RuntimeError, match="novel"):
        conditions.check_no_novel(keys + ["isic/dermatofibroma"])
    conditions.check_no_novel(keys)
    folds = conditions.make_folds(keys)
    flat = [c for f in folds for c in f]
    assert sorted(flat) == keys  # every class in exactly one fold
    derm = [sum(conditions.is_dermoscopic(c) for c in f) for f in folds]
    assert derm == [4] * conditions.FOLDS  # 4 ISIC base + 12 derm7pt, dealt evenly: 4-way per fold
    assert conditions.make_folds(keys) == folds  # seeded


def test_fold_score_weighs_dermoscopy_and_skin_equally():
    from sgps_train import conditions

    rows = [{"a": {"derm_1": 0.4, "derm_5": 0.6, "skin_1": 0.8, "skin_5": 1.0, "derm_0": 0.3, "skin_0": 0.2}}]
    s = conditions.fold_score(rows, "a")
    assert abs(s["derm"] - 0.5) < 1e-9 and abs(s["skin"] - 0.9) < 1e-9
    assert abs(s["score"] - 0.7) < 1e-9


def test_selection_rule_takes_a_later_candidate_only_for_a_clear_gain_without_a_dermoscopy_loss():
    from sgps_train import conditions

    g = conditions.MIN_GAIN
    means = {"a": {"score": 0.60, "derm": 0.60}, "b": {"score": 0.60 + g / 2, "derm": 0.70},
             "c": {"score": 0.60 + 2 * g, "derm": 0.60 - 2 * g}, "d": {"score": 0.60 + 2 * g, "derm": 0.60}}
    assert conditions.choose_simplest(dict(list(means.items())[:3])) == "a"  # too small; loses dermoscopy
    assert conditions.choose_simplest(means) == "d"
    assert conditions.choose_simplest({"x": {"m": 0.1, "d": 0.1}, "y": {"m": 0.2, "d": 0.1}}, "m", "d") == "y"


def test_concept_sentences_enter_the_text_map_only_for_training_classes():
    from sgps_train import conditions

    row = {"pigment_network": "atypical", "streaks": "absent", "pigmentation": "diffuse irregular",
           "regression_structures": "absent", "dots_and_globules": "irregular", "blue_whitish_veil": "present",
           "vascular_structures": "arborizing"}
    assert conditions.concept_text(row) == (
        "Dermoscopy: atypical pigment network, no streaks, diffuse irregular pigmentation, no regression structures, "
        "irregular dots and globules, blue-whitish veil, arborizing vessels.")
    rng = np.random.default_rng(0)
    emb = {c: rng.standard_normal((4, 16)).astype(np.float32) for c in ("derm7pt/a", "dermnet/b", "dermnet/c")}
    texts = {c: rng.standard_normal((3, 384)).astype(np.float32) for c in emb}
    concepts = [("derm7pt/a", rng.standard_normal(384).astype(np.float32), rng.standard_normal(16).astype(np.float32))]
    held_out = [("derm7pt/z", concepts[0][1], concepts[0][2])]  # a class not in the training set

    def proj(cp):
        g = synth.Synthesizer(dim=16, text_dim=384)
        conditions.fit_text_proj(g, emb, texts, concepts=cp)
        return g.text_proj.weight.detach().numpy().copy()

    assert np.array_equal(proj(None), proj(held_out))  # held-out classes' concepts are never read
    assert not np.allclose(proj(None), proj(concepts))


def test_word_features_follow_their_definition_and_learn_only_from_the_fitting_classes():
    from sgps_train import conditions
    from sgps_train.words import Words, tokens

    assert tokens("Blue-white VEIL; a 2x naevus's") == ["blue", "white", "veil", "2x", "naevus"]
    w = Words.fit(["red scaly plaque", "red nodule", "scaly red patch", "blue veil"], min_df=2)
    assert w.vocab == ["red", "scaly"]  # words in fewer than 2 descriptions are left out
    idf = np.log(5 / np.array([4, 3])) + 1
    v = w.vector("Red, red and SCALY")
    raw = np.array([(1 + np.log(2)) * idf[0], idf[1]])
    assert np.allclose(v, raw / np.linalg.norm(raw), atol=1e-7)
    assert not w.vector("unknown words only").any()
    assert Words.from_json(json.loads(json.dumps(w.to_json()))).vocab == w.vocab

    # the vocabulary of a fold's map comes from its training classes' descriptions only
    desc = {"a/x": ["pink scaly plaque", "pink scaly patch"], "a/y": ["violet lagoons", "violet lagoons"],
            "a/z": ["pink nodule", "scaly nodule"]}
    minilm = {c: np.zeros((2, 384), np.float32) for c in desc}
    tm = conditions.TEXT_MAPS["words"]
    feats, words = conditions.text_features(tm, minilm, desc, ["a/x", "a/z"])
    assert "violet" not in words.vocab and "lagoons" not in words.vocab
    assert not feats["a/y"].any() and feats["a/x"].shape == (2, words.dim)
    both, _ = conditions.text_features(conditions.TEXT_MAPS["minilm+words"], minilm, desc, ["a/x", "a/z"])
    assert both["a/x"].shape == (2, 384 + words.dim)
    # a novel class can neither shape the vocabulary nor get features
    nd = dict(desc, **{"isic/vascular_lesion": ["red lagoons", "red lagoons"]})
    with pytest.raises(RuntimeError, match="novel"):
        conditions.text_features(tm, minilm, nd, ["a/x", "isic/vascular_lesion"])
    with pytest.raises(RuntimeError, match="novel"):
        conditions.text_features(tm, dict(minilm, **{"isic/vascular_lesion": minilm["a/x"]}), nd, ["a/x"])


# ---------------------------------------------------------------- supervised encoder stage


def test_supervised_stage_rebuilds_the_shipped_encoder_exactly():
    from sgps_train import export, supervise

    path = HERE.parent / "image_encoder.onnx"
    enc = supervise.rebuild(path)
    assert enc.power and enc.center.abs().sum() > 0  # the shipped export is sqrt + centred
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        a = enc(torch.from_numpy(x)).numpy()
    b = export.ort_session(path).run(["embedding"], {"image": x})[0]
    assert np.abs(a - b).max() < 1e-4
    # every layer gets a gradient through the rebuilt graph (the fine-tuning trains them all)
    enc(torch.from_numpy(x[:1]))[0, :8].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in enc.backbone.named_parameters() if not n.startswith("_fc."))


def supervise_anchor():
    from sgps_train import supervise

    return supervise.ANCHOR


def test_supervised_anchor_candidate_trains_with_its_term_and_is_cached_apart(tmp_path, monkeypatch):
    from sgps_train import data as D
    from sgps_train import supervise

    monkeypatch.setattr(supervise, "ANCHOR", dict(supervise.ANCHOR_TRIED, batch=2))
    start = HERE.parent / "image_encoder.onnx"
    rng = np.random.default_rng(0)
    items = [D.Item(f"x/{i}.jpg", "dermnet", c) for i, c in enumerate(["a", "a", "b", "b"])]
    pool = torch.from_numpy(rng.integers(0, 255, (4, 3, 224, 224), dtype=np.uint8))
    anchor = torch.from_numpy(rng.integers(0, 255, (3, 3, 224, 224), dtype=np.uint8))
    idx = np.arange(4)
    plain, _ = supervise.finetuned_cached(start, "s", items, pool, idx, 0, True, tmp_path, "t")
    anch, info = supervise.finetuned_cached(start, "s", items, pool, idx, 0, True, tmp_path, "t", anchor)
    assert info["anchor"]["images"] == 3 and info["steps"] == 2
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert len(names) == 2 and any(n.startswith("sup_t_anchor_") for n in names)
    # the anchor term changes what the fine-tuning does
    a, b = plain.state_dict(), anch.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_supervised_sampling_balances_classes_and_gives_dermoscopy_half():
    from sgps_train import supervise

    keys = ["isic/melanoma"] * 10 + ["derm7pt/x"] * 2 + ["dermnet/a"] * 5 + ["dermnet/b"] * 1 + ["sd198/c"] * 2
    classes, y, w = supervise.sampling(keys)
    assert classes == sorted(set(keys)) and abs(w.sum() - 1) < 1e-9
    mass = {c: w[y == i].sum() for i, c in enumerate(classes)}
    assert abs(mass["isic/melanoma"] - 0.25) < 1e-9 and abs(mass["derm7pt/x"] - 0.25) < 1e-9
    assert all(abs(mass[c] - 0.5 / 3) < 1e-9 for c in ("dermnet/a", "dermnet/b", "sd198/c"))


def test_supervised_stage_keeps_its_start_and_says_when_it_is_missing(tmp_path):
    import shutil

    from sgps_train import export, supervise

    models, work = tmp_path / "models", tmp_path / "work"
    models.mkdir()
    shutil.copyfile(HERE.parent / "image_encoder.onnx", models / "image_encoder.onnx")
    (models / "manifest.json").write_text(json.dumps({"provenance": {}}))
    start, sha = supervise.start_encoder(models, work)
    assert sha == export.sha256(models / "image_encoder.onnx") and export.sha256(start) == sha
    # once the stage has replaced the file, the start comes from work - or the stage refuses
    (models / "image_encoder.onnx").write_bytes(b"fine-tuned")
    done = {"shipped": True, "start_sha256": sha, "output_sha256": export.sha256(models / "image_encoder.onnx")}
    (models / "manifest.json").write_text(json.dumps({"provenance": {"supervised_encoder": done}}))
    assert supervise.start_encoder(models, work) == (start, sha)
    start.unlink()
    with pytest.raises(RuntimeError, match="run the whole recipe"):
        supervise.start_encoder(models, work)


def test_supervised_stage_never_reads_novel_classes():
    from sgps_train import conditions, supervise

    d = need_data()
    classes, items = supervise.skin_items(d, False, 0)
    novel = {f"{ds}/{c}" for ds, c in data.NOVEL}
    assert not novel & set(classes) and not novel & {it.key for it in items}
    assert not novel & {it.key for it in conditions.chosen_items(d, False, 0)}


def test_text_stage_reexports_only_the_text_encoder(tmp_path):
    """`run.py --stage text` on a models dir with the old int8 text encoder: the f16w file, its
    reference and manifest entry replace it, the stale file goes, everything else is untouched."""
    import shutil

    import run
    from sgps_train.export import sha256

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "models"
    out.mkdir()
    mf = json.loads((root / "manifest.json").read_text())
    keep = [mf["image_encoder"]["variants"]["fp32"]["file"], mf["synthesizer"]["file"], "tokenizer.json"]
    for f in keep + ["manifest.json"]:
        shutil.copy(root / f, out / f)
    shutil.copytree(root / "reference", out / "reference")
    # the state before: an int8 text encoder as the only text variant (a stand-in file)
    (out / "text_encoder.int8.onnx").write_bytes(b"old")
    mf["text_encoder"]["variants"] = {"int8": {"file": "text_encoder.int8.onnx", "sha256": sha256(out / "text_encoder.int8.onnx"), "bytes": 3}}
    mf["text_encoder"]["default_variant"] = "int8"
    (out / "manifest.json").write_text(json.dumps(mf))
    before = {f: sha256(out / f) for f in keep}
    run.main(["--stage", "text", "--out", str(out), "--work", str(tmp_path / "work")])
    m = json.loads((out / "manifest.json").read_text())
    te = m["text_encoder"]
    assert te["default_variant"] == "f16w" and sorted(te["variants"]) == ["f16", "f16w"]
    assert sha256(out / te["variants"]["f16w"]["file"]) == te["variants"]["f16w"]["sha256"]
    assert te["variants"]["f16w"]["mean_cosine_to_fp32"] > 0.999
    assert not (out / "text_encoder.int8.onnx").exists()
    assert {f: sha256(out / f) for f in keep} == before
    assert m["synthesizer"] == mf["synthesizer"] and m["head"] == mf["head"]
    refs = json.loads((out / "reference" / "texts.json").read_text())
    assert [r["variant"] for r in refs] == ["f16w"] * len(refs)
