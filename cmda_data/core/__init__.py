"""The math of CMDA, free of the rest of the package (it imports only :mod:`cmda_data.exceptions`).

* :mod:`~cmda_data.core.functional`: Eq. 10/11 and the mix as pure tensor functions;
* :mod:`~cmda_data.core.plan`: :class:`~cmda_data.MixPlan`, the record of one batch's draws, and
  :mod:`~cmda_data.core.build`, the one function that builds it;
* :mod:`~cmda_data.core.mixture`: :class:`~cmda_data.GaussianMixture` (scikit-learn's contract);
* :mod:`~cmda_data.core.losses`: the contrastive losses of Eq. 7/8/9.
"""
