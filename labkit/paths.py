"""Where the course's files live, so every module finds them the same way."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "data" / "corpus"
EVAL_DIR = REPO_ROOT / "data" / "eval"
COURSE_MODEL_DIR = REPO_ROOT / "course_model"
# models provisioned by `make setup` (converted, never committed: see .gitignore)
MODELS_DIR = REPO_ROOT / "models"
SMOLLM2_DIR = MODELS_DIR / "SmolLM2-135M-Instruct"
RESULTS_DIR = REPO_ROOT / "results"
