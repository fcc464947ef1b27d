"""The ``freqvi`` console command, called in-process through :func:`freqvi.cli.main`."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from report_keys import standard_error_keys
from scipy.stats import multivariate_normal
from test_proposals import DEFAULT_NAME

import freqvi
from freqvi.cli import diffusion_report, main, vae_report
from freqvi.datasets import load_digits, load_iris, load_moons
from freqvi.infer.diffusion import diffusion_bound
from freqvi.models import VAE, GaussianDiffusion, GaussianMixture


def _printed_log_likelihood(out: str) -> float:
    match = re.search(r"^log-likelihood\s+(\S+) nats total", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


def _write_csv(path, x: np.ndarray) -> None:
    header = ",".join(f"x{j}" for j in range(x.shape[1]))
    np.savetxt(path, x, delimiter=",", header=header, comments="")


@pytest.fixture
def small_data() -> np.ndarray:
    """Every fifth iris row, float64: shape (30, 4)."""
    return load_iris(dtype=torch.float64).numpy()[::5]


def test_default_run_prints_the_log_likelihood_of_the_same_fit(capsys):
    assert main(["--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "data            iris: n = 150, dim = 4" in out
    assert out.count("component ") == 3 and "converged       yes" in out
    assert err == ""

    x = load_iris()
    model = GaussianMixture(3, 4, "full")
    freqvi.em(model, x, seed=0, progress=False)
    expected = freqvi.log_likelihood(model, x).total
    assert _printed_log_likelihood(out) == pytest.approx(expected, abs=1e-4)


def test_help_describes_the_commands(capsys):
    assert main(["--help"]) == 0
    assert "em" in capsys.readouterr().out
    assert main(["em", "--help"]) == 0
    assert "Gaussian mixture" in capsys.readouterr().out


def test_json_holds_estimates_and_metrics(tmp_path, capsys):
    path = tmp_path / "fit.json"
    argv = ["em", "--quiet", "--max-iter", "3", "--covariance", "diag", "--json", str(path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(path.read_text())
    assert set(report) == {"command", "data", "model", "estimates", "log_likelihood", "fit", "conventions"}
    ll = report["log_likelihood"]  # exact for a mixture: no Monte-Carlo error
    assert ll["method"] == "exact" and ll["monte_carlo_standard_error_total"] == 0
    assert ll["mean_per_observation"] == pytest.approx(ll["total"] / 150)
    assert standard_error_keys(report) == [(("log_likelihood",), "monte_carlo", "total"),
                                           (("log_likelihood",), "monte_carlo", "per_observation")]
    assert set(report["estimates"]) == {"weights", "locs", "covariances"}
    assert np.asarray(report["estimates"]["covariances"]).shape == (3, 4)
    assert report["data"] == {"name": "iris", "n": 150, "dim": 4, "dtype": "float32"}
    assert report["fit"]["num_iter"] == 3 and report["fit"]["converged"] is False
    assert report["log_likelihood"]["total"] == pytest.approx(_printed_log_likelihood(out), abs=1e-4)
    assert err.startswith("freqvi: warning: EM stopped at max_iter=3")


@pytest.mark.parametrize("suffix", [".csv", ".npy"])
def test_data_from_a_file(tmp_path, capsys, small_data, suffix):
    path = tmp_path / f"small{suffix}"
    _write_csv(path, small_data) if suffix == ".csv" else np.save(path, small_data)
    assert main(["--quiet", "--data", str(path), "--components", "2", "--full", "--max-iter", "5"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: n = 30, dim = 4 (float64)" in out
    assert out.count("component ") == 2 and out.count("covariance ") == 2


def _nan_file(tmp_path, data):
    data = data.copy()
    data[3, 1] = np.nan
    path = tmp_path / "nan.csv"
    _write_csv(path, data)
    return ["--data", str(path)], "non-finite"


def _three_rows(tmp_path, data):
    path = tmp_path / "three.npy"
    np.save(path, data[:3])
    return ["--data", str(path), "--components", "4"], "at least that many observations"


@pytest.mark.parametrize("bad_input", [
    _nan_file,
    _three_rows,
    lambda tmp_path, data: (["--data", str(tmp_path / "missing.csv")], "does not exist"),
], ids=["nan", "more-components-than-rows", "missing-file"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, small_data, bad_input):
    argv, message = bad_input(tmp_path, small_data)
    assert main(["em", "--quiet", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("freqvi: error: ") and err.count("\n") == 1
    assert message in err


# ----- freqvi vae ------------------------------------------------------------------------------
VAE_QUICK = ["vae", "--quiet", "--steps", "30", "--num-samples", "50", "--hidden", "16", "--gap-steps", "20"]


def test_vae_writes_metrics_and_pictures(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main([*VAE_QUICK, "--latent-dim", "2", "--out", str(out_dir)]) == 0
    out, _ = capsys.readouterr()
    report = json.loads((out_dir / "metrics.json").read_text())
    assert report["data"] == {"name": "digits", "n_train": 1500, "n_test": 297, "dim": 64, "pixels": "binary"}
    assert report["model"]["latent_dim"] == 2 and report["fit"]["num_steps"] == 30
    ll, terms = report["test_log_likelihood"], report["test_elbo"]
    assert ll["num_samples"] == 50 and ll["mean_per_observation"] > terms["mean_per_observation"]
    assert terms["mean_per_observation"] == pytest.approx(
        terms["reconstruction_per_observation"] - terms["kl_per_observation"])
    assert sorted(report["pictures"]) == ["latent.png", "reconstructions.png", "samples.png"]
    assert all((out_dir / name).read_bytes()[:4] == b"\x89PNG" for name in report["pictures"])
    # the default digits are binary: the Bernoulli likelihood is a density and the number a log-likelihood
    assert ll["normalised"] and "cross-entropy" not in out and "(binarised at 0.5)" in out
    assert f"{ll['mean_per_observation']:.3f} nats per image (Monte-Carlo s.e. " in out
    assert ll["proposal"] == DEFAULT_NAME and f"from the proposal {DEFAULT_NAME}" in " ".join(out.split())
    assert "PSIS k-hat" in out


def test_vae_report_keys_name_their_units(tmp_path, capsys):
    """Every standard error in metrics.json is of a known kind and sits beside a number of its unit; the
    per-observation ones are the totals' over the number of observations, as printed."""
    out_dir = tmp_path / "run"
    assert main([*VAE_QUICK, "--out", str(out_dir)]) == 0
    out, _ = capsys.readouterr()
    report = json.loads((out_dir / "metrics.json").read_text())
    assert set(report["conventions"]) == {"units", "standard_errors"}
    found = standard_error_keys(report)
    for section, n in (("test_log_likelihood", 297), ("test_elbo", 297), ("amortization_gap", 10)):
        entry = report[section]
        assert ((section,), "monte_carlo", "per_observation") in found
        assert ((section,), "sampling", "per_observation") in found
        assert entry["mean_per_observation"] == pytest.approx(entry["total"] / n)
        assert entry["monte_carlo_standard_error_per_observation"] == pytest.approx(
            entry["monte_carlo_standard_error_total"] / n)
        assert (f"(Monte-Carlo s.e. {entry['monte_carlo_standard_error_per_observation']:.3f}; s.e. "
                f"{entry['sampling_standard_error_per_observation']:.3f} over the {n} test images)") in out


