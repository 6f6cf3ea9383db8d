"""PSFTJob schema, validation, the stage DAG and its renderers (Argo, local)."""
