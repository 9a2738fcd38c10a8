"""The plumbing a reader can skip: command lines, HTTP, the hub, JSONL files, decode workers,
memory plans."""
