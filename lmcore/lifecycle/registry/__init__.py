"""The model registry side of the lifecycle, one module per reason to change:

- `uris`: `models:/` URIs, the MLflow client, the local (verified) copies of a registered version;
- `candidate`: what a workspace would register, its eval metrics and the gate metric, a `Registration`;
- `register`: logging the model with its lineage tags and registering a version (idempotent by lineage);
- `gate`: the promotion gate's pure rules (the decision, the quality floor, the eval fingerprint);
- `lease`: the lease that serialises concurrent gates on one registered model;
- `promotion`: the gate at work: challenger alias, champion re-scored by the LM library when the data differ;
- `aliases`: champion history, promote, rollback, the list of versions;
- `reproduce`: a version's recipe and its rebuild from scratch.

Import from the module that holds a name; this package re-exports nothing, so loading one concern (say, resolving
a `models:/` URI for `lmcycle generate`) loads none of the others.
"""