def test_vae_runs_with_one_seed_agree(tmp_path):
    """--seed also sets the networks' initial weights: two runs give the same numbers."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out_dir in runs:
        assert main([*VAE_QUICK, "--gap-steps", "1", "--seed", "3", "--out", str(out_dir)]) == 0
    first, second = (json.loads((out_dir / "metrics.json").read_text()) for out_dir in runs)
    assert first["test_log_likelihood"]["total"] == second["test_log_likelihood"]["total"]
    assert first["fit"]["validation_elbo_total"] == second["fit"]["validation_elbo_total"]


def test_vae_grey_levels_are_an_explicit_option(tmp_path, capsys):
    assert main([*VAE_QUICK, "--pixels", "grey", "--out", str(tmp_path)]) == 0
    out, _ = capsys.readouterr()
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["data"]["pixels"] == "grey" and not report["test_log_likelihood"]["normalised"]
    assert "(grey levels in [0, 1])" in out and "a cross-entropy, not a log-likelihood" in out


@pytest.fixture(scope="module")
def small_vae():
    """A VAE fitted for 30 steps on 300 binarised training digits, and 60 test digits."""
    train, test = load_digits("train", binarize=True)[:300], load_digits("test", binarize=True)[:60]
    model = VAE(64, 2, hidden=(16,))
    result = freqvi.fit(model, train, loss="mean_field", lr=2e-3, num_steps=30, batch_size=128, seed=0,
                        progress=False)
    return model, train, test, result


def _vae_args(seed: int) -> argparse.Namespace:
    return argparse.Namespace(num_samples=50, seed=seed, gap_steps=20, estimator="mean_field", lr=2e-3,
                              batch_size=128, pixels=None, ema_decay=0.0)


@pytest.mark.filterwarnings("ignore::freqvi.errors.FreqviWarning")
def test_vae_monte_carlo_standard_errors_match_the_spread_over_seeds(small_vae):
    """The Monte-Carlo s.e. per observation against an independent estimate of it: the standard deviation
    of the report's mean per observation over 24 seeds (the same fit, new draws). A s.e. of the total, or
    the spread over observations, beside a per-observation mean is off by a factor 60 or about 20."""
    model, train, test, result = small_vae
    reports = [vae_report("digits", train, test, model, result, _vae_args(seed)) for seed in range(24)]
    for section in ("test_log_likelihood", "test_elbo", "amortization_gap"):
        means = np.array([r[section]["mean_per_observation"] for r in reports])
        reported = np.array([r[section]["monte_carlo_standard_error_per_observation"] for r in reports])
        ratio = means.std(ddof=1) / np.sqrt(np.mean(reported ** 2))
        # the sample s.d. of 24 draws has relative s.e. 1/sqrt(2 * 23); 4 of them on the log scale
        assert abs(np.log(ratio)) < 4 / np.sqrt(2 * 23), (section, ratio)


@pytest.mark.filterwarnings("ignore::freqvi.errors.FreqviWarning")
def test_vae_sampling_standard_errors_recomputed(small_vae):
    """The sampling s.e. of the report against NumPy's on the per-observation values of the same draws."""
    model, train, test, result = small_vae
    report = vae_report("digits", train, test, model, result, _vae_args(3))
    ll = freqvi.log_likelihood(model, test, num_samples=50, seed=3)
    values = ll.per_observation.double().numpy()
    assert report["test_log_likelihood"]["sampling_standard_error_per_observation"] == pytest.approx(
        values.std(ddof=1) / np.sqrt(len(values)), rel=1e-9)
    # the total is summed in float64, the per-observation values are kept in the data's float32
    assert report["test_log_likelihood"]["total"] == pytest.approx(values.sum(), rel=1e-6)
    assert report["test_log_likelihood"]["monte_carlo_standard_error_total"] == pytest.approx(
        ll.standard_error, rel=1e-9)


