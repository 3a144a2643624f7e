"""Device and precision correctness on a CPU-only machine.

Stale-device defects (a module asking Lightning's cached device instead of its weights, state
created on the CPU inside device code) show up on the ``meta`` device: a module or metric moved
there must keep its inputs, states and outputs there, since mixing a meta tensor with a CPU one
fails. Code that reads device values back to the host fails on ``meta`` too, so running a
training step there also shows that the step never waits for the device. Metrics must not
depend on the autocast context.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from callbacks import GenerationMetrics
from callbacks.metrics import PRDC, GenerativeMetrics, LoopScore, NoteDensity, UniquePitch, embed, prdc, random_cnn_embedding
from lightning_modules.cnn_vae import CNNVAE
from lightning_modules.loop_detector import LoopDetector
from lightning_modules.musegan import MuseGAN
from lightning_modules.music_transformer import MusicTransformer
from lightning_modules.prior import LSTMPrior
from lightning_modules.vqvae import VQVAE
from tests.test_vqvae import loop_phrases

META = torch.device("meta")


def on_meta(*tensors: torch.Tensor) -> bool:
    return all(tensor.device == META for tensor in tensors)


def metric_states(metric) -> list[torch.Tensor]:
    states = [getattr(metric, name) for name in metric._defaults]
    return [t for state in states for t in (state if isinstance(state, list) else [state])]


def trained_detector() -> LoopDetector:
    detector = LoopDetector(pretrain_epochs=0, svdd_epochs=1)
    detector.center.copy_(torch.linspace(-0.5, 0.5, 7))
    return detector


def test_loop_score_scores_where_its_parent_moved_the_detector():
    metric = LoopScore(trained_detector()).to(META)
    assert on_meta(*metric.detector.parameters(), *metric.detector.buffers())
    phrases = loop_phrases(6).to(META)
    assert on_meta(metric.score(phrases))
    metric.update(phrases, torch.arange(6, device=META))
    assert on_meta(*metric_states(metric))


@pytest.mark.parametrize("name", ["unique_pitch", "note_density", "prdc", "generative"])
def test_metric_states_stay_on_the_metrics_device(name):
    metric = {"unique_pitch": UniquePitch, "note_density": NoteDensity, "prdc": PRDC,
              "generative": lambda: GenerativeMetrics(n_networks=2, max_samples=10, k=3)}[name]().to(META)
    if name == "prdc":
        metric.update(real=torch.randn(8, 4, device=META), fake=torch.randn(8, 4, device=META))
    elif name == "generative":
        metric.update(real=loop_phrases(8).to(META), fake=loop_phrases(8, seed=1).to(META),
                      real_index=torch.arange(8, device=META))
    else:
        metric.update(loop_phrases(8).to(META))
    assert on_meta(*metric_states(metric))


def test_generation_callback_moves_every_metric_and_the_detector():
    callback = GenerationMetrics(n_samples=8, k=3, detector=trained_detector())
    callback.setup(None, None, "fit")
    metrics = callback.metrics_on(META)
    assert set(metrics) == {"generative", "unique_pitch", "note_density", "loop_score"}
    fake, index = loop_phrases(8).to(META), torch.arange(8, device=META)
    for name, metric in metrics.items():
        if name == "generative":
            metric.update(real=fake, fake=fake, real_index=index, fake_index=index)
        else:
            metric.update(fake, index)
        assert on_meta(*metric_states(metric)), name
    assert on_meta(*metrics["loop_score"].detector.parameters())


def test_embedding_network_runs_on_the_inputs_device():
    net = random_cnn_embedding(0).to(META)
    assert on_meta(embed(net, loop_phrases(5).to(META)))


def test_vqvae_training_step_stays_on_the_device_and_never_waits_for_it():
    model = VQVAE(channels=8, num_codes=16, code_dim=4).train()
    model._loss(loop_phrases(4).float())  # the first step reads the codebook's step counter, once
    model.to(META)
    loss, logits, quantized = model._loss(loop_phrases(4).float().to(META))
    model.epoch_restarts += quantized.restarts
    assert on_meta(loss, logits, *quantized, model.epoch_restarts, *model.codebook.buffers())


def test_cnn_vae_losses_stay_on_the_device():
    model = CNNVAE(channels=8, latent_dim=16).to(META).train()
    bce, kl, logits = model._losses(loop_phrases(3).float().to(META))
    assert on_meta(bce, kl, logits)


def test_prior_steps_and_decoding_stay_on_the_device():
    prior = LSTMPrior(num_codes=16, embed_dim=8, hidden=16, layers=1)
    prior.attach_vqvae(VQVAE(channels=8, num_codes=16, code_dim=4))
    prior.to(META)
    logits, targets = prior._next_index_logits(torch.zeros(3, 32, dtype=torch.long, device=META))
    assert on_meta(logits, targets)
    assert on_meta(*prior.vqvae.parameters())


def test_music_transformer_loss_and_sampling_stay_on_the_device():
    model = MusicTransformer(hidden=16, layers=1, heads=2, feed_forward=32).eval()
    model.set_first_steps(loop_phrases(4)[:, 0])
    model.to(META)
    assert on_meta(model._next_step_loss(loop_phrases(3).to(META)), model.sample(2))


def test_musegan_training_step_stays_on_the_device_and_never_waits_for_it(monkeypatch):
    model = MuseGAN(generator_width=16, critic_width=8, critic_steps=2)
    model.on_train_start()  # once per fit, on the host
    model.to(META)
    idle = SimpleNamespace(zero_grad=lambda: None, step=lambda: None)
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(model, "optimizers", lambda: (idle, idle))
    monkeypatch.setattr(model, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(model, "log_dict", lambda values, **kwargs: logged.update(values))
    for batch_idx in range(2):  # the second critic update is followed by a generator update
        model.training_step(loop_phrases(4).to(META), batch_idx)
    assert "train/generator_loss/bass" in logged
    assert on_meta(*logged.values(), model.critic_updates, model.eval().sample(2))

def test_detector_held_out_metrics_stay_on_the_device():
    detector = trained_detector()
    detector.score_threshold.fill_(0.1)
    detector._start_held_out(svdd=True)  # once per epoch, on the host
    detector.to(META)._update_held_out("val", torch.rand(5, 28, device=META))
    assert "loop_rate" in detector._held_out_metrics
    for name in detector._held_out_metrics:
        assert on_meta(*metric_states(detector.held_out["val"][name])), name


# ------------------------------------------------------------------------------------ precision


def test_metrics_compute_in_float32_under_autocast():
    real, fake = loop_phrases(40), loop_phrases(30, seed=1) | (torch.rand(30, 128, 57) < 0.02)
    detector = trained_detector()

    def everything():
        values = {"loop_score": detector.loop_score(torch.rand(6, 28, generator=torch.Generator().manual_seed(0)))}
        generative = GenerativeMetrics(n_networks=2, max_samples=40, k=3)
        generative.update(real=real, fake=fake)
        values.update(generative.compute())
        features = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
        values.update({f"features_{key}": value for key, value in prdc(features[:20], features[20:], 3).items()})
        return values

    expected = everything()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = everything()
    for key, value in expected.items():
        assert under_autocast[key].dtype == torch.float32, key
        assert torch.equal(under_autocast[key], value), key
