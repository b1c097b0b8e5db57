"""tsm.py against independent references: a naive per-frame shift loop, torchvision's ResNet,
checkpoints written in the official TSM key grammar, and the non-checkpointed model."""
import copy
import re
from dataclasses import asdict

import pytest
import torch
import torchvision

import data
import tsm
from bench import synthetic

from tsm import MEAN, STD, TSM, TemporalShift, TSMConfig, load_weights, normalize, temporal_shift


def randomize_bn_(model):
    """Non-default BatchNorm statistics and affine weights, so loading them is actually tested."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.num_batches_tracked.fill_(7)
    return model


def tsm18(**kw):
    return randomize_bn_(TSM(TSMConfig(**kw)))


def clip(n=2, f=4, size=32):
    return torch.randn(n, f, 3, size, size)  # (N, F, 3, H, W)


def naive_shift(x, n_frames, shift_div):
    """Frame by frame: channels [0, fold) from frame t+1, [fold, 2 fold) from t-1, zeros at clip ends."""
    fold = x.shape[1] // shift_div
    frames = []
    for i in range(x.shape[0]):
        t = i % n_frames
        zeros = torch.zeros_like(x[i, :fold])
        future = x[i + 1, :fold] if t < n_frames - 1 else zeros
        past = x[i - 1, fold:2 * fold] if t > 0 else zeros
        frames.append(torch.cat([future, past, x[i, 2 * fold:]]))
    return torch.stack(frames)


def naive_shift_grad(g, n_frames, shift_div):
    """The backward of the shift by hand: the opposite shift of the gradient."""
    fold = g.shape[1] // shift_div
    out = g.clone()
    for i in range(g.shape[0]):
        t = i % n_frames
        out[i, :fold] = g[i - 1, :fold] if t > 0 else 0
        out[i, fold:2 * fold] = g[i + 1, fold:2 * fold] if t < n_frames - 1 else 0
    return out


def test_normalize_hand_computed():
    x = torch.tensor([255, 0, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    expected = [(1 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]]
    torch.testing.assert_close(y[1, :, 1, 0], torch.tensor(expected))
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float())


@pytest.mark.parametrize("channels, shift_div", [(20, 8), (16, 4), (7, 8)])
def test_shift_matches_naive_loop_forward_and_gradient(channels, shift_div):
    n_frames = 5
    x = torch.randn(3 * n_frames, channels, 4, 3, requires_grad=True)  # (N*F, C, H, W)
    g = torch.randn(3 * n_frames, channels, 4, 3)
    out = temporal_shift(x, n_frames, shift_div)
    torch.testing.assert_close(out, naive_shift(x.detach(), n_frames, shift_div), rtol=0, atol=0)
    out.backward(g)
    torch.testing.assert_close(x.grad, naive_shift_grad(g, n_frames, shift_div), rtol=0, atol=0)
    assert out.data_ptr() != x.data_ptr(), "the shift must not work in place"


def test_shift_keeps_channels_last():
    x = torch.randn(2 * 3, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    out = temporal_shift(x, 3, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, naive_shift(x.contiguous(), 3, 8), rtol=0, atol=0)


def test_clips_never_leak_into_each_other():
    model = tsm18().eval()
    x = clip(n=3)
    with torch.no_grad():
        before = model(x)
        x[1] = torch.randn_like(x[1])
        after = model(x)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after[1], before[1], atol=1e-3)


def test_no_shift_equals_torchvision_resnet(tmp_path):
    resnet = randomize_bn_(torchvision.models.resnet18()).eval()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = TSM(TSMConfig(shift_div=0)).eval()  # shift_div=0: the shift is off (a TSN encoder)
    report = load_weights(model, tmp_path / "resnet18.pth")
    assert report["ignored"] == ["fc.weight", "fc.bias"] and len(report["loaded"]) == 120
    resnet.fc = torch.nn.Identity()
    x = clip(n=2, f=3)
    with torch.no_grad():
        expected = resnet(x.flatten(0, 1)).view(2, 3, -1).mean(1)  # (N, 512)
        torch.testing.assert_close(model(x), expected)
        # Same weights with the shift on: the features change and depend on the frame order.
        shifted = TSM(TSMConfig()).eval()
        load_weights(shifted, tmp_path / "resnet18.pth")
        assert not torch.allclose(shifted(x), expected, atol=1e-3)
        reversed_x = x.flip(1)
        torch.testing.assert_close(model(reversed_x), model(x))
        assert not torch.allclose(shifted(reversed_x), shifted(x), atol=1e-3)


@pytest.mark.parametrize("depth, dim, n_shifts, params_m", [(18, 512, 8, 11.18), (34, 512, 16, 21.28),
                                                             (50, 2048, 16, 23.51)])
def test_depths_build_with_feature_sizes(depth, dim, n_shifts, params_m):
    with torch.device("meta"):  # shapes and names only, no memory or init cost
        model = TSM(TSMConfig(depth=depth))
        out = model(torch.empty(2, 3, 3, 64, 64))
        resnet_keys = torchvision.models.get_model(f"resnet{depth}").state_dict()
    assert model.dim == dim and out.shape == (2, dim)
    assert sum(isinstance(m, TemporalShift) for m in model.modules()) == n_shifts
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m  # spec table, no fc
    # Parameter names: torchvision's, with the official '.net.' infix on every block's conv1.
    official = {re.sub(r"^(layer\d\.\d+\.conv1)\.", r"\1.net.", k)
                for k in resnet_keys if not k.startswith("fc.")}
    assert set(model.state_dict()) == official


def test_official_release_checkpoint_loads_strictly(tmp_path):
    source = tsm18().eval()
    state = {"module.base_model." + k: v for k, v in source.state_dict().items()}
    state["module.new_fc.weight"], state["module.new_fc.bias"] = torch.randn(400, 512), torch.randn(400)
    assert "module.base_model.layer1.0.conv1.net.weight" in state and len(state) == 122  # spec, R18
    path = tmp_path / "TSM_kinetics_RGB_resnet18_shift8_blockres_avg_segment8_e50.pth"
    torch.save({"epoch": 50, "arch": "resnet18", "state_dict": state}, path)
    model = TSM(TSMConfig()).eval()
    report = load_weights(model, path)
    assert report["ignored"] == ["module.new_fc.weight", "module.new_fc.bias"]
    assert sorted(report["loaded"]) == sorted(source.state_dict())
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_project_checkpoint_loads_and_depth_mismatch_is_named(tmp_path):
    source = tsm18().eval()
    path = tmp_path / "encoder.pt"
    torch.save({"encoder": source.state_dict(), "encoder_cfg": asdict(source.cfg)}, path)
    model = TSM(TSMConfig()).eval()
    assert load_weights(model, path)["ignored"] == []
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    torch.save({"encoder": source.state_dict(), "encoder_cfg": dict(asdict(source.cfg), depth=34)}, path)
    with pytest.raises(ValueError, match=r"encoder\.pt.*TSM-R34.*TSM-R18"):
        load_weights(model, path)


def test_wrong_keys_and_shapes_fail_naming_them(tmp_path):
    state = tsm18().state_dict()
    del state["layer2.0.bn1.running_mean"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad_keys.pth")
    with pytest.raises(ValueError) as err:
        load_weights(TSM(TSMConfig()), tmp_path / "bad_keys.pth")
    for name in ("bad_keys.pth", "layer2.0.bn1.running_mean", "layer5.0.conv1.weight"):
        assert name in str(err.value)

    state = tsm18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "bad_shape.pth")
    shape_error = r"bad_shape\.pth.*conv1\.weight \(64, 3, 5, 5\) vs model \(64, 3, 7, 7\)"
    with pytest.raises(ValueError, match=shape_error):
        load_weights(TSM(TSMConfig()), tmp_path / "bad_shape.pth")


def test_unreadable_files_fail_naming_them(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save(tsm18().state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth: cannot read"):
        load_weights(TSM(TSMConfig()), path)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth: cannot read"):
        load_weights(TSM(TSMConfig()), tmp_path / "notes.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_weights(TSM(TSMConfig()), tmp_path / "absent.pth")


def saved_bytes_and_grads(model, x, w):
    """One training step; bytes saved for backward (per storage, parameters excluded) and grads."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)  # (N, D)
    (out * w).sum().backward()
    return sum(seen.values()), out, [x.grad] + [p.grad for p in model.parameters()]


