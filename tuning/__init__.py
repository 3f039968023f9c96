"""hptune's search side: MANY configurations of one model, searched on Ray Tune with Optuna.
It never knows how an epoch runs (that is `trainable`). The Python API is `hptune.search`."""