@pytest.mark.parametrize("values", ["binary", "grey"])
def test_vae_on_a_users_file(tmp_path, capsys, values):
    path = tmp_path / "pixels.npy"
    pixels = np.random.default_rng(0).uniform(size=(50, 9))
    np.save(path, pixels.round() if values == "binary" else pixels)
    assert main([*VAE_QUICK, "--data", str(path), "--out", str(tmp_path), "--estimator", "iwae",
                 "--particles", "3"]) == 0
    out, _ = capsys.readouterr()
    assert ("cross-entropy" in out) == (values == "grey")  # a user's file is used as it is
    assert "nats per observation" in out
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["data"] == {"name": str(path), "n_train": 40, "n_test": 10, "dim": 9}
    assert report["fit"]["estimator"] == "iwae"
    assert report["pictures"] == ["reconstructions.png", "samples.png"]


def _above_one(tmp_path):
    path = tmp_path / "counts.npy"
    np.save(path, np.arange(64.0 * 10).reshape(10, 64))
    return ["--data", str(path)], "values in [0, 1]"


@pytest.mark.parametrize("bad_input", [
    _above_one,
    lambda tmp_path: (["--data", str(tmp_path / "missing.npy")], "does not exist"),
    lambda tmp_path: (["--pixels", "grey", "--data", str(_above_one(tmp_path)[0][1])],
                      "--pixels grey applies to the embedded digits"),
], ids=["above-one", "missing-file", "pixels-with-data"])
def test_vae_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, bad_input):
    argv, message = bad_input(tmp_path)
    assert main([*VAE_QUICK, "--out", str(tmp_path / "out"), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("freqvi: error: ") and err.count("\n") == 1
    assert message in err


# ----- freqvi diffusion ------------------------------------------------------------------------
DIFFUSION_QUICK = ["diffusion", "--quiet", "--steps", "20", "--diffusion-steps", "20", "--hidden", "16",
                   "--samples", "200"]


def test_diffusion_writes_metrics_and_pictures(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main([*DIFFUSION_QUICK, "--out", str(out_dir)]) == 0
    out, _ = capsys.readouterr()
    report = json.loads((out_dir / "metrics.json").read_text())
    assert report["data"] == {"name": "moons", "n_train": 2000, "n_test": 2000, "dim": 2}
    assert report["model"]["num_steps"] == 20 and report["fit"]["num_steps"] == 20
    nll, ed = report["test_nll_bound"], report["energy_distance"]
    assert nll["bits_per_dim"] == pytest.approx(nll["nats_per_dim"] / np.log(2))
    train, test = load_moons("train", torch.float64).numpy(), load_moons("test", torch.float64).numpy()
    gaussian = multivariate_normal(train.mean(0), np.cov(train.T, bias=True)).logpdf(test)
    assert nll["gaussian_nats_per_dim"] == pytest.approx(-gaussian.mean() / 2, rel=1e-9)
    assert ed["num_points"] == 200 and ed["samples_vs_test"] > ed["test_half_vs_half"] > 0
    assert sorted(report["pictures"]) == ["forward_noising.png", "samples.png"]
    assert all((out_dir / name).read_bytes()[:4] == b"\x89PNG" for name in report["pictures"])
    se = nll["sampling_standard_error_nats_per_dim"]
    assert f"{nll['nats_per_dim']:.4f} nats/dim (s.e. {se:.4f} over the 2000 test points)" in out
    assert "an upper bound on their NLL" in out
    assert nll["sampling_standard_error_bits_per_dim"] == pytest.approx(
        nll["sampling_standard_error_nats_per_dim"] / np.log(2))
    assert standard_error_keys(report) == [(("test_nll_bound",), "sampling", "nats_per_dim"),
                                           (("test_nll_bound",), "sampling", "bits_per_dim")]


def test_diffusion_standard_error_recomputed():
    """The bound's sampling s.e. per dimension against NumPy's on the per-observation bounds of the same
    draws."""
    train, test = load_moons("train")[:200], load_moons("test")[:100]
    torch.manual_seed(0)
    model = GaussianDiffusion(2, 20, hidden=(16,))
    result = freqvi.fit(model, train, loss="time_subsampled", num_steps=5, seed=0, progress=False)
    args = argparse.Namespace(seed=4, schedule="linear", hidden=(16,), estimator="time_subsampled", lr=0.01,
                              batch_size=200, ema_decay=0.0, sampler="ancestral")
    report = diffusion_report("moons", train, test, model, result, model.sample(50, seed=0), args)
    values = diffusion_bound(model, test, seed=4).per_observation.double().numpy() / 2  # nats per dimension
    nll = report["test_nll_bound"]
    assert nll["nats_per_dim"] == pytest.approx(values.mean(), rel=1e-9)
    assert nll["sampling_standard_error_nats_per_dim"] == pytest.approx(
        values.std(ddof=1) / np.sqrt(len(values)), rel=1e-9)


def test_diffusion_on_a_users_file(tmp_path):
    path = tmp_path / "points.csv"
    _write_csv(path, np.random.default_rng(0).normal(size=(50, 3)))
    assert main([*DIFFUSION_QUICK, "--data", str(path), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["data"] == {"name": str(path), "n_train": 40, "n_test": 10, "dim": 3}
    assert report["pictures"] == [] and "energy_distance" not in report


def test_diffusion_on_digits_with_ddim(tmp_path):
    assert main([*DIFFUSION_QUICK, "--dataset", "digits", "--steps", "3", "--sampler", "ddim", "--ddim-steps",
                 "5", "--estimator", "simple", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["data"]["dim"] == 64 and "energy_distance" not in report
    assert report["test_nll_bound"]["gaussian_nats_per_dim"] is None  # blank pixels: singular covariance
    assert report["pictures"] == ["forward_noising.png", "samples.png"]


@pytest.mark.parametrize("bad_input", [
    (["--data", "missing.npy"], "does not exist"),
], ids=["missing-file"])
def test_diffusion_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, bad_input):
    argv, message = bad_input
    assert main([*DIFFUSION_QUICK, "--out", str(tmp_path / "out"), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("freqvi: error: ") and err.count("\n") == 1
    assert message in err


# ----- every argument checked before any work ------------------------------------------------------------
@pytest.mark.parametrize(("argv", "option", "expected"), [
    (["em", "--seed", "-1"], "--seed", "an integer in [0, 2**32 - 1]"),
    (["em", "--seed", str(2**40)], "--seed", "an integer in [0, 2**32 - 1]"),
    (["em", "--seed", "1.5"], "--seed", "an integer in [0, 2**32 - 1]"),
    (["em", "--components", "0"], "--components", "an integer >= 1"),
    (["em", "--max-iter", "-3"], "--max-iter", "an integer >= 1"),
    (["em", "--tol", "nan"], "--tol", "a finite number >= 0"),
    (["em", "--threads", "0"], "--threads", "an integer >= 1"),
    (["vae", "--steps", "0"], "--steps", "an integer >= 1"),
    (["vae", "--batch-size", "0"], "--batch-size", "an integer >= 1"),
    (["vae", "--particles", "-2"], "--particles", "an integer >= 1"),
    (["vae", "--num-samples", "0"], "--num-samples", "an integer >= 1"),
    (["vae", "--latent-dim", "0"], "--latent-dim", "an integer >= 1"),
    (["vae", "--gap-steps", "0"], "--gap-steps", "an integer >= 1"),
    (["vae", "--lr", "-1"], "--lr", "a finite number > 0"),
    (["vae", "--lr", "inf"], "--lr", "a finite number > 0"),
    (["vae", "--min-noise-scale", "-1"], "--min-noise-scale", "a finite number >= 0"),
    (["vae", "--hidden", "16,x"], "--hidden", "comma-separated integers >= 1"),
    (["vae", "--checkpoint-every", "0"], "--checkpoint-every", "an integer >= 1"),
    (["diffusion", "--samples", "0"], "--samples", "an integer >= 1"),
    (["diffusion", "--diffusion-steps", "0"], "--diffusion-steps", "an integer >= 1"),
    (["diffusion", "--hidden", "16,0"], "--hidden", "comma-separated integers >= 1"),
    (["diffusion", "--ddim-steps", "0"], "--ddim-steps", "an integer >= 1"),
    (["diffusion", "--ema-decay", "1"], "--ema-decay", "a finite number >= 0 and < 1"),
    (["tour", "--seed", str(2**32)], "--seed", "an integer in [0, 2**32 - 1]"),
])
def test_a_bad_value_is_a_usage_error_before_any_work(tmp_path, capsys, monkeypatch, argv, option, expected):
    calls = []
    for name in ("em", "fit"):
        monkeypatch.setattr(freqvi, name, lambda *a, **k: calls.append(a))
    out_dir = tmp_path / "out"
    folder = [] if argv[0] == "em" else ["--out", str(out_dir)]
    assert main([*argv, *folder, "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith("usage: freqvi ") and f"error: argument {option}: expected {expected}" in err
    assert calls == [] and not out_dir.exists()


def test_a_ddim_sampler_longer_than_the_chain_is_refused_before_the_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(freqvi, "fit", lambda *a, **k: pytest.fail("fitted before the check"))
    argv = [*DIFFUSION_QUICK, "--sampler", "ddim", "--ddim-steps", "21", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--ddim-steps takes at most the chain's --diffusion-steps (20) steps; got 21" in err


def test_a_run_that_fails_is_exit_status_1(tmp_path, capsys):
    """Input refused is 2 (a usage error); a run that fails (here it diverges at once) is 1."""
    assert main([*VAE_QUICK, "--lr", "1e9", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("freqvi: error: step 0 diverged")


# ----- the places the command writes to, checked before any work -----------------------------------------
def _a_file(tmp_path):
    (tmp_path / "file").write_text("")
    return tmp_path / "file"


@pytest.mark.parametrize(("argv", "message"), [
    (lambda p: ["tour", "--quick", "--out", str(_a_file(p) / "sub")], "is not a folder"),
    (lambda p: ["vae", "--out", str(_a_file(p))], "exists and is not a folder"),
    (lambda p: ["diffusion", "--out", str(_a_file(p) / "a" / "b")], "is not a folder"),
    (lambda p: ["em", "--json", str(p)], "exists and is not a regular file"),
    (lambda p: ["em", "--json", str(p / "missing" / "fit.json")], "the folder of"),
    (lambda p: ["vae", "--out", str(p / "o"), "--checkpoint", str(p)], "is a directory, not a regular file"),
    (lambda p: ["vae", "--out", str(p / "o"), "--resume"], "give --checkpoint PATH too"),
    (lambda p: ["vae", "--out", str(p / "o"), "--data", str(_a_file(p)), "--checkpoint", str(p / "file")],
     "is the --data file; writing it would replace the data"),
    (lambda p: ["em", "--data", str(_a_file(p)), "--json", str(p / "." / "file")], "is the --data file"),
    (lambda p: ["diffusion", "--out", str(p / "o"), "--checkpoint", str(p / "c.ckpt"), "--resume"],
     "there is no checkpoint"),
], ids=["tour-out-under-a-file", "out-is-a-file", "out-under-a-file", "json-is-a-folder",
        "json-folder-missing", "checkpoint-is-a-folder", "resume-without-checkpoint",
        "checkpoint-is-the-data", "json-is-the-data", "resume-missing-checkpoint"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, argv,
                                                                    message):
    _forbid_work(monkeypatch)
    assert main([*argv(tmp_path), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("freqvi: error: ") and err.count("\n") == 1 and message in err


def _forbid_work(monkeypatch):
    from freqvi import tour

    def work(*args, **kwargs):
        pytest.fail("work started before the outputs were checked")

    for module, name in ((freqvi, "em"), (freqvi, "fit"), (tour, "run_tour"),
                         (freqvi.cli, "_load_data"), (freqvi.cli, "_vae_data")):
        monkeypatch.setattr(module, name, work)


@pytest.mark.parametrize("command", ["em", "vae", "diffusion", "tour"])
def test_a_folder_where_nothing_can_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                                         command):
    """As root every folder is writable, so the refusal of the probe file is injected: what a read-only
    disk or a folder without write permission does to ``mkstemp``/``mkdtemp``."""
    from freqvi import cli_options

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_options.tempfile, "mkstemp", refused)
    monkeypatch.setattr(cli_options.tempfile, "mkdtemp", refused)
    _forbid_work(monkeypatch)
    target = ["--json", str(tmp_path / "fit.json")] if command == "em" else ["--out", str(tmp_path / "new")]
    assert main([command, *target, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"nothing can be written in {str(tmp_path)!r} (Permission denied)" in err
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # no probe left behind


def test_the_probes_leave_nothing_behind(tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    argv = ["em", "--quiet", "--max-iter", "2", "--json", str(existing / "fit.json")]
    assert main(argv) == 0
    assert sorted(p.name for p in existing.iterdir()) == ["fit.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_a_gaussian_vae_on_the_digits_names_their_blank_pixels_once(tmp_path, capsys):
    """The digits' grey-level training images have blank pixels (always 0): the floor bounds the
    likelihood there, the command says so once (the data are checked by the command and by fit), and the
    run goes on."""
    assert main([*VAE_QUICK, "--likelihood", "gaussian", "--pixels", "grey", "--out", str(tmp_path)]) == 0
    train = load_digits("train")
    blank = (train == train[:1]).all(0).nonzero().flatten().tolist()
    warned = [line for line in capsys.readouterr().err.splitlines() if "are constant" in line]
    assert len(warned) == 1
    assert warned[0].startswith(f"freqvi: warning: columns {blank} of the data ({len(blank)} of 64) are "
                                "constant: there the Gaussian likelihood grows as the noise scale falls, "
                                "bounded only by min_noise_scale = 0.001 (at most 5.989 nats per row")


@pytest.mark.parametrize("command", ["em", "vae", "diffusion"])
@pytest.mark.parametrize(("contents", "message"), [
    ("x\xe9,y\n0.1,0.2\n0.3,0.4\n".encode("latin-1"), "as UTF-8 text"),
    (b"x,y\n0.1,nan\n0.3,0.4\n0.5,0.6\n0.7,0.8\n", "non-finite"),
], ids=["latin-1", "nan"])
def test_a_data_file_that_cannot_be_used_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, command,
                                                                     contents, message):
    path = tmp_path / "data.csv"
    path.write_bytes(contents)
    monkeypatch.setattr(freqvi, "fit", lambda *a, **k: pytest.fail("fitted"))
    monkeypatch.setattr(freqvi, "em", lambda *a, **k: pytest.fail("fitted"))
    folder = [] if command == "em" else ["--out", str(tmp_path / "out")]
    assert main([command, "--quiet", "--data", str(path), *folder]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("freqvi: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()
