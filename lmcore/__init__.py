"""lmcore: the LM library (model, kernels, decoding, tokenizer, data, training, fine-tuning, metrics) and, in
`lmcore.lifecycle`, the lifecycle layer that every lmcycle stage runs on top of it.

The library never imports the lifecycle layer, DVC, MLflow, Prefect or `flows`; heavy libraries (torch,
transformers, mlflow) are imported inside the functions that need them so that light commands start fast.
"""

__version__ = "0.1.0"
