"""MLflow tracking: the `tracking` params section (`config`) and the tracker (`tracker`;
mlflow is imported inside its functions)."""
