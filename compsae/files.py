"""Every file and folder name the stages write and read, in one place: a stage finds another
stage's files through these names, never through a literal of its own."""

from __future__ import annotations

# a stage folder <runs_root>/<pipeline>/<stage>-<hash>/
STAGE_RECORD = "stage.json"  # written last: its presence means the stage is done
STAGE_LOCK = ".stage.lock"  # the one lock of a stage folder (the train stage takes it itself)
PIPELINE_REPORT = "report.html"  # <runs_root>/<pipeline>/report.html, over every stage

# harvest (and the ground-truth data source)
STORE_DIR = "store.zarr"
GROUND_TRUTH_JSON = "ground_truth.json"  # inside a ground-truth store
GROUND_TRUTH_TENSORS = "ground_truth.safetensors"  # inside a ground-truth store

# train: one folder per model
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # the checkpoint's metadata; its presence marks a model folder
STATE_FILE = "train_state.safetensors"
TRAIN_METRICS = "metrics.jsonl"
TRAINING_CURVES = "training_curves.png"  # in the train stage folder, every model on one figure

# analyze
ANALYSIS_REPORT = "report.html"
ANALYSIS_METRICS = "metrics.json"
ANALYSIS_METRICS_TABLE = "metrics.parquet"
LATENTS_TABLE = "latents.parquet"
TOP_CONTEXTS_TABLE = "top_contexts.parquet"
FIGURES_DIR = "figures"
BROWSER_DIR = "browser"  # browser/<model>.html: the feature browser

# evaluate
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
PAIR_SCORES_PNG = "pair_scores.png"

# probe
PROBES_JSON = "probes.json"
PROBES_MD = "probes.md"
PROBES_PNG = "probes.png"
