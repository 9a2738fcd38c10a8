"""train.py's parts: what trains and where (trainable.py: the model built or loaded, LoRA, FSDP2),
what a run leaves and resumes from (trainstate.py), the data it reads (dataset.py), and what each
step reports (steplog.py)."""
