"""The bank says when BIC picks M = 1 (DCA inert): one CMDAWarning with the scores, kept in bank.json."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SklearnGMM

from cmda_data import CMDAWarning, EmbeddingBank
from cmda_data.core import functional as F


def build(x: torch.Tensor, **options):
    """Build a bank on ``x`` (student and teacher); return it and the CMDAWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = EmbeddingBank.from_embeddings({"image": x, "caption": x}, student="image", teachers="caption",
                                             **options)
    return bank, [w for w in caught if issubclass(w.category, CMDAWarning)]


def one_cluster(n: int = 240) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5])


@pytest.fixture(scope="module")
def inert():
    """A bank on one Gaussian blob with the default options (M by BIC over 1..6), and its warnings."""
    return build(one_cluster())


def test_one_cluster_warns_once_with_the_bic_table_of_sklearn(inert):
    x = one_cluster()
    bank, caught = inert
    assert bank.n_components == 1
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "'caption' embeddings" in message and "BIC chose M = 1" in message and "DCA" in message
    shown = {int(m): float(v) for m, v in re.findall(r"M=(\d+): (-?[\d.]+)", message)}
    assert set(shown) >= {1, 2, 3, 4}
    data = x.double().numpy()
    for m in (1, 2, 3, 4):
        reference = SklearnGMM(m, covariance_type="full", random_state=0, n_init=5).fit(data).bic(data)
        # the table keeps one decimal; EM of M > 1 may stop at another optimum than sklearn's best of 5
        assert shown[m] == pytest.approx(reference, rel=1e-3), m
    # M = 1 has a closed form: the stored scores equal sklearn's to rounding
    stored = bank.metadata["n_components_scores"]
    assert stored["1"] == pytest.approx(SklearnGMM(1, covariance_type="full").fit(data).bic(data), rel=1e-9)
    # the scores in the message are the stored ones
    for m in (1, 2, 3, 4):
        assert shown[m] == pytest.approx(stored[str(m)], abs=0.051)
    assert bank.metadata["dca_inert"] == message
    # with M = 1 the intra-modal weights really are one constant: the warning's claim
    intra = F.intra_modal_weights(bank.responsibilities)
    assert torch.allclose(intra, torch.full_like(intra, 2.0))


def test_other_covariance_types_and_aic_name_their_criterion():
    x = one_cluster()
    data = x.double().numpy()
    bank, caught = build(x, covariance_type="diag", candidates=range(1, 5))
    assert len(caught) == 1
    shown = {int(m): float(v) for m, v in re.findall(r"M=(\d+): (-?[\d.]+)", str(caught[0].message))}
    assert shown[1] == pytest.approx(SklearnGMM(1, covariance_type="diag").fit(data).bic(data), abs=0.051)
    bank, caught = build(x, candidates=[1, 2, 3], criterion="aic")
    assert bank.n_components == 1 and len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("AIC chose M = 1") and "M=3" in message and "M=4" not in message
    aic = SklearnGMM(1, covariance_type="full").fit(data).aic(data)
    assert bank.metadata["n_components_scores"]["1"] == pytest.approx(aic, rel=1e-9)


def test_two_clear_clusters_do_not_warn():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[6.0, 0.0, 0.0], [-6.0, 0.0, 0.0]])
    x = centres[torch.arange(200) % 2] + torch.randn(200, 3, generator=g)
    bank, caught = build(x)
    assert caught == [] and bank.n_components == 2
    assert "dca_inert" not in bank.metadata


def test_a_given_m_of_one_is_the_users_choice_and_does_not_warn():
    bank, caught = build(one_cluster(), n_components=1)
    assert caught == [] and bank.n_components == 1
    bank, caught = build(one_cluster(), candidates=[1])  # nothing to choose from
    assert caught == [] and bank.n_components == 1


def test_the_note_is_saved_in_bank_json_and_loaded(tmp_path, inert):
    bank, caught = inert
    folder = bank.save(tmp_path / "bank")
    assert "BIC chose M = 1" in (folder / "bank.json").read_text(encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CMDAWarning)  # loading does not warn again
        loaded = EmbeddingBank.load(folder)
    assert loaded.metadata["dca_inert"] == str(caught[0].message)
    assert np.isfinite(list(loaded.metadata["n_components_scores"].values())).all()


