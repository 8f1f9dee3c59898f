"""The pipeline: its config schema, the stage runner and the pipeline report."""
