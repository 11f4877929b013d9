"""`fuse` and the `FeatureFusion` transformer: a scikit-learn transformer, block L2, PCA, refused inputs, and its
backward map."""

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from tlfusion.errors import InputError
from tlfusion.features.fusion import FeatureFusion, fuse


def test_fuse_concatenates_blocks_and_reports_their_sizes():
    X, sizes = fuse([np.ones((3, 2)), np.zeros((3, 4))])
    assert X.shape == (3, 6) and X.dtype == np.float32 and sizes == [2, 4]
    with pytest.raises(InputError, match="block 1 has 2 rows"):
        fuse([np.ones((3, 2)), np.ones((2, 2))])


@parametrize_with_checks(
    [FeatureFusion(), FeatureFusion(l2=True), FeatureFusion(standardize=False, l2=True, pca=0.9), FeatureFusion(pca=1)]
)
def test_feature_fusion_is_a_scikit_learn_transformer(estimator, check):
    check(estimator)


def test_l2_gives_each_block_unit_norm():
    X = np.random.default_rng(0).normal(size=(20, 7))
    Z = FeatureFusion(block_sizes=[3, 4], l2=True).fit_transform(X)
    np.testing.assert_allclose(np.linalg.norm(Z[:, :3], axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(Z[:, 3:], axis=1), 1, rtol=1e-6)


def test_pca_by_count_or_variance_fraction():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 2)) @ rng.normal(size=(2, 10)) + 1e-3 * rng.normal(size=(30, 10))
    assert FeatureFusion(pca=4).fit_transform(X).shape == (30, 4)
    by_variance = FeatureFusion(standardize=False, pca=0.99).fit(X)
    assert by_variance.pca_.n_components_ == 2
    assert list(by_variance.get_feature_names_out()) == ["pca0", "pca1"]


def test_fusion_refuses_non_finite_rows_and_bad_settings():
    X = np.ones((5, 4))
    X[1, 0], X[3, 2] = np.nan, np.inf
    with pytest.raises(InputError, match="NaN or inf in 2 of 5 rows"):
        FeatureFusion().fit(X)
    with pytest.raises(InputError, match="block_sizes sum to 5"):
        FeatureFusion(block_sizes=[2, 3]).fit(np.ones((5, 4)))
    with pytest.raises(InputError, match="pca"):
        FeatureFusion(pca=1.5).fit(np.ones((5, 4)))


@pytest.mark.parametrize("settings", [{}, {"l2": True}, {"l2": True, "pca": 3}, {"standardize": False, "l2": True}])
def test_backward_is_the_gradient_of_a_score_on_the_transformed_features(settings):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 6))
    fusion = FeatureFusion(block_sizes=[2, 4], **settings).fit(X)
    weights = rng.normal(size=fusion.transform(X[:1]).shape[1])
    gradient, step = fusion.backward(X[:3], weights), 1e-6
    for row in range(3):
        for column in range(6):
            moved = X[row : row + 1].copy()
            moved[0, column] += step
            change = (fusion.transform(moved) - fusion.transform(X[row : row + 1])) @ weights
            assert change[0] / step == pytest.approx(gradient[row, column], rel=1e-4, abs=1e-6)
    assert [block.shape[1] for block in fusion.blocks(gradient)] == [2, 4]
