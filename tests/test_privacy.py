"""The DP mechanism: flat clipping, noise of the right size in each placement, equal weights."""

from __future__ import annotations

import math

import pytest
import torch

from plateau.privacy.mechanism import (
    GaussianClientDP,
    clip_flat,
    flat_norm,
    weighted_mean,
)
from plateau.privacy.noise import ChaChaSource, add_noise


def source() -> ChaChaSource:
    return ChaChaSource.from_os()


def test_flat_norm_is_one_norm_over_all_tensors() -> None:
    assert flat_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0, 0.0]])}) == 5.0


def test_clip_scales_the_whole_update_to_c() -> None:
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # norm 5
    clipped, norm = clip_flat(update, 1.0)
    assert norm == 5.0
    assert flat_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    # flat: one common factor C/||v|| = 0.2 (per-tensor clipping would give a = [1, 0], b = [1])
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([0.8]))


def test_updates_under_c_are_untouched() -> None:
    update = {"a": torch.tensor([0.3, -0.4]), "b": torch.tensor([0.0])}
    clipped, norm = clip_flat(update, 1.0)
    assert norm == pytest.approx(0.5)
    for k in update:
        assert torch.equal(clipped[k], update[k])
        assert clipped[k] is not update[k]


@pytest.mark.parametrize("scale", [1e-3, 0.99, 1.0, 7.0, 1e6])
def test_clipped_norm_never_exceeds_c(scale: float) -> None:
    gen = torch.Generator().manual_seed(1)
    update = {"w": torch.randn(50, 20, generator=gen) * scale, "b": torch.randn(20, generator=gen)}
    clipped, _ = clip_flat(update, 0.7)
    assert flat_norm(clipped) <= 0.7 * (1 + 1e-6)


def aggregate_noise(placement: str, sigma: float, clip: float, cohort: int, dim: int
                    ) -> torch.Tensor:
    """Run `cohort` all-zero updates through the mechanism; what comes out is pure noise (on the
    sum, i.e. multiplied back by the cohort size)."""
    mechanism = GaussianClientDP(clip, sigma, placement=placement)
    zeros = {"w": torch.zeros(dim)}
    uploads = [mechanism.release(zeros, cohort, source())[0] for _ in range(cohort)]
    mean = mechanism.aggregate(uploads, cohort, zeros, source())
    return mean["w"] * cohort


@pytest.mark.parametrize(("placement", "sigma_on_sum"),
                         [("central", 0.5), ("distributed", 0.5), ("local", 0.5 * math.sqrt(8))])
def test_noise_std_matches_each_placement(placement: str, sigma_on_sum: float) -> None:
    noise = aggregate_noise(placement, sigma=0.5, clip=2.0, cohort=8, dim=200_000)
    mechanism = GaussianClientDP(2.0, 0.5, placement=placement)
    expected = mechanism.effective_noise_multiplier(8, 200_000) * 2.0
    # the server adds what shares are not credited with: a few percent at this many coordinates
    assert sigma_on_sum * 2.0 <= expected <= 1.1 * sigma_on_sum * 2.0
    # sample std of 200k draws: relative standard error ~ 1/sqrt(2n) = 0.16%, so 2% is > 10 SE
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 6 * expected / math.sqrt(200_000)  # 2e-9 a run


def test_noise_std_on_the_mean_is_sigma_c_over_m() -> None:
    mechanism = GaussianClientDP(1.0, 0.8, placement="central")
    zeros = {"w": torch.zeros(100_000)}
    mean = mechanism.aggregate([zeros] * 10, 10, zeros, source())
    assert mean["w"].std().item() == pytest.approx(0.8 * 1.0 / 10, rel=0.02)


