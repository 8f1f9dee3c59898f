"""Task probes (arithmetic, boolean, grammar) and k-sparse probing: the `probe` stage."""
