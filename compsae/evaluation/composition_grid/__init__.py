"""The composition grid: pair-graph ground truth over many designs, an oracle per cell, the shipped
composer against a TopK with a post-hoc pair statistic, label-free calls, validation / test
split."""