def test_client_noise_shares_and_the_server_top_up() -> None:
    dim = 100_000  # enough coordinates for the norm test to verify shares
    mechanism = GaussianClientDP(2.0, 0.5, placement="distributed")
    share = 0.5 * 2.0 / 2
    assert mechanism.client_noise_std(4) == pytest.approx(share)
    assert mechanism.verifies_shares(dim, 4)
    credited = mechanism.credited_share(dim, 4)
    assert 0.85 * share ** 2 < credited < share ** 2  # what a passing norm proves
    uncredited = 4 * (share ** 2 - credited)
    assert mechanism.server_noise_std(4, 4, dim) ** 2 == pytest.approx(uncredited)
    # one of four shares missing: the server also adds the missing variance (sigma C)^2 / 4
    assert mechanism.server_noise_std(4, 3, dim) ** 2 == pytest.approx(uncredited + share ** 2)
    central = GaussianClientDP(2.0, 0.5, placement="central")
    assert central.client_noise_std(4) == 0.0
    assert central.server_noise_std(4, 4, dim) == pytest.approx(1.0)
    local = GaussianClientDP(2.0, 0.5, placement="local")
    assert local.client_noise_std(4) == pytest.approx(1.0)
    # two of four local uploads missing: two shares of (sigma C)^2 plus the uncredited part
    local_uncredited = 4 * (1.0 - local.credited_share(dim, 4))
    assert local.server_noise_std(4, 2, dim) ** 2 == pytest.approx(2 * 1.0 + local_uncredited)


def test_a_partly_lazy_client_cannot_thin_the_noise() -> None:
    """Every accepted upload is credited only with what its norm proves, whatever noise it
    really carries: with uploads that just pass the floor, the sum still carries (sigma C)^2."""
    mechanism = GaussianClientDP(1.0, 2.0, placement="distributed")
    dim, cohort = 2_000, 20
    share = mechanism.client_noise_std(cohort)
    floor = mechanism.share_floor(dim, cohort)
    # the least noise a passing upload can carry: its norm at the floor, all of it noise
    thinnest = (floor - 1.0) / math.sqrt(dim)
    carried = cohort * min(thinnest, share) ** 2 + mechanism.server_noise_std(cohort, cohort,
                                                                              dim) ** 2
    assert carried >= (2.0 * 1.0) ** 2 * 0.999


def test_unverifiable_shares_are_not_trusted() -> None:
    """With few released coordinates an upload without its share cannot be told apart, so the
    server adds the whole target itself plus the missing shares: a constant 2 (sigma C)^2."""
    mechanism = GaussianClientDP(1.0, 1.0, placement="distributed")
    assert not mechanism.verifies_shares(50, 10)
    assert mechanism.server_noise_std(10, 10, 50) == pytest.approx(1.0)
    assert mechanism.server_noise_std(10, 6, 50) ** 2 == pytest.approx(1.0 + 4 * 0.1)
    assert mechanism.effective_noise_multiplier(10, 50) == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize(("placement", "std_on_sum"),
                         [("central", 0.6 * 1.5), ("distributed", 0.6 * 1.5),
                          ("local", 0.6 * 1.5 * math.sqrt(5))])
def test_a_failed_client_does_not_change_the_noise_on_the_sum(placement: str,
                                                              std_on_sum: float) -> None:
    """The aggregate's noise is the same however many of the m clients replied: the count
    cannot be read from the model."""
    mechanism = GaussianClientDP(1.5, 0.6, placement=placement)
    zeros = {"w": torch.zeros(200_000)}
    uploads = [mechanism.release(zeros, 5, source())[0] for _ in range(3)]  # 2 of 5 fail
    total = mechanism.aggregate(uploads, 5, zeros, source())["w"] * 5
    expected = mechanism.effective_noise_multiplier(5, 200_000) * 1.5
    assert std_on_sum <= expected <= 1.1 * std_on_sum
    assert total.std().item() == pytest.approx(expected, rel=0.02)


def test_release_clips_before_noising_and_reports_the_pre_clip_norm() -> None:
    mechanism = GaussianClientDP(1.0, 0.0, placement="local")
    released, report = mechanism.release({"w": torch.tensor([6.0, 8.0])}, 5, source())
    assert report.norm == pytest.approx(10.0) and report.clipped
    assert torch.allclose(released["w"], torch.tensor([0.6, 0.8]))


def test_dp_mean_divides_by_the_expected_cohort_not_the_replies() -> None:
    mechanism = GaussianClientDP(10.0, 0.0, placement="central")
    template = {"w": torch.zeros(2)}
    uploads = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    mean = mechanism.aggregate(uploads, cohort=2.5, template=template,
                               source=source())
    assert torch.allclose(mean["w"], torch.tensor([1.6, 2.4]))  # (1+3)/2.5, (2+4)/2.5


