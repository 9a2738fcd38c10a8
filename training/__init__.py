"""train.py's parts: what trains and where (trainable.py: the model built or loaded, LoRA, FSDP2),
what a run leaves and resumes from (trainstate.py), and the data it reads (dataset.py)."""