def test_checkpointing_gives_identical_outputs_grads_and_bn_stats():
    plain = tsm18().train()
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.checkpoint = True
    x, w = clip(size=64), torch.randn(2, 512)
    bytes_plain, out_plain, grads_plain = saved_bytes_and_grads(plain, x, w)
    bytes_ckpt, out_ckpt, grads_ckpt = saved_bytes_and_grads(ckpt, x, w)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=0, atol=0)
    # Recomputation in backward must not update the running statistics a second time.
    for (name, b_ckpt), b_plain in zip(ckpt.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b_ckpt, b_plain, rtol=0, atol=0, msg=name)
    assert bytes_ckpt < 0.5 * bytes_plain


def test_checkpoint_recomputes_with_each_forwards_own_frame_count():
    plain = tsm18().train()
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.checkpoint = True
    a, b = clip(n=1, f=4), clip(n=2, f=2)
    grads = []
    for model in (plain, ckpt):
        loss = model(a).square().sum() + model(b).sum()  # the second forward changes n_frames
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for g_ckpt, g_plain in zip(*grads):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=0, atol=0)


def test_bf16_autocast_close_to_fp32_and_checkpointable():
    model = tsm18().eval()
    x = clip()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert (low.float() - ref).norm() / ref.norm() < 0.05
    plain = model.train()
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.checkpoint = True
    w = torch.randn(2, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, out_plain, grads_plain = saved_bytes_and_grads(plain, x, w)
        _, out_ckpt, grads_ckpt = saved_bytes_and_grads(ckpt, x, w)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=0, atol=0)


