"""The training loop: it learns, it is repeatable, its schedule has the promised shape."""

import numpy as np
import pytest
import torch
from conftest import params_of

from tgm.model import TGM, TGMConfig
from tgm.training.data import Split, warp_images
from tgm.training.device import seed_everything
from tgm.training.loop import fit
from tgm.training.objectives import Classify, Generative
from tgm.training.optim import lr_factor


def objective_of(name: str, lambda_gen: float = 0.5):
    return Classify(lambda_gen) if name == "classify" else Generative()


def test_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, total=100, warmup=10, min_fraction=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def toy_data(n=64, seed=0):
    # Two classes of 4x4 images: class 0 dark on top, class 1 dark at the bottom.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    tokens = rng.integers(0, 2, (n, 16))
    tokens[labels == 0, :8] += 2
    tokens[labels == 1, 8:] += 2
    return tokens.astype(np.int64), labels.astype(np.int64)


def toy_splits() -> tuple[Split, Split]:
    return Split(*toy_data()), Split(*toy_data(32, seed=1))


def train_once(objective):
    seed_everything(0)
    model = TGM(
        TGMConfig(
            palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2 if objective == "classify" else 0
        )
    )
    params = params_of("pretrain", augment_shift=0, epochs=6, batch_size=16, lr=0.01, patience=10)
    history, best = fit(model, *toy_splits(), params, objective_of(objective), torch.device("cpu"))
    return model, history, best


def test_pretraining_lowers_validation_bits_per_pixel():
    _, history, _ = train_once("generative")
    assert history[-1]["val_bpp"] < history[0]["val_bpp"]


def test_finetuning_learns_the_toy_classes():
    _, history, best = train_once("classify")
    assert max(r["val_accuracy"] for r in history) >= 0.9
    assert 1 <= best <= len(history)


def test_same_seed_same_weights():
    a, _, _ = train_once("classify")
    b, _, _ = train_once("classify")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_early_stopping_stops_and_keeps_the_best_epoch():
    seed_everything(0)
    model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2))
    # A learning rate this high makes validation loss worse after the first epochs.
    params = params_of("pretrain", augment_shift=0, epochs=30, batch_size=8, lr=0.5, patience=2, warmup_fraction=0.0)
    history, best = fit(model, *toy_splits(), params, Classify(), torch.device("cpu"))
    assert len(history) < 30
    assert history[best - 1]["val_cls_loss"] == min(r["val_cls_loss"] for r in history)


def test_unlabelled_images_add_to_the_next_pixel_loss_only():
    seed_everything(0)
    model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2)).eval()
    tokens, labels = toy_data(8)
    x, y = torch.from_numpy(tokens), torch.from_numpy(labels)
    mixed = torch.cat([y[:4], torch.full((4,), -1)])
    loss_all, parts_all = Classify(0.5).loss(model, x, mixed)
    _, parts_labelled = Classify(0.5).loss(model, x[:4], y[:4])
    # The class loss is the labelled images' alone; the next-pixel loss is over all eight.
    assert parts_all["cls_loss"] == pytest.approx(float(parts_labelled["cls_loss"]), rel=1e-5)
    assert parts_all["correct"] == parts_labelled["correct"]
    _, parts_none = Classify(0.5).loss(model, x, torch.full((8,), -1))
    assert float(parts_none["cls_loss"]) == 0.0 and torch.isfinite(loss_all)


def test_semi_supervised_fit_is_repeatable_and_learns():
    def run():
        seed_everything(0)
        model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2))
        history, _ = fit(
            model,
            Split(*toy_data(16)),
            Split(*toy_data(32, seed=1)),
            params_of("pretrain", augment_shift=0, epochs=8, batch_size=8, lr=0.01, patience=10),
            Classify(0.5),
            torch.device("cpu"),
            pool=toy_data(64, seed=2)[0],
        )
        return model, history

    (a, history), (b, _) = run(), run()
    assert max(r["val_accuracy"] for r in history) >= 0.9
    assert all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values()))


def test_warping_keeps_palette_indices_and_repeats_with_its_seed():
    tokens = torch.zeros(6, 64, dtype=torch.long)
    tokens.view(6, 8, 8)[:, 1:7, 3:5] = 3  # a bar on a background of 0
    warp = lambda seed: warp_images(tokens, 20.0, 0.2, torch.Generator().manual_seed(seed))  # noqa: E731
    out = warp(0)
    assert out.shape == tokens.shape and out.dtype == tokens.dtype
    assert set(out.unique().tolist()) <= {0, 3}
    assert torch.equal(out, warp(0)) and not torch.equal(out, warp(1))
    assert not torch.equal(out, tokens)
    assert torch.equal(warp_images(tokens, 0.0, 0.0, torch.Generator()), tokens)


