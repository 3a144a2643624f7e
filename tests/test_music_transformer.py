"""Music Transformer: skewed relative attention equals the explicit form, causality, cached sampling, Bernoulli draws."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_modules.music_transformer import MusicTransformer
from lightning_modules.nets.music_transformer import MusicTransformerDecoder
from lightning_modules.nets.relative_attention import KeyValueCache, RelativeGlobalAttention, skew
from tests.helpers import save_checkpoint
from tests.test_vqvae import loop_phrases, quiet_trainer


def explicit_relative_attention(attention: RelativeGlobalAttention, x: torch.Tensor) -> torch.Tensor:
    """Shaw et al.'s relative attention computed naively: the embedding of every (query, key) distance
    gathered into an (L, L, d) tensor per head."""
    q, k, v = attention._split_heads(x)
    length = x.shape[1]
    distance = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    rows = (distance + attention.max_distance - 1).clamp(0, attention.max_distance - 1)
    gathered = attention.relative[:, rows]  # (heads, L, L, head_dim)
    relative = torch.einsum("bhqd,hqkd->bhqk", q, gathered)
    logits = (q @ k.transpose(-1, -2) + relative) / math.sqrt(attention.head_dim)
    weights = logits.masked_fill(distance > 0, float("-inf")).softmax(dim=-1)
    return attention.out((weights @ v).transpose(1, 2).reshape(x.shape))


def test_skew_moves_distance_columns_to_key_columns():
    length = 6
    by_distance = torch.randn(2, length, length)
    skewed = skew(by_distance)
    for q in range(length):
        for k in range(q + 1):
            assert skewed[:, q, k].tolist() == by_distance[:, q, k - q + length - 1].tolist()


@pytest.mark.parametrize("length, max_distance", [(9, 9), (7, 16), (128, 128)])
def test_skewed_relative_attention_equals_the_explicit_gather(length, max_distance):
    torch.manual_seed(length)
    attention = RelativeGlobalAttention(dim=24, heads=3, max_distance=max_distance).eval()
    x = torch.randn(4, length, 24)
    torch.testing.assert_close(attention(x), explicit_relative_attention(attention, x), rtol=1e-5, atol=1e-5)


def test_relative_embeddings_are_learned_per_head_and_saved():
    model = MusicTransformer(hidden=16, layers=2, heads=2, feed_forward=32)
    state = model.state_dict()
    tables = [key for key in state if key.endswith("attention.relative")]
    assert len(tables) == 2 and all(state[key].shape == (2, 128, 8) for key in tables)
    assert all(model.get_parameter(key).requires_grad for key in tables)


def test_output_at_a_step_ignores_later_steps():
    torch.manual_seed(0)
    model = MusicTransformer(hidden=32, layers=2, heads=2, feed_forward=64).eval()
    x = loop_phrases(2).float()
    changed = x.clone()
    changed[:, 70:] = 1 - changed[:, 70:]
    before, after = model(x), model(changed)
    assert before.shape == (2, 128, 57)
    torch.testing.assert_close(before[:, :70], after[:, :70])
    assert not torch.allclose(before[:, 70:], after[:, 70:])


def test_cached_steps_equal_the_full_forward():
    torch.manual_seed(1)
    net = MusicTransformerDecoder(dim=32, layers=3, heads=4, feed_forward=64, dropout=0.0).eval()
    x = loop_phrases(3).float()
    cache = KeyValueCache()
    stepped = torch.stack([net.step(x[:, t], cache) for t in range(128)], dim=1)
    torch.testing.assert_close(stepped, net(x), rtol=1e-4, atol=1e-5)
    assert cache.length == 128


def constant_model(probability: float, first_steps: torch.Tensor) -> MusicTransformer:
    """A model whose next-step probability is ``probability`` for every cell, whatever came before."""
    model = MusicTransformer(hidden=16, layers=1, heads=2, feed_forward=32).eval()
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.bias.fill_(math.log(probability / (1 - probability)))
    model.set_first_steps(first_steps)
    return model


def test_samples_are_bernoulli_draws_with_the_predicted_probability():
    first = torch.zeros(4, 57, dtype=torch.bool)
    first[:3, 0] = True  # three phrases start with a kick, one with silence
    model = constant_model(0.2, first)
    phrases = model.sample(400, torch.Generator().manual_seed(0), batch_size=128)
    assert phrases.shape == (400, 128, 57) and phrases.dtype == torch.bool
    rate, cells = phrases[:, 1:].float().mean().item(), 400 * 127 * 57
    assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / cells)
    starts_with_kick = phrases[:, 0, 0].float().mean().item()
    assert abs(starts_with_kick - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 400)
    assert not phrases[:, 0, 1:].any()  # only the drawn first steps occur at step 0
    # a lower temperature pushes probabilities below 0.5 towards 0; temperature 0 thresholds at 0.5
    colder = model.sample(50, torch.Generator().manual_seed(0), temperature=0.5)[:, 1:].float().mean().item()
    assert colder < 0.1
    assert not model.sample(5, torch.Generator().manual_seed(0), temperature=0)[:, 1:].any()


def test_sampling_is_reproducible_and_batch_size_does_not_change_shapes():
    torch.manual_seed(2)
    model = MusicTransformer(hidden=16, layers=1, heads=2, feed_forward=32).eval()
    model.set_first_steps(loop_phrases(5)[:, 0])
    first = model.sample(6, torch.Generator().manual_seed(3), batch_size=4)
    assert torch.equal(first, model.sample(6, torch.Generator().manual_seed(3), batch_size=4))
    assert not torch.equal(first, model.sample(6, torch.Generator().manual_seed(4), batch_size=4))
    assert model.sample(0, torch.Generator()).shape == (0, 128, 57)


def test_sampling_without_first_steps_fails_clearly():
    with pytest.raises(ValueError, match="no first steps"):
        MusicTransformer(hidden=16, layers=1).sample(2, torch.Generator())


def test_checkpoint_samples_on_its_own(tmp_path):
    torch.manual_seed(4)
    model = MusicTransformer(hidden=16, layers=1, heads=2, feed_forward=32).eval()
    model.set_first_steps(loop_phrases(7)[:, 0])
    loaded = MusicTransformer.load_from_checkpoint(save_checkpoint(model, tmp_path / "mt.ckpt"), map_location="cpu")
    assert torch.equal(loaded.first_steps, model.first_steps)
    assert torch.equal(loaded.eval().sample(3, torch.Generator().manual_seed(0)),
                      model.sample(3, torch.Generator().manual_seed(0)))


def test_validation_loss_is_the_mean_next_step_bce():
    torch.manual_seed(5)
    loops = loop_phrases(6).float()
    model = MusicTransformer(hidden=16, layers=1, heads=2, feed_forward=32)
    metrics = quiet_trainer().validate(model, DataLoader(loops, batch_size=4), verbose=False)[0]
    with torch.no_grad():
        logits = model.eval()(loops)[:, :-1]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, loops[:, 1:]).item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_first_steps_come_from_the_datamodules_training_phrases(phrase_cache, demo_root, tmp_path):
    from datamodules.phrases import PhraseDataModule

    datamodule = PhraseDataModule(str(phrase_cache), batch_size=64)
    model = MusicTransformer(hidden=16, layers=1, heads=2, feed_forward=32)
    quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(model, datamodule=datamodule)
    train = datamodule.train_phrases()[:, 0]
    distinct, counts = torch.unique(train, dim=0, return_counts=True)
    assert torch.equal(model.first_steps.bool(), distinct) and torch.equal(model.first_step_counts, counts.float())
