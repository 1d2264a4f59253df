"""Where the course's shipped files live, so every module finds them the same way."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "data" / "corpus"
COURSE_MODEL_DIR = REPO_ROOT / "course_model"
RESULTS_DIR = REPO_ROOT / "results"
