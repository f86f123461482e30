"""The transformer: causal, shaped as documented, saved and loaded without pickles."""

import torch

from tgm.model import TGM, TGMConfig, load_model, save_model


def tiny(n_classes=0):
    torch.manual_seed(0)
    return TGM(TGMConfig(palette_size=8, seq_len=16, n_layer=2, n_head=2, n_embd=16, n_classes=n_classes)).eval()


def test_shapes():
    model = tiny(n_classes=3)
    tokens = torch.randint(0, 8, (5, 16))
    logits, class_logits = model(tokens)
    assert logits.shape == (5, 16, 8) and class_logits.shape == (5, 3)
    assert tiny()(tokens)[1] is None


def test_pixel_predictions_only_see_earlier_pixels():
    model = tiny()
    a = torch.randint(0, 8, (1, 16))
    b = a.clone()
    b[0, 9] = (a[0, 9] + 1) % 8  # change pixel 9
    la, lb = model(a)[0], model(b)[0]
    # The prediction for pixel i reads pixels < i: positions 0..9 are unaffected, 10.. change.
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6)
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_safetensors_round_trip_gives_identical_outputs(tmp_path):
    model = tiny(n_classes=3)
    save_model(model, tmp_path, extra={"classes": ["a", "b", "c"]})
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = load_model(tmp_path).eval()
    tokens = torch.randint(0, 8, (2, 16))
    assert torch.equal(model(tokens)[1], loaded(tokens)[1])


def test_pretrained_weights_load_under_a_new_classification_head(tmp_path):
    pretrained = tiny()
    save_model(pretrained, tmp_path)
    clf = load_model(tmp_path, n_classes=4, strict=False).eval()
    tokens = torch.randint(0, 8, (2, 16))
    assert torch.equal(pretrained(tokens)[0], clf(tokens)[0])
    assert clf(tokens)[1].shape == (2, 4)


def test_completion_keeps_the_prefix_and_fills_the_sequence():
    model = tiny()
    prefix = torch.randint(0, 8, (3, 6))
    out = model.complete(prefix, torch.Generator().manual_seed(0), top_k=2)
    assert out.shape == (3, 16) and torch.equal(out[:, :6], prefix)
    assert out.min() >= 0 and out.max() < 8
    again = model.complete(prefix, torch.Generator().manual_seed(0), top_k=2)
    assert torch.equal(out, again)


def test_cached_decoding_gives_the_logits_of_a_full_forward_pass():
    from tgm.model import KVCache

    model = tiny()
    tokens = torch.randint(0, 8, (2, 16))
    full = model(tokens)[0]  # (B, T, K): logits for pixel i from pixels < i
    inputs = model.shift_right(tokens)
    cache = KVCache()
    steps = [model.lm_head(model.hidden(inputs[:, :5], cache=cache))]  # prefill 5 positions
    for i in range(5, 16):
        steps.append(model.lm_head(model.hidden(inputs[:, i : i + 1], cache=cache)))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_cached_and_recomputed_sampling_agree():
    model = tiny()
    prefix = torch.randint(0, 8, (4, 5))
    cached = model.complete(prefix, torch.Generator().manual_seed(1), use_cache=True)
    recomputed = model.complete(prefix, torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(cached, recomputed)


def test_bf16_autocast_on_cpu_stays_close_to_fp32_and_trains():
    model = tiny()
    tokens = torch.randint(0, 8, (4, 16))
    reference = model(tokens)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)[0]
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.05  # bf16 keeps ~3 significant digits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(tokens)[0].float().reshape(-1, 8), tokens.reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
