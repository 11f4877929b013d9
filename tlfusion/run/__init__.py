"""The run folder: its paths, checked readers of what stages wrote, and the stages' code keys."""
