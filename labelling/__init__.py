"""label.py's parts: the runner its modes share (run.py: the client, the decoders, --out resumed,
the counts), the rules that clean a teacher's labels (clean.py), and the checks that compare them
with a student's captions or a second source's (checks.py)."""