def test_equal_and_weighted_means() -> None:
    template = {"w": torch.zeros(1)}
    updates = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}]
    assert weighted_mean(updates, [1.0, 1.0], template)["w"].item() == pytest.approx(2.5)
    assert weighted_mean(updates, [3.0, 1.0], template)["w"].item() == pytest.approx(1.75)


def test_server_accepts_only_clipped_uploads_in_central_placement() -> None:
    central = GaussianClientDP(1.0, 1.0, placement="central")
    assert central.screen(1.0, 100, 4) is None
    assert central.screen(1.001, 100, 4) == "norm-exceeds-bound"


@pytest.mark.parametrize("placement", ["distributed", "local"])
def test_noised_uploads_are_bounded_by_c_plus_their_noise(placement: str) -> None:
    mechanism = GaussianClientDP(1.0, 2.0, placement=placement)
    dim, cohort = 10_000, 4
    for _ in range(20):  # honest uploads: clipped update plus the client's noise
        update = {"w": torch.randn(dim) * 5}
        released, _ = mechanism.release(update, cohort, source())
        assert mechanism.screen(flat_norm(released), dim, cohort) is None
    noise_norm = mechanism.client_noise_std(cohort) * math.sqrt(dim)
    assert mechanism.screen(1.0 + noise_norm * 1.5, dim, cohort) == "norm-exceeds-bound"
    assert mechanism.screen(1e30, dim, cohort) == "norm-exceeds-bound"


@pytest.mark.parametrize("placement", ["distributed", "local"])
@pytest.mark.parametrize("share", [0.0, 0.5, 0.8])
def test_uploads_missing_their_noise_share_are_rejected(placement: str, share: float) -> None:
    """A lazy client (no noise, or part of its share) would leave the aggregate with less noise
    than accounted: its upload is rejected and the server tops the share up instead."""
    mechanism = GaussianClientDP(1.0, 1.0, placement=placement)
    dim, cohort = 10_000, 20
    update = {"w": torch.randn(dim)}
    lazy = GaussianClientDP(1.0, share, placement=placement)
    released, _ = lazy.release(update, cohort, source())
    assert mechanism.screen(flat_norm(released), dim, cohort) == "noise-share-missing"
    honest, _ = mechanism.release(update, cohort, source())
    assert mechanism.screen(flat_norm(honest), dim, cohort) is None


def test_effective_noise_multiplier_is_at_least_the_accounted_one() -> None:
    dim = 100_000
    distributed = GaussianClientDP(1.0, 1.2, placement="distributed")
    assert 1.2 <= distributed.effective_noise_multiplier(10, dim) <= 1.2 * 1.1
    assert GaussianClientDP(1.0, 1.2).effective_noise_multiplier(10, dim) == pytest.approx(1.2)
    local = GaussianClientDP(1.0, 1.2, placement="local")
    assert local.accounted_noise_multiplier(4) == pytest.approx(1.2 * 2)
    assert 1.2 * 2 <= local.effective_noise_multiplier(4, dim) <= 1.2 * 2 * 1.1


def test_noise_is_not_reproducible_from_any_public_seed() -> None:
    torch.manual_seed(0)
    first = add_noise(torch.zeros(1000), 1.0, source())
    torch.manual_seed(0)
    second = add_noise(torch.zeros(1000), 1.0, source())
    assert not torch.equal(first, second)


def test_noise_is_drawn_on_the_tensor_device_and_dtype() -> None:
    out = add_noise(torch.zeros(3, dtype=torch.float64), 1.0, source())
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    out32 = add_noise(torch.zeros(3), 1.0, source())
    assert out32.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_is_generated_on_cuda() -> None:
    out = add_noise(torch.zeros(3, device="cuda"), 1.0, source())
    assert out.device.type == "cuda"


def test_invalid_mechanism_is_refused() -> None:
    with pytest.raises(ValueError, match="placement"):
        GaussianClientDP(1.0, 1.0, placement="server")
    with pytest.raises(ValueError, match="clip_norm"):
        GaussianClientDP(0.0, 1.0)
