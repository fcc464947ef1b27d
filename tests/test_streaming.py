"""Data larger than memory: batches streamed from an iterable, the data plate scaled to the true n."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from simulate import factor_data, mixture_data
from torch.utils.data import DataLoader, TensorDataset

import freqvi
from freqvi.datasets import NpyBatches
from freqvi.errors import FreqviInputError
from freqvi.estimators import get_estimator
from freqvi.handlers import SubsamplePlate
from freqvi.models import FactorAnalysis, GaussianMixture


def normal_mean(x):
    loc = pyro.param("loc", torch.tensor(0.0, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)


def no_latents(x):
    pass


def test_a_streamed_step_is_the_gradient_of_the_batch_scaled_to_n():
    x = torch.linspace(-1.0, 3.0, 40, dtype=torch.float64)
    batches = DataLoader(TensorDataset(x), batch_size=8)  # n = len(dataset) = 40
    freqvi.fit(normal_mean, batches, no_latents, num_steps=1, optim="sgd", lr=1e-3, progress=False)
    # d/d loc of (n / b) sum_{i <= b} log N(x_i; loc, 1) at loc = 0
    expected = 1e-3 * (40 / 8) * float(x[:8].sum())
    assert float(pyro.param("loc").detach()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss", ["trace", "iwae"])
def test_a_streamed_batch_scores_as_the_same_rows_subsampled_in_memory(loss):
    fa = FactorAnalysis(5, 2)
    x = factor_data(n=60)
    guide = fa.guide  # exact posterior: no local parameters
    rows = torch.arange(10, 22)
    elbo = get_estimator(loss, num_particles=3)
    freqvi.fit(fa.model, x, guide, num_steps=1, progress=False)  # initialises the parameters
    pyro.set_rng_seed(5)
    with SubsamplePlate("data", rows):
        in_memory = elbo.loss(fa.model, guide, x)
    pyro.set_rng_seed(5)
    with SubsamplePlate("data", None, size=60):
        streamed = elbo.loss(fa.model, guide, x[rows])
    pyro.set_rng_seed(5)
    unscaled = elbo.loss(fa.model, guide, x[rows])  # the 12 rows on their own
    assert streamed == pytest.approx(in_memory, rel=1e-10)
    assert streamed == pytest.approx(unscaled * 60 / 12, rel=1e-10)


def fit_from_npy(path, num_steps, **options):
    fa = FactorAnalysis(5, 2)
    source = NpyBatches(path, batch_size=16, seed=4)
    freqvi.fit(fa.model, source, fa.guide, num_steps=num_steps, lr=0.02, seed=0, progress=False, **options)
    return {k: v.clone() for k, v in fa.estimates().items()}


def test_a_fit_streamed_from_npy_resumes_bit_for_bit(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, factor_data(n=70).numpy())  # 5 blocks a pass, the last of 6 rows
    whole = fit_from_npy(path, 23)
    first = fit_from_npy(path, 12, checkpoint=tmp_path / "fit.ckpt")
    assert not all(torch.equal(first[k], whole[k]) for k in whole)
    resumed = fit_from_npy(path, 23, resume=tmp_path / "fit.ckpt")
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_online_em_over_npy_batches_records_the_full_data_log_likelihood(tmp_path):
    x = mixture_data(n=600, dtype=torch.float32)
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    gm = GaussianMixture(3, 2)
    result = freqvi.em(gm, NpyBatches(path, batch_size=100), max_iter=6, tol=0.0, seed=0, progress=False)
    at_the_end = float(freqvi.log_likelihood(gm, x).total)
    assert result.log_likelihood[-1] == pytest.approx(at_the_end, rel=1e-5)
    batch = GaussianMixture(3, 2)
    freqvi.em(batch, x, max_iter=200, seed=0, progress=False)
    exact = float(freqvi.log_likelihood(batch, x).total)
    assert result.log_likelihood[-1] == pytest.approx(exact, abs=0.01 * 600)  # within 0.01 nats per row


def test_checkpoints_of_a_plain_dataloader_are_refused(tmp_path):
    x = torch.randn(40)
    with pytest.raises(FreqviInputError, match="position in a DataLoader cannot be saved"):
        freqvi.fit(normal_mean, DataLoader(x, batch_size=8), no_latents, checkpoint=tmp_path / "c",
                   progress=False)


BAD_STREAMS = {
    "batch_size-with-batches": (lambda: DataLoader(torch.randn(40), batch_size=8), {"batch_size": 4},
                                "leave batch_size out"),
    "unknown-n": (lambda: (b for b in torch.randn(5, 8)), {}, "pass num_observations="),
    "iterator-used-up": (lambda: iter(list(torch.randn(3, 8))), {"num_observations": 24},
                         "used up after one pass"),
    "batch-larger-than-n": (lambda: DataLoader(torch.randn(40), batch_size=8), {"num_observations": 4},
                            "more than num_observations"),
    "shapes-change": (lambda: [torch.randn(8), torch.randn(8, 2)].__iter__(), {"num_observations": 16},
                      "first batch's shapes"),
    "nan-in-a-batch": (lambda: DataLoader(torch.tensor([1.0, np.nan] * 4), batch_size=4), {},
                       "non-finite"),
    "empty": (lambda: DataLoader(torch.randn(0), batch_size=4), {"num_observations": 3}, "yields no batches"),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_malformed_streams_are_clear_errors(case):
    make, options, message = BAD_STREAMS[case]
    with pytest.raises(FreqviInputError, match=message):
        freqvi.fit(normal_mean, make(), no_latents, num_steps=10, progress=False, **options)


def test_a_guide_with_parameters_per_observation_is_refused_for_batches():
    fa = FactorAnalysis(5, 2)
    batches = DataLoader(factor_data(n=40), batch_size=8)
    with pytest.raises(FreqviInputError, match="parameters per observation"):
        freqvi.fit(fa.model, batches, fa.mean_field_guide(), num_steps=2, progress=False)


def test_npy_batches_refuse_files_they_cannot_stream(tmp_path):
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.ones((4, 3))))
    np.save(tmp_path / "flat.npy", np.ones(4))
    with pytest.raises(FreqviInputError, match="Fortran order"):
        NpyBatches(tmp_path / "fortran.npy", 2)
    with pytest.raises(FreqviInputError, match=r"shape \(4,\)"):
        NpyBatches(tmp_path / "flat.npy", 2)
    with pytest.raises(FreqviInputError, match=r"expected an existing \.npy file"):
        NpyBatches(tmp_path / "missing.npy", 2)


def test_npy_batches_cover_every_row_once_a_pass_and_shard_disjointly(tmp_path):
    x = np.arange(2 * 23, dtype=np.float32).reshape(23, 2)
    np.save(tmp_path / "x.npy", x)
    whole = torch.cat(list(NpyBatches(tmp_path / "x.npy", 5, seed=1)))
    assert sorted(whole[:, 0].tolist()) == x[:, 0].tolist()
    shards = [torch.cat(list(NpyBatches(tmp_path / "x.npy", 5, seed=1, rank=r, world_size=2)))
              for r in (0, 1)]
    assert not set(shards[0][:, 0].tolist()) & set(shards[1][:, 0].tolist())


def test_device_cpu_and_cuda_when_present():
    x = torch.linspace(-1.0, 3.0, 40)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        pyro.clear_param_store()
        freqvi.fit(normal_mean, x, no_latents, num_steps=300, lr=0.05, device=device, progress=False)
        assert pyro.param("loc").device.type == device
        assert float(pyro.param("loc").detach()) == pytest.approx(float(x.mean()), abs=1e-3)
    with pytest.raises(FreqviInputError, match="device must be"):
        freqvi.fit(normal_mean, x, no_latents, device="abacus", progress=False)


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_online_em_over_npy_batches_resumes_bit_for_bit(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, mixture_data(n=300, dtype=torch.float32).numpy())

    def em_run(max_iter, **options):
        gm = GaussianMixture(3, 2)
        freqvi.em(gm, NpyBatches(path, batch_size=64), max_iter=max_iter, tol=0.0, seed=0, progress=False,
                  **options)
        return {k: v.clone() for k, v in gm.estimates().items()}

    whole = em_run(5)
    em_run(2, checkpoint=tmp_path / "em.ckpt")
    resumed = em_run(5, resume=tmp_path / "em.ckpt")
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
