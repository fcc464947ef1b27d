"""``freqvi tour --quick``: every stage runs, and the report shows real figures and consistent numbers."""

import html
import itertools
import json
import math
import re
import struct

import pytest
from report_keys import standard_error_keys

from freqvi.cli import main
from freqvi.tour import STAGES


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour")
    assert main(["tour", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def png_size(path):
    """Width and height from a PNG's header; fails unless the file is a PNG."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", header[16:24])


def test_the_report_has_every_section_with_its_figures(tour):
    page = (tour / "report.html").read_text()
    titles = re.findall(r"<h2>\d+\. (.*?)</h2>", page)
    assert len(titles) == len(STAGES)
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= len(STAGES)
    for name in images:
        width, height = png_size(tour / name)
        assert width > 200 and height > 100, name
    markdown = (tour / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in images)


def test_metrics_agree_with_their_references(tour):
    metrics = json.loads((tour / "metrics.json").read_text())
    em, glmm, vae, diffusion = metrics["sections"].values()
    # EM against scikit-learn's independent fit, per observation
    assert abs(em["log_likelihood"]["total"] - em["sklearn_log_likelihood"]["total"]) / 150 < 1e-4
    assert min(b - a for a, b in itertools.pairwise(em["log_likelihood_path_total"])) >= -1e-9
    # the quadrature MLE maximises the likelihood; the ELBO bounds it at theta_VI
    loglik = {name: entry["total"] for name, entry in glmm["log_likelihood"].items()}
    assert loglik["quadrature MLE"] >= loglik["variational EM"] - 1e-6
    elbo_se = glmm["elbo"]["monte_carlo_standard_error_total"]
    assert glmm["elbo"]["total"] <= loglik["variational EM"] + 4 * elbo_se
    # importance sampling with the encoder as proposal sits above the ELBO
    ll, elbo = vae["test_log_likelihood"], vae["test_elbo"]
    se = math.hypot(ll["monte_carlo_standard_error_per_observation"],
                    elbo["monte_carlo_standard_error_per_observation"])
    assert ll["mean_per_observation"] >= elbo["mean_per_observation"] - 4 * se
    # the diffusion bound in bits is the bound in nats over log 2; distances are non-negative
    bound = diffusion["test_nll_bound"]
    assert bound["bits_per_dim"] == pytest.approx(bound["nats_per_dim"] / math.log(2))
    assert bound["sampling_standard_error_bits_per_dim"] == pytest.approx(
        bound["sampling_standard_error_nats_per_dim"] / math.log(2))
    assert diffusion["energy_distance"] >= 0 and diffusion["energy_distance_floor"] >= 0
    assert all(math.isfinite(section["seconds"]) for section in metrics["sections"].values())


def test_every_standard_error_names_its_kind_and_unit(tour):
    metrics = json.loads((tour / "metrics.json").read_text())
    found = {(path[-1], kind, unit) for path, kind, unit in standard_error_keys(metrics["sections"])}
    assert {("test_log_likelihood", "monte_carlo", "per_observation"),
            ("test_log_likelihood", "sampling", "per_observation"),
            ("test_nll_bound", "sampling", "nats_per_dim"), ("elbo", "monte_carlo", "total"),
            ("sigma", "observed_information", "estimate")} <= found
    ll = list(metrics["sections"].values())[2]["test_log_likelihood"]
    assert ll["mean_per_observation"] == pytest.approx(ll["total"] / 297)
    assert ll["monte_carlo_standard_error_per_observation"] == pytest.approx(
        ll["monte_carlo_standard_error_total"] / 297)


def test_the_report_says_what_its_numbers_are(tour):
    """The text agrees with metrics.json and says units, kinds of standard error, the proposal and
    why the fitted K is not BIC's."""
    page = html.unescape((tour / "report.html").read_text())
    metrics = json.loads((tour / "metrics.json").read_text())
    em, glmm, vae, diffusion = metrics["sections"].values()
    assert "<h2>Summary</h2>" in page and page.count("<thead>") == len(STAGES)
    ll = vae["test_log_likelihood"]
    assert (f"{ll['mean_per_observation']:.3f} nats per image (Monte-Carlo s.e. "
            f"{ll['monte_carlo_standard_error_per_observation']:.3f}; s.e. "
            f"{ll['sampling_standard_error_per_observation']:.3f} over the 297 test images)") in page
    assert f"proposal {ll['proposal']}, K = {ll['num_samples']}" in page
    assert f"PSIS k-hat above 0.7 for {ll['pareto_k_fraction_above_0.7']:.1%} of images" in page \
        or (ll["pareto_k_fraction_above_0.7"] == 0 and "PSIS k-hat at most 0.7 for every image" in page)
    bound = diffusion["test_nll_bound"]
    assert (f"{bound['nats_per_dim']:.3f} nats per dimension (s.e. "
            f"{bound['sampling_standard_error_nats_per_dim']:.3f} over the 2000 test points)") in page
    if em["bic_choice"] != em["fitted_k"]:
        assert f"The fit uses K = {em['fitted_k']}, the number of species, yet BIC prefers K = " in page
    shift = glmm["variational_minus_mle_in_mle_se_units"]["sigma"]
    vi, mle = (glmm["estimates"][name]["sigma"] for name in ("variational EM", "quadrature MLE"))
    assert shift == pytest.approx((vi["estimate"] - mle["estimate"])
                                  / mle["observed_information_standard_error_estimate"])
    assert f"sigma {shift:+.2f}" in page
    # no claim that no run supports
    assert "stays below the log-likelihood" not in page and "does not shrink" not in page
