"""MLflow tracking: where runs and models are kept, what each run records, and how a model becomes champion.

    store.py      the tracking store of a project: URI, creation/migration under a lock, clients
    flatten.py    nested params/metrics -> MLflow's flat keys and bounded values
    runs.py       a stage's run (child of the pipeline run), its params, metrics, artifacts and lineage tags
    promotion.py  the promotion decision: gates + "beats the champion" (pure, no MLflow)
    logged_model.py  the final model as an MLflow (pyfunc) Model: log it (copy or reference), its digest, metrics
    chat_model.py the pyfunc itself (models-from-code: copied into every registered model, never imported)
    registry.py   registered versions, the champion/candidate aliases, manual promote and rollback
    ui.py         the `mlflow ui` command line for a project's store, and the URLs of its runs and model pages

This package knows nothing of DVC or Prefect: callers pass a project root, run ids and lineage dicts. The pipeline
run itself (one per flow execution) is the flow's business: flows/pipeline_runs.py.
"""
