"""caption.py's parts: where it runs and with how much (placement.py)."""