def test_training_read_from_disk_a_batch_at_a_time_equals_training_in_memory(tmp_path):
    """Streamed token files give the same weights, history and checkpoint fingerprint as in-memory arrays."""
    from tgm.tokens import TokenFile
    from tgm.training.checkpoint import fingerprint_of

    train, val = toy_data(), toy_data(32, seed=1)
    for name, tokens in (("train", train[0]), ("val", val[0])):
        np.save(tmp_path / f"{name}.npy", tokens.astype(np.uint8))  # as prepare stores them
    streamed = TokenFile(tmp_path / "train.npy")
    assert np.array_equal(streamed[np.array([5, 0, 5, 63])], train[0][[5, 0, 5, 63]])
    assert np.array_equal(streamed[10:70], train[0][10:70]) and streamed[10:70].dtype == np.int64
    assert np.array_equal(np.concatenate(list(streamed.blocks())), train[0].astype(np.uint8))
    with pytest.raises(IndexError):
        streamed[np.array([64])]
    assert fingerprint_of(streamed) == fingerprint_of(train[0])

    def run(data_train, data_val):
        seed_everything(0)
        model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2))
        params = params_of("finetune", epochs=3, batch_size=16, lr=0.01, augment_shift=1)
        history, _ = fit(model, data_train, data_val, params, Classify(0.5), torch.device("cpu"))
        return model, history

    a, history_a = run(Split(*train), Split(*val))
    b, history_b = run(Split(streamed, train[1]), Split(TokenFile(tmp_path / "val.npy"), val[1]))
    assert history_a == history_b
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_max_steps_stops_training_after_that_many_steps():
    seed_everything(0)
    model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16))
    params = params_of("pretrain", epochs=5, batch_size=16, max_steps=6, patience=10)
    history, best = fit(model, *toy_splits(), params, Generative(), torch.device("cpu"))
    # 4 steps per epoch: the second epoch ends after its second step, validated like any other.
    assert [r["epoch"] for r in history] == [1, 2] and 1 <= best <= 2


def test_a_split_held_on_the_device_trains_as_one_read_from_disk(tmp_path, monkeypatch):
    """The GPU's path (splits copied to the device once, batches gathered and augmented there, the unlabelled
    pool drawn there) forced on the CPU: the same history and bit-identical weights as streaming from disk."""
    import tgm.training.data
    from tgm.tokens import TokenFile

    train, val = toy_data(), toy_data(32, seed=1)
    for name, tokens in (("train", train[0]), ("val", val[0])):
        np.save(tmp_path / f"{name}.npy", tokens.astype(np.uint8))

    def run():
        seed_everything(0)
        model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2))
        params = params_of("finetune", epochs=3, batch_size=16, lr=0.01, augment_shift=1, augment_rotate=10.0)
        history, _ = fit(
            model,
            Split(TokenFile(tmp_path / "train.npy"), train[1]),
            Split(TokenFile(tmp_path / "val.npy"), val[1]),
            params,
            Classify(0.5),
            torch.device("cpu"),
            pool=toy_data(40, seed=5)[0],
        )
        return model, history

    streamed, history_streamed = run()
    held = []
    real_on_device = tgm.training.data.on_device
    monkeypatch.setattr(tgm.training.data, "resident", lambda need, device: True)
    monkeypatch.setattr(tgm.training.loop, "resident", lambda need, device: True)
    monkeypatch.setattr(
        tgm.training.data, "on_device", lambda tokens, device: held.append(1) or real_on_device(tokens, device)
    )
    resident, history_resident = run()
    assert len(held) == 3  # train, the unlabelled pool and val were copied whole
    assert history_resident == history_streamed
    for (k, a), (_, b) in zip(streamed.state_dict().items(), resident.state_dict().items()):
        assert torch.equal(a, b), k


def test_compiled_blocks_get_seed_everythings_deterministic_setting_before_their_first_graph(monkeypatch):
    import torch._inductor.config as inductor_config

    from tgm.training.optim import compile_blocks

    monkeypatch.setattr(inductor_config, "deterministic", False)  # as in a process that never compiled
    seed_everything(0)
    compile_blocks(TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2)))
    assert inductor_config.deterministic


def test_compiled_blocks_train_like_eager_and_save_the_same_keys(tmp_path):
    """compile: true compiles each block in place (regional): training follows the eager run, and the weights
    keep their names (no `_orig_mod.` prefix) for save_model, the registry and the service."""

    def run(compile_):
        seed_everything(0)
        model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=2, n_head=2, n_embd=16, n_classes=2))
        params = params_of("finetune", epochs=2, batch_size=24, lr=0.01, precision="fp32", compile=compile_)
        history, _ = fit(model, *toy_splits(), params, Classify(0.5), torch.device("cpu"))
        return model, history

    eager, history_eager = run(False)
    compiled, history_compiled = run(True)
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl for block in compiled.blocks)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [r["epoch"] for r in history_compiled] == [r["epoch"] for r in history_eager]
    for a, b in zip(history_eager, history_compiled):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=k)
