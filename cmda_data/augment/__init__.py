"""The entry points: one base, four doors to the same plan.

* :class:`~cmda_data.CrossModalAugmentedDataset` (:mod:`~cmda_data.augment.dataset`): per sample;
* :class:`~cmda_data.CMDACollate` (:mod:`~cmda_data.augment.collate`): per batch, in ``collate_fn``;
* :class:`~cmda_data.CMDAugment` (:mod:`~cmda_data.augment.module`): per batch, an ``nn.Module``
  after the DataLoader, on any device;
* :class:`~cmda_data.CandidateBuffer` (:mod:`~cmda_data.augment.buffer`): webdataset streams.
"""