# ------------------------------------------------------------------ components too small to fit
def few_rows(n: int = 40, d: int = 16) -> torch.Tensor:
    """Too few rows for more than one full d x d covariance: BIC alone rewards singular components."""
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_bic_choice_skips_components_smaller_than_their_covariance_needs():
    x = few_rows()
    n, d = x.shape
    bank, caught = build(x)
    scores = {int(m): s for m, s in bank.metadata["n_components_scores"].items()}
    degenerate = {int(m): rows for m, rows in bank.metadata["n_components_degenerate"].items()}
    # BIC alone prefers an M whose components are singular fits (fewer than d + 1 rows) ...
    overall = min(scores, key=scores.get)
    assert overall in degenerate and degenerate[overall] < d + 1
    data = x.double().numpy()
    sk = SklearnGMM(overall, covariance_type="full", random_state=0).fit(data)  # scikit-learn agrees they are
    assert float(sk.weights_.min()) * n < d + 1
    # ... so the choice is the best M among those whose every component has d + 1 rows
    allowed = {m: s for m, s in scores.items() if m not in degenerate}
    assert bank.n_components == min(allowed, key=allowed.get)
    assert bank.n_components == 1 or float(bank.gmm.weights_.min()) * n >= d + 1
    messages = [str(w.message) for w in caught]
    assert any("smallest component holds fewer rows than its covariance needs (17" in m and
               f"Chose M = {bank.n_components}" in m for m in messages), messages


def small_cluster(d: int = 8) -> torch.Tensor:
    """Two clusters of 40 rows and one of 5, far apart, in d = 8 dimensions."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, d, generator=g) * 20
    return torch.cat([centers[0] + torch.randn(40, d, generator=g), centers[1] + torch.randn(40, d, generator=g),
                      centers[2] + torch.randn(5, d, generator=g)])


def test_a_five_row_cluster_is_a_component_for_diagonal_but_not_for_full_covariances():
    """Five rows estimate a diagonal variance (2 needed) but not an 8 x 8 covariance (9 needed)."""
    x = small_cluster()
    diag, _ = build(x, covariance_type="diag")
    assert diag.n_components == 3 and diag.metadata["n_components_degenerate"] == {}
    assert sorted(round(float(w) * len(x)) for w in diag.gmm.weights_) == [5, 40, 40]
    full, caught = build(x)
    degenerate = {int(m): rows for m, rows in full.metadata["n_components_degenerate"].items()}
    scores = {int(m): s for m, s in full.metadata["n_components_scores"].items()}
    assert min(scores, key=scores.get) == 3 and degenerate[3] == pytest.approx(5.0)  # BIC alone: the 5 rows
    assert full.n_components == 2 and float(full.gmm.weights_.min()) * len(x) >= 9
    assert any("Chose M = 2" in str(w.message) for w in caught)


def test_when_every_candidate_is_too_small_the_criterion_decides_and_says_so():
    x = few_rows()
    bank, caught = build(x, candidates=[4, 5])
    scores = {int(m): s for m, s in bank.metadata["n_components_scores"].items()}
    assert set(bank.metadata["n_components_degenerate"]) == {"4", "5"}
    assert bank.n_components == min(scores, key=scores.get)
    assert bank.gmm.n_components == bank.n_components  # the model fitted while choosing, not another
    assert any("Every candidate is like that, so BIC's own choice is kept" in str(w.message) for w in caught)


def test_well_filled_components_leave_the_choice_to_bic_as_in_sklearn():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 4, generator=g) * 6
    x = centers[torch.arange(600) % 3] + torch.randn(600, 4, generator=g)
    bank, caught = build(x)
    assert bank.metadata["n_components_degenerate"] == {} and not caught
    data = x.double().numpy()
    reference = {m: SklearnGMM(m, covariance_type="full", random_state=0).fit(data).bic(data) for m in range(1, 7)}
    assert bank.n_components == min(reference, key=reference.get) == 3
