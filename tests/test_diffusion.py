"""Diffusion maths, network and samplers on tiny CPU configurations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.semantic.diffusion.gaussian_diffusion import DiffusionConfig, GaussianDiffusion, cosine_betas, linear_betas, make_betas
from shared.semantic.diffusion.generator import SemanticDiffusionConfig, SemanticImageGenerator
from shared.limits import LimitError, SamplingOptions
from shared.semantic.diffusion.samplers import (DEFAULT_SAMPLER, SAMPLERS, DDIMSampler, DDPMSampler, DistilledSampler,
                                                DPMSolverPP2MSampler,
                                                GuidedModel, Sampler, log_snr_timesteps, per_image_noise, resolve,
                                                spaced_timesteps)
from shared.semantic.diffusion.unet import SemanticUNet, UNetConfig

TINY = UNetConfig(num_classes=4, image_height=8, image_width=16, model_channels=32, channel_mult=(1, 2),
                  attention_downsample=(2,), head_channels=32, spade_hidden=16)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    """An epsilon-predicting process: the exact model below and the closed forms speak epsilon."""
    return GaussianDiffusion.from_config(DiffusionConfig(schedule="linear", num_timesteps=1000, prediction="epsilon"))


def test_schedules_are_valid_and_cosine_ends_near_zero_signal() -> None:
    for betas in (linear_betas(1000), cosine_betas(1000)):
        assert betas.shape == (1000,) and (betas > 0).all() and (betas < 1).all()
    assert np.cumprod(1 - cosine_betas(1000))[-1] < 1e-4
    assert linear_betas(1000)[0] == pytest.approx(1e-4) and linear_betas(1000)[-1] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="schedule"):
        make_betas("quadratic", 10)


def test_q_sample_matches_closed_form(diffusion: GaussianDiffusion) -> None:
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 499, 999])
    abar = np.cumprod(1 - linear_betas(1000))[[0, 499, 999]]
    expected = torch.tensor(np.sqrt(abar), dtype=torch.float32)[:, None, None, None] * x0 \
        + torch.tensor(np.sqrt(1 - abar), dtype=torch.float32)[:, None, None, None] * noise
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), expected)


def test_posterior_matches_closed_form(diffusion: GaussianDiffusion) -> None:
    betas = linear_betas(1000)
    abar = np.cumprod(1 - betas)
    x0, xt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([1, 700])
    mean, var, _ = diffusion.q_posterior(x0, xt, t)
    for i, step in enumerate(t.tolist()):
        ab, ab_prev, beta = abar[step], abar[step - 1], betas[step]
        exp_mean = (np.sqrt(ab_prev) * beta / (1 - ab)) * x0[i] + (np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * xt[i]
        torch.testing.assert_close(mean[i], exp_mean.float())
        assert float(var[i].flatten()[0]) == pytest.approx((1 - ab_prev) / (1 - ab) * beta, rel=1e-5)


def test_eps_and_start_predictions_invert_each_other(diffusion: GaussianDiffusion) -> None:
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 900])
    xt = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.predict_start_from_eps(xt, t, noise), x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(diffusion.predict_eps_from_start(xt, t, x0), noise, atol=1e-3, rtol=1e-3)


def test_velocity_parametrisation_recovers_start_noise_and_posterior() -> None:
    velocity = GaussianDiffusion.from_config(DiffusionConfig(prediction="velocity"))
    x0, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    t = torch.tensor([3, 999])
    xt = velocity.q_sample(x0, t, noise)
    target = velocity.velocity(x0, t, noise)
    start, eps = velocity.start_and_eps(target, xt, t)
    torch.testing.assert_close(start, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps, noise, atol=1e-5, rtol=0)
    exact = torch.cat([target, torch.zeros_like(target)], dim=1)
    out = velocity.p_mean_variance(exact, xt, t, clip=False)
    torch.testing.assert_close(out["mean"], velocity.q_posterior(x0, xt, t)[0], atol=1e-5, rtol=0)
    assert float(velocity.training_losses(lambda x, ts: exact, x0, t, noise)["mse"].max()) < 1e-10
    assert velocity.respaced([0, 500, 999]).prediction == "velocity"


def test_velocity_error_at_high_noise_stays_bounded_unlike_epsilon() -> None:
    """The reason to train on velocity: the same output error moves x_0 ~160x less at t = T."""
    t, xt, error = torch.tensor([999]), torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.01)
    shifts = {}
    for prediction in ("epsilon", "velocity"):
        process = GaussianDiffusion.from_config(DiffusionConfig(prediction=prediction))
        shifts[prediction] = float((process.start_and_eps(error, xt, t)[0]).abs().max())
    assert shifts["velocity"] < 0.011 and shifts["epsilon"] > 1.0


def test_unknown_prediction_is_rejected() -> None:
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion.from_config(DiffusionConfig(prediction="x0"))


def test_learned_variance_spans_posterior_to_beta(diffusion: GaussianDiffusion) -> None:
    t = torch.tensor([500])
    low = diffusion.learned_log_variance(-torch.ones(1, 1, 1, 1), t)
    high = diffusion.learned_log_variance(torch.ones(1, 1, 1, 1), t)
    assert float(low) == pytest.approx(diffusion.posterior_log_variance_clipped[500], rel=1e-5)
    assert float(high) == pytest.approx(np.log(diffusion.betas[500]), rel=1e-5)


def test_respacing_keeps_alpha_bar(diffusion: GaussianDiffusion) -> None:
    use = spaced_timesteps(1000, 10)
    assert len(use) == 10 and use[0] == 0 and use[-1] == 999
    spaced = diffusion.respaced(use)
    np.testing.assert_allclose(spaced.alphas_cumprod, diffusion.alphas_cumprod[use], rtol=1e-10)
    assert spaced.model_timesteps(torch.tensor([0, 9])).tolist() == [0, 999]
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(1000, 0)


def test_unet_shapes_and_config_validation() -> None:
    net = SemanticUNet(TINY)
    out = net(torch.randn(2, 3, 8, 16), torch.tensor([3, 999]), torch.rand(2, 4, 8, 16))
    assert out.shape == (2, 6, 8, 16)
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_height=50, image_width=64)


def test_hybrid_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))
    net = SemanticUNet(TINY)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    x0 = torch.rand(4, 3, 8, 16) * 2 - 1
    cond = torch.rand(4, 4, 8, 16)
    t = torch.tensor([5, 30, 60, 90])
    noise = torch.randn_like(x0)

    def loss() -> tuple[torch.Tensor, torch.Tensor]:
        terms = diffusion.training_losses(lambda x, ts: net(x, ts, cond), x0, t, noise)
        return terms["loss"].mean(), terms["vb"].mean()

    first, first_vb = (v.item() for v in loss())
    for _ in range(40):
        value, _ = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    last, last_vb = (v.item() for v in loss())
    assert last < 0.5 * first
    assert last_vb < first_vb  # the variance head learns too


def test_vb_term_trains_only_the_variance_output() -> None:
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))
    eps = torch.zeros(2, 3, 4, 4, requires_grad=True)
    v = torch.zeros(2, 3, 4, 4, requires_grad=True)
    terms = diffusion.training_losses(lambda x, ts: torch.cat([eps, v], dim=1), torch.rand(2, 3, 4, 4), torch.tensor([3, 50]))
    terms["vb"].sum().backward()
    assert eps.grad is None or float(eps.grad.abs().sum()) == 0.0
    assert float(v.grad.abs().sum()) > 0.0


def test_guidance_zero_equals_conditional_prediction() -> None:
    torch.manual_seed(1)
    net = SemanticUNet(TINY).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)  # zero-initialised heads would hide differences
    x, t, cond = torch.randn(2, 3, 8, 16), torch.tensor([10, 500]), torch.rand(2, 4, 8, 16)
    with torch.no_grad():
        conditional = net(x, t, cond)
        torch.testing.assert_close(GuidedModel(net, cond, 0.0)(x, t), conditional)
        guided = GuidedModel(net, cond, 2.0)(x, t)
        unconditional = net(x, t, torch.zeros_like(cond))
    eps_c, eps_u = conditional[:, :3], unconditional[:, :3]
    torch.testing.assert_close(guided[:, :3], eps_c + 2.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:, 3:], conditional[:, 3:])
    with pytest.raises(ValueError, match="guidance"):
        GuidedModel(net, cond, -1.0)


@pytest.mark.parametrize("sampler,steps", [
    (DDPMSampler(), 20), (DDPMSampler(), 7), (DDPMSampler(), 1), (DDIMSampler(), 5), (DDIMSampler(), 1),
    (DDIMSampler(eta=1.0), 4), (DPMSolverPP2MSampler(), 6), (DPMSolverPP2MSampler(), 2), (DPMSolverPP2MSampler(), 1),
    (DPMSolverPP2MSampler(spacing="time"), 4)])
def test_samplers_return_shape_and_range(sampler, steps: int) -> None:
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=20))
    net = SemanticUNet(TINY).eval()
    with torch.no_grad():
        out = sampler.sample(diffusion, GuidedModel(net, torch.rand(2, 4, 8, 16), 1.5), (2, 3, 8, 16),
                             [torch.Generator().manual_seed(i) for i in range(2)], steps)
    assert out.shape == (2, 3, 8, 16)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1


def test_samplers_register_under_the_name_their_class_declares() -> None:
    assert SAMPLERS == {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp2m": DPMSolverPP2MSampler,
                        "distilled": DistilledSampler}
    assert (DDIMSampler.name, DDIMSampler.default_steps, DDIMSampler.step_limit) == ("ddim", 10, None)
    assert (DistilledSampler.name, DistilledSampler.default_steps, DistilledSampler.step_limit) == ("distilled", 1, 2)
    with pytest.raises(ValueError, match="registered already"):
        class Again(Sampler, name="ddim"):
            def sample(self, *args, **kwargs):
                raise NotImplementedError
    with pytest.raises(ValueError, match="SAMPLER_DEFAULT_STEPS"):
        class Undeclared(Sampler, name="euler"):
            def sample(self, *args, **kwargs):
                raise NotImplementedError
    assert "euler" not in SAMPLERS
    assert SAMPLERS["ddim"] is DDIMSampler
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=2.0)


def test_resolve_fills_the_defaults_and_names_the_bad_field() -> None:
    assert DEFAULT_SAMPLER == "distilled"
    assert resolve(SamplingOptions(guidance=2.0), 1000) == SamplingOptions(sampler="distilled", steps=1, guidance=2.0)
    # steps the default cannot run: the sampler of the trajectory it imitates, at those steps
    assert resolve(SamplingOptions(steps=20, guidance=2.0), 1000) == SamplingOptions(sampler="ddim", steps=20, guidance=2.0)
    assert resolve(SamplingOptions(sampler="ddpm", guidance=0.0), 1000).steps == 50
    assert resolve(SamplingOptions(sampler="dpmpp2m", guidance=0.0), 8).steps == 8  # a short chain caps the default
    assert resolve(SamplingOptions(sampler="ddpm", steps=7, guidance=1.0), 1000).steps == 7
    with pytest.raises(LimitError, match="^sampler must be one of") as raised:
        resolve(SamplingOptions(sampler="euler", guidance=0.0), 1000)
    assert raised.value.field == "sampler"
    with pytest.raises(LimitError, match="^steps must be in 1..20 for the ddim sampler on this model"):
        resolve(SamplingOptions(steps=21, guidance=0.0), 20)


@pytest.mark.parametrize(("options", "field"), [
    (dict(steps=1001), "steps"), (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"), (dict(guidance=20.5), "guidance"),
    (dict(guidance=-0.1), "guidance"), (dict(guidance=float("nan")), "guidance"), (dict(sampler="no spaces"), "sampler"),
    (dict(sampler="x" * 33), "sampler")])
def test_sampling_options_are_checked_against_the_limits_when_made(options, field) -> None:
    with pytest.raises(LimitError) as raised:
        SamplingOptions(**{"guidance": 1.0, **options})
    assert raised.value.field == field


@pytest.fixture(scope="module")
def generator() -> SemanticImageGenerator:
    return SemanticImageGenerator.load(None, "cpu", untrained_config=SemanticDiffusionConfig(unet=TINY))


def test_generator_is_deterministic_and_batch_independent(generator: SemanticImageGenerator) -> None:
    assert not generator.info.trained and generator.info.num_classes == 4
    cond = torch.zeros(2, 4, 8, 16)
    cond[:, 1] = 1
    ddim3 = SamplingOptions(sampler="ddim", steps=3, guidance=2.0)
    pair = generator.generate(cond, ddim3, seeds=[7, 8])
    alone = generator.generate(cond[:1], ddim3, seeds=[7])
    assert pair.shape == (2, 8, 16, 3) and pair.dtype == np.uint8
    np.testing.assert_array_equal(pair[0], alone[0])
    assert not np.array_equal(pair[0], pair[1])


def test_generator_rejects_bad_requests(generator: SemanticImageGenerator) -> None:
    cond = torch.zeros(1, 4, 8, 16)
    ddim2 = SamplingOptions(sampler="ddim", steps=2, guidance=1.0)
    with pytest.raises(ValueError, match="shape"):
        generator.generate(torch.zeros(1, 5, 8, 16), ddim2, [0])
    with pytest.raises(ValueError, match="seed"):
        generator.generate(cond, ddim2, [0, 1])
    with pytest.raises(ValueError, match="steps"):
        generator.generate(cond, SamplingOptions(sampler="ddim", steps=1001, guidance=1.0), [0])
    with pytest.raises(ValueError, match="sampler"):
        generator.generate(cond, SamplingOptions(sampler="plms", steps=2, guidance=1.0), [0])
    with pytest.raises(ValueError, match="NaN"):
        generator.generate(torch.full((1, 4, 8, 16), float("nan")), ddim2, [0])


def test_checkpoint_round_trip(tmp_path, generator: SemanticImageGenerator) -> None:
    from shared.semantic.checkpoints import save_checkpoint
    from shared.semantic.diffusion.generator import CHECKPOINT_KIND

    path = tmp_path / "model.pt"
    save_checkpoint(path, CHECKPOINT_KIND, generator.config, generator.network.state_dict(), {"name": "tiny", "step": 3})
    loaded = SemanticImageGenerator.load(path, "cpu")
    assert loaded.info.trained and loaded.info.name == "tiny" and loaded.info.training_steps == 3
    assert loaded.config == generator.config
    with pytest.raises(ValueError, match="expected"):
        from shared.semantic.checkpoints import load_checkpoint
        load_checkpoint(path, "segmenter")


class ExactGaussianModel:
    """The exact network for data x_0 ~ N(mean, std^2) per pixel; std = 0 is a single point.

    E[x_0 | x_t] = mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean), and epsilon
    follows from it, so a sampler's only error is its own discretisation of the ODE.
    """

    def __init__(self, diffusion: GaussianDiffusion, mean: float, std: float) -> None:
        self.alphas_cumprod = torch.from_numpy(diffusion.alphas_cumprod)
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_start = self.mean + alpha * self.std**2 / (alpha**2 * self.std**2 + sigma**2) * (x - alpha * self.mean)
        eps = ((x - alpha * x_start) / sigma).float()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def _seeded(count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(count)]


def test_log_snr_timesteps_are_distinct_and_evenly_spread(diffusion: GaussianDiffusion) -> None:
    for steps in (1, 2, 10, 50, 1000):
        timesteps = log_snr_timesteps(diffusion.alphas_cumprod, steps)
        assert len(timesteps) == steps and (np.diff(timesteps) > 0).all() and timesteps[-1] == 999
    log_snr = np.log(diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod))
    even = -np.diff(log_snr[log_snr_timesteps(diffusion.alphas_cumprod, 10)])
    uniform_time = -np.diff(log_snr[spaced_timesteps(1000, 10)])
    assert even.max() / even.min() < 1.5 < uniform_time.max() / uniform_time.min()
    with pytest.raises(ValueError, match="steps"):
        log_snr_timesteps(diffusion.alphas_cumprod, 0)


@pytest.mark.parametrize("sampler", [DPMSolverPP2MSampler(), DPMSolverPP2MSampler(spacing="time"), DDIMSampler()])
def test_ten_steps_land_on_a_single_data_point(diffusion: GaussianDiffusion, sampler) -> None:
    out = sampler.sample(diffusion, ExactGaussianModel(diffusion, 0.3, 0.0), (2, 3, 4, 4), _seeded(2), 10)
    torch.testing.assert_close(out, torch.full_like(out, 0.3), atol=1e-4, rtol=0)


def test_dpm_solver_follows_the_exact_ode_closer_than_ddim(diffusion: GaussianDiffusion) -> None:
    mean, std, shape = 0.2, 0.15, (4, 3, 8, 8)
    model = ExactGaussianModel(diffusion, mean, std)
    # The ODE keeps z = (x_t - alpha_t mean) / sqrt(alpha_t^2 std^2 + sigma_t^2) fixed; the last
    # model call then maps x_0's state at t = 0 to its x_0 prediction.
    alpha_bar = diffusion.alphas_cumprod
    x_noisiest = per_image_noise(_seeded(4), shape, torch.device("cpu")).double()
    z = (x_noisiest - np.sqrt(alpha_bar[-1]) * mean) / np.sqrt(alpha_bar[-1] * std**2 + 1 - alpha_bar[-1])
    exact = (mean + np.sqrt(alpha_bar[0]) * std**2 / np.sqrt(alpha_bar[0] * std**2 + 1 - alpha_bar[0]) * z).float()
    errors = {name: (sampler.sample(diffusion, model, shape, _seeded(4), 10) - exact).abs().mean().item()
              for name, sampler in [("dpmpp2m", DPMSolverPP2MSampler()), ("ddim", DDIMSampler())]}
    assert errors["dpmpp2m"] < 0.005
    assert errors["dpmpp2m"] < errors["ddim"] / 10


def test_dpm_solver_is_deterministic_per_image_seed() -> None:
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=50))
    torch.manual_seed(2)
    net = SemanticUNet(TINY).eval()
    cond = torch.rand(2, 4, 8, 16)
    sampler = SAMPLERS["dpmpp2m"]()
    assert isinstance(sampler, DPMSolverPP2MSampler)
    with torch.no_grad():
        first = sampler.sample(diffusion, GuidedModel(net, cond, 1.5), (2, 3, 8, 16), _seeded(2), 5)
        again = sampler.sample(diffusion, GuidedModel(net, cond, 1.5), (2, 3, 8, 16), _seeded(2), 5)
        alone = sampler.sample(diffusion, GuidedModel(net, cond[1:], 1.5), (1, 3, 8, 16), _seeded(2)[1:], 5)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    torch.testing.assert_close(first[1:], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="spacing"):
        DPMSolverPP2MSampler(spacing="karras")
