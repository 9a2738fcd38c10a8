"""The plumbing a reader can skip: command lines, HTTP, the hub, JSONL files, sources, decode
workers. A leaf: it imports nothing of the project outside it."""
