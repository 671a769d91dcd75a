"""lmcore: the model, data, training, evaluation and registry code shared by every lmcycle stage.

It never imports Prefect or the `flows` package; heavy libraries (torch, transformers, mlflow) are imported
inside the functions that need them so that light commands start fast.
"""

__version__ = "0.1.0"
