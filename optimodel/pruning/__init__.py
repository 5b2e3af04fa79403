"""Pruning mechanics behind the `prune` pass, one technique per module.

`magnitude` (unstructured zeros), `nm` (N:M semi-structured zeros), `channel` (whole
output channels physically removed), `search` (accuracy-budget back-off) and
`recovery` (least-squares re-fit on calibration activations). The pass in
`optimodel.passes.prune` picks one and reports what it bought.
"""
