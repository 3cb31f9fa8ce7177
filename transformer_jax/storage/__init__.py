"""Storage: local and gs:// paths, the workdir and what is in it, and its one-writer lock."""
