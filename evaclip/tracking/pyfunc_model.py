"""The logged pyfunc model, as code (MLflow's models-from-code): loading it runs this file, never unpickles."""

from mlflow.models import set_model

from evaclip.tracking.pyfunc import EvaClipModel

set_model(EvaClipModel())