def test_channels_last_gives_the_same_output():
    model = tsm18().eval()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    seen = []
    fast.layer2[1].conv1.net.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert seen == [True], "the shifted activations left channels_last"


def test_bad_input_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\(N, F, 3, H, W\)"):
        TSM(TSMConfig())(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match="depth"):
        TSM(TSMConfig(depth=101))


# ---------------- the shift, end to end
def test_shift_learns_motion_that_tsn_cannot(tmp_path):
    """Rising against falling clips of the synthetic Kinetics (each clip its own look), every clip also
    played backwards with the other label: the classes differ only in the order of the frames. TSN (the
    same network with shift_div = 0) averages frames it sees apart, so a clip and its reversal get the
    same output and it is at 0.5 by construction; the shift is TSM's only way to compare frames.
    Trained alike (2 frames, 50 steps): TSM 1.00 / 0.98 / 0.95 validation accuracy over three data seeds, TSN 0.50."""
    anno = synthetic.synth_kinetics(tmp_path, clips=450, seed=3)
    videos = [v for v in data.read_annotations(anno)[0].values() if v.labels[0] in ("rise", "fall")]

    def clips(subset, draws):                      # random clip positions, loaded once, and the reversals
        ds = data.ClipDataset([v for v in videos if v.subset == subset], tmp_path / "videos", ["fall", "rise"],
                              2, 4, size=(32, 32), train=True, seed=1, augment=subset == "training")
        items = [ds[k] for e in range(draws) if setattr(ds, "epoch", e) is None for k in range(len(ds))]
        x, y = torch.stack([i["frames"] for i in items]), torch.tensor([i["label"] for i in items])  # (N, 2, 3, 32, 32)
        return torch.cat([x, x.flip(1)]), torch.cat([y, 1 - y])
    (x_train, y_train), (x_val, y_val) = clips("training", 4), clips("validation", 2)
    accuracy = {}
    for shift_div in (8, 0):
        torch.manual_seed(0)
        net = tsm.ClipNet(TSM(TSMConfig(shift_div=shift_div)), 2).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
        draw = torch.Generator().manual_seed(0)
        for _ in range(50):                         # stage 1's recipe (tiny preset), few steps
            b = torch.randint(len(x_train), (16,), generator=draw)
            loss = torch.nn.functional.cross_entropy(net(x_train[b]), y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            accuracy[shift_div] = (net(x_val).argmax(1) == y_val).float().mean().item()
    assert abs(accuracy[0] - 0.5) <= 2 / len(y_val), accuracy   # TSN cannot tell a clip from its reversal
    assert accuracy[8] >= accuracy[0] + 0.1, accuracy
