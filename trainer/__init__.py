"""Everything that runs inside a stage: data, the PSFT objective, engines, eval, storage."""
