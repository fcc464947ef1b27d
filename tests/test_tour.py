"""``freqvi tour --quick``: every stage runs, and the report shows real figures and consistent numbers."""

import itertools
import json
import math
import re
import struct

import pytest

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
    em, glmm, vae = (metrics["sections"][title] for title in list(metrics["sections"])[:3])
    # EM against scikit-learn's independent fit, per observation
    assert abs(em["log_likelihood"] - em["sklearn_log_likelihood"]) / 150 < 1e-4
    assert min(b - a for a, b in itertools.pairwise(em["log_likelihood_path"])) >= -1e-9
    # the quadrature MLE maximises the likelihood; the ELBO bounds it at theta_VI
    loglik = glmm["log_likelihood"]
    assert loglik["quadrature MLE"] >= loglik["variational EM"] - 1e-6
    assert glmm["elbo"] <= loglik["variational EM"] + 4 * glmm["elbo_standard_error"]
    # importance sampling with the encoder as proposal sits above the ELBO
    se = math.hypot(vae["test_log_likelihood_standard_error"], vae["test_elbo_standard_error"])
    assert vae["test_log_likelihood_per_observation"] >= vae["test_elbo_per_observation"] - 4 * se
    # the diffusion bound in bits is the bound in nats over log 2; distances are non-negative
    diffusion = list(metrics["sections"].values())[3]
    assert diffusion["bits_per_dim"] == pytest.approx(diffusion["nll_bound_nats_per_dim"] / math.log(2))
    assert diffusion["energy_distance"] >= 0 and diffusion["energy_distance_floor"] >= 0
    assert all(math.isfinite(section["seconds"]) for section in metrics["sections"].values())
