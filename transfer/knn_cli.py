"""python -m transfer knn: the classification command with the kNN protocol."""
from transfer.classification_cli import add_arguments, run_knn as run  # noqa: F401
